"""make book (shared/book.py): a page for every step, whose diff is make diff's, whose links resolve and whose
diary is rendered; a bad diary costs its page one line, not the book; and every page loads in a real Chromium at a
desktop and a phone width, with no error and no sideways scroll. Screenshots go to runs/book-shots/."""
import argparse
import errno
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared import book
from shared.steps import ROOT, STEPS_DIR, all_steps
from tests.conftest import ctrl_c_as_in_a_terminal, data_dir_copy

PAGES = ["index.html", *(f"{s}.html" for s in all_steps())]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The book as `make book` writes it, from a process of its own, with one run of step 10 to draw."""
    tmp = tmp_path_factory.mktemp("book")
    run = tmp / "runs" / "10_training"
    run.mkdir(parents=True)
    rows = [{"iter": i, "loss": 10.0 - i / 10} | ({"val_loss": 9.5 - i / 10} if i % 10 == 0 else {})
            for i in range(41)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, "-m", "shared.book", "--out", str(tmp / "book"), "--runs", str(tmp / "runs")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "open file://" in r.stdout
    return tmp / "book"


def text_of(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def section(page: str, anchor: str) -> str:
    return page.split(f'<section id="{anchor}">', 1)[1].split("</section>", 1)[0]


def test_every_step_has_a_page_linked_from_the_index(built):
    index = (built / "index.html").read_text()
    for name in PAGES[1:]:
        assert (built / name).exists() and f'href="{name}"' in index


def diff_ru_lines(prev: str, step: str) -> list[tuple[str, str]]:
    """The added and removed lines of `diff -ru`, as make diff prints them: (sign, text)."""
    out = subprocess.run(["diff", "-ru", "-x", "__pycache__", f"steps/{prev}", f"steps/{step}"], cwd=ROOT,
                         capture_output=True, text=True).stdout.splitlines()
    lines, header = [], 0
    for line in out:
        if line.startswith("diff -ru"):
            header = 2  # the --- and +++ lines that follow name the files
        elif header:
            header -= 1
        elif line[:1] in "+-":
            lines.append((line[0], line[1:]))
    return lines


# ids "page02", not the step's name: the book lists a step's tests by the step's name in their ids
@pytest.mark.parametrize("name", all_steps()[1:], ids=lambda s: f"page{s[:2]}")
def test_each_page_shows_exactly_the_added_and_removed_lines_of_diff_ru(built, name):
    prev = all_steps()[all_steps().index(name) - 1]
    page = section((built / f"{name}.html").read_text(), "diff")
    shown = [("+" if kind == "add" else "-", text_of(code))
             for kind, code in re.findall(r'<tr class="(add|del)">.*?<span class="sign">.</span>(.*?)</td></tr>', page)]
    assert shown == diff_ru_lines(prev, name)


@pytest.mark.parametrize("name", PAGES, ids=lambda p: p.split("_")[0].replace(".html", ""))
def test_every_internal_link_and_image_resolves(built, name):
    page = (built / name).read_text()
    for target in re.findall(r'(?:href|src)="([^"]+)"', page):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = html.unescape(target).partition("#")
        file = built / name if not path else (built / path).resolve()
        assert file.exists(), f"{name}: {target} does not exist"
        if anchor:
            assert f'id="{anchor}"' in file.read_text(), f"{name}: {target} has no such anchor"


@pytest.mark.parametrize("name", all_steps(), ids=lambda s: f"page{s[:2]}")
def test_every_diary_is_rendered_with_no_markdown_left_in_its_text(built, name):
    diary = section((built / f"{name}.html").read_text(), "diary")
    prose = text_of(re.sub(r"<(pre|code)\b.*?</\1>", "", diary, flags=re.S))
    assert "<h3 id=" in diary and "**" not in prose and "`" not in prose
    assert "|---" not in prose and "](" not in prose and not re.search(r"^#", prose, re.M)  # tables, links, headings


@pytest.mark.parametrize("name", PAGES)
def test_no_page_shows_a_markdown_backtick_outside_its_code(built, name):
    code = r"<(pre|code|style)\b.*?</\1>|<table class=\"diff.*?</table>"  # code blocks, inline code, diffs
    prose = text_of(re.sub(code, "", (built / name).read_text(), flags=re.S))
    assert "`" not in prose, prose[max(0, prose.find("`") - 80):][:160]


@pytest.mark.parametrize("name", ["01_embedding", "10_training", "16_ddp", "17_fineweb_hellaswag"])
def test_a_diarys_part_on_the_commands_edges_is_folded_after_the_lesson(built, name):
    diary = section((built / f"{name}.html").read_text(), "diary")
    lesson, edges = diary.split('<details class="edges"><summary><h3 id="diary-the-commands-edges">')
    assert "What this step adds" in lesson and "</details>" in edges and "<details" not in lesson  # closed: no open


def test_every_id_on_a_page_is_its_own_and_a_diarys_headings_have_one(built):
    for name in PAGES:
        page = (built / name).read_text()
        ids = re.findall(r'\bid="([^"]+)"', page)
        assert len(ids) == len(set(ids)), f"{name}: {sorted(i for i in ids if ids.count(i) > 1)}"
        assert not re.search(r"<h[3-6]>", section(page, "diary") if name != "index.html" else "")
    assert 'href="#diary-the-commands-edges"' in (built / "10_training.html").read_text()  # the diary's own link


def test_diary_nn_in_a_diarys_prose_links_to_that_steps_page(built):
    page = (built / "13_vocab_50304.html").read_text()
    assert '<a href="11_mixed_precision.html">diary 11</a>' in page  # "(step 11's bf16 runs: 21%, diary 11)"
    assert re.search(r'<a href="[^"]*/docs/bench.md"><code>docs/bench.md</code></a>', page)


@pytest.mark.parametrize("name", all_steps(), ids=lambda s: f"page{s[:2]}")
def test_every_table_of_a_diary_is_an_html_table(built, name):
    text = (ROOT / "diary" / f"{name}.md").read_text()
    tables = len(re.findall(r"^\|? *:?-{3,}.*\|.*$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M))
    assert section((built / f"{name}.html").read_text(), "diary").count("<table") == tables


def test_the_code_of_a_diff_and_of_a_diarys_shell_block_is_highlighted(built):
    page = (built / "08_gpt2.html").read_text()
    assert re.search(r'<span class="k[nd]?">', section(page, "diff"))  # a keyword: def, class, import
    blocks = re.findall(r"<pre[^>]*><code>.*?</code></pre>", section(page, "diary"), re.S)
    shell = [b for b in blocks if text_of(b).startswith("make step N=08")]  # diary 08's ```sh block
    assert shell and '<span class="nv">N</span>' in shell[0]  # N= highlighted as a variable


def test_a_test_named_in_the_diary_links_to_it_in_the_pages_list_of_tests(built):
    page = (built / "08_gpt2.html").read_text()
    name = "test_gpt2_small_has_124_439_808_parameters"
    assert f'<a href="#{name}"><code>{name}</code></a>' in section(page, "diary")
    assert f'<li id="{name}">' in section(page, "tests")


def test_a_test_of_the_whole_suite_named_in_the_diary_links_to_its_file(built):
    diary = section((built / "17_fineweb_hellaswag.html").read_text(), "diary")
    name = "test_shards_are_uint16_in_build_nanogpts_layout_with_validation_first"  # make data's: no step
    up = Path(os.path.relpath(ROOT, built.resolve())).as_posix()  # the book's links to the project's files
    assert f'<a href="{up}/tests/test_shards.py"><code>{name}</code></a>' in diary


def test_a_file_new_in_a_step_is_shown_whole_as_added_lines(built):
    diff = section((built / "17_fineweb_hellaswag.html").read_text(), "diff")
    new = diff.split('id="diff-hellaswag.py"', 1)[1].split("</details>", 1)[0]
    assert "<details open>" in new and new.count('<tr class="add">') == len(
        (STEPS_DIR / "17_fineweb_hellaswag" / "hellaswag.py").read_text().splitlines())


def test_a_page_shows_whole_the_shared_code_its_step_is_the_first_to_import(built):
    diff = section((built / "17_fineweb_hellaswag.html").read_text(), "diff")  # make data's pipeline: half its lesson
    shards = diff.split('id="shared-shards.py"', 1)[1].split("</details>", 1)[0]
    assert shards.count("<tr") == len((ROOT / "shared" / "shards.py").read_text().splitlines())
    assert 'id="shared-' not in section((built / "18_kv_cache.html").read_text(), "diff")  # 17's, not 18's too


def test_a_page_without_shapes_still_gives_the_parameters_at_gpt2s_size(built):
    shapes = text_of(section((built / "09_from_pretrained.html").read_text(), "shapes"))
    assert "124,439,808 parameters" in shapes


def test_a_page_shows_the_shapes_and_the_parameters_of_the_steps_run(built):
    page = (built / "08_gpt2.html").read_text()
    shapes = text_of(section(page, "shapes"))
    assert "lm_head" in shapes and "(4, 32, 50257)" in shapes and "124,439,808 parameters" in shapes


def test_the_last_runs_loss_curve_is_drawn_inline_with_its_validation_points(built):
    curve = section((built / "10_training.html").read_text(), "curve")
    assert "<svg" in curve and curve.count("<polyline") == 2 and "5 validation points" in curve


def test_a_step_without_a_run_says_how_to_make_one_where_make_book_will_find_it(built):
    curve = text_of(section((built / "11_mixed_precision.html").read_text(), "curve"))
    runs = (built.parent / "runs").resolve()  # built with --runs: the run must go there, and the book look there
    assert (f'make step N=11 ARGS="--out {runs}/11_mixed_precision" writes {runs}/11_mixed_precision/metrics.jsonl, '
            f'and the next make book ARGS="--runs {runs}" draws its loss curve here') in curve


def test_the_index_names_the_reference_every_step_matches(built):
    index = (built / "index.html").read_text()
    rows = re.findall(r"<tr><td><a .*?</tr>", index)
    assert len(rows) == len(all_steps())  # a row a step: the loop below checks every one
    for row in rows:
        assert text_of(re.findall(r"<td>(.*?)</td>", row)[-1]).strip(), row  # the cell after the parameters


def test_the_index_says_when_and_where_its_bench_column_was_measured(built):
    _, _, _, measured = book.readme_parts((ROOT / "README.md").read_text())
    assert measured.startswith("The ladder of 20") and " on " in measured  # a date and a machine
    assert html.escape(measured) in (built / "index.html").read_text()


def test_an_escaped_pipe_in_the_readmes_steps_table_stays_in_its_cell():
    _, refs, _, _ = book.readme_parts("intro\n| 17 | `17_x` | `<\\|endoftext\\|>` first | decoded shards |\n")
    assert refs == {"17_x": "decoded shards"}


def test_the_readmes_ladder_gives_each_steps_ms_spread_and_vs_10_and_no_row_for_the_control():
    readme = ("intro\n## The speed ladder\n\n```\n"
              "step        ms/iter  spread clock ms  tokens/s  vs 10    MFU\n"
              "----------------------------------------------------------\n"
              "10_training  5637.1    0.2%     42.0       182  1.00x  38.0%\n"
              "11_mixed     3059.4    0.3%     42.3       335  1.84x  69.9%\n"
              "11_mixed again 3060.0  0.4%     42.1       334  1.84x  69.8%\n```\n")
    _, _, ladder, _ = book.readme_parts(readme)
    assert ladder == {"10_training": ("5637.1", "0.2%", "1.00x"), "11_mixed": ("3059.4", "0.3%", "1.84x")}


def test_every_page_links_to_the_step_before_and_the_step_after_it(built):
    pages = [f"{s}.html" for s in all_steps()]
    for i, name in enumerate(pages):  # the first page has no step before it, the last none after it
        nav = (built / name).read_text().split("<nav>", 1)[1].split("</nav>", 1)[0]
        around = [*pages[max(i - 1, 0) : i], "index.html", *pages[i + 1 : i + 2]]
        assert re.findall(r'href="([^"]+)"', nav) == around, name


def test_a_page_lists_the_tests_of_the_shared_code_its_step_brought(built):
    tests = section((built / "11_mixed_precision.html").read_text(), "tests")
    assert 'id="test_bf16_is_native_on_a_gpu_of_compute_capability_8_or_newer"' in tests  # no step parameter


@pytest.mark.parametrize("name", ["01_embedding", "08_gpt2"])  # pages that listed tests of shared code, once
def test_a_page_lists_the_tests_make_test_runs_for_its_step(built, name):
    listed = set(re.findall(r'<li id="(test_\w+)"', section((built / f"{name}.html").read_text(), "tests")))
    r = subprocess.run([sys.executable, "-m", "pytest", "--step", name[:2], "--collect-only", "-q", "-o", "addopts=",
                        "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    run = {line.split("::")[1].split("[")[0] for line in r.stdout.splitlines() if line.startswith("tests/")}
    assert r.returncode == 0 and listed == run, f"listed only: {listed - run}; run only: {run - listed}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="where there is a GPU the gpu tests are listed")
def test_a_page_built_without_a_gpu_says_its_gpu_tests_are_not_listed(built):
    assert "Built without a GPU: the tests marked gpu" in text_of(section((built / "12_compile_flash.html").read_text(),
                                                                          "tests"))


def test_a_mistakes_tests_are_those_that_run_on_the_page_or_in_the_whole_suite(built):
    on_08 = text_of(section((built / "08_gpt2.html").read_text(), "mistakes"))
    assert "test_multi_head_attention_matches_torch_multihead_attention" not in on_08  # steps 02-07's, not 08's
    on_17 = text_of(section((built / "17_fineweb_hellaswag.html").read_text(), "mistakes"))
    assert "(tests/test_shards.py, in the whole make test)" in on_17  # make data's tests: no step of their own


def test_the_step_that_shares_the_work_says_to_run_it_on_two_processes(built):
    head = text_of((built / "16_ddp.html").read_text().split('<p class="toc">')[0])
    assert "Run it: make step N=16 NPROC=2 (two processes: the lesson; make step N=16 runs one)." in head
    assert "Run it: make step N=15." in text_of((built / "15_grad_accum.html").read_text())


def test_a_page_lists_the_mistakes_of_earlier_steps_in_the_code_it_carries(built):
    mistakes = text_of(section((built / "05_decoder.html").read_text(), "mistakes"))
    assert "make mistake M=heads-merged-wrong N=05" in mistakes and "make mistake M=ffn-per-position N=05" in mistakes
    on_12 = text_of(section((built / "12_compile_flash.html").read_text(), "mistakes"))
    assert "make mistake M=logits-kept N=12" in on_12  # its line spelled loss = fast(x, y)[1] there


def test_a_code_box_has_as_many_lines_as_its_file(built):
    code = section((built / "01_embedding.html").read_text(), "diff")
    rows = code.split('id="diff-model.py"', 1)[1].split("</table>", 1)[0].count("<tr")
    assert rows == len((STEPS_DIR / "01_embedding" / "model.py").read_text().splitlines())


def test_a_missing_or_unreadable_diary_costs_its_page_one_line_not_the_book(tmp_path):
    diaries = tmp_path / "diary"
    shutil.copytree(ROOT / "diary", diaries)
    (diaries / "03_feedforward.md").unlink()
    (diaries / "04_encoder.md").write_bytes(b"# 04\n\n\xff\xfe not UTF-8")
    pages = book.write(tmp_path / "book", {}, {}, diary_dir=diaries, runs_dir=tmp_path / "runs")
    assert len(pages) == len(PAGES)
    assert "diary/03_feedforward.md is missing" in (tmp_path / "book" / "03_feedforward.html").read_text()
    assert "diary/04_encoder.md could not be read" in (tmp_path / "book" / "04_encoder.html").read_text()
    assert "<h3 id=" in section((tmp_path / "book" / "05_decoder.html").read_text(), "diary")  # the others as ever


@pytest.mark.parametrize("inside", [True, False], ids=["diary-in-the-project", "diary-elsewhere"])
def test_a_picture_a_diary_shows_beside_it_is_found_from_the_page(tmp_path, inside):
    diaries = (ROOT / "diary") if inside else tmp_path / "diary"
    if not inside:
        shutil.copytree(ROOT / "diary", diaries)
        (diaries / "img").mkdir(exist_ok=True)
        (diaries / "img" / "x.svg").write_text("<svg/>")
        (diaries / "02_attention.md").write_text("# 02\n\n![a curve](img/x.svg)\n")
    book.write(tmp_path / "book", {}, {}, diary_dir=diaries, runs_dir=tmp_path / "runs")
    for page in (tmp_path / "book" / f"{s}.html" for s in all_steps()):
        for src in re.findall(r'<img src="([^"]+)"', section(page.read_text(), "diary")):
            file = Path(src.removeprefix("file://")) if src.startswith("file://") else (page.parent / src).resolve()
            assert file.is_file(), f"{page.name}: {src}"
    shows = "14_gpt3_hparams" if inside else "02_attention"  # diary 14 draws steps 13 and 14 together
    assert '<img src="' in section((tmp_path / "book" / f"{shows}.html").read_text(), "diary")


def test_tests_pytest_could_not_collect_are_said_to_be_missing_on_every_page(tmp_path):
    failing = "print('tests/test_gpt2.py::test_a'); print('ERROR tests/test_x.py - ImportError: no x'); exit(2)"
    proc = subprocess.Popen([sys.executable, "-c", failing], stdout=subprocess.PIPE, text=True)  # as pytest fails
    tests, why = book.tests_by_step(proc)
    assert tests == {} and why.startswith("pytest could not collect the tests (exit 2: ERROR tests/test_x.py - ")
    book.write(tmp_path / "book", {}, tests, runs_dir=tmp_path / "runs", no_tests=why)
    page = text_of(section((tmp_path / "book" / "01_embedding.html").read_text(), "tests"))
    assert "Pytest could not collect the tests" in page and "No test of the suite runs" not in page


def test_steps_that_could_not_run_are_named_in_the_terminal_too_not_only_on_their_pages(tmp_path, monkeypatch,
                                                                                          capsys):
    found = {"01_embedding": book.Facts(stopped="error: no data"), "02_attention": book.Facts(stopped="error: x"),
             "08_gpt2": book.Facts(rows=[("h", "Block", "(4, 8, 64)")])}
    monkeypatch.setattr(book, "gather", lambda: (found, {}, ""))
    monkeypatch.setattr(book, "write", lambda out, *args, **kwargs: [out / "index.html"])
    assert book.main(["--out", str(tmp_path / "book")]) == 0  # the book is written, with what could be made
    assert capsys.readouterr().err == ("make book: 2 steps could not run here, so no shapes on their pages (01, 02); "
                                       "step 01 said: error: no data\n")


def test_a_full_disk_stops_the_book_in_one_line_naming_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(book, "gather", lambda: ({}, {}, ""))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a full disk raises it: no file name
    monkeypatch.setattr(book, "write", full)
    assert book.main(["--out", str(tmp_path / "book")]) == 1
    assert capsys.readouterr().err == f"make book: cannot write the book to {tmp_path / 'book'} (No space left on " \
        "device)\n"


def test_a_book_that_cannot_be_written_stops_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(book, "gather", lambda: ({}, {}, ""))  # no steps run: the writing is what is tried
    (tmp_path / "book" / "index.html").mkdir(parents=True)  # a directory where the index goes
    monkeypatch.setattr(book, "BOOK", tmp_path / "book")  # book/ itself: a --out elsewhere would refuse the directory
    assert book.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"make book: cannot write the book to {tmp_path / 'book'} (Is a directory") and \
        err.count("\n") == 1


def test_ctrl_c_stops_make_book_in_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "shared.book", "--out", str(tmp_path / "book")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    assert proc.stdout.readline().startswith("running each step")  # the work has begun
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to make book and its pytest
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "make book: interrupted; run it again for a whole book\n", err[-2000:]


def write_run(runs: Path, step: str, lines: list[str], summary: dict | None = None) -> Path:
    (runs / step).mkdir(parents=True)
    (runs / step / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if summary is not None:
        (runs / step / "summary.json").write_text(json.dumps(summary))
    return runs


ROW = '{{"iter": {}, "loss": {}}}'


def test_a_metrics_file_with_a_blank_line_a_bad_one_and_a_cut_off_end_still_gives_its_curve(tmp_path):
    lines = [ROW.format(0, 3.0), "", ROW.format(1, 2.5), "[1, 2]", '{"iter": 2, "loss": "x"}', ROW.format(3, 2.0),
             '{"iter": 4, "lo']
    curve = text_of(book.curve_html("10_training", write_run(tmp_path, "10_training", lines)))
    assert "3 iterations" in curve and "2 lines that are not rows" in curve and "last line is cut off" in curve


def test_a_metrics_file_of_nothing_but_bytes_is_not_said_to_be_a_log_cut_off(tmp_path):
    runs = write_run(tmp_path, "10_training", [])
    (runs / "10_training" / "metrics.jsonl").write_bytes(bytes(range(128, 256)) * 4)  # no line break: one "line"
    curve = text_of(book.curve_html("10_training", runs))
    assert "1 line that is not a row" in curve and "cut off" not in curve and "a curve needs two" in curve


def test_a_run_of_one_loss_says_a_curve_needs_two_and_draws_no_picture(tmp_path):
    curve = book.curve_html("10_training", write_run(tmp_path, "10_training", [ROW.format(0, 3.0)]))
    assert "has 1 iteration with a loss: a curve needs two." in text_of(curve) and "<svg" not in curve


def test_a_run_that_evaluates_once_at_its_end_gives_its_validation_loss_not_a_count_of_none(tmp_path):
    lines = [ROW.format(0, 3.0), ROW.format(1, 2.5)]  # steps 01-08: no val_loss row, one at the end in summary.json
    curve = text_of(book.curve_html("03_feedforward", write_run(tmp_path, "03_feedforward", lines, {"val_loss": 2.4})))
    assert "the last run of this step: 2 iterations; at its end, val loss 2.4000" in curve
    assert "validation point" not in curve


def test_a_diverged_run_says_so_over_its_curve(tmp_path):
    summary = {"diverged": {"iter": 2, "loss": "nan", "lr": 1e9}}
    lines = [ROW.format(0, 3.0), ROW.format(1, 1.8e11)]
    curve = book.curve_html("03_feedforward", write_run(tmp_path, "03_feedforward", lines, summary))
    assert "This run diverged: the loss was nan at iteration 2" in curve and ">loss 1.8e+11<" in curve


@pytest.mark.parametrize("name, interrupted, says", [
    ("03_feedforward", {"iters_done": 2}, "stopped after 2 iterations (Ctrl-C)."),  # no checkpoint before step 10
    ("10_training", {"iters_done": 2, "resume": "make step N=10 ARGS='--resume runs/10_training'"},
     "stopped after 2 iterations (Ctrl-C); it can go on."),
])
def test_an_interrupted_run_says_so_over_its_curve_and_whether_it_can_go_on(tmp_path, name, interrupted, says):
    lines = [ROW.format(0, 3.0), ROW.format(1, 2.5)]
    curve = text_of(book.curve_html(name, write_run(tmp_path, name, lines, {"interrupted": interrupted})))
    assert f"This run was {says}" in curve


def test_a_curve_names_the_make_curves_command_that_draws_it_beside_the_step_befores_last_run(tmp_path):
    lines = [ROW.format(0, 3.0), ROW.format(1, 2.5)]
    runs = write_run(tmp_path, "14_gpt3_hparams", lines)
    assert "make curves" not in book.curve_html("14_gpt3_hparams", runs)  # no run of step 13 to draw beside it
    write_run(tmp_path, "13_vocab_50304", lines)
    curve = text_of(book.curve_html("14_gpt3_hparams", runs))
    assert f'make curves ARGS="{runs}/13_vocab_50304 {runs}/14_gpt3_hparams" draws both' in curve


def test_a_step_that_cannot_run_says_why_on_its_page(tmp_path, monkeypatch):
    data_dir_copy(tmp_path, monkeypatch, missing="tinyshakespeare.txt")
    found = book.facts("01_embedding")
    shapes = text_of(book.shapes_html("01_embedding", found))  # the page's shapes section
    assert found.rows == [] and "could not run here, so no shapes: error:" in shapes
    assert "tinyshakespeare.txt" in shapes and "downloading" not in shapes


@pytest.mark.parametrize("flags, said", [
    (["--out", "FILE"], "is a file, not a directory"),
    (["--out", "steps/02_attention"], "is the project's own"),
    (["--out", "RUN"], "is in a run (a metrics.jsonl): the book goes to a directory of its own"),
    (["--out", "RUN/site"], "RUN/site is in a run"),
    (["--out", "RUNS"], "holds runs (a metrics.jsonl)"),
    (["--runs", "nowhere"], "nowhere does not exist"),
    (["--runs", "steps"], "steps has no run in it"),
    (["--out", ""], "expected a directory, got ''"),
    (["--out", "SITE"], "SITE holds index.html, which make book did not write: the book goes to a new or empty"),
], ids=["out-a-file", "out-in-steps", "out-a-run", "out-in-a-run", "out-runs", "runs-missing", "runs-without-runs",
        "out-empty", "out-a-site-of-yours"])
def test_a_bad_flag_is_refused_with_its_error_line_and_the_help_hint_before_any_work(tmp_path, flags, said):
    (tmp_path / "FILE").write_text("")
    (tmp_path / "RUNS" / "RUN").mkdir(parents=True)
    (tmp_path / "RUNS" / "RUN" / "metrics.jsonl").write_text("")
    (tmp_path / "SITE").mkdir()
    (tmp_path / "SITE" / "index.html").write_text("<p>my own home page</p>")  # make book writes an index.html too
    where = {"FILE": tmp_path / "FILE", "RUNS": tmp_path / "RUNS", "RUN": tmp_path / "RUNS" / "RUN",
             "RUN/site": tmp_path / "RUNS" / "RUN" / "site", "SITE": tmp_path / "SITE"}
    flags = [str(where.get(f, f)) for f in flags]
    r = subprocess.run([sys.executable, "-m", "shared.book", *flags], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 2 and "--help" in r.stderr.splitlines()[1]  # the error, where the help is
    assert "running each step" not in r.stdout  # refused before any work
    assert (tmp_path / "SITE" / "index.html").read_text() == "<p>my own home page</p>"


def test_an_out_that_make_book_wrote_before_is_taken_again(built, tmp_path):
    assert book.book_dir(str(built)) == built  # every page and book.css carries the mark
    (built / "notes.txt").write_text("mine")
    try:
        with pytest.raises(argparse.ArgumentTypeError, match="holds notes.txt, which make book did not write"):
            book.book_dir(str(built))
    finally:
        (built / "notes.txt").unlink()
    assert book.book_dir(str(tmp_path / "new")) == tmp_path / "new"  # a new directory, made now


def test_a_link_among_a_books_pages_is_not_its_own_and_a_hidden_file_is_left_alone(built, tmp_path):
    shutil.copytree(built, tmp_path / "copy")
    (tmp_path / "copy" / ".DS_Store").write_bytes(b"\0")  # a Mac's Finder leaves one where the book is opened
    assert book.book_dir(str(tmp_path / "copy")) == tmp_path / "copy"
    (tmp_path / "copy" / "index.html").unlink()
    (tmp_path / "copy" / "index.html").symlink_to(built / "index.html")  # writing would go through to built/
    with pytest.raises(argparse.ArgumentTypeError, match="holds index.html, which make book did not write"):
        book.book_dir(str(tmp_path / "copy"))


def test_a_headings_anchor_is_its_own_when_two_headings_have_one_text_and_the_diarys_links_follow():
    out = book.anchored('<h3>Measured</h3><h4>In <code>make bench</code></h4><h4>Measured</h4>'
                        '<p><a href="#measured">m</a> <a href="#tests">t</a></p>')
    assert out == ('<h3 id="diary-measured">Measured</h3><h4 id="diary-in-make-bench">In <code>make bench</code></h4>'
                   '<h4 id="diary-measured-1">Measured</h4>'
                   '<p><a href="#diary-measured">m</a> <a href="#tests">t</a></p>')


def test_diary_nn_is_linked_in_prose_only_and_a_link_is_never_put_inside_a_link():
    out = book.cross_linked('<p>diary 11, <code>diary 11</code>, <a href="x">diary 11</a>, diary 99; '
                            '<code>docs/bench.md</code>, <a href="y"><code>docs/bench.md</code></a></p>', "..")
    assert out == ('<p><a href="11_mixed_precision.html">diary 11</a>, <code>diary 11</code>, <a href="x">diary 11</a>'
                   ', diary 99; <a href="../docs/bench.md"><code>docs/bench.md</code></a>, '
                   '<a href="y"><code>docs/bench.md</code></a></p>')


def test_the_index_says_which_step_has_no_model_of_its_own_and_which_could_not_run():
    found = {"01_embedding": book.Facts(stopped="no data"), "09_from_pretrained": book.Facts(gpt2_parameters=7)}
    rows = {s: text_of(r) for s, r in zip(all_steps(), book.index_page(all_steps(), found, "# x\n", "..")
                                          .split("<tr>")[2:])}
    assert "not run here:its page says why" in rows["01_embedding"]
    assert "no modelof its own7 at 124M" in rows["09_from_pretrained"]


def test_the_indexs_bench_cell_gives_a_steps_ms_its_spread_and_its_speed_vs_10():
    readme = "# x\n## The speed ladder\n\n```\n11_mixed_precision  3059.4  0.3%  42.3  335  1.84x  69.9%\n```\n"
    index = book.index_page(all_steps(), {}, readme, "..")
    row = next(r for r in index.split("<tr>") if 'href="11_mixed_precision.html"' in r)
    assert text_of(re.findall(r'<td class="num">(.*?)</td>', row)[-1]) == "3059.4 ms±0.3%, 1.84x"


def test_the_index_leaves_out_the_readmes_picture_of_the_book_and_keeps_its_words():
    readme = "# gpt2-steps\nA course.\n\n![Step 08's page in the book](docs/book-08_gpt2.png)\n\n## Steps\n"
    index = book.index_page(all_steps(), {}, readme, "..")
    assert "A course." in index and "<img" not in index and "book-08_gpt2.png" not in index


def test_a_default_out_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "book").write_text("")  # where book/ should be
    monkeypatch.setattr(book, "BOOK", tmp_path / "book")
    monkeypatch.setattr(book, "gather", lambda: pytest.fail("work began before the refusal"))
    with pytest.raises(SystemExit) as stop:
        book.main([])
    assert stop.value.code == 2 and "is a file, not a directory" in capsys.readouterr().err


# --- in a real browser --------------------------------------------------------------------------------------------

def chromium():
    """The system's Chromium (Debian: apt-get install chromium), or GPT2STEPS_CHROMIUM. Under CI
    (GPT2STEPS_REQUIRE_BROWSER=1) a missing browser fails the tests; elsewhere it skips them, saying how to get it."""
    path = os.environ.get("GPT2STEPS_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if path is None:
        why = "no Chromium to load the book in: apt-get install chromium (or set GPT2STEPS_CHROMIUM)"
        if os.environ.get("GPT2STEPS_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    path = chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path)
        yield b
        b.close()


def test_the_index_table_of_the_steps_fits_a_desktop_window_without_scrolling(built, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto((built / "index.html").as_uri())
    box = page.evaluate("(() => { const d = document.querySelector('div.scroll'); return [d.scrollWidth, "
                        "d.clientWidth]; })()")
    page.close()
    assert box[0] <= box[1], f"the steps table is {box[0]} px wide in a box of {box[1]} px"  # no hidden column


# Each word of inline code with a hyphen in it, up to 40 characters, and the number of lines it is laid out on
HYPHENATED = """(() => {
  const out = [];
  for (const code of document.querySelectorAll('main code')) {
    if (code.closest('pre')) continue;
    const text = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
    for (let node = text.nextNode(); node; node = text.nextNode()) {
      for (const word of node.data.matchAll(/\\S*-\\S*/g)) {
        if (word[0].length > 40) continue;
        const range = document.createRange();
        range.setStart(node, word.index);
        range.setEnd(node, word.index + word[0].length);
        out.push([word[0], new Set([...range.getClientRects()].map(r => Math.round(r.top))).size]);
      }
    }
  }
  return out;
})()"""


@pytest.mark.parametrize("width", [1280, 390])
def test_no_word_with_a_hyphen_in_inline_code_is_broken_across_two_lines(built, browser, width):
    # --max- / new-tokens, M=heads-viewed-without- / transpose: a line that ends at a hyphen reads as two words
    page = browser.new_page(viewport={"width": width, "height": 900})
    words, broken = 0, []
    for name in PAGES:
        page.goto((built / name).as_uri())
        laid_out = page.evaluate(HYPHENATED)
        words += len(laid_out)
        broken += [f"{name}: {word}" for word, lines in laid_out if lines > 1]
    page.close()
    assert words > 500 and broken == []  # flags, mistakes' ids, file names: 655 in this book


@pytest.mark.parametrize("width", [1280, 390])
def test_every_page_loads_with_no_error_and_no_sideways_scroll(built, browser, width):
    shots = ROOT / "runs" / "book-shots"
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": width, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    for name in PAGES:
        page.goto((built / name).as_uri())
        wide = page.evaluate("document.documentElement.scrollWidth")
        assert wide <= width, f"{name} at {width} px scrolls sideways: {wide} px wide"
        page.screenshot(path=str(shots / f"{Path(name).stem}_{width}.png"))
    page.close()
    assert problems == []

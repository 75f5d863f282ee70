"""make book: the steps as a static site to read in a browser, written to book/ (or --out DIR).

Each step's page puts together its lesson, its diary entry, the diff from the step before (the hunks of
`make diff`) and the shared/ code it is the first to import, the shapes through its model (what `make step` prints
at its start), its tests by name, its classic mistakes, and the loss curve of the last run in runs/. Opened from
disk: no server, no network, no script.
A part that cannot be made (no diary, no data to run the model on) is said on its page; the rest is still written.
"""
import argparse
import ast
import contextlib
import functools
import html
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_by_name, get_lexer_for_filename
from pygments.util import ClassNotFound

from shared import cli
from shared.steps import ROOT, STEPS_DIR, all_steps, lesson, shared_brought

BOOK = ROOT / "book"
GENERATOR = "make book (gpt2-steps)"  # in every page's head and atop book.css: what --out may write over
STYLE = "hl"  # the CSS class of highlighted code


@dataclass
class Facts:
    """What running the step's own __main__ up to its shapes printout says: the header line, the shapes, the count."""
    header: str = ""
    rows: list = field(default_factory=list)  # (module name, type, output shape)
    parameters: int | None = None
    gpt2_parameters: int | None = None  # the model at GPT-2 124M's size, where the step has a GPTConfig
    gap: str = ""  # why there are no shapes, when there are none
    stopped: str = ""  # what the step said when it could not run here (no data, offline)


class Shapes(BaseException):
    """Raised in place of the step's shapes printout: the run stops there (BaseException: no `except Exception`
    in a step swallows it)."""


def facts(step: str) -> Facts:
    """The step's default run on the CPU (`make step N=.. ARGS="--device cpu"`), stopped at its shapes printout."""
    import torch
    from shared import shapes

    found = Facts()
    def stop(model, *inputs, depth=2):
        found.rows = shapes.rows(model, *inputs, depth=depth)
        found.parameters = sum(p.numel() for p in model.parameters())
        raise Shapes

    said, real = io.StringIO(), shapes.show
    shapes.show = stop
    try:
        main = importlib.import_module(f"steps.{step}.__main__")
        if "shapes.show" not in Path(main.__file__).read_text():
            found.gap = "This step's command trains no model of its own and prints no shapes."
        else:
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(said), \
                    contextlib.redirect_stderr(said):
                main.main(["--device", "cpu", "--out", str(Path(tmp) / "run")])
            found.gap = "The run ended before it printed its shapes."
    except KeyboardInterrupt:  # Ctrl-C stops the book, not just this step's part of it
        raise
    except Shapes:
        found.header = next((line for line in said.getvalue().splitlines() if line.startswith(f"step {step}")), "")
    except BaseException as e:  # a step that cannot run here (no data, offline): its own message, on the page
        if isinstance(e, SystemExit) and isinstance(e.code, str):
            why = e.code  # what the step says when it stops: sys.exit("error: ...")
        else:
            errors = [line for line in said.getvalue().splitlines() if line.startswith("error")]
            why = errors[-1] if errors else f"{type(e).__name__}: {e}"
        found.gap, found.stopped = f"`make step N={step[:2]}` could not run here, so no shapes: {why}", why
    finally:
        shapes.show = real
    model = importlib.import_module(f"steps.{step}.model")
    if hasattr(model, "GPTConfig"):
        with torch.device("meta"):  # shapes only, no memory: the count at the full size in an instant
            found.gpt2_parameters = sum(p.numel() for p in model.GPT(model.GPTConfig()).parameters())
    return found


def collect_tests() -> subprocess.Popen:
    """pytest --collect-only over the whole suite, every test on every step it covers; started now, read later."""
    env = {**os.environ, "GPT2STEPS_EVERY_STEP": "1"}
    return subprocess.Popen([sys.executable, "-m", "pytest", "--collect-only", "-q", "-o", "addopts=",
                             "-p", "no:cacheprovider"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@functools.cache
def test_functions() -> dict[str, dict[str, bool]]:
    """tests/<file> -> its test functions -> whether each takes the step fixture, read from the source as conftest
    reads them (a test of shared code may have a step's name among its other parameters: it is not that step's)."""
    def takes_a_step(f) -> bool:
        return "step" in [a.arg for a in f.args.args]
    return {f"tests/{path.name}": {f.name: takes_a_step(f) for f in ast.parse(path.read_text()).body
                                   if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")}
            for path in sorted((ROOT / "tests").glob("test_*.py"))}


def whole_suite_tests() -> dict[str, str]:
    """test -> its file, for the files with no test of a step (make data's, the bench's...): make test N=.. never
    runs them, the whole make test does."""
    return {t: path for path, names in test_functions().items() if not any(names.values()) for t in names}


def tests_by_step(proc: subprocess.Popen) -> tuple[dict[str, dict[str, list[str]]], str]:
    """step -> test file -> the names of its tests that run on the step (one name for all its parameters). A test
    with no step of its own (one of shared/ code, such as bf16's detection) goes with the first step its file tests.
    And why there are none, where pytest could not collect them ('' where it could)."""
    out, _ = proc.communicate()
    if proc.returncode not in (0, 5):  # 5: no tests at all
        said = [line for line in out.splitlines() if line.startswith(("ERROR", "E "))] or out.splitlines() or [""]
        return {}, (f"pytest could not collect the tests (exit {proc.returncode}: {said[-1].strip()[:200]}), so the "
                    "pages list none; make test shows why")
    found: dict[str, dict[str, list[str]]] = {}
    unstepped: dict[str, list[str]] = {}  # file -> its tests that take no step
    first: dict[str, str] = {}  # file -> the first step it tests
    step_names = set(all_steps())
    for line in out.splitlines():
        path, sep, rest = line.partition("::")
        if not sep or not path.startswith("tests/"):
            continue
        name, _, params = rest.partition("[")  # a step's name among the parameters: the step, if the test takes one
        steps = sorted(set(params.rstrip("]").split("-")) & step_names) if test_functions().get(path, {}).get(name) \
            else []
        if not steps and name not in unstepped.setdefault(path, []):
            unstepped[path].append(name)
        for step in steps:
            first[path] = min(first.get(path, step), step)
            names = found.setdefault(step, {}).setdefault(path, [])
            if name not in names:
                names.append(name)
    for path, names in unstepped.items():
        if path in first and names:
            found[first[path]][path] += [n for n in names if n not in found[first[path]][path]]
    return found, ""


# --- the diff, as `make diff` shows it -------------------------------------------------------------------------

@dataclass
class FileDiff:
    name: str  # the file's path inside the step
    hunks: list = field(default_factory=list)  # (header, [(kind " +-", old line no, new line no, text)])
    only_in: str = ""  # "new" or "gone" for a file that one of the two steps lacks


def diff(prev: str, step: str) -> list[FileDiff]:
    """The hunks of `diff -ru` of the two step directories: the same tool as `make diff`, so the same lines (make
    diff's -N prints a new file's lines as added; here "Only in" marks it, and the page shows it whole)."""
    proc = subprocess.run(["diff", "-ru", "-x", "__pycache__", f"steps/{prev}", f"steps/{step}"], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode > 1:
        raise RuntimeError(proc.stderr.strip() or "diff failed")
    files: list[FileDiff] = []
    old = new = 0
    for line in proc.stdout.splitlines():
        if line.startswith("Only in "):
            where, _, name = line[len("Only in "):].partition(": ")
            rel = str(Path(where, name).relative_to(Path("steps", step if step in where else prev)))
            files.append(FileDiff(rel, only_in="new" if step in where else "gone"))
        elif line.startswith("diff -ru"):
            files.append(FileDiff(line.split()[-1].split("/", 2)[2]))
        elif line.startswith(("--- ", "+++ ")) and not files[-1].hunks:
            continue
        elif line.startswith("@@"):
            m = re.match(r"@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@", line)
            old, new = int(m[1]), int(m[2])
            files[-1].hunks.append((line, []))
        elif line.startswith("\\"):  # "\ No newline at end of file"
            continue
        elif files and files[-1].hunks:
            kind, text = line[:1], line[1:]
            files[-1].hunks[-1][1].append((kind, old if kind != "+" else None, new if kind != "-" else None, text))
            old += kind != "+"
            new += kind != "-"
    return files


def highlighted_lines(path: Path) -> list[str]:
    """The file's lines as highlighted HTML, one string a line (pygments closes its spans at each line's end)."""
    return list(highlighted(path.name, path.read_text()))


@functools.cache  # a step's file is highlighted once, though two diffs show it: its own and the next step's
def highlighted(name: str, text: str) -> tuple[str, ...]:
    try:
        lexer = get_lexer_for_filename(name, stripnl=False, ensurenl=False)
    except ClassNotFound:
        lexer = TextLexer(stripnl=False, ensurenl=False)
    lines = highlight(text, lexer, HtmlFormatter(nowrap=True)).split("\n")
    return tuple(lines[:-1] if text.endswith("\n") else lines)  # the last newline ends a line; it starts none


def diff_html(prev: str, step: str) -> str:
    parts = [f'<p>What step {step[:2]} adds to step {prev[:2]}: <code>make diff N={step[:2]}</code>, the same hunks '
             f'(<code>diff -ru steps/{prev} steps/{step}</code>).</p>']
    for f in diff(prev, step):
        if f.only_in:
            side = step if f.only_in == "new" else prev
            parts.append(f'<h3 class="file" id="diff-{f.name}">{html.escape(f.name)}: only in {side}</h3>')
            if f.only_in == "new":  # all of it is the lesson: shown open, as added lines
                n = len(highlighted_lines(STEPS_DIR / side / f.name))
                parts.append(f'<details open><summary>the whole file ({n} lines)</summary>'
                             f'{code_box(STEPS_DIR / side / f.name, "add")}</details>')
            continue
        added = sum(k == "+" for _, lines in f.hunks for k, *_ in lines)
        removed = sum(k == "-" for _, lines in f.hunks for k, *_ in lines)
        parts.append(f'<h3 class="file" id="diff-{f.name}">{html.escape(f.name)} '
                     f'<span class="count">+{added} -{removed}</span></h3>')
        before, after = highlighted_lines(STEPS_DIR / prev / f.name), highlighted_lines(STEPS_DIR / step / f.name)
        rows = []
        for header, lines in f.hunks:
            rows.append(f'<tr class="hunk"><td colspan="3">{html.escape(header)}</td></tr>')
            for kind, o, n, _ in lines:
                code = after[n - 1] if n else before[o - 1]
                cls = {"+": "add", "-": "del", " ": "ctx"}[kind]
                rows.append(f'<tr class="{cls}"><td class="n">{o or ""}</td><td class="n">{n or ""}</td>'
                            f'<td class="code"><span class="sign">{kind}</span>{code}</td></tr>')
        parts.append(f'<div class="scroll"><table class="diff {STYLE}">{"".join(rows)}</table></div>')
    return "\n".join(parts)


def shared_html(names: list[str]) -> str:
    parts = ["<p>The code of <code>shared/</code> that this step is the first to import, in full:</p>"]
    for name in names:
        n = len((ROOT / "shared" / name).read_text().splitlines())
        parts.append(f'<h3 class="file" id="shared-{name}">shared/{html.escape(name)}</h3>'
                     f'<details><summary>the whole file ({n} lines)</summary>{code_box(ROOT / "shared" / name)}'
                     '</details>')
    return "\n".join(parts)


def code_box(path: Path, kind: str = "ctx") -> str:
    """A file's lines, numbered and highlighted; kind "add" shows them as added (a file new in the step)."""
    lines = highlighted_lines(path)
    rows = "".join(f'<tr class="{kind}"><td class="n">{i}</td><td class="code">{code}</td></tr>'
                   for i, code in enumerate(lines, 1))
    return f'<div class="scroll"><table class="diff {STYLE}">{rows}</table></div>'


# --- Markdown ----------------------------------------------------------------------------------------------------

def fence(code: str, lang: str, attrs) -> str:
    try:
        lexer = get_lexer_by_name(lang or "text")
    except ClassNotFound:
        lexer = TextLexer()
    return f'<pre class="{STYLE}"><code>{highlight(code, lexer, HtmlFormatter(nowrap=True))}</code></pre>'


MD = MarkdownIt("commonmark", {"html": False, "highlight": fence}).enable("table")


def markdown(text: str, tests: set[str] = frozenset(), elsewhere: dict[str, str] | None = None) -> str:
    """Markdown to HTML; a test's name in backticks links to it in the page's list of tests, or (elsewhere: test ->
    href) to its file; a link to another diary entry to that step's page."""
    out = MD.render(text).replace("<table>", '<div class="scroll"><table>').replace("</table>", "</table></div>")
    out = re.sub(r'href="(\d\d_\w+)\.md', r'href="\1.html', out)
    hrefs = {**(elsewhere or {}), **{t: f"#{t}" for t in tests}}
    return re.sub(r"<code>(test_\w+)</code>", lambda m: f'<a href="{hrefs[m[1]]}"><code>{m[1]}</code></a>'
                  if m[1] in hrefs else m[0], out)


# --- the README's tables -----------------------------------------------------------------------------------------

def readme_parts(readme: str) -> tuple[str, dict[str, str], dict[str, tuple[str, str]], str]:
    """The introduction (before the first ##), the reference each step matches (the steps table), each step's
    row of the speed ladder (ms/iter, spread, vs step 10), and when and where the ladder was measured."""
    intro = readme.split("\n## ", 1)[0].split("\n", 1)[-1]
    refs = {}
    for line in readme.splitlines():
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) == 4 and re.fullmatch(r"`\d\d_\w+`", cells[1]):
            refs[cells[1].strip("`")] = cells[3]
    ladder = {}
    block = re.search(r"## The speed ladder.*?```\n(.*?)```", readme, re.S)
    for line in (block[1].splitlines() if block else []):
        cells = line.split()
        if len(cells) > 5 and re.fullmatch(r"\d\d_\w+", cells[0]) and cells[1] != "again":
            ladder[cells[0]] = (cells[1], cells[2], cells[5])  # ms/iter, spread, clock ms, tokens/s, vs 10
    measured = re.search(r"## The speed ladder.*?(The ladder of [^`]*?), by `", readme, re.S)  # its date and machine
    return intro, refs, ladder, " ".join(measured[1].split()) if measured else ""


# --- the pages ---------------------------------------------------------------------------------------------------

def page(title: str, body: str, nav: str = "") -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="{GENERATOR}">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="book.css">
</head>
<body>
<nav>{nav}</nav>
<main>
{words_whole(body)}
</main>
<nav>{nav}</nav>
</body>
</html>
"""


WHOLE = 40  # characters: a word of inline code this long still fits a phone's line (390 px) whole


def words_whole(body: str) -> str:
    """Each word of inline code with a hyphen in it (--max-new-tokens, M=heads-merged-wrong), up to WHOLE characters,
    in a span the line never breaks in: a line that ends at a hyphen reads as two words. Only the text between tags
    is touched; blocks of code (<pre>) keep their lines as they are."""
    def words(text: str) -> str:
        return re.sub(r"\S*-\S*", lambda w: f'<span class="word">{w[0]}</span>' if len(html.unescape(w[0])) <= WHOLE
                      else w[0], text)

    def code(m: re.Match) -> str:
        return "".join(p if p.startswith("<") else words(p) for p in re.split(r"(<[^>]+>)", m[0]))
    parts = re.split(r"(<pre\b.*?</pre>)", body, flags=re.S)
    return "".join(p if p.startswith("<pre") else re.sub(r"<code>.*?</code>", code, p, flags=re.S) for p in parts)


def run_it(steps: list[str], i: int) -> str:
    """The command that runs steps[i], as the Makefile runs it: from the step that shares the work on, NPROC=2 too."""
    def shares(s: str) -> bool:  # the Makefile's test for NPROC
        return "init_process_group" in (STEPS_DIR / s / "__main__.py").read_text()
    one = f"<code>make step N={steps[i][:2]}</code>"
    two = f"<code>make step N={steps[i][:2]} NPROC=2</code>"
    if not shares(steps[i]):
        return one
    if i == 0 or not shares(steps[i - 1]):  # its lesson: two processes; one is the step before it
        return f"{two} (two processes: the lesson; {one} runs one)"
    return f"{one}, or {two} on two processes"


def inline(text: str) -> str:
    """Text as HTML, its `backticks` become code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def gap(text: str) -> str:
    """A line that says what is missing from a page."""
    return f'<p class="gap">{inline(text)}</p>'


def section(title: str, anchor: str, make) -> str:
    """One part of a page; a part that fails says so instead of stopping the book."""
    try:
        body = make()
    except Exception as e:  # noqa: BLE001 - any failure of one part becomes a line on its page
        body = gap(f"This part could not be made: {type(e).__name__}: {e}")
    return f'<section id="{anchor}">\n<h2>{title}</h2>\n{body}\n</section>'


def diary_html(step: str, diary_dir: Path, tests: set[str], up: str) -> str:
    path = diary_dir / f"{step}.md"
    if not path.exists():
        return gap(f"No diary entry yet: diary/{step}.md is missing.")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        return gap(f"diary/{step}.md could not be read ({e}); the rest of this page stands.")
    out = markdown(text.split("\n", 1)[1] if text.startswith("# ") else text, tests,
                   {t: f"{up}/{path}" for t, path in whole_suite_tests().items()})
    for level in (5, 4, 3, 2):  # one level under the page's own sections
        out = out.replace(f"<h{level}>", f"<h{level + 1}>").replace(f"</h{level}>", f"</h{level + 1}>")
    out = cross_linked(folded(anchored(out)), up)
    here = diary_dir.resolve()  # a picture beside the diary, named as the diary's own link names it
    return rebased(out, f"{up}/{here.relative_to(ROOT).as_posix()}" if here.is_relative_to(ROOT) else here.as_uri(),
                   "src")


def anchored(fragment: str) -> str:
    """Each heading of a diary gets an id, its GitHub anchor after diary- (## Too many processes:
    diary-too-many-processes), and the diary's #links to its headings follow: the page's sections have ids of
    their own (shapes, tests), and a test's name links to the page's list of tests."""
    seen: dict[str, int] = {}

    def heading(m: re.Match) -> str:
        slug = re.sub(r"[^\w\- ]", "", html.unescape(re.sub(r"<[^>]+>", "", m[2])).lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        return f'<h{m[1]} id="diary-{slug}{f"-{seen[slug]}" if seen[slug] else ""}">{m[2]}</h{m[1]}>'
    fragment = re.sub(r"<h([3-6])>(.*?)</h\1>", heading, fragment)
    return re.sub(r'href="#([^"]+)"', lambda m: f'href="#diary-{m[1]}"' if m[1] in seen else m[0], fragment)


def cross_linked(fragment: str, up: str) -> str:
    """"diary 11" in a diary's prose links to step 11's page, and `docs/bench.md` to the file."""
    pages, out, inside = {s[:2]: f"{s}.html" for s in all_steps()}, [], 0  # inside: an <a>, <code> or <pre>

    def link(m: re.Match) -> str:
        return f'<a href="{pages[m[2]]}">{m[0]}</a>' if m[2] in pages else m[0]
    for part in re.split(r"(<[^>]+>)", fragment):
        if re.match(r"</?(a|code|pre)\b", part):
            inside += -1 if part.startswith("</") else 1
        out.append(part if part.startswith("<") or inside else re.sub(r"\b([Dd]iary) (\d\d)\b", link, part))
    return re.sub(r'(?<!">)<code>docs/bench\.md</code>', f'<a href="{up}/docs/bench.md"><code>docs/bench.md</code></a>',
                  "".join(out))  # not one already inside a link


EDGES = "The command's edges"  # a diary's part on wrong input, failures and Ctrl-C: under the lesson, folded


def folded(fragment: str) -> str:
    """The diary's part titled EDGES, up to the next heading of its level, in a <details> the reader opens."""
    m = re.search(rf'<h3 id="[^"]*">{re.escape(EDGES)}.*?</h3>', fragment)
    if not m:
        return fragment
    end = fragment.find("<h3 ", m.end())
    end = len(fragment) if end < 0 else end
    return (fragment[: m.start()] + f'<details class="edges"><summary>{m[0]}</summary>'
            + fragment[m.end() : end] + "</details>" + fragment[end:])


def rebased(fragment: str, base: str, attrs: str = "src|href") -> str:
    """Each relative link of an HTML fragment (no scheme, not an anchor, not absolute) made relative to base."""
    def fix(m: re.Match) -> str:
        return m[0] if urlsplit(m[2]).scheme or m[2].startswith(("#", "/")) else f'{m[1]}="{base}/{m[2]}"'
    return re.sub(rf'\b({attrs})="([^"]+)"', fix, fragment)


def shapes_html(step: str, f: Facts) -> str:
    size = (f"<p>At GPT-2 124M's size (<code>GPTConfig()</code>): {f.gpt2_parameters:,} parameters.</p>"
            if f.gpt2_parameters else "")
    if not f.rows:
        return gap(f.gap) + size
    rows = "".join(f"<tr><td><code>{html.escape(name)}</code></td><td>{html.escape(kind)}</td>"
                   f"<td><code>{html.escape(str(tuple(shape)))}</code></td></tr>" for name, kind, shape in f.rows)
    return (f"<p>What <code>make step N={step[:2]} ARGS=\"--device cpu\"</code> prints at its start: "
            f"{html.escape(f.header)}. One forward pass over a small batch, each module's output:</p>"
            f'<div class="scroll"><table class="shapes"><tr><th>module</th><th>type</th><th>output shape</th></tr>'
            f"{rows}</table></div>" + size)


def tests_html(step: str, tests: dict[str, list[str]], up: str, no_tests: str = "") -> str:
    import torch

    if not tests:
        return gap(f"{no_tests[0].upper()}{no_tests[1:]}." if no_tests else "No test of the suite runs on this step.")
    parts = [f"<p>The tests that check this step: {sum(map(len, tests.values()))} in {len(tests)} files, one "
             "name for all of a test's cases (with the tests of the shared code this step brought). "
             f"<code>make test N={step[:2]}</code> runs these; the files that test no step (the bench's, the book's, "
             "make data's, make mistake's, the shared helpers', the suite's own coverage) run in the whole "
             "<code>make test</code>.</p>"]
    for path, names in sorted(tests.items()):
        items = "".join(f'<li id="{n}"><code>{n.replace("_", "_<wbr>")}</code></li>' for n in names)
        parts.append(f'<h3 class="file"><a href="{up}/{path}">{path}</a></h3><ul class="tests">{items}</ul>')
    if not torch.cuda.is_available():  # pytest leaves them out where there is no CUDA device
        parts.append(f'<p>Built without a GPU: the tests marked gpu (<a href="{up}/tests/test_gpu.py">'
                     "tests/test_gpu.py</a>: TF32 and bf16, the flash kernel, compile, fused AdamW, pinned memory, "
                     "NCCL) are not listed; <code>make gpu-check</code> runs them where there is one.</p>")
    return "\n".join(parts)


@functools.cache  # the same for every page: each mistake's steps, found once
def mistakes_by_step() -> dict[str, list]:
    from shared.mistakes import MISTAKES

    steps = {m.id: m.steps() for m in MISTAKES}
    return {s: [m for m in MISTAKES if s in steps[m.id]] for s in all_steps()}


def mistakes_html(step: str, tests: set[str]) -> str:
    from shared.steps import resolve

    mine = mistakes_by_step().get(step, [])
    if not mine:
        return gap("No classic mistake is registered for this step (`make mistake` lists them all).")
    suite_only = whole_suite_tests()

    def catcher(t: str) -> str:  # a test of another step that does not run on this one is left out
        if t in tests:
            return f'<a href="#{t}"><code>{t}</code></a>'
        return f"<code>{t}</code> ({suite_only[t]}, in the whole <code>make test</code>)" if t in suite_only else ""
    items = []
    for m in mine:
        caught = ", ".join(c for c in map(catcher, m.tests) if c)
        own = resolve(m.step) == step
        command = f"make mistake M={m.id}" + ("" if own else f" N={step[:2]}")
        items.append(f"<li><code>{command}</code>: {inline(m.what)}" + ("" if own else
                     f' (step {m.step}\'s, in code this step carries: <a href="{resolve(m.step)}.html#mistakes">'
                     f"{resolve(m.step)}</a>)") + f". Caught by {caught}.</li>")
    return ("<p>Each one made on purpose in a temporary copy of the step, with the tests that catch it run "
            f"(<code>steps/</code> is never touched):</p><ul>{''.join(items)}</ul>")


def shown(path: Path) -> str:
    """A path as a learner would type it: from the project's root when it is inside, whole when not."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def curve_html(step: str, runs_dir: Path) -> str:
    from shared.runlog import loss_svg, metrics_rows

    if "RunLog(" not in (STEPS_DIR / step / "__main__.py").read_text():
        return gap("This step's command trains nothing and writes no metrics: there is no curve to draw.")
    where = runs_dir / step
    path = where / "metrics.jsonl"
    if not path.exists():
        default = runs_dir.resolve() == (ROOT / "runs").resolve()
        run = f"make step N={step[:2]}" + ("" if default else " " + cli.make_args(["--out", shown(where)]))
        book = "make book" + ("" if default else " " + cli.make_args(["--runs", shown(runs_dir)]))
        return gap(f"No run of this step in {shown(runs_dir)}/ yet: `{run}` writes `{shown(path)}`, and the next "
                   f"`{book}` draws its loss curve here.")
    rows, notes = metrics_rows(path)
    try:
        summary = json.loads((where / "summary.json").read_text())
        summary = summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        summary = {}
    said = []
    if isinstance(d := summary.get("diverged"), dict):
        said.append(gap(f"This run diverged: the loss was {d.get('loss')} at iteration {d.get('iter')} "
                        f"(lr {d.get('lr')}), and it stopped there."))
    if isinstance(i := summary.get("interrupted"), dict):
        said.append(gap(f"This run was stopped after {i.get('iters_done')} iterations (Ctrl-C)"
                        + ("; it can go on." if "resume" in i else ".")))
    said += [gap(f"{shown(path)}: {note}.") for note in notes]
    curves = {name: [(r["iter"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
              for name, key in (("train", "loss"), ("validation", "val_loss"))}
    if len(curves["train"]) < 2:
        return "".join(said) + gap(f"{shown(path)} has {cli.plural(len(curves['train']), 'iteration')} with a loss: "
                                   "a curve needs two.")
    end = [f"{k.replace('_', ' ')} {v:.4f}" for k, v in summary.items()
           if k in ("val_loss", "uniform_guess") and isinstance(v, (int, float))]
    counts = [cli.plural(len(curves["train"]), "iteration")]
    if curves["validation"]:  # steps 01-08 evaluate once, at the end: summary.json has it
        counts.append(cli.plural(len(curves["validation"]), "validation point"))
    return ("".join(said) + f"<p>From <code>{html.escape(shown(path))}</code>, the last run of this step: "
            f"{', '.join(counts)}"
            + (f"; at its end, {', '.join(end)} (summary.json)" if end else "") + ".</p>"
            f'<div class="scroll"><figure class="curve">{loss_svg(curves)}</figure></div>'
            + beside_the_step_before(step, runs_dir))


def beside_the_step_before(step: str, runs_dir: Path) -> str:
    """The make curves command that draws this step's last run beside the step before's, where both ran."""
    i = all_steps().index(step)
    prev = all_steps()[i - 1] if i else None
    if not prev or not (runs_dir / prev / "metrics.jsonl").is_file():
        return ""
    runs = html.escape(f"{shown(runs_dir / prev)} {shown(runs_dir / step)}")
    return (f'<p>Beside the last run of step {prev[:2]}: <code>make curves ARGS="{runs}"</code> draws both (they '
            'compare when they had the same sizes and seed; <a href="14_gpt3_hparams.html#diary">diary 14</a> reads '
            "such a picture).</p>")


def step_page(i: int, steps: list[str], f: Facts, tests: dict[str, list[str]], diary_dir: Path,
              runs_dir: Path, up: str, no_tests: str = "") -> str:
    """up: the project's root, relative to the book's directory (.. for book/)."""
    step = steps[i]
    names = {n for ns in tests.values() for n in ns}
    prev_link = f'<a href="{steps[i - 1]}.html">&larr; {steps[i - 1]}</a>' if i else ""
    next_link = f'<a href="{steps[i + 1]}.html">{steps[i + 1]} &rarr;</a>' if i + 1 < len(steps) else ""
    nav = f'{prev_link} <a href="index.html">all steps</a> {next_link}'
    files = ", ".join(f'<a href="{up}/steps/{step}/{p.name}"><code>{p.name}</code></a>'
                      for p in sorted((STEPS_DIR / step).iterdir()) if p.is_file())
    brought = shared_brought(step)
    if brought:
        files += "; first used here, from <code>shared/</code>: " + ", ".join(
            f'<a href="#shared-{n}"><code>{n}</code></a>' for n in brought)
    head = (f"<h1>{step[:2]} &middot; {html.escape(lesson(step))}</h1>"
            f'<p class="files">The step\'s files: {files}. Run it: {run_it(steps, i)}.</p>'
            f'<p class="toc"><a href="#diary">diary</a> &middot; <a href="#diff">{"diff" if i else "code"}</a> '
            '&middot; <a href="#shapes">shapes</a> &middot; <a href="#mistakes">mistakes</a> &middot; '
            '<a href="#tests">tests</a> &middot; <a href="#curve">loss curve</a></p>')
    body = [head,
            section("The diary", "diary", lambda: diary_html(step, diary_dir, names, up)),
            section("The diff" if i else "The code", "diff",
                    lambda: (diff_html(steps[i - 1], step) if i else
                             "<p>The first step: its files in full.</p>" + "".join(
                                 f'<h3 class="file" id="diff-{p.name}">{p.name}</h3>{code_box(p)}'
                                 for p in sorted((STEPS_DIR / step).glob("*.py"))))
                    + (shared_html(brought) if brought else "")),
            section("The shapes", "shapes", lambda: shapes_html(step, f)),
            section("The mistakes to make on purpose", "mistakes", lambda: mistakes_html(step, names)),
            section("The tests", "tests", lambda: tests_html(step, tests, up, no_tests)),
            section("The loss curve", "curve", lambda: curve_html(step, runs_dir))]
    return page(f"{step}: {lesson(step)}", "\n".join(body), nav)


def breakable(fragment: str) -> str:
    """Code in a narrow cell may break after a dot or an underscore, never inside a word."""
    return re.sub(r"<code>(.*?)</code>", lambda m: "<code>" + re.sub(r"([._])", r"\1<wbr>", m[1]) + "</code>",
                  fragment)


def index_page(steps: list[str], found: dict[str, Facts], readme: str, up: str) -> str:
    intro, refs, ladder, measured = readme_parts(readme)
    rows = []
    for s in steps:
        f = found.get(s, Facts())
        params = (f"{f.parameters:,}" if f.parameters else "not run here:<br>its page says why" if f.stopped
                  else "no model<br>of its own")  # step 09 loads one
        if f.gpt2_parameters:
            params += f"{'<br>' if params else ''}{f.gpt2_parameters:,} at 124M"
        bench = f"{ladder[s][0]} ms<br>&plusmn;{ladder[s][1]}, {ladder[s][2]}" if s in ladder else ""  # 2 lines: fits
        rows.append(f'<tr><td><a href="{s}.html">{s[:2]}</a></td><td><a href="{s}.html">{html.escape(lesson(s))}</a>'
                    f"</td><td class=\"num\">{params}</td><td>{breakable(markdown(refs.get(s, '')).strip()[3:-4])}</td>"
                    f'<td class="num">{bench}</td></tr>')
    table = ('<div class="scroll"><table class="steps"><tr><th>step</th><th>the lesson</th><th>parameters '
             '(the default run; at GPT-2 124M)</th><th>reference it matches</th>'
             '<th>make bench: ms/iter, spread, vs 10</th>'
             f"</tr>{''.join(rows)}</table></div>")
    intro = re.sub(r"^!\[.*$", "", intro, flags=re.M)  # the README's picture is of this book: not in it
    intro = rebased(markdown(intro), up)  # the README's links
    body = (f"<h1>gpt2-steps</h1>{intro}<h2>The steps</h2>"
            '<p class="narrow">The table scrolls sideways: parameters, reference and speed are to the right.</p>'
            f"{table}"
            "<p>The parameters are those of each step's default run on a CPU (the model <code>make step</code> "
            "builds there) and, from step 08, of the same model at GPT-2 124M's size. The bench column is the "
            f'README\'s speed ladder (<a href="{up}/README.md">README.md</a>, The speed ladder)'
            + (f": {html.escape(measured)}" if measured else "") + ". A diary's speeds may come from another "
            "session's machine: each says which; only rows of one run compare.</p>")
    return page("gpt2-steps: the book", body, f'<a href="{steps[0]}.html">start: {steps[0]} &rarr;</a>')


CSS = f"/* {GENERATOR} */" + """
body { margin: 0; font: 16px/1.55 system-ui, sans-serif; color: #1d1d1f; background: #fdfdfc; }
main { max-width: 60rem; margin: 0 auto; padding: 0 1rem 2rem; overflow-wrap: break-word; }
nav { max-width: 60rem; margin: 0 auto; padding: .6rem 1rem; display: flex; gap: 1rem; flex-wrap: wrap;
      justify-content: space-between; border-bottom: 1px solid #e3e3e0; }
nav:last-of-type { border-top: 1px solid #e3e3e0; border-bottom: 0; }
h1 { font-size: 1.6rem; line-height: 1.25; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #e3e3e0; }
h3.file { font: 600 .95rem/1.4 ui-monospace, monospace; margin: 1.4rem 0 .4rem; overflow-wrap: anywhere; }
a { color: #0b57a4; } code { font: .9em ui-monospace, monospace; overflow-wrap: anywhere; }
pre { overflow-x: auto; background: #f5f5f2; padding: .7rem; border-radius: 4px; }
pre code { overflow-wrap: normal; } code .word { white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; } th, td { padding: .25rem .5rem; border: 1px solid #e3e3e0; vertical-align: top; }
td.num { text-align: right; white-space: nowrap; }
table.diff { font: 13px/1.45 ui-monospace, monospace; border: 1px solid #e3e3e0; min-width: 100%; }
table.diff td { border: 0; padding: 0 .5rem; white-space: pre; }
table.diff td.n { color: #8a8a86; text-align: right; user-select: none; background: #f5f5f2; }
table.diff tr.add td.code { background: #e6f6e6; } table.diff tr.del td.code { background: #fbe9e9; }
table.diff tr.hunk td { background: #eef2f8; color: #51607a; padding: .15rem .5rem; }
.sign { user-select: none; display: inline-block; width: 1.2em; color: #8a8a86; }
.count { color: #51607a; font-weight: 400; }
.gap { background: #fff6db; border-left: 4px solid #e0b000; padding: .5rem .8rem; }
figure.curve { margin: 0; } figure.curve svg { width: 100%; min-width: 480px; height: auto; }
main img { max-width: 100%; height: auto; }
table.steps td:nth-child(2) { min-width: 12rem; } table.steps code { overflow-wrap: normal; }
.narrow { display: none; }
details.edges > summary { cursor: pointer; } details.edges > summary > h3 { display: inline; }
ul.tests { columns: 2 22rem; column-gap: 2.5rem; font-size: .9rem; } ul.tests li { break-inside: avoid; }
.toc, .files { color: #51607a; }
@media (max-width: 600px) { body { font-size: 15px; } h1 { font-size: 1.3rem; } table.diff { font-size: 12px; }
                             .narrow { display: block; } }
"""


def gather() -> tuple[dict[str, Facts], dict[str, dict[str, list[str]]], str]:
    """What the pages need from running code: each step's facts, the tests that run on it, and why there are no
    tests where pytest could not collect them."""
    collecting = collect_tests()  # in another process while the steps run here: 2 cores, both busy
    try:
        found = {s: facts(s) for s in all_steps()}
        return found, *tests_by_step(collecting)
    finally:
        collecting.kill()  # gone already, but not after Ctrl-C


def write(out: Path, found: dict[str, Facts], tests: dict, diary_dir: Path = ROOT / "diary",
          runs_dir: Path = ROOT / "runs", no_tests: str = "") -> list[Path]:
    """Writes the site to out; returns the pages written, the index first. no_tests: why no page lists tests."""
    steps = all_steps()
    out.mkdir(parents=True, exist_ok=True)
    (out / "book.css").write_text(CSS + HtmlFormatter(style="friendly").get_style_defs(f".{STYLE}"))
    pages = [out / "index.html"]
    up = Path(os.path.relpath(ROOT, out.resolve())).as_posix()  # links to the project's files work from anywhere
    pages[0].write_text(index_page(steps, found, (ROOT / "README.md").read_text(), up))
    for i, s in enumerate(steps):
        pages.append(out / f"{s}.html")
        pages[-1].write_text(step_page(i, steps, found.get(s, Facts(gap="not gathered")), tests.get(s, {}),
                                       diary_dir, runs_dir, up, no_tests))
    return pages


def book_dir(text: str) -> Path:
    """An argparse type: a directory to write the site to, made now; not the project's own, and not a run's. Other
    than book/, it may hold only what make book wrote there before: it overwrites index.html and book.css."""
    path = cli.out_dir(text)
    in_a_run = any((d / "metrics.jsonl").exists() for d in (path.absolute(), *path.absolute().parents))
    if in_a_run or any(path.glob("*/metrics.jsonl")):  # --out runs/13_vocab_50304, or runs: 19 pages among the runs
        raise argparse.ArgumentTypeError(f"{text} {'is in a run' if in_a_run else 'holds runs'} (a metrics.jsonl): "
                                         "the book goes to a directory of its own (default book/)")
    if path.resolve() != BOOK.resolve() and (other := not_the_books(path)):
        raise argparse.ArgumentTypeError(f"{text} holds {other.name}, which make book did not write: the book goes to "
                                         "a new or empty directory, or one it wrote before (default book/)")
    return path


def not_the_books(path: Path) -> Path | None:
    """The first entry of path that make book did not write (its pages and book.css carry GENERATOR; a link is not
    its own, whatever it points to), if any. A hidden file (a Mac's .DS_Store) it never writes is left alone."""
    try:
        entries = sorted(e for e in path.iterdir() if not e.name.startswith("."))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{path} cannot be read ({cli.reason(e)})")
    for entry in entries:
        if entry.suffix not in (".html", ".css") or entry.is_symlink() or not entry.is_file():
            return entry
        try:
            with entry.open(errors="replace") as f:
                if GENERATOR not in f.read(1000):
                    return entry
        except OSError:
            return entry
    return None


def runs_dir(text: str) -> Path:
    """An argparse type: a directory with at least one run in it (NN_name/metrics.jsonl), so a typo is not read as
    "no runs"."""
    path = cli.existing_dir(text)
    if not any((path / s / "metrics.jsonl").exists() for s in all_steps()):
        raise argparse.ArgumentTypeError(f"{text} has no run in it: make step writes runs/NN_name/metrics.jsonl, "
                                         "so --runs takes the directory above NN_name (default runs/)")
    return path


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="make book", description=__doc__.split("\n\n")[0], hint='make book ARGS="--help"')
    p.add_argument("--out", type=book_dir, default=str(BOOK), help="the directory to write the site to "
                   "(default book/)")  # a str default goes through book_dir too
    p.add_argument("--runs", type=runs_dir, default=ROOT / "runs", help="the directory of the runs whose loss "
                   "curves the pages draw, NN_name/metrics.jsonl in it (default runs/, where make step writes them)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    try:  # a Ctrl-C can land while the first line is still being written: that too is an interruption
        print("running each step up to its shapes, and collecting the tests ...", flush=True)
        found, tests, no_tests = gather()
        if no_tests:
            print(f"make book: {no_tests}", file=sys.stderr)
        if stopped := {s: f.stopped for s, f in found.items() if f.stopped}:  # said on their pages; here, too
            first = next(iter(stopped))
            print(f"make book: {cli.plural(len(stopped), 'step')} could not run here, so no shapes on "
                  f"{'its page' if len(stopped) == 1 else 'their pages'} ({', '.join(s[:2] for s in stopped)}); "
                  f"step {first[:2]} said: {stopped[first]}", file=sys.stderr)
        pages = write(args.out, found, tests, runs_dir=args.runs, no_tests=no_tests)
    except KeyboardInterrupt:
        print("make book: interrupted; run it again for a whole book", file=sys.stderr)
        return 130
    except OSError as e:  # the disk filled, or --out changed under the run
        where = f": {e.filename}" if e.filename else ""  # a full disk names no file
        print(f"make book: cannot write the book to {args.out} ({e.strerror or e}{where})", file=sys.stderr)
        return 1
    print(f"{len(pages)} pages in {time.perf_counter() - start:.0f} s; open {pages[0].resolve().as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

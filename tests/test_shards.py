"""make data (shared/shards.py): text to uint16 token shards in build-nanogpt's layout, with a manifest, resumable.
Sources are made here, offline: the same documents as a .jsonl, a .parquet and a .txt."""
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import data, shards
from shared.steps import ROOT
from tests.conftest import ctrl_c_as_in_a_terminal, data_dir_copy

SHARD = 2_000  # tokens a shard: a few documents each, so that shards cut documents


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """300 paragraphs of tiny shakespeare, and one that holds the text '<|endoftext|>' (text, not the token)."""
    paragraphs = [p.strip() for p in data.shakespeare().split("\n\n") if p.strip()]
    return paragraphs[:299] + ["A document that says <|endoftext|> in the middle."]


@pytest.fixture(scope="module")
def sources(documents, tmp_path_factory) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("sources")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)))
    pq.write_table(pa.table({"text": documents}), root / "docs.parquet")
    (root / "docs.txt").write_text("\n\n".join(documents))  # a .txt: documents cut at blank lines
    return {kind: str(root / f"docs.{kind}") for kind in ("jsonl", "parquet", "txt")}


def prepare(source, out, **kw):
    return shards.prepare(source, out, shard_tokens=SHARD, progress=False, **kw)


def stopped_at_the_third_shard(monkeypatch, source, out):
    """prepare(source, out) stopped (by Ctrl-C, or a kill) while it makes its third shard."""
    save = shards.save_shard

    def save_or_stop(out, prefix, manifest, tokens, next_at):
        if len(manifest["shards"]) == 2:
            raise KeyboardInterrupt
        save(out, prefix, manifest, tokens, next_at)

    with monkeypatch.context() as m:
        m.setattr(shards, "save_shard", save_or_stop)
        with pytest.raises(KeyboardInterrupt):
            prepare(source, out)


def every_token(out) -> np.ndarray:
    val, train = shards.shard_files(out)
    return np.concatenate([np.load(p) for p in [val, *train]])


def test_decoded_shards_give_back_every_document_in_order_each_after_one_end_of_text(sources, documents, tmp_path):
    prepare(sources["jsonl"], tmp_path)
    tokens = every_token(tmp_path)
    starts = np.flatnonzero(tokens == shards.EOT)
    assert len(starts) == len(documents) and starts[0] == 0  # encode_ordinary never makes 50256 itself
    enc = data.gpt2_tokenizer()
    pieces = np.split(tokens, starts[1:])
    assert [enc.decode(p[1:].tolist()) for p in pieces] == documents


def test_the_progress_bar_ends_with_the_documents_the_summary_counts(sources, documents, tmp_path, capsys):
    shards.prepare(sources["jsonl"], tmp_path, shard_tokens=SHARD, progress=True)
    bar = capsys.readouterr().err.split("\r")[-1]  # tqdm redraws its line; the last drawing is what stays
    assert f"documents={len(documents)}" in bar, bar  # 300; without its last update the bar stopped at 256


def test_a_local_sources_progress_bar_counts_tokens_without_taking_max_tokens_for_its_size(sources, tmp_path, capsys):
    shards.prepare(sources["jsonl"], tmp_path, shard_tokens=SHARD, max_tokens=10**8, progress=True)
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "/100M" not in bar and "%" not in bar, bar  # the source ends far before: no ETA of hours for seconds of work


def test_shards_are_uint16_in_build_nanogpts_layout_with_validation_first(sources, tmp_path):
    manifest = prepare(sources["jsonl"], tmp_path)
    names = sorted(p.name for p in tmp_path.glob("*.npy"))
    assert names[0] == "docs_train_000001.npy" and "docs_val_000000.npy" in names
    assert all(np.load(tmp_path / n).dtype == np.uint16 for n in names)
    assert [s["tokens"] for s in manifest["shards"][:-1]] == [SHARD] * (len(names) - 1)  # only the last is shorter


@pytest.mark.parametrize("kind", ["parquet", "txt"])
def test_a_parquet_and_a_txt_source_give_the_shards_of_the_jsonl(sources, kind, tmp_path):
    prepare(sources["jsonl"], tmp_path / "jsonl")
    prepare(sources[kind], tmp_path / kind)
    assert np.array_equal(every_token(tmp_path / kind), every_token(tmp_path / "jsonl"))


def test_the_same_source_gives_the_same_bytes_with_one_worker_or_two(sources, tmp_path):
    prepare(sources["jsonl"], tmp_path / "one")
    prepare(sources["jsonl"], tmp_path / "two", workers=2)
    files = sorted(p.name for p in (tmp_path / "one").glob("*.npy"))
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


def test_the_manifest_records_each_shards_tokens_documents_and_sha256(sources, tmp_path):
    manifest = prepare(sources["jsonl"], tmp_path)
    for s in manifest["shards"]:
        tokens = np.load(tmp_path / s["file"])
        assert s["tokens"] == len(tokens) and s["documents"] == (tokens == shards.EOT).sum()
        assert s["sha256"] == shards.sha256(tmp_path / s["file"])
    assert manifest["complete"]


def test_a_prepare_stopped_after_two_shards_goes_on_to_the_shards_of_one_run(sources, tmp_path, monkeypatch):
    prepare(sources["jsonl"], tmp_path / "whole")
    stopped_at_the_third_shard(monkeypatch, sources["jsonl"], tmp_path / "split")
    assert len(list((tmp_path / "split").glob("*.npy"))) == 2
    assert shards.read_manifest(tmp_path / "split")["shards"][-1]["next"][1] > 0  # the cut is inside a document
    prepare(sources["jsonl"], tmp_path / "split")
    whole = sorted((tmp_path / "whole").iterdir())
    assert [p.name for p in whole] == sorted(p.name for p in (tmp_path / "split").iterdir())
    assert all(p.read_bytes() == (tmp_path / "split" / p.name).read_bytes() for p in whole)  # manifest too


def test_a_prepare_stopped_inside_a_document_that_spans_several_shards_goes_on_to_the_shards_of_one_run(
        documents, tmp_path, monkeypatch):
    source = tmp_path / "long.jsonl"  # a first document of over 6,000 tokens: shards 0, 1 and 2 cut it
    long = [" ".join(documents[:200]), *documents[200:240]]
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in long))
    prepare(source, tmp_path / "whole")
    stopped_at_the_third_shard(monkeypatch, source, tmp_path / "split")
    prepare(source, tmp_path / "split")
    manifest = shards.read_manifest(tmp_path / "split")
    assert [s["next"][0] for s in manifest["shards"][:3]] == [0, 0, 0]  # the resumed document cut again
    assert manifest == shards.read_manifest(tmp_path / "whole")  # where each shard ends in it: as one run records
    assert every_token(tmp_path / "split").tobytes() == every_token(tmp_path / "whole").tobytes()


def test_max_tokens_stops_there(sources, tmp_path):
    manifest = prepare(sources["jsonl"], tmp_path, max_tokens=5_000)
    assert [s["tokens"] for s in manifest["shards"]] == [2_000, 2_000, 1_000]


def test_a_complete_directory_is_left_as_it_is(sources, tmp_path, capsys):
    prepare(sources["jsonl"], tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    prepare(sources["jsonl"], tmp_path)
    assert "already holds the shards" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def refused(call, *words):
    with pytest.raises(SystemExit) as exit:
        call()
    message = str(exit.value.code)
    assert message.startswith("error:") and all(w in message for w in words), message
    return message


def test_making_shards_where_another_process_is_making_them_is_refused_in_one_line(sources, tmp_path):
    other = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)  # as another process would: the lock of another open directory
    with pytest.raises(SystemExit) as exit:
        prepare(sources["jsonl"], tmp_path)
    os.close(other)
    assert exit.value.code == f"error: another process is making shards in {tmp_path} now: wait for it to end, or " \
        "give this one another --out"
    assert prepare(sources["jsonl"], tmp_path)["complete"]  # once the other has let go, the same command runs


def test_two_makers_of_one_directory_cannot_both_hold_it(tmp_path):
    # the lock is an exclusive one: a shared one would let both in
    with shards.one_maker(tmp_path, wait=False), pytest.raises(SystemExit, match="another process is making shards"), \
            shards.one_maker(tmp_path, wait=False):
        pass


def test_other_settings_in_the_same_directory_are_refused(sources, tmp_path):
    prepare(sources["jsonl"], tmp_path)
    refused(lambda: shards.prepare(sources["jsonl"], tmp_path, shard_tokens=3_000, progress=False),
            "other settings", "shard_tokens 2000", "another --out")


@pytest.mark.parametrize("name", ["docs_val_000000.npy", "docs_train_000001.npy"])  # the validation shard is read too
def test_a_truncated_shard_is_named_with_what_to_do(sources, tmp_path, name):
    prepare(sources["jsonl"], tmp_path)
    path = tmp_path / name
    np.save(path, np.load(path)[:100])  # a whole .npy, but shorter than the manifest says
    refused(lambda: shards.shard_files(tmp_path), str(path), "100 tokens where manifest.json says 2,000",
            "make data again")


def test_a_shard_its_manifest_does_not_list_is_left_out_with_a_note(sources, tmp_path, capsys):
    prepare(sources["jsonl"], tmp_path)
    made = shards.shard_files(tmp_path)
    np.save(tmp_path / "docs_train_000099.npy", np.zeros(10, np.uint16))  # left by an earlier run into the same --out
    assert shards.shard_files(tmp_path) == made
    assert "holds 1 shard that its manifest.json does not list (docs_train_000099.npy): left out" in \
        capsys.readouterr().err


def test_the_training_shards_come_in_the_order_of_their_numbers_whatever_order_the_directory_lists(tmp_path,
                                                                                                     monkeypatch):
    names = ["x_train_000010.npy", "x_train_000002.npy", "x_val_000000.npy", "x_train_000001.npy"]
    for name in names:  # build-nanogpt's layout: no manifest
        np.save(tmp_path / name, np.zeros(10, np.uint16))
    monkeypatch.setattr(Path, "glob", lambda self, pattern: (self / n for n in names if Path(n).match(pattern)))
    val, train = shards.shard_files(tmp_path)
    assert val == tmp_path / "x_val_000000.npy"
    assert [p.name for p in train] == ["x_train_000001.npy", "x_train_000002.npy", "x_train_000010.npy"]


def test_a_cut_off_file_is_named(sources, tmp_path):
    prepare(sources["jsonl"], tmp_path)
    path = tmp_path / "docs_train_000002.npy"
    path.write_bytes(path.read_bytes()[:1000])  # the header and a part of the data
    refused(lambda: shards.shard_files(tmp_path), str(path))


def test_a_file_of_random_bytes_is_named_as_no_npy_not_as_a_pickle_to_trust(sources, tmp_path):
    prepare(sources["jsonl"], tmp_path)
    path = tmp_path / "docs_train_000001.npy"
    path.write_bytes(bytes(range(256)) * 8)
    said = refused(lambda: shards.shard_files(tmp_path), str(path), "no .npy header", "make data again")
    assert "allow_pickle" not in said


@pytest.mark.parametrize("dtype", ["int32", "int16"])  # int16: uint16's 2 bytes, but ids past 32,767 read negative
def test_a_shard_of_another_dtype_is_named(sources, tmp_path, dtype):
    prepare(sources["jsonl"], tmp_path)
    path = tmp_path / "docs_train_000001.npy"
    np.save(path, np.load(path).astype(dtype))
    refused(lambda: shards.shard_files(tmp_path), str(path), dtype, "uint16")


def test_a_shard_of_two_dimensions_is_named(sources, tmp_path):
    prepare(sources["jsonl"], tmp_path)
    path = tmp_path / "docs_train_000001.npy"
    np.save(path, np.load(path)[:, None])  # (2000, 1): uint16, and 2,000 long, as its manifest says
    refused(lambda: shards.shard_files(tmp_path), str(path), "of shape (2000, 1), not a 1-D array")


def test_token_ids_up_to_endoftext_pass_and_the_first_past_it_is_named():
    shards.check_ids(np.array([0, 50_256], dtype=np.uint16), "a shard")  # <|endoftext|>, GPT-2's last id
    with pytest.raises(SystemExit, match="a shard holds token id 50,257, past GPT-2's last, 50,256"):
        shards.check_ids(np.array([0, 50_257], dtype=np.uint16), "a shard")


def test_a_damaged_manifest_is_named(sources, tmp_path):
    prepare(sources["jsonl"], tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    refused(lambda: shards.shard_files(tmp_path), "manifest.json is damaged")


@pytest.mark.parametrize("key, value", [("file", ["docs_val_000000.npy"]), ("next", 7), ("next", [1]),
                                        ("tokens", "many")])
def test_a_manifest_edited_by_hand_with_a_value_of_another_kind_is_named(sources, tmp_path, key, value):
    prepare(sources["jsonl"], tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0][key] = value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    refused(lambda: shards.shard_files(tmp_path), "manifest.json is damaged")


def test_a_manifest_edited_by_hand_without_a_shards_sha256_is_named_by_verify(sources, tmp_path):
    prepare(sources["jsonl"], tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["shards"][0]["sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    refused(lambda: shards.verify(tmp_path), "manifest.json is damaged")


def test_shards_without_a_manifest_are_read_as_they_are(sources, tmp_path):
    prepare(sources["jsonl"], tmp_path)  # as build-nanogpt's fineweb.py leaves them: .npy files only
    (tmp_path / "manifest.json").unlink()
    val, train = shards.shard_files(tmp_path)
    assert val.name == "docs_val_000000.npy" and len(train) == len(list(tmp_path.glob("*_train_*.npy")))


def test_verify_of_a_manifest_with_no_shard_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [], "complete": True}))
    refused(lambda: shards.verify(tmp_path), "records no shard")


def test_verify_of_an_unfinished_make_data_says_so(sources, tmp_path, capsys):
    manifest = prepare(sources["jsonl"], tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    shards.verify(tmp_path)
    assert "every sha256 as recorded; make data has not finished" in capsys.readouterr().out


def test_a_directory_named_as_the_manifest_is_refused_as_damaged(tmp_path):
    (tmp_path / "manifest.json").mkdir()
    refused(lambda: shards.verify(tmp_path), "manifest.json is damaged")


def test_a_source_directory_skips_a_subdirectory_named_like_a_text_file(tmp_path):
    (tmp_path / "src" / "more.txt").mkdir(parents=True)
    (tmp_path / "src" / "a.txt").write_text("Some text.\n\nAnother paragraph.\n")
    manifest = prepare(str(tmp_path / "src"), tmp_path / "out")
    assert sum(s["documents"] for s in manifest["shards"]) == 2


def test_verify_finds_a_changed_byte(sources, tmp_path):
    prepare(sources["jsonl"], tmp_path)
    path = tmp_path / "docs_train_000001.npy"
    tokens = np.load(path)
    tokens[5] += 1
    np.save(path, tokens)
    refused(lambda: shards.verify(tmp_path), str(path), "damaged")


def test_the_hub_source_offline_says_to_use_a_local_one(tmp_path, monkeypatch):
    for variable in ("HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(shards, "online", lambda host, timeout=3.0: False)
    refused(lambda: shards.prepare("fineweb-edu", tmp_path, progress=False), "cannot be reached", "--source PATH")


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"])
def test_through_a_proxy_or_a_mirror_the_hub_is_not_judged_by_a_direct_connection(tmp_path, monkeypatch, variable):
    import datasets

    monkeypatch.setenv(variable, "http://proxy.example:3128")
    monkeypatch.setattr(shards, "online", lambda host, timeout=3.0: False)  # no direct connection from here
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: "streamed")  # as datasets would, through it
    assert shards.open_source("fineweb-edu") == ("streamed", "edufineweb")


def parquet_of(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("make, words", [
    (lambda root: root / "nothing.txt", ["no such file"]),
    (lambda root: (root / "a.csv").write_text("x") and root / "a.csv", ["expected .parquet, .jsonl, .json or", ".csv"]),
    (lambda root: (root / "b.jsonl").write_text('{"body": "x"}\n') and root / "b.jsonl", ["no text", "body"]),
    (lambda root: (root / "n.jsonl").write_text('{"text": 5}\n') and root / "n.jsonl",
     ["document 0's 'text' field holds int '5', not text"]),
    (lambda root: parquet_of(root / "c.parquet", body=["x"]), ["has no 'text' column", "body"]),
    (lambda root: (root / "d.jsonl").write_text('{"text": "x"}\nnot json\n') and root / "d.jsonl",
     ["cannot be read at document", "JSON parse error"]),
    (lambda root: (root / "e.parquet").write_bytes(b"PAR1 not parquet") and root / "e.parquet",
     ["cannot be read at document 0", "ArrowInvalid"]),
])
def test_a_bad_source_is_named(tmp_path, make, words):
    refused(lambda: prepare(str(make(tmp_path)), tmp_path / "out"), *words)


def test_a_bad_document_stops_a_run_of_two_workers_too(tmp_path):
    (tmp_path / "mixed.jsonl").write_text('{"text": "a document"}\n{"body": "not one"}\n')
    r = subprocess.run([sys.executable, "-m", "shared.shards", "--source", str(tmp_path / "mixed.jsonl"), "--out",
                        str(tmp_path / "out"), "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "document 1 has no text in a 'text' field (what it has: body)" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_damaged_tokenizer_stops_a_run_of_two_workers_with_one_line(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    data_dir_copy(tmp_path / "data", monkeypatch, damaged="r50k_base.tiktoken")  # the subprocess inherits the setting
    (tmp_path / "a.txt").write_text("a document\n\nanother one\n")
    r = subprocess.run([sys.executable, "-m", "shared.shards", "--source", str(tmp_path / "a.txt"), "--out",
                        str(tmp_path / "out"), "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("r50k_base.tiktoken is damaged") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("tokens", [10**14, 10**20])  # 10**20: more than numpy can index, a ValueError
def test_a_shard_too_large_for_memory_is_refused_with_what_it_needs(sources, tmp_path, tokens):
    make = lambda: shards.prepare(sources["jsonl"], tmp_path, shard_tokens=tokens, progress=False)
    refused(make, f"a shard of {tokens:,} tokens needs {2 * tokens / 2**30:,.1f} GiB of memory", "smaller --shard-tokens")


@pytest.mark.parametrize("out", [".", ".."])
def test_an_out_that_is_the_source_directory_or_holds_it_is_refused(tmp_path, out):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a document\n")
    refused(lambda: prepare(str(tmp_path / "texts"), tmp_path / "texts" / out), "is the --source directory or holds it")


@pytest.mark.parametrize("argv, missing", [
    (["--out", "OUT"], "--source is required (--verify needs --out alone)"),
    (["--source", "x.txt"], "--out is required"),
    ([], "--source and --out are required (--verify needs --out alone)"),
    (["--verify"], "--out is required")])
def test_make_data_names_every_flag_it_needs_in_one_error_line_and_where_the_help_is(tmp_path, capsys, argv, missing):
    with pytest.raises(SystemExit):
        shards.main([str(tmp_path) if a == "OUT" else a for a in argv])
    said = capsys.readouterr().err.splitlines()
    assert said == [f"make data: error: {missing}",
                    '(make data ARGS="--help" lists every flag)']


def test_a_shard_smaller_than_one_window_is_refused_before_any_file_is_made(tmp_path, capsys):
    with pytest.raises(SystemExit):  # --shard-tokens 100 once made thousands of files without a word
        shards.main(["--source", "x.txt", "--out", str(tmp_path / "out"), "--shard-tokens", "100"])
    assert capsys.readouterr().err.splitlines() == [
        "make data: error: argument --shard-tokens: expected a whole number, at least 1025: one window of GPT-2's "
        "1,024 tokens and the token after it, got '100'", '(make data ARGS="--help" lists every flag)']
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # --out, made by its check, goes at exit if empty


def test_shard_tokens_written_as_10m_is_told_to_be_a_whole_number(tmp_path, capsys):
    with pytest.raises(SystemExit):  # the help said "default 100M"; 100M is no number to int()
        shards.main(["--source", "x.txt", "--out", str(tmp_path / "out"), "--shard-tokens", "10M"])
    assert "expected a whole number, at least 1025" in capsys.readouterr().err


def test_an_out_among_the_projects_own_directories_is_refused(capsys):
    with pytest.raises(SystemExit):  # make data --out steps once wrote its shards and manifest into steps/
        shards.main(["--source", "x.txt", "--out", str(ROOT / "steps")])
    assert f"make data: error: argument --out: {ROOT / 'steps'} is the project's own" in capsys.readouterr().err
    assert not (ROOT / "steps" / "manifest.json").exists()


def test_a_deleted_shard_is_made_again_by_running_make_data_again(sources, tmp_path, capsys):
    prepare(sources["jsonl"], tmp_path / "whole")
    prepare(sources["jsonl"], tmp_path / "again")
    (tmp_path / "again" / "docs_train_000002.npy").unlink()
    refused(lambda: shards.shard_files(tmp_path / "again"), "missing", "Run make data again")
    prepare(sources["jsonl"], tmp_path / "again")  # what the message says to do
    assert "making it, and those after it, again" in capsys.readouterr().out
    assert all(p.read_bytes() == (tmp_path / "again" / p.name).read_bytes() for p in (tmp_path / "whole").iterdir())


def test_a_shortened_shard_is_made_again_by_running_make_data_again(sources, tmp_path, capsys):
    prepare(sources["jsonl"], tmp_path)
    path = tmp_path / "docs_train_000002.npy"
    made = path.read_bytes()
    np.save(path, np.load(path)[:100])  # a whole .npy, but shorter than the manifest says
    prepare(sources["jsonl"], tmp_path)
    assert "making it, and those after it, again" in capsys.readouterr().out
    assert path.read_bytes() == made


def test_a_lengthened_shard_is_made_again_by_running_make_data_again(sources, tmp_path, capsys):
    prepare(sources["jsonl"], tmp_path)
    path = tmp_path / "docs_train_000002.npy"
    made = path.read_bytes()
    np.save(path, np.concatenate([np.load(path), np.load(path)[:100]]))  # longer than the manifest says
    prepare(sources["jsonl"], tmp_path)
    assert "making it, and those after it, again" in capsys.readouterr().out
    assert path.read_bytes() == made


def test_a_source_smaller_than_a_shard_is_named_with_what_to_do(sources, tmp_path, capsys):
    shards.prepare(sources["jsonl"], tmp_path, shard_tokens=100_000, quiet=False, progress=False)
    assert "one shard only" in capsys.readouterr().out  # 12,697 tokens: the validation shard alone
    refused(lambda: shards.shard_files(tmp_path), "a validation shard and no training shard", "--shard-tokens")


def test_the_shard_size_suggested_for_a_small_source_makes_ten_shards_each_at_least_a_window(sources, tmp_path,
                                                                                              capsys):
    shards.prepare(sources["jsonl"], tmp_path / "one", shard_tokens=100_000, quiet=False, progress=False)
    suggested = int(re.search(r"--shard-tokens \(e\.g\. (\d+)\)", capsys.readouterr().out)[1])  # pasted as it is
    made = shards.prepare(sources["jsonl"], tmp_path / "ten", shard_tokens=suggested, progress=False)
    sizes = [s["tokens"] for s in made["shards"]]  # 12,697 // 10 once left an eleventh shard of 7 tokens
    assert len(sizes) == 10 and min(sizes) >= shards.MIN_SHARD, sizes


def test_make_datas_processes_tokenize_without_importing_torch():
    code = "import sys; from shared import shards; shards.encode(['a document']); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout == "False\n", r.stderr  # torch is 170-180 MiB of memory in each of them, for nothing (diary 17)


@given(total=st.integers(2 * shards.MIN_SHARD, 10**12))
def test_the_suggested_shard_size_makes_two_to_ten_shards_none_shorter_than_a_window(total):
    size = shards.shard_tokens_for(total)  # 2,051 tokens once gave 1,025 + 1,025 + 1
    count, last = -(-total // size), total - (-(-total // size) - 1) * size
    assert 2 <= count <= 10 and size >= shards.MIN_SHARD and last >= shards.MIN_SHARD


def test_a_source_too_small_for_two_shards_is_told_so_not_to_make_smaller_shards(tmp_path, capsys):
    (tmp_path / "small.txt").write_text("A few words, far fewer than two windows of 1,024 tokens.")
    shards.prepare(str(tmp_path / "small.txt"), tmp_path / "out", shard_tokens=100_000, quiet=False, progress=False)
    assert "tokens are too few for two shards of 1,025" in capsys.readouterr().out


def test_shards_made_inside_the_source_directory_are_not_read_as_source(documents, tmp_path, monkeypatch):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    # stopped, it leaves its manifest.json, a .json file, in the source directory
    stopped_at_the_third_shard(monkeypatch, str(tmp_path / "texts"), tmp_path / "texts" / "shards")
    prepare(str(tmp_path / "texts"), tmp_path / "texts" / "shards")
    prepare(str(tmp_path / "texts" / "docs.jsonl"), tmp_path / "alone")
    assert np.array_equal(every_token(tmp_path / "texts" / "shards"), every_token(tmp_path / "alone"))


def test_a_source_is_one_source_however_its_path_is_written(sources, tmp_path, capsys):
    prepare(sources["jsonl"], tmp_path)
    source = Path(sources["jsonl"])
    prepare(str(source.parent / "." / source.name), tmp_path)  # not "other settings"
    assert "already holds the shards" in capsys.readouterr().out


def test_shards_of_a_prepare_that_did_not_finish_are_used_with_a_note(sources, tmp_path, monkeypatch, capsys):
    manifest = prepare(sources["jsonl"], tmp_path)
    manifest["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    shards.shard_files(tmp_path)
    assert "make data has not finished" in capsys.readouterr().err


def test_a_full_disk_stops_make_data_with_one_line_and_leaves_no_temporary_file(sources, tmp_path):
    (tmp_path / f".{shards.MANIFEST}.{os.getpid()}.tmp").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(SystemExit) as exit:
        prepare(sources["jsonl"], tmp_path)  # its first shard is written, then its manifest fails
    assert str(exit.value.code).startswith(f"error: cannot write {tmp_path / shards.MANIFEST} (No space left on "
                                           "device). The complete shards and the manifest are kept")
    assert not list(tmp_path.glob(".*"))


def test_a_write_stopped_by_ctrl_c_leaves_no_temporary_file(tmp_path):
    def interrupted(f):
        f.write(b"half a shard")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shards.write_atomic(tmp_path / "docs_train_000001.npy", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_a_source_that_datasets_cannot_open_is_one_line_even_with_an_empty_message(tmp_path, monkeypatch):
    import datasets

    (tmp_path / "a.txt").write_text("Some text.\n")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: (_ for _ in ()).throw(OSError()))
    refused(lambda: shards.open_source(str(tmp_path / "a.txt")), "cannot be opened: OSError")


def test_ctrl_c_stops_make_data_with_one_line_and_no_worker_traceback(tmp_path):
    text = "\n\n".join([data.shakespeare()] * 8)  # 9 MB: seconds of work for two workers
    (tmp_path / "big.txt").write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "shared.shards", "--source", str(tmp_path / "big.txt"), "--out",
                             str(tmp_path / "out"), "--workers", "2", "--shard-tokens", "100000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("*_train_*.npy")) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the work is well under way
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to the parent and its workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "run the same command to go on" in err

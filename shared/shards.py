"""make data: text to token shards, the training data of step 17 on.

    make data ARGS="--source fineweb-edu --out data/edu_fineweb10B"                FineWeb-Edu sample-10BT, streamed
    make data ARGS="--source texts/ --out data/mine --shard-tokens 10000000"    local .parquet, .jsonl, .json, .txt

Every document becomes <|endoftext|> (id 50256) and then its GPT-2 tokens (tiktoken's encode_ordinary: the text
"<|endoftext|>" inside a document stays text). The stream of tokens is cut into shards of --shard-tokens uint16 ids
(GPT-2's 50,257 ids fit in 16 bits: half the bytes of int32), saved as .npy files in build-nanogpt's layout:
PREFIX_val_000000.npy first, then PREFIX_train_000001.npy, ... A .txt source is cut into documents at blank lines.

A shard appears only when it is complete (written under a temporary name, then renamed), and manifest.json records
its tokens, documents, sha256 and where in the source it ends: a prepare that was stopped goes on after its last
complete shard, and makes the shards that one run would have made.
"""
import argparse
import collections
import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import signal
import socket
import sys
from pathlib import Path

import numpy as np

from shared import cli

EOT = 50256  # <|endoftext|>: GPT-2's one special token, before every document
MANIFEST = "manifest.json"
HUB = ("HuggingFaceFW/fineweb-edu", "sample-10BT")  # about 10B GPT-2 tokens, streamed: no 27 GB download first
KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}  # datasets' local loaders
CHUNK = 256  # documents a worker tokenizes at a time
MIN_SHARD = 1025  # the smallest --shard-tokens: one window of 1,024 tokens and its next token (a target)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"  # the first shard is the validation split


# ---- the source: documents, one string each

def open_source(source: str, out: Path | None = None):
    """(documents, prefix): an iterable of records with a text, streamed, and the shards' name prefix. Files under
    out (the shards being made, and their manifest) are not part of a source directory."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach us as exceptions: one line each
    if source == "fineweb-edu":
        routed = {"HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"} & os.environ.keys()  # a proxy or a mirror: no direct way
        if not routed and not online("huggingface.co"):
            sys.exit("error: --source fineweb-edu streams from the Hugging Face hub, which cannot be reached from here "
                     "(offline?). Use local files instead: --source PATH (a .parquet, .jsonl, .json or .txt file, or "
                     "a directory of them).")
        docs = datasets.load_dataset(HUB[0], name=HUB[1], split="train", streaming=True)
        return docs, "edufineweb"
    path = Path(source)
    skip = out.resolve() if out else None
    if path.is_dir() and skip and (skip == path.resolve() or skip in path.resolve().parents):
        sys.exit(f"error: --out {out} is the --source directory or holds it, and the shards made there are not read as "
                 "source: give an --out outside it")
    files = sorted(p for p in path.rglob("*") if p.suffix in KINDS and p.is_file()  # not a directory named a.txt
                   and (skip is None or skip not in p.resolve().parents)) if path.is_dir() else [path]
    if not path.exists():
        sys.exit(f"error: --source {source}: no such file or directory (or give fineweb-edu)")
    kinds = {KINDS.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) > 1:
        sys.exit(f"error: --source {source}: expected .parquet, .jsonl, .json or .txt files, of one kind; found "
                 f"{', '.join(sorted({p.suffix or p.name for p in files})) or 'none'}")
    kind, prefix = kinds.pop(), path.stem if path.is_file() else path.name
    if kind == "parquet":
        return parquet_records(files, source), prefix
    extra = {"sample_by": "paragraph"} if kind == "text" else {}  # a .txt: one document per blank-line paragraph
    try:
        docs = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train", streaming=True, **extra)
    except (ValueError, OSError) as e:  # a file unreadable, or gone since it was listed
        sys.exit(f"error: --source {source} cannot be opened: {cli.one_line(e)}")
    return docs, prefix


def parquet_records(files: list[Path], source: str):
    """The text column of local .parquet files, one row group (a few MB) at a time, so that memory stays flat however
    large the files: datasets' streaming parquet reader grew with the file, 10x the text gave about 2x the peak
    memory (diary 17); pyarrow read row group by row group did not."""
    import pyarrow.parquet as pq

    for path in files:
        f = pq.ParquetFile(path)
        if "text" not in f.schema_arrow.names:
            sys.exit(f"error: --source {source}: {path} has no 'text' column (its columns: "
                     f"{', '.join(f.schema_arrow.names)})")
        for group in range(f.num_row_groups):
            yield from ({"text": text} for text in f.read_row_group(group, columns=["text"]).column(0).to_pylist())


def online(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def texts(docs, source: str, first: int = 0):
    """The text of each document (numbered from first); a record without text, or a file that cannot be parsed,
    stops the run with one line that names it."""
    i = first
    try:
        for i, record in enumerate(docs, first):
            text = record.get("text")
            if text is None:
                sys.exit(f"error: --source {source}: document {i} has no text in a 'text' field (what it has: "
                         f"{', '.join(k for k, v in record.items() if v is not None) or 'nothing'})")
            if not isinstance(text, str):
                sys.exit(f"error: --source {source}: document {i}'s 'text' field holds {type(text).__name__} "
                         f"{str(text)[:40]!r}, not text")
            yield text
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid (a bad JSON line, a damaged parquet) is a ValueError
        sys.exit(f"error: --source {source} cannot be read at document {i:,} or the next: {cli.one_line(e)}")


# ---- tokenizing, on every core

_enc = None


def encode(chunk: list[str]) -> list[np.ndarray]:
    """[EOT, tokens...] of each document, as uint16. Runs in a worker process (and loads the tokenizer there once)."""
    global _enc
    if _enc is None:
        from shared import data
        _enc = data.gpt2_tokenizer()
    out = []
    for text in chunk:
        tokens = _enc.encode_ordinary(text)
        ids = np.empty(len(tokens) + 1, dtype=np.uint16)  # (1 + tokens,)
        ids[0], ids[1:] = EOT, tokens
        out.append(ids)
    return out


def batched(iterable, n: int):
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def encoded(texts_, workers: int):
    """Each document's tokens, in order. With several workers, a process pool: tiktoken's own threads do not
    speed up encode_ordinary_batch here (diary 17), separate processes do."""
    if workers == 1:
        for chunk in batched(texts_, CHUNK):
            yield from encode(chunk)
        return
    import multiprocessing

    encode([])  # the tokenizer loaded here first: a missing or damaged file stops the run with its one line here; in a
    # worker its exit would only end that worker, and the pool would wait for the lost chunk forever
    # spawn: safe beside torch's threads. The workers ignore Ctrl-C; the parent lets the chunks in flight finish
    # (below) and says how to go on.
    pool = multiprocessing.get_context("spawn").Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN))
    try:
        pending = collections.deque()  # at most 2 chunks a worker, plus one, in flight: memory stays flat
        for chunk in batched(texts_, CHUNK):  # read here, not in the pool's thread: a bad document stops the run
            pending.append(pool.apply_async(encode, (chunk,)))
            if len(pending) > 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()
    finally:  # on Ctrl-C too, the chunks in flight finish: Pool.terminate() can kill a worker halfway through
        pool.close()  # sending its tokens, and then wait forever for the rest
        pool.join()


# ---- the shards

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, write, then: str = "The complete shards and the manifest are kept: make room, then run "
                 "the same command to go on") -> None:
    """write(f) into a temporary file, on the disk, then rename it: a half-written shard never has the real name. A
    failed write (a full disk) stops with one line, then what to do; no temporary file is left, however it stops."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes on the disk before the name: else a crash could keep the name only
        os.replace(tmp, path)  # atomic on one file system
    except OSError as e:
        sys.exit(f"error: cannot write {path} ({cli.reason(e)}). {then}")
    finally:
        tmp.unlink(missing_ok=True)


def prepare(source: str, out: Path, shard_tokens: int = 100_000_000, max_tokens: int | None = None,
            workers: int = 1, progress: bool = True, quiet: bool = False, wait: bool = False) -> dict:
    """Tokenize source into shards in out (made or continued); returns the manifest. quiet: no bar, no lines.
    wait: for another process making shards in out to end (it may have made them); else that is refused."""
    out.mkdir(parents=True, exist_ok=True)
    with one_maker(out, wait):
        return make_shards(source, out, shard_tokens, max_tokens, workers, progress and not quiet,
                           (lambda *a: None) if quiet else print)


@contextlib.contextmanager
def one_maker(out: Path, wait: bool):
    """Hold a lock on out itself (no lock file) while making its shards: two processes would write the same shards
    and manifest. The lock goes when the directory is closed or the process ends."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                sys.exit(f"error: another process is making shards in {out} now: wait for it to end, or give this "
                         "one another --out")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (some network mounts): go on, unguarded
            print(f"note: {out} cannot be locked ({os.strerror(e.errno)}): nothing stops a second process from "
                  "making shards there at the same time", flush=True)
        yield
    finally:
        os.close(fd)


def make_shards(source: str, out: Path, shard_tokens: int, max_tokens: int | None, workers: int, progress: bool,
                say) -> dict:
    source = source if source == "fineweb-edu" else str(Path(source).resolve())  # texts/ and ./texts are one source
    settings = {"source": source, "tokenizer": "gpt2", "shard_tokens": shard_tokens, "max_tokens": max_tokens}
    manifest = read_manifest(out) or {**settings, "shards": [], "complete": False}
    if {k: manifest.get(k) for k in settings} != settings:
        sys.exit(f"error: {out} holds shards made with other settings ("
                 + ", ".join(f"{k} {manifest.get(k)!r} there, {settings[k]!r} now" for k in settings
                             if manifest.get(k) != settings[k]) + "). Give another --out, or delete that directory.")
    bad = next((i for i, shard in enumerate(manifest["shards"]) if not intact(out, shard)), None)
    if bad is not None:  # deleted or damaged since it was made: make it, and those after it, again
        say(f"{out / manifest['shards'][bad]['file']} is missing or not as made: making it, and those after it, again")
        manifest["shards"], manifest["complete"] = manifest["shards"][:bad], False
    if manifest["complete"]:
        say(f"{out} already holds the shards of {source}: {cli.plural(len(manifest['shards']), 'shard')}, "
            f"{sum(s['tokens'] for s in manifest['shards']):,} tokens")
        return manifest
    docs, prefix = open_source(source, out)
    done = sum(s["tokens"] for s in manifest["shards"])
    doc, offset = manifest["shards"][-1]["next"] if manifest["shards"] else (0, 0)  # where the next shard starts
    if manifest["shards"]:
        say(f"{out}: {cli.plural(len(manifest['shards']), 'shard')} already complete; going on from document {doc:,}")
    from tqdm import tqdm

    bar_total = max_tokens if source == "fineweb-edu" else None  # a local source may end long before --max-tokens
    with tqdm(total=bar_total, initial=done, unit="tok", unit_scale=True, disable=not progress,
              desc=f"tokenizing {source}", dynamic_ncols=True) as bar:  # closed however the loop ends
        try:
            buf = np.empty(shard_tokens, dtype=np.uint16)  # one shard at a time: memory does not grow with the source
        except (MemoryError, ValueError):  # ValueError: more than numpy can index
            sys.exit(f"error: a shard of {shard_tokens:,} tokens needs {2 * shard_tokens / 2**30:,.1f} GiB of memory "
                     "at once; give a smaller --shard-tokens (the default, 100,000,000, needs 0.2 GiB)")
        fill, total = 0, done
        for tokens in encoded(texts(itertools.islice(docs, doc, None), source, first=doc), workers):
            tokens, start = tokens[offset:], offset  # a document cut by the last shard goes on where it was cut
            offset = 0
            while len(tokens) and total < (max_tokens or math.inf):
                take = min(len(tokens), shard_tokens - fill, (max_tokens or math.inf) - total)
                buf[fill : fill + take] = tokens[:take]
                fill, total, tokens, start = fill + take, total + take, tokens[take:], start + take
                bar.update(take)
                if fill == shard_tokens:
                    save_shard(out, prefix, manifest, buf, next_at=(doc, start) if len(tokens) else (doc + 1, 0))
                    fill = 0
            doc += 1
            if doc % CHUNK == 0:
                bar.set_postfix(documents=f"{doc:,}", refresh=False)
            if total >= (max_tokens or math.inf):
                break
        bar.set_postfix(documents=f"{doc:,}")  # the last count, not the last CHUNK's
    if fill:  # the rest: a last, shorter shard
        save_shard(out, prefix, manifest, buf[:fill], next_at=(doc, 0))
    if not manifest["shards"]:
        sys.exit(f"error: --source {source} holds no text: no shard was made")
    manifest["complete"] = True
    write_atomic(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode() + b"\n"))
    say(f"{out}: {cli.plural(len(manifest['shards']), 'shard')}, {total:,} tokens, "
        f"{cli.plural(sum(s['documents'] for s in manifest['shards']), 'document')}")
    if len(manifest["shards"]) == 1:
        say("note: one shard only, and the first shard is the validation split: training needs more. " + (
            f"Make them again into another --out with a smaller --shard-tokens (e.g. {shard_tokens_for(total)})"
            if total >= 2 * MIN_SHARD else f"{total:,} tokens are too few for two shards of {MIN_SHARD:,} tokens (a "
            "window of 1,024 and the token after it): give a bigger source"))
    return manifest


def shard_tokens_for(total: int) -> int:
    """A --shard-tokens that cuts `total` tokens (2 x MIN_SHARD or more) into at most 10 shards, each at least
    MIN_SHARD: no last shard too short for a window."""
    for n in range(min(10, total // MIN_SHARD), 1, -1):  # n = 2 always works: halves of 1,025 or more
        size = -(-total // n)  # ceil
        if total - (-(-total // size) - 1) * size >= MIN_SHARD:  # the last of ceil(total / size) shards
            return size
    raise ValueError(f"{total:,} tokens are too few for two shards of {MIN_SHARD:,}")


def directory(text: str) -> Path:
    """An argparse type for a trainer's --data: a directory there already. A text file given in its place is answered
    with the make data command that turns it into shards."""
    path = Path(text)
    if path.suffix in KINDS and cli.answered(path.is_file, text):
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory of token shards: make them from it with "
                                         f'make data ARGS="--source {text} --out data/shards/{path.stem}"')
    return cli.existing_dir(text)  # a shard or manifest.json given: it names the directory that holds it


def check_ids(tokens: np.ndarray, where) -> None:
    """Exit when tokens hold an id past GPT-2's last (<|endoftext|>): not GPT-2's tokens, or damaged bytes."""
    if len(tokens) and (top := int(tokens.max())) > EOT:
        sys.exit(f"error: {where} holds token id {top:,}, past GPT-2's last, {EOT:,}: its tokens are not GPT-2's, or "
                 "it is damaged. Make the shards again with make data")


def intact(out: Path, shard: dict) -> bool:
    """The shard's file is there with the tokens the manifest records (its header says; the data is not read)."""
    try:
        return len(np.load(out / shard["file"], mmap_mode="r")) == shard["tokens"]
    except (OSError, ValueError, EOFError):
        return False


def save_shard(out: Path, prefix: str, manifest: dict, tokens: np.ndarray, next_at: tuple[int, int]) -> None:
    name = shard_name(prefix, len(manifest["shards"]))
    write_atomic(out / name, lambda f: np.save(f, tokens))
    manifest["shards"].append({"file": name, "tokens": len(tokens), "documents": int((tokens == EOT).sum()),
                               "sha256": sha256(out / name), "next": list(next_at)})
    write_atomic(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode() + b"\n"))


SHARD_KEYS = {"file": str, "tokens": int, "documents": int, "sha256": str, "next": list}  # what save_shard records


def well_formed(shard) -> bool:
    """A shard's record as save_shard writes it: every key, of its type; next is [document, offset]."""
    return (isinstance(shard, dict) and all(isinstance(shard.get(k), kind) for k, kind in SHARD_KEYS.items())
            and len(shard["next"]) == 2 and all(isinstance(n, int) for n in shard["next"]))


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError, RecursionError):  # not JSON, not UTF-8, not a readable file, or nested too deep
        manifest = None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("shards"), list)
            and isinstance(manifest.get("complete"), bool) and all(map(well_formed, manifest["shards"]))):
        sys.exit(f"error: {path} is damaged (not the manifest make data writes). Delete {out} and prepare it again.")
    return manifest


def shard_files(out: Path) -> tuple[Path, list[Path]]:
    """(the validation shard, the training shards in order) of a directory of shards, checked: every shard a 1-D
    uint16 array, with the token count its manifest records when there is one (shards made by build-nanogpt's
    fineweb.py have none, and are read as they are). Exits naming the file and what to do."""
    if not out.is_dir():
        sys.exit(f"error: --data {out} is not a directory. Make shards with: "
                 f"make data ARGS=\"--source ... --out {out}\"")
    val, train = sorted(out.glob("*_val_*.npy")), sorted(out.glob("*_train_*.npy"))
    manifest = read_manifest(out)
    if manifest:  # make data's own list: a shard an earlier run left in the same --out is not read
        listed = {s["file"] for s in manifest["shards"]}
        if stray := [p.name for p in val + train if p.name not in listed]:
            print(f"note: {out} holds {cli.plural(len(stray), 'shard')} that its {MANIFEST} does not list ({stray[0]}"
                  f"{', ...' * (len(stray) > 1)}): left out", file=sys.stderr)
        val, train = [p for p in val if p.name in listed], [p for p in train if p.name in listed]
    if val and not train:
        sys.exit(f"error: {out} holds a validation shard and no training shard: its source gave fewer tokens than "
                 "one shard. Make the shards again into another --out with a smaller --shard-tokens.")
    if not val or not train:
        sys.exit(f"error: {out} holds no shards (*_val_*.npy and *_train_*.npy). Make them with: "
                 f"make data ARGS=\"--source ... --out {out}\"")
    if manifest and not manifest.get("complete"):
        print(f"note: make data has not finished {out} (its manifest says so): using its "
              f"{cli.plural(len(manifest['shards']), 'complete shard')}", file=sys.stderr)
    recorded = {s["file"]: s["tokens"] for s in manifest["shards"]} if manifest else {}
    for name in recorded:
        if not (out / name).exists():
            sys.exit(f"error: {out / name} is in {MANIFEST} but missing. Run make data again with --out {out}: it "
                     "remakes it.")
    for path in [val[0], *train]:
        try:
            shard = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            why = "no .npy header" if "pickle" in str(e) else e  # numpy takes a file without one for a pickle
            sys.exit(f"error: {path} is not a readable .npy shard ({why}). Delete it and run make data again with "
                     f"--out {out}: it remakes it.")
        if shard.dtype != np.uint16 or shard.ndim != 1:
            sys.exit(f"error: {path} holds {shard.dtype} of shape {shard.shape}, not a 1-D array of uint16 token ids "
                     "(the layout make data and build-nanogpt's fineweb.py write). Make it again with make data.")
        if path.name in recorded and recorded[path.name] != len(shard):
            sys.exit(f"error: {path} has {len(shard):,} tokens where {MANIFEST} says {recorded[path.name]:,}: it is "
                     f"truncated or from another run. Run make data again with --out {out}: it remakes it.")
    return val[0], train


def verify(out: Path) -> None:
    """Every shard's sha256 against the manifest's (reads every byte: minutes for 10B tokens)."""
    manifest = read_manifest(out)
    if manifest is None:
        sys.exit(f"error: {out} has no {MANIFEST} to verify against")
    if not manifest["shards"]:
        sys.exit(f"error: {out / MANIFEST} records no shard: nothing to verify. Make them with: "
                 f"make data ARGS=\"--source ... --out {out}\"")
    for s in manifest["shards"]:
        if not (out / s["file"]).is_file():
            sys.exit(f"error: {out / s['file']} is missing. Run make data again with --out {out}: it remakes it")
        if (got := sha256(out / s["file"])) != s["sha256"]:
            sys.exit(f"error: {out / s['file']} is damaged: sha256 {got}, not {s['sha256']} as when it was made. "
                     f"Delete it and run make data again with --out {out}: it remakes it")
    print(f"{out}: {cli.plural(len(manifest['shards']), 'shard')}, every sha256 as recorded"
          + ("" if manifest["complete"] else "; make data has not finished: the same command goes on"))


def main(argv=None):
    p = cli.ArgumentParser(prog="make data", description=__doc__.split("\n\n")[0], hint='make data ARGS="--help"',
                           epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="required unless --verify: fineweb-edu (streamed from the hub), or a .parquet, "
                   ".jsonl or .json (a text field) or .txt file, or a directory of them")
    p.add_argument("--out", type=cli.out_dir, help="required: the directory of shards (made, or continued)")
    p.add_argument("--shard-tokens", type=cli.checked(int, lambda v: v >= MIN_SHARD, f"a whole number, at least "
                   f"{MIN_SHARD}: one window of GPT-2's 1,024 tokens and the token after it"), default=100_000_000,
                   help=f"tokens a shard (default 100000000, 200 MB; at least {MIN_SHARD})")
    p.add_argument("--max-tokens", type=cli.positive_int, help="stop after this many tokens (default: the whole "
                   "source)")
    p.add_argument("--workers", type=cli.positive_int, default=os.cpu_count() or 1, help="tokenizing processes "
                   "(default: one a core)")
    p.add_argument("--verify", action="store_true", help="check the shards in --out against their manifest")
    args = p.parse_args(argv)
    needed = (("--source", args.source or args.verify), ("--out", args.out))
    if missing := [flag for flag, given in needed if not given]:
        p.error(f"{' and '.join(missing)} {'are' if len(missing) == 2 else 'is'} required"
                + " (--verify needs --out alone)" * ("--source" in missing))
    if args.verify:
        return verify(args.out)
    prepare(args.source, args.out, args.shard_tokens, args.max_tokens, args.workers)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: the complete shards and the manifest are kept; run the same command to go on",
              file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT: how a shell reports a command stopped by Ctrl-C

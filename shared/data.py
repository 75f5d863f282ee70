"""Data files, tokenizers and batches. Not a lesson: every step uses these the same way.

Files live in a data directory: `data/` by default, or $GPT2STEPS_DATA. A missing file is
downloaded from its canonical URL; when that fails we say which file to put where, and exit.
Every use checks the file's sha256, so a damaged copy is named instead of silently used.
"""
# the hints name torch, which is imported only where a function needs it
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.client
import os
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch in the hints only: make data's tokenizer processes need none of it (170-180 MiB each)
    import torch

FILES = {  # name -> (canonical URL, sha256)
    "tinyshakespeare.txt": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
    "r50k_base.tiktoken": (  # the GPT-2 BPE merge ranks, in tiktoken's format
        "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
}


def data_dir() -> Path:
    """data/, or $GPT2STEPS_DATA; exits when that is a file (nothing could be read from it or saved in it)."""
    where = Path(os.environ.get("GPT2STEPS_DATA") or "data")  # set but empty: the default too, not "." (Path(""))
    if where.exists() and not where.is_dir():
        named = f"GPT2STEPS_DATA={where}" if os.environ.get("GPT2STEPS_DATA") else f"{where}/"
        sys.exit(f"error: {named} is a file, not a directory: the data files ({', '.join(FILES)}) go in a "
                 "directory; set GPT2STEPS_DATA to one, or leave it unset for data/")
    return where


def not_in_data_dir(name: str) -> str:
    """'NAME is not in DIR/', saying so when DIR itself is missing: a mistyped $GPT2STEPS_DATA."""
    where = data_dir()
    return f"{name} is not in {where}/{'' if where.is_dir() else ' (no such directory)'}"


def fetch(name: str) -> bytes:
    """The contents of a data file, downloaded on first use and checked against its sha256 on every use.

    Exits with a message that names the file and says what to do when it is missing, cannot be
    downloaded, or is damaged (a truncated download, an edited copy).
    """
    url, sha256 = FILES[name]
    path = data_dir() / name
    if not path.exists():
        download(name, url, sha256, path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        sys.exit(f"error: cannot read {path} ({e.strerror})")
    if (got := hashlib.sha256(blob).hexdigest()) != sha256:
        sys.exit(f"error: {path} is damaged: its sha256 is {got}, not {sha256}.\n"
                 f"Delete it and run again to download a good copy, or save {url} there yourself.")
    return blob


def download(name: str, url: str, sha256: str, path: Path) -> None:
    print(f"downloading {name} from {url}", file=sys.stderr)
    tmp = path.with_suffix(f".{os.getpid()}.part")  # one a process: two downloading at once do not mix
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            blob = r.read()
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise OSError("checksum mismatch")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(blob)
        tmp.replace(path)  # atomic: a half-written file never has the real name
    except (OSError, http.client.HTTPException) as e:  # IncompleteRead, a connection cut mid-file, is not an OSError
        with contextlib.suppress(OSError):  # a write cut short (a full disk): no .part left behind
            tmp.unlink(missing_ok=True)
        sys.exit(
            f"error: {not_in_data_dir(name)} and could not be downloaded ({e}).\n"
            f"Download {url}\nand save it as {path}, or set GPT2STEPS_DATA to a directory that holds {name}."
        )


def shakespeare() -> str:
    return fetch("tinyshakespeare.txt").decode("utf-8")


class CharTokenizer:
    """One id per character of the corpus (65 for tiny shakespeare), after any special tokens."""

    def __init__(self, text: str, specials: tuple[str, ...] = ()):
        if clash := sorted(set(specials) & set(text)):
            raise ValueError(f"special symbols {clash} also occur in the text: the decoded text would be ambiguous")
        self.itos = list(specials) + sorted(set(text))
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    def encode(self, s: str) -> list[int]:
        return [self.stoi[c] for c in s]

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids)


def gpt2_tokenizer():
    """GPT-2's BPE (tiktoken's r50k_base, same ids as "gpt2"), built from the local ranks file."""
    return bpe(fetch("r50k_base.tiktoken"))  # checked on every call, parsed once


@functools.lru_cache(maxsize=1)
def bpe(ranks_file: bytes):
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    # One line per token: the token's bytes in base64, then its rank (= its id).
    ranks = {base64.b64decode(token): int(rank) for token, rank in
             (line.split() for line in ranks_file.splitlines() if line)}
    return tiktoken.Encoding(
        name="r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


def split(ids: torch.Tensor, block_size: int, flag: str = "--block-size") -> tuple[torch.Tensor, torch.Tensor]:
    """First 90% for training, last 10% for validation. Exits, naming `flag`, when a window of block_size + 1 ids
    does not fit in one of them."""
    n = int(len(ids) * 0.9)
    train, val = ids[:n], ids[n:]
    longest = min(len(train), len(val)) - 1  # a window that fits both splits
    short = [f"the {name} split ({len(part):,} ids)" for name, part in (("training", train), ("validation", val))
             if len(part) <= block_size]
    if short:
        sys.exit(f"error: {flag} {block_size} {'fits neither ' if len(short) == 2 else 'does not fit '}"
                 f"{' nor '.join(short)}: a window needs {block_size + 1:,} ids (use {flag} {longest} or less)")
    return train, val


def random_windows(ids: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator):
    """x, y: (batch_size, block_size) windows of ids at random offsets, y = x shifted left by one."""
    import torch

    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=gen)  # the last window ends at ids[-1]
    x = torch.stack([ids[s : s + block_size] for s in starts])  # (B, T)
    y = torch.stack([ids[s + 1 : s + block_size + 1] for s in starts])  # (B, T)
    return x, y


def sequential_windows(ids: torch.Tensor, batch_size: int, block_size: int):
    """Every full window of ids in order, batch_size windows at a time: x, y (<= batch_size, block_size)."""
    n = (len(ids) - 1) // block_size  # windows; y needs one id more than x
    x = ids[: n * block_size].view(n, block_size)  # (n, T)
    y = ids[1 : n * block_size + 1].view(n, block_size)  # (n, T), x shifted left by one
    for i in range(0, n, batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]

"""Data files, tokenizers and batches. Not a lesson: every step uses these the same way.

Files live in a data directory: `data/` by default, or $GPT2STEPS_DATA. A missing file is
downloaded from its canonical URL; when that fails we say which file to put where, and exit.
"""
import hashlib
import os
import sys
import urllib.request
from pathlib import Path

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
    return Path(os.environ.get("GPT2STEPS_DATA", "data"))


def fetch(name: str) -> Path:
    """Path of a data file, downloading it on first use. Exits with a clear message when it cannot."""
    url, sha256 = FILES[name]
    path = data_dir() / name
    if path.exists():
        return path
    print(f"downloading {name} from {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            blob = r.read()
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise OSError("checksum mismatch")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(blob)
        tmp.replace(path)  # atomic: a half-written file never has the real name
    except OSError as e:
        sys.exit(
            f"error: {name} is not in {data_dir()}/ and could not be downloaded ({e}).\n"
            f"Download {url}\nand save it as {path}, or set GPT2STEPS_DATA to a directory that holds {name}."
        )
    return path


def shakespeare() -> str:
    return fetch("tinyshakespeare.txt").read_text(encoding="utf-8")


class CharTokenizer:
    """One id per character of the corpus (65 for tiny shakespeare), after any special tokens."""

    def __init__(self, text: str, specials: tuple[str, ...] = ()):
        self.itos = list(specials) + sorted(set(text))
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    def encode(self, s: str) -> list[int]:
        return [self.stoi[c] for c in s]

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids)


def gpt2_tokenizer():
    """GPT-2's BPE (tiktoken's r50k_base, same ids as "gpt2"), built from the local ranks file."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    url, sha256 = FILES["r50k_base.tiktoken"]
    ranks = load_tiktoken_bpe(str(fetch("r50k_base.tiktoken")), expected_hash=sha256)
    return tiktoken.Encoding(
        name="r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


def split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """First 90% for training, last 10% for validation."""
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:]


def random_windows(ids: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator):
    """x, y: (batch_size, block_size) windows of ids at random offsets, y = x shifted left by one."""
    starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([ids[s : s + block_size] for s in starts])  # (B, T)
    y = torch.stack([ids[s + 1 : s + block_size + 1] for s in starts])  # (B, T)
    return x, y

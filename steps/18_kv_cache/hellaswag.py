"""HellaSwag (Zellers et al., 2019), scored completion style, as in GPT-3's paper and llm.c's GPT-2 numbers: each
item is a context and 4 endings; the model reads context + ending for each, and the ending it finds most likely
(the lowest loss over the ending's tokens) is its answer. acc compares the summed losses, acc_norm the losses per
token (which does not favour short endings). GPT-2 124M: acc 0.2859, acc_norm 0.2955 on the 10,042 validation
items; chance: 0.25.
"""
import contextlib
import hashlib
import http.client
import json
import os
import sys
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from shared import data

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_ITEMS = 10_042
GPT2_ACC_NORM = 0.2955  # GPT-2 124M, as build-nanogpt measures it: the line to beat


def val_file() -> Path:
    """The validation file in the data directory: downloaded on first use, its sha256 recorded beside it then and
    checked every time after (with the item count). Offline, says where to put it."""
    path = data.data_dir() / "hellaswag_val.jsonl"
    record = path.with_suffix(".jsonl.sha256")
    if not path.exists():
        print(f"downloading hellaswag_val.jsonl from {URL}", file=sys.stderr)
        try:
            with urllib.request.urlopen(URL, timeout=30) as r:
                blob = r.read()
        except (OSError, http.client.HTTPException) as e:  # HTTPException: a connection cut mid-file (IncompleteRead)
            read_only = path.parent.exists() and not os.access(path.parent, os.W_OK)  # a shared $GPT2STEPS_DATA
            put = f"save it anywhere ({path.parent} is read-only) and give it" if read_only else \
                f"save it as {path}, or give a file"
            sys.exit(f"error: {data.not_in_data_dir('hellaswag_val.jsonl')} and could not be downloaded ({e}).\n"
                     f"Download {URL}\nand {put}: --hellaswag FILE.")
        parts = {target: target.with_name(f".{target.name}.{os.getpid()}.part") for target in (record, path)}
        try:  # each rank its own .part: no torn file
            path.parent.mkdir(parents=True, exist_ok=True)
            for target, content in (record, hashlib.sha256(blob).hexdigest().encode() + b"\n"), (path, blob):
                parts[target].write_bytes(content)
                parts[target].replace(target)
        except OSError as e:  # a data directory that is read-only, or a full disk
            for part in parts.values():
                with contextlib.suppress(OSError):
                    part.unlink(missing_ok=True)
            sys.exit(f"error: cannot save {path} ({e.strerror}): save it there yourself, or give a file: "
                     "--hellaswag FILE.")
    try:
        blob, recorded = path.read_bytes(), record.read_text().strip() if record.exists() else None
    except (OSError, UnicodeDecodeError) as e:  # a directory of that name, a sha256 record that is not text
        sys.exit(f"error: {path} or {record} cannot be read ({type(e).__name__}). Delete both, and run again to "
                 "download it afresh.")
    if recorded is not None and hashlib.sha256(blob).hexdigest() != recorded:
        sys.exit(f"error: {path} has changed since it was downloaded (sha256 in {record}). Delete both, and run "
                 "again to download it afresh.")
    if (n := blob.count(b"\n")) != VAL_ITEMS:
        sys.exit(f"error: {path} has {n:,} lines, not HellaSwag's {VAL_ITEMS:,} validation items: delete it, and "
                 "run again to download it afresh.")
    return path


def load(spec: str) -> list[dict]:
    """The items of --hellaswag: val (the validation file) or a .jsonl in the official format (ctx, endings, label).
    A line that is not such an item stops the run, naming the file and the line."""
    path = val_file() if spec == "val" else Path(spec)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        sys.exit(f"error: --hellaswag {spec}: cannot read {path} ({e.strerror}); give val or a .jsonl file")
    except UnicodeDecodeError:
        sys.exit(f"error: --hellaswag {spec}: {path} is not text (not UTF-8), so not a HellaSwag .jsonl file")
    items = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if (item := item_of(line)) is None:
            sys.exit(f"error: {path}, line {i}: not a HellaSwag item (a JSON object with ctx, a list of 4 endings and "
                     "a label from 0 to 3)")
        items.append(item)
    if not items:
        sys.exit(f"error: {path} holds no HellaSwag items")
    return items


def item_of(line: str) -> dict | None:
    """The item on a line of HellaSwag's .jsonl, or None when the line is not one."""
    try:
        item = json.loads(line)
        ctx, endings, label = item["ctx"], item["endings"], item["label"]
    except (ValueError, KeyError, TypeError, RecursionError):  # not JSON, not an object, or nested too deep
        return None
    label = int(label) if label in ("0", "1", "2", "3") else label  # "2" in the hub's copy
    ok = (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
          and all(isinstance(e, str) for e in endings) and type(label) is int and label in (0, 1, 2, 3))
    return {"ctx": ctx, "endings": endings, "label": label} if ok else None


def rows(item: dict, tok, block_size: int) -> list[tuple[list[int], int]]:
    """The 4 token rows of an item, context + ending, and where each ending starts. A row longer than the model's
    context loses the start of its context (the ending is what is scored); an ending that alone fills the context
    keeps its first block_size - 1 tokens, after the context's last."""
    ctx = tok.encode_ordinary(item["ctx"]) or [tok.eot_token]  # no context: the start of a document
    out = []
    for ending in item["endings"]:
        end = tok.encode_ordinary(" " + ending)[: block_size - 1]  # the space belongs to the ending's first token
        row = (ctx + end)[-block_size:]
        out.append((row, len(row) - len(end)))
    return out


@torch.no_grad()
def ending_losses(model, items: list[dict], tok, device, block_size: int, autocast, per_batch: int = 8,
                  progress: bool = False):
    """(summed, mean): (len(items), 4) losses of each ending's tokens after its context. per_batch items' 4 rows go
    through the model in one forward, right-padded; the padding is masked out of the losses (and, being after the
    real tokens, cannot be attended to by them). progress: a bar on a terminal (10,042 items: most of an hour on a
    CPU)."""
    summed, mean = [], []
    bar = tqdm(total=len(items), desc="HellaSwag", unit="item", leave=False, disable=None if progress else True)
    for i in range(0, len(items), per_batch):
        batch = [r for item in items[i : i + per_batch] for r in rows(item, tok, block_size)]
        width = max(len(row) for row, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # (R, L), R = 4 x items
        scored = torch.zeros(len(batch), width - 1, dtype=torch.bool)  # (R, L - 1): which predictions are endings'
        for r, (row, start) in enumerate(batch):
            ids[r, : len(row)] = torch.tensor(row)
            scored[r, start - 1 : len(row) - 1] = True  # position t predicts token t + 1
        ids, scored = ids.to(device), scored.to(device)
        with autocast:
            logits = model(ids)[0]  # (R, L, padded_vocab_size)
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        losses = losses.view(len(batch), width - 1) * scored  # (R, L - 1), 0 off the endings
        summed.append(losses.sum(1).view(-1, 4))  # (items, 4): each ending's loss, summed
        mean.append((losses.sum(1) / scored.sum(1)).view(-1, 4))  # (items, 4): per token
        bar.update(len(batch) // 4)
    bar.close()  # leave=False: the bar goes, the log line after it stays
    if not items:  # a rank with no items (more ranks than items)
        return torch.zeros(0, 4), torch.zeros(0, 4)
    return torch.cat(summed).cpu(), torch.cat(mean).cpu()  # (len(items), 4) each


def evaluate(model, items: list[dict], tok, args, autocast) -> tuple[float, float]:
    """(acc, acc_norm). Each rank scores every world-th item; the counts are added over the ranks."""
    model.eval()
    mine = items[args.rank :: args.world]
    per_batch = 8 if args.device.type == "cuda" else 1  # on 2 CPU cores 8 items a forward were slower (diary 17)
    summed, mean = ending_losses(model, mine, tok, args.device, model.config.block_size, autocast, per_batch,
                                 progress=args.rank == 0)
    labels = torch.tensor([item["label"] for item in mine])  # (len(mine),)
    where = args.device if args.device.type == "cuda" else "cpu"  # NCCL adds on the GPU, gloo on the CPU
    counts = torch.tensor([(summed.argmin(1) == labels).sum().item(), (mean.argmin(1) == labels).sum().item(),
                           len(mine)], dtype=torch.float64, device=where)  # (3,)
    if args.world > 1:
        dist.all_reduce(counts)
    model.train()
    return (counts[0] / counts[2]).item(), (counts[1] / counts[2]).item()

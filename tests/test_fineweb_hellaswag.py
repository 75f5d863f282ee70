"""Step 17's lesson and every step after it: training on token shards (read memory-mapped, in a seeded shuffled
order that resumes exactly) and HellaSwag scored completion style. The shards' making is in test_shards.py."""
import contextlib
import fcntl
import hashlib
import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from shared import data, shards
from shared.steps import ROOT
from tests.conftest import small_run_flags, with_a_nan_weight
from tests.test_trainer import interrupt_after, metrics

CPU = torch.device("cpu")


def shard_dir(tmp_path, sizes: list[int]) -> list:
    """Training shards of the given token counts, every token a different id (0, 1, 2, ... across the shards)."""
    files, first = [], 0
    for i, n in enumerate(sizes):
        files.append(tmp_path / f"t_train_{i + 1:06d}.npy")
        np.save(files[-1], np.arange(first, first + n, dtype=np.uint16))
        first += n
    return files


def read_windows(loader, batches: int) -> list[int]:
    """The first token of each window the loader gives in that many batches: which window it was."""
    return [int(x[0]) for _ in range(batches) for x in loader.next_batch()[0]]


# ---- the loader

@pytest.mark.main_needs("shards")
def test_an_epoch_reads_every_window_of_every_shard_once_in_a_shuffled_order(step, tmp_path):
    files = shard_dir(tmp_path, [33, 65, 17, 49])  # 4, 8, 2 and 6 windows of T = 8 (the last needs a 9th token)
    loader = step.main.Loader(files, batch_size=4, seq_len=8, seed=0)
    starts = read_windows(loader, 5)  # 20 windows: one epoch
    every = [first + 8 * k for first, n in zip([0, 33, 98, 115], [4, 8, 2, 6]) for k in range(n)]
    assert sorted(starts) == every and starts != every


@pytest.mark.main_needs("shards")
def test_the_order_is_the_seeds_and_another_epoch_is_shuffled_anew(step, tmp_path):
    files = shard_dir(tmp_path, [65, 65, 65])  # 24 windows
    again = lambda seed: read_windows(step.main.Loader(files, 4, 8, seed=seed), 12)  # two epochs
    assert again(0) == again(0) and again(0) != again(1)
    assert again(0)[:24] != again(0)[24:] and sorted(again(0)[:24]) == sorted(again(0)[24:])


@pytest.mark.main_needs("shards")
def test_the_shards_themselves_are_read_in_a_shuffled_order_not_only_their_windows(step, tmp_path):
    files = shard_dir(tmp_path, [17] * 6)  # 6 shards of 2 windows: shard i's windows start at 17 i and 17 i + 8
    epochs = read_windows(step.main.Loader(files, 2, 8, seed=0), 18)  # 3 epochs of 12 windows
    shard_order = [[w // 17 for w in epochs[e * 12 : (e + 1) * 12 : 2]] for e in range(3)]  # a shard's 2 together
    assert all(sorted(o) == list(range(6)) for o in shard_order)  # each shard once an epoch, its windows together
    assert list(range(6)) not in shard_order and len({tuple(o) for o in shard_order}) == 3  # drawn anew an epoch


@pytest.mark.main_needs("shards")
def test_a_loader_made_at_any_position_reads_on_as_the_one_that_read_its_way_there(step, tmp_path):
    # what a resumed run does: a new Loader at the checkpoint's pos, in any epoch (each epoch's order comes from
    # (seed, epoch), not from a generator that has drawn the epochs before)
    files = shard_dir(tmp_path, [33, 65, 17])  # 4 + 8 + 2 = 14 windows an epoch
    walked = read_windows(step.main.Loader(files, 2, 8, seed=4), 24)  # 48 windows: into the 4th epoch
    for pos in (0, 6, 14, 20, 30, 42):  # within and across epochs 0 to 3
        assert read_windows(step.main.Loader(files, 2, 8, seed=4, pos=pos), 3) == walked[pos : pos + 6], pos


@pytest.mark.main_needs("shards")
def test_no_shuffle_reads_the_shards_and_their_windows_in_order(step, tmp_path):
    files = shard_dir(tmp_path, [33, 17])
    assert read_windows(step.main.Loader(files, 3, 8, shuffle=False), 2) == [0, 8, 16, 24, 33, 41]


@pytest.mark.main_needs("shards")
def test_a_batch_is_the_window_and_the_window_shifted_by_one(step, tmp_path):
    files = shard_dir(tmp_path, [65, 65])
    x, y = step.main.Loader(files, 4, 8, seed=3).next_batch()
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64 and torch.equal(y, x + 1)


@pytest.mark.main_needs("shards")
def test_two_ranks_read_disjoint_windows_whose_union_is_what_one_process_reads(step, tmp_path):
    files = shard_dir(tmp_path, [65, 41, 97])  # 8 + 5 + 12 windows: the ranks' batches cross the shards' edges
    one = read_windows(step.main.Loader(files, 2, 8, seed=5), 8)
    ranks = [step.main.Loader(files, 2, 8, seed=5, rank=r, world=2) for r in (0, 1)]
    together = [w for _ in range(4) for r in ranks for w in read_windows(r, 1)]  # rank 0's batch, then rank 1's
    assert together == one


@pytest.mark.main_needs("shards")
def test_a_shard_of_a_whole_number_of_windows_keeps_its_last_token_for_the_last_target(step, tmp_path):
    files = shard_dir(tmp_path, [64, 33])  # 64 = 8 x 8 tokens: 7 windows of T + 1 = 9, the 8th has no target for t=8
    loader = step.main.Loader(files, batch_size=11, seq_len=8, shuffle=False)
    assert loader.windows == 7 + 4
    x, y = loader.next_batch()  # the whole epoch in one batch
    assert [int(w[0]) for w in x] == [*range(0, 56, 8), *range(64, 96, 8)] and torch.equal(y, x + 1)


@pytest.mark.main_needs("shards")
def test_the_gpt2_preset_is_build_nanogpts_10b_token_run(step):
    # build-nanogpt's train_gpt2.py: B=64, T=1024, 2^19 tokens a step for 19,073 steps (10B tokens, one epoch of its
    # FineWeb-Edu sample), lr 6e-4 warmed up over 715 steps and decayed to 10%; AdamW (0.9, 0.95), eps 1e-8, decay 0.1
    # on the 2-D parameters, the gradient clipped at 1.0; validation every 250 steps over 20 batches of 64 windows, a
    # checkpoint every 5,000
    assert step.main.PRESETS["gpt2"] == dict(n_layer=12, n_head=12, n_embd=768, batch_size=64, seq_len=1024,
                                             total_batch_size=2**19, lr=6e-4, max_steps=19_073, warmup_steps=715,
                                             eval_every=250, save_every=5_000, val_windows=20 * 64)
    assert (step.main.BETAS, step.main.EPS, step.main.WEIGHT_DECAY, step.main.CLIP, step.main.MIN_LR) == \
        ((0.9, 0.95), 1e-8, 0.1, 1.0, 0.1)


@pytest.mark.main_needs("shards")
def test_shards_as_build_nanogpts_fineweb_py_writes_them_are_read_as_they_are(step, tmp_path):
    # fineweb.py: np.save(f"edufineweb_{split}_{shard_index:06d}", tokens.astype(np.uint16)), shard 0 the validation
    # split, each document [50256, its tokens...], and no manifest
    rng = np.random.default_rng(0)
    tokens = [np.concatenate([[shards.EOT], rng.integers(0, shards.EOT, 99)]).astype(np.uint16) for _ in range(3)]
    for i, shard in enumerate(tokens):
        np.save(tmp_path / f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}", shard)
    val, train = shards.shard_files(tmp_path)
    assert (val.name, [f.name for f in train]) == ("edufineweb_val_000000.npy",
                                                  ["edufineweb_train_000001.npy", "edufineweb_train_000002.npy"])
    x, _ = step.main.Loader(train, batch_size=24, seq_len=8, shuffle=False).next_batch()  # every window, in order
    assert torch.equal(x.flatten(), torch.from_numpy(np.concatenate([t[:96] for t in tokens[1:]]).astype(np.int64)))


def resident_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024


@pytest.mark.main_needs("shards")
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident memory from /proc")
def test_resident_memory_does_not_grow_with_the_number_of_shards(step, tmp_path):
    def growth(n: int) -> float:
        files = []
        for i in range(n):
            files.append(tmp_path / f"{n}_train_{i:06d}.npy")
            np.save(files[-1], np.random.default_rng(i).integers(0, 50257, 2_000_000, dtype=np.uint16))  # 4 MB
        before = resident_mb()
        loader = step.main.Loader(files, batch_size=8, seq_len=64, seed=0)
        read_windows(loader, 50)
        return resident_mb() - before

    # 20 shards are 80 MB: read whole they would add that much. Memory-mapped, 50 batches touch 400 windows of 130
    # bytes, each on at most 2 pages of 4 kB: 3.2 MB, whatever the number of shards; 8 MB of slack for Python's heap.
    assert growth(20) < growth(2) + 8


@pytest.fixture
def small_shards(tmp_path):
    """Shards of 300 tokens (9 windows of T = 32): a run of the small trainer crosses a shard every 2 iterations."""
    text = "\n\n".join(p for p in data.shakespeare()[:60_000].split("\n\n") if p.strip())
    (tmp_path / "source.txt").write_text(text)
    shards.prepare(str(tmp_path / "source.txt"), tmp_path / "shards", shard_tokens=300, quiet=True)
    return tmp_path / "shards"


@pytest.mark.main_needs("shards")
def test_a_run_stopped_by_ctrl_c_across_a_shard_boundary_resumes_to_the_losses_of_one_run(step, small_shards,
                                                                                          tmp_path, monkeypatch):
    flags = [*small_run_flags(step), "--data", str(small_shards), "--max-steps", "5", "--eval-every", "5",
             "--device", "cpu", "--seed", "0"]
    step.main.main([*flags, "--out", str(tmp_path / "whole")])
    with monkeypatch.context() as m:
        interrupt_after(1, m)  # 2 iterations of 4 windows done: the next batch is windows 8 to 11, across a shard
        with pytest.raises(SystemExit):
            step.main.main([*flags, "--out", str(tmp_path / "split")])
    step.main.main([*flags, "--out", str(tmp_path / "split"), "--resume", str(tmp_path / "split")])
    assert metrics(tmp_path / "split") == metrics(tmp_path / "whole")  # every loss, digit for digit


@pytest.mark.main_needs("shards")
def test_a_run_reads_its_shards_in_the_order_its_seed_and_no_shuffle_give(step, small_shards, tmp_path, monkeypatch):
    batches, next_batch = [], step.main.Loader.next_batch
    monkeypatch.setattr(step.main.Loader, "next_batch", lambda self: batches.append(next_batch(self)) or batches[-1])

    def first_batch(*flags):  # the first batch the run trains on
        batches.clear()
        step.main.main([*small_run_flags(step), "--data", str(small_shards), "--max-steps", "1", "--device", "cpu",
                        "--out", str(tmp_path / "_".join(flags)), *flags])
        return batches[0][0]
    train = shards.shard_files(small_shards)[1]
    expected = lambda **order: step.main.Loader(train, 2, 32, **order).next_batch()[0]  # SMALL_TRAINER's B and T
    assert torch.equal(first_batch("--seed", "1"), expected(seed=1))
    assert torch.equal(first_batch("--seed", "2"), expected(seed=2))
    assert torch.equal(first_batch("--seed", "1", "--no-shuffle"), expected(shuffle=False))
    assert not torch.equal(expected(seed=1), expected(seed=2))  # three first batches that tell the orders apart
    assert not torch.equal(expected(seed=1), expected(shuffle=False))


@pytest.mark.main_needs("shards")
def test_val_windows_evaluates_that_many_windows_of_the_val_shard(step, small_shards, tmp_path, monkeypatch):
    lengths, evaluate = [], step.main.evaluate
    monkeypatch.setattr(step.main, "evaluate", lambda model, ids, args: lengths.append(len(ids)) or evaluate(model, ids,
                                                                                                          args))
    step.main.main([*small_run_flags(step), "--data", str(small_shards), "--val-windows", "3", "--max-steps", "1",
                    "--max-new-tokens", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert lengths == [3 * 32 + 1]  # 3 windows of T = 32, the last with its 33rd token as the last target


@pytest.mark.main_needs("shards")
def test_more_validation_windows_than_the_split_holds_are_said_to_be_fewer(step, small_shards, tmp_path, capsys):
    step.main.main([*small_run_flags(step), "--data", str(small_shards), "--max-steps", "1", "--val-windows", "100",
                    "--device", "cpu", "--out", str(tmp_path / "run")])
    held = (len(np.load(next(small_shards.glob("*_val_*.npy")))) - 1) // 32  # T = 32
    assert (f"holds {held} validation windows of 32 tokens, fewer than --val-windows 100: each evaluation reads "
            f"those {held}") in capsys.readouterr().out and 0 < held < 100


@pytest.mark.main_needs("shards")
def test_a_data_directory_without_shards_is_refused(step, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--data", str(tmp_path), "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert "holds no shards" in str(exit.value.code) and "make data" in str(exit.value.code)


@pytest.mark.main_needs("shards")
@pytest.mark.parametrize("given, said", [
    ("poems.txt", 'make data ARGS="--source {tmp}/poems.txt --out data/shards/poems"'),  # text: make shards of it
    ("poems_train_000001.npy", "give the directory that holds it, {tmp}"),  # a shard: its directory was meant
])
def test_a_file_given_as_data_is_answered_with_what_to_give(step, tmp_path, capsys, given, said):
    (tmp_path / given).write_text("a file, not a directory of shards")
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--data", str(tmp_path / given), "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert exit.value.code == 2 and said.format(tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.main_needs("shakespeare_shards")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_a_run_making_tiny_shakespeares_shards_while_another_makes_them_waits_for_it(step, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("data/shards") / f"tinyshakespeare-{hashlib.sha256(data.shakespeare().encode()).hexdigest()[:12]}"
    out.mkdir(parents=True)
    read, open_source = [], shards.open_source
    monkeypatch.setattr(shards, "open_source", lambda *a: read.append(time.monotonic()) or open_source(*a))
    other = os.open(out, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)  # the other run, making the same shards
    run = threading.Thread(target=step.main.shakespeare_shards, args=(SimpleNamespace(rank=0, world=1),))
    run.start()
    time.sleep(0.5)
    released = time.monotonic()
    os.close(other)
    run.join(timeout=60)
    assert read and read[0] > released  # it read the text only once the other had let go
    assert shards.read_manifest(out)["complete"]
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, f"{out.name}.txt"]  # no part-written text left


@pytest.mark.main_needs("shakespeare_shards")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_tiny_shakespeares_text_that_cannot_be_written_is_one_line_and_leaves_no_part(step, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = f"tinyshakespeare-{hashlib.sha256(data.shakespeare().encode()).hexdigest()[:12]}.txt"
    Path("data/shards").mkdir(parents=True)
    Path(f"data/shards/.{name}.{os.getpid()}.tmp").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(SystemExit) as exit:
        step.main.shakespeare_shards(SimpleNamespace(rank=0, world=1))
    assert exit.value.code == (f"error: cannot write data/shards/{name} (No space left on device). Run from a "
                               "directory where data/ can be written, or give --data")
    assert [p.name for p in Path("data/shards").iterdir()] == [name[:-4]]  # the shards' directory, empty, only


@pytest.mark.main_needs("shards")
def test_without_data_where_data_cannot_be_made_the_run_says_so_in_one_line(step, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").write_text("a file where data/shards/ would go")
    with pytest.raises(SystemExit) as exit:
        step.main.main([*small_run_flags(step), "--max-steps", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert str(exit.value.code).startswith("error: cannot make data/shards/tinyshakespeare-")
    assert "give --data" in str(exit.value.code)


@pytest.mark.main_needs("shards")
@pytest.mark.parametrize("split", ["val", "train"])
def test_a_shard_with_an_id_past_gpt2s_vocabulary_is_named_not_trained_on(step, small_shards, tmp_path, split):
    for path in small_shards.glob(f"*_{split}_*.npy"):  # 50,300: a padded row's id (of 50,304), whose loss would
        np.save(path, np.full_like(np.load(path), 50_300))  # be inf, and "diverged" the wrong word
    with pytest.raises(SystemExit) as exit:
        step.main.main([*small_run_flags(step), "--data", str(small_shards), "--max-steps", "1", "--device", "cpu",
                        "--out", str(tmp_path / "run")])
    assert re.match(rf"error: {small_shards}/\w+_{split}_\d+\.npy holds token id 50,300, past GPT-2's last, 50,256",
                    str(exit.value.code))


# ---- HellaSwag

ITEMS = [{"ctx": "The cat sat on the", "endings": ["mat.", "moon, far away in the sky.", "roof", "idea"], "label": 0},
         {"ctx": "ROMEO: But soft, what light", "endings": ["through yonder window breaks", "is", "a", "b c"],
          "label": 0},
         {"ctx": "A man is cutting a tomato. He", "endings": ["slices it.", "flies.", "sings a song loudly.", "x"],
          "label": 1}] * 3


@pytest.mark.main_needs("hellaswag")
def test_a_row_is_the_context_then_a_space_and_the_ending_which_alone_is_scored(step):
    tok = data.gpt2_tokenizer()
    for item in ITEMS[:3]:
        for (row, start), ending in zip(step.main.hellaswag.rows(item, tok, 64), item["endings"]):
            assert tok.decode(row) == item["ctx"] + " " + ending
            assert tok.decode(row[start:]) == " " + ending  # GPT-2's tokens carry their leading space


@pytest.fixture
def saved_model(step, tmp_path):
    """(the step's model, its directory): a small untrained GPT, written as a GPT2LMHeadModel directory."""
    torch.manual_seed(0)
    model = step.model.GPT(step.model.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.main_needs("hellaswag")
@pytest.mark.parametrize("where", ["a terminal", "a file"])
def test_hellaswag_shows_its_progress_on_a_terminal_only(step, saved_model, monkeypatch, where):
    err = Terminal() if where == "a terminal" else io.StringIO()  # a log file would keep every redrawing
    monkeypatch.setattr(sys, "stderr", err)
    step.main.hellaswag.ending_losses(saved_model[0], ITEMS, data.gpt2_tokenizer(), CPU, 32, contextlib.nullcontext(),
                                      per_batch=1, progress=True)
    drawn = re.search(rf"HellaSwag: +\d+%\|.*\| \d+/{len(ITEMS)} ", err.getvalue())  # "HellaSwag:  0%| | 0/9 "
    assert bool(drawn) == (where == "a terminal")


@pytest.mark.main_needs("hellaswag")
def test_ending_losses_equal_those_from_gpt2lmheadmodels_logits(step, saved_model):
    model, path = saved_model
    hf, tok = GPT2LMHeadModel.from_pretrained(path).eval(), data.gpt2_tokenizer()
    summed, mean = step.main.hellaswag.ending_losses(model, ITEMS, tok, CPU, 32, contextlib.nullcontext())
    for i, item in enumerate(ITEMS):
        for j, (row, start) in enumerate(step.main.hellaswag.rows(item, tok, 32)):
            with torch.no_grad():
                logits = hf(torch.tensor([row])).logits[0]  # (L, vocab)
            losses = F.cross_entropy(logits[start - 1 : -1], torch.tensor(row[start:]), reduction="none")
            # fp32, the same weights: sums of a few token losses near 10.8, differing in the order of float sums only:
            # 7.6e-6 measured (one rounding step of a sum near 54); 1e-4 is 13 such steps at the largest, 87
            assert abs(summed[i, j] - losses.sum()) < 1e-4 and abs(mean[i, j] - losses.mean()) < 1e-4


@pytest.mark.main_needs("hellaswag")
def test_an_items_losses_do_not_depend_on_the_items_that_share_its_batch(step, saved_model):
    model, tok = saved_model[0], data.gpt2_tokenizer()
    alone = torch.cat([step.main.hellaswag.ending_losses(model, [item], tok, CPU, 32, contextlib.nullcontext())[0]
                       for item in ITEMS])
    batched = step.main.hellaswag.ending_losses(model, ITEMS, tok, CPU, 32, contextlib.nullcontext(), per_batch=4)[0]
    # the padding of other lengths hides nothing it should not; 1e-5: batches of other shapes sum in another order
    # (equal as measured on this CPU)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.main_needs("shards")
def test_a_batch_reaches_a_device_that_is_neither_the_cpu_nor_cuda(step, tmp_path):
    files = shard_dir(tmp_path, [33])
    x, y = step.main.Loader(files, 2, 8, device=torch.device("meta")).next_batch()  # meta: as MPS is, another device
    assert x.device.type == y.device.type == "meta" and x.shape == y.shape == (2, 8)


@pytest.mark.main_needs("hellaswag")
def test_hellaswags_counts_are_added_on_the_cpu_off_cuda(step, monkeypatch):
    # MPS has no float64: the counts, made on the device, stopped a Mac's run. meta stands for a device that is
    # neither (.item() of a meta tensor fails); gloo adds CPU tensors, NCCL CUDA ones
    summed = mean = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    monkeypatch.setattr(step.main.hellaswag, "ending_losses", lambda *a, **k: (summed, mean))
    args, model = SimpleNamespace(rank=0, world=1, device=torch.device("meta")), torch.nn.Linear(1, 1)
    model.config = SimpleNamespace(block_size=32)
    assert step.main.hellaswag.evaluate(model, [{"ctx": "", "endings": [""] * 4, "label": 0}], None, args,
                                        None) == (1.0, 1.0)


@pytest.mark.main_needs("hellaswag")
def test_after_scoring_hellaswag_the_model_is_back_in_training_mode(step, monkeypatch):
    # in eval mode, training would go on with its dropout silently off after every evaluation
    summed = mean = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    monkeypatch.setattr(step.main.hellaswag, "ending_losses", lambda *a, **k: (summed, mean))
    model = torch.nn.Dropout(0.1).train()
    model.config = SimpleNamespace(block_size=32)
    step.main.hellaswag.evaluate(model, [{"ctx": "", "endings": [""] * 4, "label": 0}], None,
                                 SimpleNamespace(rank=0, world=1, device=CPU), None)
    assert model.training


@pytest.mark.main_needs("hellaswag")
def test_acc_takes_the_lowest_summed_loss_and_acc_norm_the_lowest_loss_per_token(step, monkeypatch):
    # Item 0: ending 1 has the lowest sum, ending 2 the lowest mean (a long ending); the label is 2.
    # Item 1: ending 3 is lowest both ways; the label is 3.
    summed = torch.tensor([[9.0, 4.0, 6.0, 8.0], [5.0, 5.0, 5.0, 1.0]])
    mean = torch.tensor([[3.0, 4.0, 1.0, 2.0], [2.0, 2.0, 2.0, 0.5]])
    monkeypatch.setattr(step.main.hellaswag, "ending_losses", lambda *a, **k: (summed, mean))
    items = [{"ctx": "", "endings": [""] * 4, "label": 2}, {"ctx": "", "endings": [""] * 4, "label": 3}]
    args, model = SimpleNamespace(rank=0, world=1, device=CPU), torch.nn.Linear(1, 1)
    model.config = SimpleNamespace(block_size=32)
    assert step.main.hellaswag.evaluate(model, items, None, args, None) == (0.5, 1.0)


@pytest.mark.main_needs("hellaswag")
def test_a_context_longer_than_the_model_loses_its_start_not_the_ending(step):
    tok = data.gpt2_tokenizer()
    item = {"ctx": "word " * 100, "endings": ["the end.", "b", "c", "d"], "label": 0}
    row, start = step.main.hellaswag.rows(item, tok, 32)[0]
    assert len(row) == 32 and row[start:] == tok.encode_ordinary(" the end.")


@pytest.mark.main_needs("hellaswag")
def test_an_ending_as_long_as_the_model_keeps_its_first_tokens_after_the_contexts_last(step, saved_model):
    model, tok = saved_model[0], data.gpt2_tokenizer()
    item = {"ctx": "The end", "endings": ["word " * 40, "b", "c", "d"], "label": 0}
    row, start = step.main.hellaswag.rows(item, tok, 32)[0]
    assert start == 1 and row == [tok.encode_ordinary("The end")[-1], *tok.encode_ordinary(" " + "word " * 40)[:31]]
    summed, mean = step.main.hellaswag.ending_losses(model, [item], tok, CPU, 32, contextlib.nullcontext())
    with torch.no_grad():
        logits = model(torch.tensor([row]))[0][0]  # (32, vocab)
    # all 31 predictions are the ending's; fp32, the same forward: equal but for the order of the float sums.
    # The sum is near 325, where a float32 rounding step is 3.1e-5; one step measured. Summed in another order, 31
    # additions may each round by half a step: 5e-4 is that bound. A wrong token or shift is off by whole nats.
    assert abs(summed[0, 0] - F.cross_entropy(logits[:-1], torch.tensor(row[1:]), reduction="sum")) < 5e-4


def write_items(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.main_needs("hellaswag")
@pytest.mark.parametrize("line", ["not json", json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 0}),
                                  json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}),
                                  json.dumps({"endings": ["b", "c", "d", "e"], "label": 1}),
                                  json.dumps({"ctx": "a", "endings": "bcde", "label": 1}),  # 4 letters, not 4 endings
                                  json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 2.7}),
                                  json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": float("inf")}),
                                  "[" * 100_000])  # deeper than json's recursion
def test_a_bad_item_names_the_file_and_the_line(step, tmp_path, line):
    path = write_items(tmp_path / "items.jsonl", [json.dumps(ITEMS[0]), line])
    with pytest.raises(SystemExit) as exit:
        step.main.hellaswag.load(str(path))
    assert str(exit.value.code).startswith(f"error: {path}, line 2: not a HellaSwag item")


@pytest.mark.main_needs("hellaswag")
def test_a_file_that_is_not_text_is_refused_with_one_line(step, tmp_path):
    path = tmp_path / "items.pt"
    path.write_bytes(bytes(range(256)) * 4)  # 0x80 and above alone are not UTF-8
    with pytest.raises(SystemExit) as exit:
        step.main.hellaswag.load(str(path))
    assert str(exit.value.code) == (f"error: --hellaswag {path}: {path} is not text (not UTF-8), so not a HellaSwag "
                                    ".jsonl file")


@pytest.mark.main_needs("hellaswag")
def test_a_bad_hellaswag_file_stops_the_run_before_any_shard_is_made(step, tmp_path, monkeypatch):
    monkeypatch.setattr(step.main, "shakespeare_shards", lambda args: pytest.fail("shards made before --hellaswag"))
    path = write_items(tmp_path / "items.jsonl", ["not json"])
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--hellaswag", str(path), "--device", "cpu", "--out", str(tmp_path / "run")])
    assert str(exit.value.code).startswith(f"error: {path}, line 1: not a HellaSwag item")


@pytest.mark.main_needs("hellaswag")
@pytest.mark.parametrize("failure", [OSError("no network"), http.client.IncompleteRead(b"{", 100)],
                         ids=["offline", "cut off mid-file"])
def test_hellaswag_val_offline_says_where_to_put_the_file(step, tmp_path, monkeypatch, failure):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))
    monkeypatch.setattr(step.main.hellaswag.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(failure))
    with pytest.raises(SystemExit) as exit:
        step.main.hellaswag.load("val")
    message = str(exit.value.code)
    assert "could not be downloaded" in message and str(tmp_path / "hellaswag_val.jsonl") in message
    assert step.main.hellaswag.URL in message


@pytest.mark.main_needs("hellaswag")
def test_hellaswag_val_offline_with_a_read_only_data_directory_says_to_give_the_file(step, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))
    monkeypatch.setattr(step.main.hellaswag.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    # a read-only directory, as os.access answers for one (chmod cannot make one here: root may write anywhere)
    monkeypatch.setattr(step.main.hellaswag.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit) as exit:
        step.main.hellaswag.load("val")
    said = str(exit.value.code)
    assert said.endswith(f"and save it anywhere ({tmp_path} is read-only) and give it: --hellaswag FILE.")


@pytest.mark.main_needs("hellaswag")
@pytest.mark.parametrize("record", ["0" * 64 + "\n", ""], ids=["another download's", "emptied"])
def test_a_val_file_changed_since_its_download_is_refused(step, tmp_path, monkeypatch, record):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))
    write_items(tmp_path / "hellaswag_val.jsonl", [json.dumps(ITEMS[0])] * step.main.hellaswag.VAL_ITEMS)
    (tmp_path / "hellaswag_val.jsonl.sha256").write_text(record)
    with pytest.raises(SystemExit) as exit:
        step.main.hellaswag.load("val")
    assert "has changed since it was downloaded" in str(exit.value.code)


@pytest.mark.main_needs("hellaswag")
@pytest.mark.parametrize("damage", ["a directory of its name", "a sha256 record that is not text"])
def test_a_val_file_that_cannot_be_read_is_refused_with_what_to_do(step, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))
    if damage == "a directory of its name":
        (tmp_path / "hellaswag_val.jsonl").mkdir()
    else:
        write_items(tmp_path / "hellaswag_val.jsonl", [json.dumps(ITEMS[0])] * step.main.hellaswag.VAL_ITEMS)
        (tmp_path / "hellaswag_val.jsonl.sha256").write_bytes(b"\xff\xfe")
    with pytest.raises(SystemExit) as exit:
        step.main.hellaswag.load("val")
    assert "cannot be read" in str(exit.value.code) and "Delete both" in str(exit.value.code)


@pytest.mark.main_needs("hellaswag")
def test_a_downloaded_val_file_that_cannot_be_saved_is_refused_and_leaves_no_part(step, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / f".hellaswag_val.jsonl.{os.getpid()}.part").symlink_to("/dev/full")  # a full disk: every write fails
    monkeypatch.setenv("GPT2STEPS_DATA", str(data_dir))
    monkeypatch.setattr(step.main.hellaswag.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"{}\n"))
    with pytest.raises(SystemExit) as exit:
        step.main.hellaswag.load("val")
    assert str(exit.value.code).startswith(f"error: cannot save {data_dir / 'hellaswag_val.jsonl'} (")
    assert not list(data_dir.glob(".*.part"))


@pytest.mark.main_needs("hellaswag")
def test_a_data_directory_that_is_a_file_is_refused_before_hellaswag_is_downloaded(step, tmp_path, monkeypatch):
    (tmp_path / "data").write_text("a file where the data directory should be")
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(step.main.hellaswag.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(SystemExit) as exit:
        step.main.hellaswag.load("val")
    assert str(exit.value.code).startswith(f"error: GPT2STEPS_DATA={tmp_path / 'data'} is a file, not a directory")


@pytest.mark.main_needs("hellaswag")
def test_a_val_file_with_another_count_of_items_is_refused(step, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))
    write_items(tmp_path / "hellaswag_val.jsonl", [json.dumps(ITEMS[0])] * 10)
    with pytest.raises(SystemExit) as exit:
        step.main.hellaswag.load("val")
    assert "has 10 lines, not HellaSwag's 10,042" in str(exit.value.code)


@pytest.mark.newest  # score_only and hellaswag.py as step 17 brought them, carried unchanged (make diff)
@pytest.mark.main_needs("hellaswag")
def test_eval_only_scores_a_saved_model_and_two_processes_count_what_one_does(step, saved_model, tmp_path, capsys):
    # labels the model gets right on some items only (it answers the same for each copy of an item): an accuracy of
    # 0 or 1, as an untrained model's answers and HellaSwag's labels give, is the same whatever items a rank counts
    summed, _ = step.main.hellaswag.ending_losses(saved_model[0], ITEMS, data.gpt2_tokenizer(), CPU, 32,
                                                  contextlib.nullcontext())
    right = summed.argmin(1).tolist()
    labelled = [{**item, "label": right[i] if i % 3 else (right[i] + 1) % 4} for i, item in enumerate(ITEMS)]
    items = write_items(tmp_path / "items.jsonl", [json.dumps(item) for item in labelled])
    flags = ["--eval-only", "--model", str(saved_model[1]), "--hellaswag", str(items), "--device", "cpu",
             "--dtype", "fp32"]
    step.main.main(flags)
    one = re.search(r"hellaswag acc \S+ acc_norm \S+", capsys.readouterr().out).group(0)
    assert one.startswith("hellaswag acc 0.6667 ")  # 6 of 9 right: items 1, 2, 4, 5, 7, 8
    r = subprocess.run([sys.executable, "-m", "shared.launch", "2", f"steps.{step.name}", *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"hellaswag acc \S+ acc_norm \S+", r.stdout).group(0) == one  # 9 items: 5 on rank 0, 4 on 1


@pytest.mark.main_needs("hellaswag")
def test_eval_only_with_a_model_of_fewer_tokens_than_gpt2s_is_refused(step, tmp_path):
    config = step.model.GPTConfig(block_size=32, vocab_size=100, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    step.model.GPT(config).save_pretrained(tmp_path / "model")
    items = write_items(tmp_path / "items.jsonl", [json.dumps(ITEMS[0])])
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--eval-only", "--model", str(tmp_path / "model"), "--hellaswag", str(items), "--device",
                        "cpu"])
    assert str(exit.value.code).endswith("knows 100 tokens; HellaSwag needs GPT-2's 50,257")


@pytest.mark.main_needs("hellaswag")
def test_eval_only_names_a_mistyped_model_before_it_looks_for_hellaswag(step, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))  # no hellaswag_val.jsonl: it would be downloaded
    monkeypatch.setattr(step.main.hellaswag.urllib.request, "urlopen", lambda *a, **k: pytest.fail("looked for it"))
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--eval-only", "--model", str(tmp_path / "no-such-model"), "--hellaswag", "val", "--device",
                        "cpu"])
    assert str(exit.value.code).startswith(f"error: --model {tmp_path / 'no-such-model'}: ")


@pytest.mark.main_needs("hellaswag")
def test_eval_only_refuses_a_model_with_a_nan_weight_not_scores_it(step, saved_model, tmp_path):
    items = write_items(tmp_path / "items.jsonl", [json.dumps(ITEMS[0])])
    nan = with_a_nan_weight(saved_model[1], tmp_path / "nan")
    with pytest.raises(SystemExit) as exit:  # all its losses would be nan, and argmin would answer ending 0
        step.main.main(["--eval-only", "--model", str(nan), "--hellaswag", str(items), "--device", "cpu"])
    assert "nan or inf in transformer.h.0.mlp.c_fc.weight" in str(exit.value.code)


@pytest.mark.main_needs("hellaswag")
def test_hellaswag_with_a_window_of_one_token_is_refused(step, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--seq-len", "1", "--hellaswag", "val", "--device", "cpu", "--out", str(tmp_path)])
    assert exit.value.code == 2 and "--hellaswag needs --seq-len 2 or more (got 1)" in capsys.readouterr().err


@pytest.mark.main_needs("hellaswag")
def test_eval_only_with_flags_of_training_is_refused_not_ignored(step, capsys):
    with pytest.raises(SystemExit) as exit:  # refused as it is parsed: no model, no items needed
        step.main.main(["--eval-only", "--model", "m", "--hellaswag", "val", "--max-steps", "5", "--lr=1e-3"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--lr, --max-steps with --eval-only: it scores --model on --hellaswag" in err


@pytest.mark.main_needs("hellaswag")
def test_eval_only_without_hellaswag_is_refused(step, saved_model):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--eval-only", "--model", str(saved_model[1]), "--device", "cpu"])
    assert "--eval-only scores HellaSwag" in str(exit.value.code)


@pytest.mark.main_needs("hellaswag")
@pytest.mark.parametrize("model, said", [("runs/x/model", "runs/x/model"), ("", "''")])  # '': seen, not a blank
def test_model_given_to_a_training_run_is_refused_not_left_unread(step, tmp_path, capsys, model, said):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--model", model, "--device", "cpu", "--out", str(tmp_path)])
    assert exit.value.code == 2 and f"--model {said} is for --eval-only" in capsys.readouterr().err


@pytest.mark.main_needs("hellaswag")
def test_a_run_with_hellaswag_logs_acc_and_acc_norm_and_draws_them(step, small_shards, tmp_path, capsys):
    items = write_items(tmp_path / "items.jsonl", [json.dumps(item) for item in ITEMS])
    step.main.main([*small_run_flags(step), "--data", str(small_shards), "--hellaswag", str(items), "--max-steps",
                    "2", "--eval-every", "1", "--device", "cpu", "--seed", "0", "--out", str(tmp_path / "run")])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "hellaswag_acc_norm" in r]
    assert [r["iter"] for r in scored] == [0, 1] and all(0 <= r["hellaswag_acc"] <= 1 for r in scored)
    assert "GPT-2 124M: acc_norm 0.2955" in (tmp_path / "run" / "loss.svg").read_text()
    assert "hellaswag_acc_norm" in json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "| hellaswag_acc " in capsys.readouterr().out


# ---- as a learner runs it

@pytest.mark.newest  # shakespeare_shards as step 17 brought it, carried unchanged (make diff)
@pytest.mark.main_needs("shards")
def test_make_step_offline_with_no_shards_makes_shakespeares_and_trains_on_them(step, tmp_path):
    r = subprocess.run(["make", "-s", "step", f"N={step.name[:2]}", "ARGS=" + " ".join(
        [*small_run_flags(step), "--max-steps", "2", "--device", "cpu", "--out", str(tmp_path)])], cwd=ROOT,
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stdout.splitlines() if line.startswith("no --data")]
    assert len(said) == 1 and "tiny shakespeare" in said[0]
    assert (tmp_path / "summary.json").exists()


@pytest.mark.main_needs("hellaswag")
def test_a_label_written_as_a_string_is_read_as_the_hubs_copy_writes_it(step, tmp_path):
    path = write_items(tmp_path / "items.jsonl", [json.dumps({**ITEMS[2], "label": "1"})])
    assert step.main.hellaswag.load(str(path))[0]["label"] == 1


@pytest.mark.main_needs("hellaswag")
def test_an_item_without_a_context_scores_its_endings_after_an_end_of_text(step, saved_model):
    item, tok = {"ctx": "", "endings": ["Hello", "A much longer ending.", "b", "c"], "label": 0}, data.gpt2_tokenizer()
    assert step.main.hellaswag.rows(item, tok, 32)[0] == ([tok.eot_token, *tok.encode_ordinary(" Hello")], 1)
    summed, mean = step.main.hellaswag.ending_losses(saved_model[0], [item], tok, CPU, 32, contextlib.nullcontext())
    assert torch.isfinite(summed).all() and torch.isfinite(mean).all()  # every ending scored, none of them nan

"""Step 16's lesson and every step after it: data parallelism. N processes (ranks), each with its own slice of every
batch, end each optimizer step with the gradients, parameters and logged loss of one process doing all the work.
The ranks talk over gloo on the CPU: the processes here are real, started as torchrun starts them."""
import contextlib
import importlib
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from shared import runlog
from shared.steps import ROOT
from tests.conftest import SMALL_TRAINER, token_loader

CPU, CUDA1 = torch.device("cpu"), torch.device("cuda", 1)
# 256 tokens an optimizer step in micro-batches of 2 x 32 = 64: 4 micro-steps on one process, 2 on each of two.
ONE_STEP = [*SMALL_TRAINER, "--total-batch-size", "256", "--max-steps", "1", "--max-new-tokens", "1",
            "--device", "cpu", "--seed", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `python -m steps.NN_name`, reading the first 5% of the corpus as the in-process runs do (first_twentieth_of_the_corpus)
ON_A_TWENTIETH = ("from shared import data; corpus = data.shakespeare(); "
                  "data.shakespeare = lambda: corpus[: len(corpus) // 20]; "
                  "import runpy; runpy.run_module('steps.{}', run_name='__main__')")


def rank_env(rank: int, world: int, port: int) -> dict:
    """The environment torchrun gives one process of a run."""
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def as_rank(monkeypatch, device: str, rank: int, world: int) -> SimpleNamespace:
    """In this process, the environment torchrun gives rank `rank` of `world` on one machine; and the args that
    join_process_group reads."""
    for k, v in dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world).items():
        monkeypatch.setenv(k, str(v))
    return SimpleNamespace(device=torch.device(device), rank=rank, world=world, dist_timeout=5)


def start_rank(step, rank: int, world: int, port: int, *flags, twentieth=False):
    """One process of a run, started as torchrun starts it."""
    command = ["-c", ON_A_TWENTIETH.format(step.name)] if twentieth else ["-m", f"steps.{step.name}"]
    return subprocess.Popen([sys.executable, *command, *flags], cwd=ROOT, env=rank_env(rank, world, port), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="session")
def two_ranks_and_one(tmp_path_factory):
    """runs(step): one optimizer step as 2 processes (rank 0 writes to rank0/, rank 1 is told to write to rank1/)
    and as 1 process (one/), on the first 5% of the corpus; made once a step."""
    made = {}

    def runs(step):
        if step.name not in made:
            root = made[step.name] = tmp_path_factory.mktemp(f"ddp-{step.name}")
            port = free_port()
            procs = [start_rank(step, r, 2, port, *ONE_STEP, "--out", str(root / f"rank{r}"), twentieth=True)
                     for r in (0, 1)]
            outputs = [p.communicate(timeout=300) for p in procs]
            for r, (p, (out, err)) in enumerate(zip(procs, outputs)):
                assert p.returncode == 0, f"rank {r} failed:\n{err}"
                (root / f"rank{r}.stdout").write_text(out)
            step.main.main([*ONE_STEP, "--out", str(root / "one")])
        return made[step.name]

    return runs


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.main_needs("join_process_group")
@pytest.mark.first_and_last
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_two_processes_log_the_loss_of_one_process_over_the_same_windows(step, two_ranks_and_one):
    root = two_ranks_and_one(step)
    (two,), (two_val,) = losses(root / "rank0")
    (one,), (one_val,) = losses(root / "one")
    # The same 4 micro-batch losses, averaged as (a + b)/2 + (c + d)/2 halves instead of in one sum: fp32 rounding
    # at 10.8 is 1e-6, and metrics.jsonl rounds to 6 decimals. Measured: 1e-6 (one step of the 6th decimal), and 0
    # for the validation loss.
    assert abs(two - one) <= 3e-6
    assert abs(two_val - one_val) <= 3e-6  # the sums of each rank's validation windows, all-reduced


@pytest.mark.main_needs("join_process_group")
@pytest.mark.first_and_last
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_two_processes_end_the_step_with_the_gradients_and_parameters_of_one_process(step, two_ranks_and_one):
    root = two_ranks_and_one(step)
    two, one = (torch.load(root / d / "checkpoint.pt", weights_only=True) for d in ("rank0", "one"))
    # AdamW's first moment after one step is 0.1 x the (clipped) gradient, kept in fp32 whatever --dtype auto picks
    # (bf16 where the CPU has it): each micro-batch's gradient is the same computation in both runs, and their sum
    # adds the same terms in another order: 1e-5 of a value is about a hundred float32 rounding steps, and
    # 1e-9 absolute a few at gradients below 1e-2, for the values near 0. Measured: 3% of this tolerance at most.
    assert two["optimizer"]["state"].keys() == one["optimizer"]["state"].keys() and two["optimizer"]["state"]
    for (i, a), b in zip(two["optimizer"]["state"].items(), one["optimizer"]["state"].values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], atol=1e-9, rtol=1e-5, msg=f"parameter {i}")
    # The first update is lr x g / (|g| + eps), about lr = 3e-3 x sign(g): a rounding-sized difference in g moves a
    # parameter by far less than 1e-6 wherever |g| is well above eps = 1e-8 (3.7e-9 measured).
    for name, a in two["model"].items():
        torch.testing.assert_close(a, one["model"][name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.main_needs("join_process_group")
@pytest.mark.first_and_last
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_only_rank_0_prints_and_writes(step, two_ranks_and_one):
    root = two_ranks_and_one(step)
    assert sorted(p.name for p in (root / "rank0").iterdir()) == sorted(p.name for p in (root / "one").iterdir())
    assert not (root / "rank1").exists()  # its --out, made when the flags were read, was empty at exit and removed
    assert "iter     0 | loss" in (root / "rank0.stdout").read_text()
    assert (root / "rank1.stdout").read_text() == ""


# The same, with torch.compile counting the graphs dynamo hands its backend (eager: no C++ compiling), each rank into
# $GRAPHS_DIR/rank<RANK> when it exits.
COUNTING_GRAPHS = ("import atexit, os, torch; graphs = []; compile = torch.compile; "
                   "torch.compile = lambda m, **kw: compile(m, backend=lambda gm, inputs: graphs.append(gm) or gm.forward); "
                   "atexit.register(lambda: open(os.path.join(os.environ['GRAPHS_DIR'], 'rank' + os.environ['RANK']), "
                   "'w').write(str(len(graphs)))); " + ON_A_TWENTIETH)


@pytest.mark.main_needs("join_process_group")
@pytest.mark.newest  # compiled() as step 16 brought it, carried unchanged to the newest step (make diff)
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_under_ddp_the_compiled_graph_is_cut_at_the_gradient_buckets(step, tmp_path):
    # Compiled inside DDP's forward, dynamo cuts the model into one graph per bucket of gradients, so that a bucket's
    # all-reduce can start while backward goes on through the next graph. Compiled and called once before it is
    # wrapped, it is one graph, and every all-reduce waits for the whole backward. Dynamo's first bucket holds 1 MB
    # and, walking the graph backwards, meets the tied 6.4 MB token table first: even this small model is cut in two.
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", COUNTING_GRAPHS.format(step.name), *ONE_STEP, "--compile",
                               "--out", str(tmp_path / f"out{r}")], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**rank_env(r, 2, port), "GRAPHS_DIR": str(tmp_path)})
             for r in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{err}"
    assert "compiled in" in outputs[0][0]
    assert [int((tmp_path / f"rank{r}").read_text()) for r in (0, 1)] == [2, 2]


@pytest.mark.main_needs("join_process_group")
def test_each_rank_reads_its_own_windows_and_together_they_read_one_process_batches(step):
    ids = torch.arange(1000)
    one = token_loader(step, ids, batch_size=2, seq_len=8)
    ranks = [token_loader(step, ids, batch_size=2, seq_len=8, rank=r, world=3) for r in range(3)]
    for _ in range(4):
        together = torch.cat([r.next_batch()[0] for r in ranks])  # (3 * 2, 8): this micro-step, all ranks
        alone = torch.cat([one.next_batch()[0] for _ in range(3)])  # 3 micro-steps of one process
        assert torch.equal(together, alone)
        assert len({tuple(w.tolist()) for w in together}) == 6  # no window read twice


@pytest.mark.main_needs("join_process_group")
@pytest.mark.main_lacks("shards")  # from step 17 the windows run on into the next epoch, whatever the world
def test_at_the_end_of_the_data_the_ranks_start_again_together_leaving_out_fewer_than_world_blocks(step):
    # 1000 tokens hold 62 batches of 2 x 8 (+1). One process reads all 62, then starts again at 0; 3 ranks read 20
    # rounds of 3, and with 2 left, fewer than 3, start again at 0 together: those 2 are not read.
    ids = torch.arange(1000)
    one = token_loader(step, ids, batch_size=2, seq_len=8)
    alone = [one.next_batch()[0] for _ in range(62)]
    assert torch.equal(one.next_batch()[0], alone[0])  # one process: the next epoch after all 62
    ranks = [token_loader(step, ids, batch_size=2, seq_len=8, rank=r, world=3) for r in range(3)]
    rounds = [[r.next_batch()[0] for r in ranks] for _ in range(21)]
    for i in range(20):
        for r in range(3):
            assert torch.equal(rounds[i][r], alone[3 * i + r])
    for r in range(3):
        assert torch.equal(rounds[20][r], alone[r])  # the next epoch, on every rank at once; 60 and 61 left out


@pytest.mark.main_needs("leave_process_group")
def test_a_rank_waits_for_every_rank_before_it_leaves_the_group(step, monkeypatch):
    # gloo's threads let go of the last exchange's tensors a moment after the exchange returns, and need Python to do
    # it. A rank that exits at once can begin shutting Python down first, and aborts ("terminate called without an
    # active exception": 5 two-process runs in 131 on 2 cores, before this wait). While it waits, they finish.
    calls, work = [], SimpleNamespace(wait=lambda: calls.append("wait"))
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append("barrier") or work)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(step.main, "LAST_BARRIER", [])
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    step.main.leave_process_group(SimpleNamespace(world=2, device=CPU))
    assert calls == ["barrier", "wait", "destroy"]
    assert step.main.LAST_BARRIER == [work]  # kept: see the deadlock test below


@pytest.mark.main_needs("leave_process_group")
@pytest.mark.parametrize("joined", [True, False])
def test_a_group_of_one_is_left_too_and_a_process_that_joined_none_leaves_none(step, monkeypatch, joined):
    # under torchrun with NPROC=1 the one rank joins a group (NCCL warns at exit of a group never destroyed); run
    # alone, it joins none
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: joined)
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append("barrier") or SimpleNamespace(wait=lambda: None))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(step.main, "LAST_BARRIER", [])
    step.main.leave_process_group(SimpleNamespace(world=1, device=CPU))
    assert calls == (["barrier", "destroy"] if joined else [])


# Two ranks; on each, a model of two 2 MB layers (DDP's first bucket holds 1 MB: two buckets) compiled three ways, and
# the graphs TorchDynamo hands its backend counted for one forward and backward.
GRAPHS_IN_THREE_ORDERS = """
import os, sys, torch, torch.distributed as dist
import torch._dynamo  # before the group, as join_process_group does: else the process can abort as it ends
from torch.nn.parallel import DistributedDataParallel as DDP
class Net(torch.nn.Module):  # a class of our own: dynamo does not start a graph in torch.nn's own forwards
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512)
    def forward(self, x):
        return self.b(torch.relu(self.a(x)))
def graphs(order):
    torch._dynamo.reset()
    graphs, x = [], torch.randn(4, 512)
    compile = lambda m: torch.compile(m, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    if order == "compile(DDP(model))":
        model = compile(DDP(Net()))
    else:
        model = compile(Net())
        if order == "DDP(compile(model)) after a call":
            model(x).sum().backward()  # compiled here, outside any DDP forward
        model = DDP(model)
    model(x).sum().backward()
    return len(graphs)
dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}/store", rank=int(sys.argv[1]), world_size=2)
orders = ("compile(DDP(model))", "DDP(compile(model))", "DDP(compile(model)) after a call")
print([graphs(o) for o in orders], flush=True)
dist.destroy_process_group()
os._exit(0)  # the counts are out: no interpreter shutdown, where a gloo thread can still abort the process
"""


def test_dynamo_cuts_the_graph_at_ddps_buckets_when_its_first_call_is_inside_ddps_forward(tmp_path):
    # the order of torch.compile and DDP does not matter (step 16 compiles the DDP module, build-nanogpt wraps the
    # compiled model); a model compiled by a call before it was wrapped keeps its one graph under DDP
    procs = [subprocess.Popen([sys.executable, "-c", GRAPHS_IN_THREE_ORDERS, str(r), str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()  # a hung rank, when the other failed: not left running
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [out for out, _ in outs] == ["[2, 2, 1]\n"] * 2


# A fresh Python, as torchrun starts a rank: join the group, build an AdamW (which imports torch._dynamo), destroy the
# group. The names of the threads still running: gloo's are called pt_gloo_runloop and gloo_tcp_loop.
THREADS_AFTER_LEAVING = """
import os, sys, types, importlib, torch, torch.distributed as dist
main = importlib.import_module("steps.{}.__main__")
args = types.SimpleNamespace(rank=0, world=1, device=torch.device("cpu"), dist_timeout=60)
main.join_process_group(args)
torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
dist.destroy_process_group()
print(sorted(open(f"/proc/self/task/{{task}}/comm").read().strip() for task in os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads from Linux's /proc")
@pytest.mark.main_needs("join_process_group")
@pytest.mark.newest  # join_process_group as step 16 brought it, carried unchanged (make diff)
def test_a_group_joined_as_the_step_joins_it_stops_gloos_threads_when_destroyed(step):
    # torch._dynamo, imported while a group exists, keeps references to it: the group and its threads then outlive
    # destroy_process_group, and a thread letting go of a tensor as Python shuts down aborts the process ("terminate
    # called without an active exception"). join_process_group imports torch._dynamo before it makes the group.
    r = subprocess.run([sys.executable, "-c", THREADS_AFTER_LEAVING.format(step.name)], cwd=ROOT, text=True,
                       capture_output=True, env=rank_env(0, 1, free_port()), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gloo" not in r.stdout, r.stdout


# Two ranks, round after round: join a group, one DDP backward and one all-reduce, leave_process_group, then drop the
# DDP model, which frees the group: its destructor waits for gloo's threads while holding the GIL. Were one of those
# threads the last to let go of an exchange's tensors, it would wait for the GIL: a deadlock. Before the fix it came
# in each of four tries of 40 rounds, after 2 to 32 of them; a hung run of the trainer's test showed the same stacks.
LEAVING_ROUND_AFTER_ROUND = """
import importlib, sys, types, torch, torch.distributed as dist
import torch._dynamo  # as join_process_group does, before any group exists
from torch.nn.parallel import DistributedDataParallel as DDP
main = importlib.import_module("steps.{}.__main__")
rank, where = int(sys.argv[1]), sys.argv[2]
args = types.SimpleNamespace(rank=rank, world=2, device=torch.device("cpu"))
for i in range(50):
    dist.init_process_group("gloo", init_method=f"file://{{where}}/store{{i}}", rank=rank, world_size=2)
    ddp = DDP(torch.nn.Linear(4, 4))
    ddp(torch.randn(2, 4)).sum().backward()
    dist.all_reduce(torch.ones(1))
    main.leave_process_group(args)
    del ddp
print("50 rounds")
"""


@pytest.mark.main_needs("join_process_group")
@pytest.mark.newest  # leave_process_group as step 16 brought it, carried unchanged (make diff)
def test_leaving_the_group_never_deadlocks_when_ddp_frees_it_right_after(step, tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", LEAVING_ROUND_AFTER_ROUND.format(step.name), str(r), str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=60) for p in procs]  # 50 rounds take about 5 s
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail("a rank hung as it left the group: a gloo thread waiting for the GIL, the main thread for it")
    assert [p.returncode for p in procs] == [0, 0] and [out for out, _ in outs] == ["50 rounds\n"] * 2, outs


@pytest.fixture
def process_group_of_one():
    """A real gloo process group with this test as its only rank."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.main_needs("join_process_group")
def test_gradients_are_all_reduced_once_an_optimizer_step_not_once_a_micro_step(step, process_group_of_one):
    torch.manual_seed(0)
    config = step.model.GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = DDP(step.model.GPT(config))
    all_reduces = []

    def counting(state, bucket):  # a comm hook: DDP calls it for each bucket of gradients it all-reduces
        all_reduces.append(bucket.index())
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

    model.register_comm_hook(None, counting)
    args = SimpleNamespace(device=CPU, dtype="fp32", rank=0, world=1)
    loader = token_loader(step, torch.randint(100, (1000,)), batch_size=2, seq_len=16)
    step.main.accumulate(model, loader, 1, args)
    per_sync = len(all_reduces)
    step.main.accumulate(model, loader, 4, args)
    assert per_sync > 0 and len(all_reduces) == 2 * per_sync  # 4 micro-steps: one all-reduce of every bucket


@pytest.mark.main_needs("join_process_group")
@pytest.mark.newest  # code step 16 brought, carried unchanged: run where it is now
def test_a_process_group_that_cannot_form_fails_within_its_timeout_with_one_line(step, tmp_path):
    start = time.monotonic()
    proc = start_rank(step, 1, 2, free_port(), "--device", "cpu", "--dist-timeout", "1", "--out", str(tmp_path))
    out, err = proc.communicate(timeout=120)
    # Rank 1 looks for rank 0's store at MASTER_ADDR:MASTER_PORT, where nothing listens. TCPStore tries to connect
    # for the timeout, then once more; 20 s more is for starting Python and torch on a busy 2-core machine.
    assert time.monotonic() - start < 2 * 1 + 20
    assert proc.returncode == 1
    assert "error: rank 1 of 2 could not join the process group at 127.0.0.1:" in err and "within 1 s" in err
    assert "Traceback" not in err and "frame #" not in err


@pytest.mark.main_needs("join_process_group")
@pytest.mark.newest  # join_process_group as step 16 brought it, carried unchanged (make diff)
def test_a_group_that_fails_with_an_empty_message_is_named_in_one_line(step, monkeypatch, capfd):
    def fails(*args, **kwargs):
        raise RuntimeError()
    monkeypatch.setattr(step.main.dist, "init_process_group", fails)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(SystemExit) as exit:
        step.main.join_process_group(SimpleNamespace(rank=1, world=2, device=CPU, dist_timeout=5))
    assert exit.value.code == 1
    assert capfd.readouterr().err == ("error: rank 1 of 2 could not join the process group at 10.0.0.1:29500 within "
                                       "5 s (--dist-timeout): RuntimeError\n")


@pytest.mark.main_needs("join_process_group")
@pytest.mark.newest  # only_rank_0_speaks as step 16 brought it, carried unchanged (make diff)
def test_a_run_into_the_out_of_a_running_one_stops_with_rank_0s_line_and_no_traceback(step, tmp_path):
    other = runlog.RunLog(tmp_path, total=10)  # a run already writing there
    port = free_port()
    procs = [start_rank(step, r, 2, port, *ONE_STEP, "--out", str(tmp_path), twentieth=True) for r in (0, 1)]
    (_, err0), (_, err1) = [p.communicate(timeout=120) for p in procs]
    assert err0.strip() == f"error: another run is writing to {tmp_path} now: wait for it to end, or give this one " \
        "another --out" and procs[0].returncode == 1
    assert err1 == "" and procs[1].returncode != 0  # every rank asks; rank 1 stops as well, and says nothing
    other.close()


@pytest.mark.main_needs("join_process_group")
@pytest.mark.first_and_last
def test_a_total_batch_the_processes_do_not_divide_stops_every_rank_with_one_message_leaving_no_out(step, tmp_path):
    start = time.monotonic()
    # 384 is 3 micro-batches of 4 x 32 on one process, but not a whole number on each of two.
    r = subprocess.run(["make", "-s", "step", f"N={step.name[:2]}", "NPROC=2", "ARGS=--device cpu --batch-size 4 "
                        f"--seq-len 32 --total-batch-size 384 --out {tmp_path / 'refused'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "LC_ALL": "C"})  # make's English
    assert r.returncode == 2 and "] Error 2" in r.stderr  # make's line: the launcher's own exit status was 2
    message = ("--total-batch-size 384 is not a multiple of --batch-size x --seq-len x processes = 4 x 32 x 2 = 256 "
               "tokens (the nearest that is: --total-batch-size 512)")  # 384 / 256 = 1.5: a half rounds up
    assert r.stderr.count(message) == 1, r.stderr  # rank 0's; rank 1 refuses silently
    assert "Traceback" not in r.stderr
    assert time.monotonic() - start < 60  # no rank waits for the other: all stop at once
    assert not (tmp_path / "refused").exists()  # rank 0 removed what it made; rank 1, stopped by torchrun, made none


@pytest.mark.main_needs("join_process_group")
@pytest.mark.main_lacks("shards")  # from step 17 on, the data is another: shards, a document after each end-of-text
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_alone_it_logs_the_losses_of_step_15(step, tmp_path):
    flags = [*SMALL_TRAINER, "--total-batch-size", "128", "--max-steps", "3", "--device", "cpu", "--seed", "0"]
    importlib.import_module("steps.15_grad_accum.__main__").main([*flags, "--out", str(tmp_path / "15")])
    step.main.main([*flags, "--out", str(tmp_path / "16")])
    assert losses(tmp_path / "16") == losses(tmp_path / "15")


@pytest.mark.main_needs("join_process_group")
@pytest.mark.newest  # join_process_group as step 16 brought it, carried unchanged (make diff)
def test_more_processes_than_gpus_are_refused_by_every_rank_before_nccl_is_started(step, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a Colab with one GPU, NPROC=2
    with pytest.raises(SystemExit) as exit:
        step.main.join_process_group(as_rank(monkeypatch, "cuda", rank=1, world=2))
    assert str(exit.value.code) == ("error: NPROC=2 on 1 GPU: NCCL takes a GPU for each process (NPROC=1, or --device "
                                    "cpu for gloo between CPU processes)")


@pytest.mark.main_needs("join_process_group")
@pytest.mark.newest  # join_process_group as step 16 brought it, carried unchanged (make diff)
def test_processes_on_a_macs_gpu_are_refused_by_every_rank_before_gloo_is_started(step, monkeypatch):
    with pytest.raises(SystemExit) as exit:
        step.main.join_process_group(as_rank(monkeypatch, "mps", rank=0, world=2))
    assert str(exit.value.code) == ("error: NPROC on a Mac's GPU (mps): gloo, the backend between processes there, "
                                    "adds CPU tensors only (give --device cpu)")


@pytest.mark.main_needs("join_process_group")
@pytest.mark.newest  # join_process_group as step 16 brought it, carried unchanged (make diff)
def test_one_process_on_a_macs_gpu_joins_a_gloo_group_of_one(step, monkeypatch):
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append(backend))
    step.main.join_process_group(as_rank(monkeypatch, "mps", rank=0, world=1))
    assert joined == ["gloo"]


class Windows(torch.nn.Module):
    """A stand-in model that keeps the first token of every window it is given: (logits, loss) as GPT returns."""
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, y):
        self.seen += x[:, 0].tolist()
        return None, x.float().mean()


@pytest.mark.main_needs("join_process_group")
def test_each_rank_evaluates_its_own_validation_windows_and_together_every_one_once(step, monkeypatch):
    # the sum and the count of the windows each rank scores are added over the ranks: ranks that each scored every
    # window would give the same mean, world times the work
    monkeypatch.setattr(step.main.dist, "all_reduce", lambda sums: None)  # no group here: each rank's own sums
    ids = torch.arange(1000)  # 62 batches of 2 windows of 8 (+ 1)
    seen = []
    for rank in range(3):
        model = Windows()
        step.main.evaluate(model, ids, SimpleNamespace(batch_size=2, seq_len=8, world=3, rank=rank, device=CPU,
                                                        dtype="fp32"))
        seen.append(model.seen)
    alone = Windows()
    step.main.evaluate(alone, ids, SimpleNamespace(batch_size=2, seq_len=8, world=1, rank=0, device=CPU, dtype="fp32"))
    assert sorted(sum(seen, [])) == sorted(alone.seen) and len(set(alone.seen)) == len(alone.seen) == 124
    assert [len(s) for s in seen] == [42, 42, 40]  # 21, 21 and 20 batches of 2


@pytest.mark.main_needs("join_process_group")
def test_the_validation_sums_are_added_on_the_cpu_off_cuda(step, monkeypatch):
    # MPS has no float64: the sums, made on the device, stopped a Mac's run at its first evaluation. meta stands for
    # a device that is neither (.item() of a meta tensor fails); the model and the windows stay on the CPU
    monkeypatch.setattr(step.main, "autocast", lambda args: contextlib.nullcontext())  # none for meta
    model = step.model.GPT(step.model.GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=8))
    args = SimpleNamespace(batch_size=2, seq_len=8, world=1, rank=0, device=torch.device("meta"), dtype="fp32")
    assert step.main.reduce_device(args) == CPU and step.main.reduce_device(SimpleNamespace(device=CUDA1)) == CUDA1
    assert math.isfinite(step.main.evaluate(model, torch.randint(50, (100,)), args))


@pytest.mark.main_needs("restore_rng")
def test_each_rank_restores_its_gpus_generator_from_rank_0s_first_gpu(step, monkeypatch):
    # rank 0 saves every GPU's generator as its own process sees them: only its first one ever drew
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    cpu, first, second = torch.get_rng_state(), torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)
    step.main.restore_rng({"cpu": cpu, "cuda": [first, second]}, CUDA1)  # rank 1, on GPU 1
    assert len(restored) == 1 and restored[0][0] is first and restored[0][1] == CUDA1


@pytest.mark.main_needs("restore_rng")
@pytest.mark.parametrize("saved_gpus, device", [
    (0, CUDA1),  # saved on a CPU, resumed on a GPU: the GPU keeps its seeded generator
    (1, CPU),  # saved on a GPU, resumed on a CPU: there is no GPU to restore it to
])
def test_a_gpu_generator_is_restored_only_where_one_was_saved_and_one_is_used(step, monkeypatch, saved_gpus, device):
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    step.main.restore_rng({"cpu": torch.get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * saved_gpus},
                          device)
    assert restored == []


def test_make_step_refuses_nproc_for_a_step_that_runs_as_one_process():
    r = subprocess.run(["make", "-s", "step", "N=08", "NPROC=2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "error: step 08_gpt2 runs as one process" in r.stderr


def test_make_step_refuses_an_nproc_that_is_not_a_number():
    r = subprocess.run(["make", "-s", "step", "N=16", "NPROC=two"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "error: NPROC=two is not a number of processes" in r.stderr


@pytest.mark.main_needs("join_process_group")
def test_a_rank_that_is_not_a_number_gets_one_line(step, monkeypatch):
    monkeypatch.setenv("RANK", "abc")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--device", "cpu"])
    assert str(exit.value.code).startswith("error: RANK and WORLD_SIZE must be whole numbers")


# make step N=16 NPROC=2 (shared.launch, torchrun), on the first 5% of the corpus. After rank 0 logs iteration
# $CTRL_C_AT, Ctrl-C as a terminal sends it: SIGINT to every process of the foreground group (the launcher, torchrun's
# agent, each rank). Each rank writes the count of its optimizer steps (one gradient clip each) to $COUNTS/rank<RANK>.
UNDER_TORCHRUN = """
import os, runpy, signal, torch
from shared import data, runlog
corpus = data.shakespeare()
data.shakespeare = lambda: corpus[: len(corpus) // 20]
steps, clip, log = [], torch.nn.utils.clip_grad_norm_, runlog.RunLog.log
def count_then_clip(*args, **kwargs):
    steps.append(1)
    open(os.path.join(os.environ["COUNTS"], "rank" + os.environ["RANK"]), "w").write(str(len(steps)))
    return clip(*args, **kwargs)
torch.nn.utils.clip_grad_norm_ = count_then_clip
def log_then_ctrl_c(self, it, *args, **kwargs):
    log(self, it, *args, **kwargs)
    if it == int(os.environ["CTRL_C_AT"]):
        os.killpg(os.getpgid(0), signal.SIGINT)
runlog.RunLog.log = log_then_ctrl_c
runpy.run_module(os.environ["STEP_MODULE"], run_name="__main__")
"""


@pytest.mark.main_needs("join_process_group")
@pytest.mark.newest  # code step 16 brought, carried unchanged: run where it is now
def test_ctrl_c_under_torchrun_stops_every_rank_at_one_iteration_and_resumes_exactly(step, tmp_path):
    (tmp_path / "under_torchrun.py").write_text(UNDER_TORCHRUN)
    flags = [*SMALL_TRAINER, "--total-batch-size", "256", "--max-steps", "6", "--eval-every", "3", "--device", "cpu",
             "--seed", "0", "--dist-timeout", "60"]  # a rank that stops alone leaves the other waiting: 60 s, not 300

    def launch(run, *argv, ctrl_c_at=-1):
        (tmp_path / f"counts-{run}").mkdir()
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "STEP_MODULE": f"steps.{step.name}",
               "CTRL_C_AT": str(ctrl_c_at), "COUNTS": str(tmp_path / f"counts-{run}")}
        r = subprocess.run([sys.executable, "-m", "shared.launch", "2", "under_torchrun", *argv], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300, start_new_session=True)  # its own group
        return r, [int((tmp_path / f"counts-{run}" / f"rank{k}").read_text()) for k in (0, 1)]

    whole, counts = launch("whole", *flags, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0 and counts == [6, 6], whole.stderr
    stopped, counts = launch("stopped", *flags, "--out", str(tmp_path / "split"), ctrl_c_at=2)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr
    assert counts == [3, 3]  # both ranks stop after iteration 2, whichever saw the signal first
    assert stopped.stderr.count("To go on:") == 1 and "torchrun:" not in stopped.stderr  # rank 0 speaks for all
    command = stopped.stderr.split("To go on:\n")[1].strip()
    assert command.startswith(f"make step N={step.name[:2]} NPROC=2 ARGS=")
    args = next(word for word in shlex.split(command) if word.startswith("ARGS="))[len("ARGS="):]
    resumed, counts = launch("resumed", *shlex.split(args))  # as make hands $(ARGS) to the shell
    assert resumed.returncode == 0 and counts == [3, 3], resumed.stderr
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # every loss, digit for digit

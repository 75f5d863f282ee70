"""Step 17: the trainer on real pretraining data, scored on a real benchmark. It reads token shards made by
  make data ARGS="--source fineweb-edu --out data/edu_fineweb10B"
  make step N=17 ARGS="--preset gpt2 --data data/edu_fineweb10B --hellaswag val"     (8 GPUs: NPROC=8)
Without --data it makes shards of tiny shakespeare with the same pipeline and trains on them. --hellaswag scores
HellaSwag completion style at every evaluation; --eval-only --model DIR scores a trained model alone."""
import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import math
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # torch.distributed's C++ log: pages of stack frames when a
# connection fails, which join_process_group says in one line (TORCH_CPP_LOG_LEVEL=INFO brings them back)
import numpy as np
import torch  # after the line above: the C++ log reads it once, when torch loads
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from shared import checkpoint, cli, data, device, runlog, shapes, shards

from . import hellaswag
from .model import GPT, GPTConfig

STEP = "17_fineweb_hellaswag"

# --preset sets these; a flag given on the command line overrides its preset's value.
PRESETS = {
    # A small GPT over GPT-2's 50257 tokens: a default run of a few minutes on a 2-core CPU.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, batch_size=4, seq_len=64, total_batch_size=512, lr=1e-3,
                 max_steps=250, eval_every=125, save_every=125,  # step 14's 8 x 64 tokens, in 2 micro-batches
                 val_windows=512),
    # build-nanogpt's GPT-2 124M run: 10B tokens of FineWeb-Edu in 19,073 steps of 2^19 tokens. B=64 fits an 80 GB
    # GPU; --batch-size 16 fits 24 GB at the same total batch, in 4 times the micro-batches.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, batch_size=64, seq_len=1024, total_batch_size=524_288,
                 lr=6e-4, max_steps=19_073, warmup_steps=715, eval_every=250, save_every=5_000, val_windows=1_280),
}
SHAKESPEARE_SHARDS = 10  # without --data: tiny shakespeare in shards of a tenth of (a little more than) its
# tokens, 9 of them, the first for validation
# GPT-3's optimisation (Brown et al., 2020, appendix B), as build-nanogpt uses it for GPT-2.
BETAS, EPS = (0.9, 0.95), 1e-8  # beta2 0.95: the second moment forgets in about 20 steps, not 1000
CLIP = 1.0  # the gradient's global norm is clipped to this
WEIGHT_DECAY = 0.1  # on the 2-D parameters only
MIN_LR = 0.1  # the cosine decays to 10% of --lr
PROMPT = "ROMEO:"
EVAL_ONLY_READS = ["--model", "--hellaswag", "--device", "--dtype", "--dist-timeout"]  # the rest is for training


class Loader:
    """Windows of T + 1 tokens from memory-mapped shards; only the windows of a batch are read and become int64.
    An epoch reads every window of every shard once: the shards in an order shuffled by (seed, epoch), and the
    windows of each shard in an order shuffled by (seed, epoch, shard), as llm.c reads (in file order, a loss can
    repeat the data's own periods). A batch is the next B windows of that order. The position, windows read so far,
    is its whole state, so a checkpoint that saves it resumes on exactly the next batch.
    With `world` processes, the next world batches are read at once, rank r taking the r-th: together the ranks
    read what one process reads in world micro-steps, and no two ranks read the same window."""

    def __init__(self, files: list[Path], batch_size: int, seq_len: int, seed: int = 0, shuffle: bool = True,
                 pos: int = 0, rank: int = 0, world: int = 1, device=torch.device("cpu")):
        self.shards = [np.load(f, mmap_mode="r") for f in files]  # nothing read yet: the pages come as windows do
        self.B, self.T, self.pos, self.seed, self.shuffle = batch_size, seq_len, pos, seed, shuffle
        self.rank, self.world, self.device = rank, world, device  # pos is the same on every rank
        self.counts = [(len(s) - 1) // seq_len for s in self.shards]  # windows a shard: the last one needs a T+1-th
        self.windows, self.tokens = sum(self.counts), sum(map(len, self.shards))
        self.orders = {}  # (epoch,) -> the shards' order; (epoch, shard) -> that shard's windows' order

    def order(self, *key) -> np.ndarray:
        if key not in self.orders:  # keep the epoch's shard order and the last shard's: a few MB, however many shards
            self.orders = {k: v for k, v in self.orders.items() if k == key[:1] or len(key) == 1}
            n = len(self.shards) if len(key) == 1 else self.counts[key[1]]
            self.orders[key] = (np.random.default_rng([self.seed, *key]).permutation(n) if self.shuffle
                                else np.arange(n))
        return self.orders[key]

    def window(self, n: int) -> np.ndarray:
        """The n-th window read since the start, (T + 1,) uint16."""
        epoch, n = divmod(n, self.windows)
        for shard in self.order(epoch):
            if n < self.counts[shard]:
                start = self.order(epoch, shard)[n] * self.T
                tokens = self.shards[shard][start : start + self.T + 1]
                shards.check_ids(tokens, self.shards[shard].filename)  # an id past the vocabulary: one line
                return tokens
            n -= self.counts[shard]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.pos + self.B * self.rank  # this rank's windows
        buf = torch.from_numpy(np.stack([self.window(first + i) for i in range(self.B)]).astype(np.int64))  # (B, T+1)
        self.pos += self.B * self.world
        if self.device.type == "cuda":  # queued behind the GPU's work; the CPU reads on instead of waiting
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        else:
            buf = buf.to(self.device)  # on the CPU: itself; to MPS: a copy
        return buf[:, :-1], buf[:, 1:]  # x, y: (B, T), y is x shifted left by one


def shakespeare_shards(args) -> Path:
    """Shards of tiny shakespeare, made by make data's pipeline (documents cut at blank lines) on first use, under
    data/shards/ (rank 0 makes them; the other ranks wait, and so does another run making them at the same time)."""
    text = data.shakespeare()
    out = Path("data") / "shards" / f"tinyshakespeare-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    source = out.parent / f"{out.name}.txt"
    if args.rank == 0 and not (shards.read_manifest(out) or {}).get("complete"):
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # ./data a file, or read-only
            sys.exit(f"error: cannot make {out} for tiny shakespeare's shards ({e.strerror}): run from a directory "
                     "where data/ can be written, or give --data")
        shards.write_atomic(source, lambda f: f.write(text.encode()),  # whole: another run may be reading it
                            then="Run from a directory where data/ can be written, or give --data")
        tokens = len(text) // 3 + 1  # about 3.3 characters a token: a little more than the tokens it has
        shards.prepare(str(source), out, tokens // SHAKESPEARE_SHARDS + 1, quiet=True, wait=True)
    if args.world > 1:
        dist.barrier(device_ids=[args.device.index] if args.device.type == "cuda" else None)
    print(f"no --data: training on tiny shakespeare, as shards made by make data's pipeline in {out}")
    return out


@torch.no_grad()
def evaluate(model, ids, args) -> float:
    """Mean loss over every window of ids, in order: the same number every time for the same weights.
    Each rank takes every world-th batch of windows; the sums of all ranks are added (an all-reduce)."""
    model.eval()
    total, count = 0.0, 0
    windows = data.sequential_windows(ids, args.batch_size, args.seq_len)  # views of ids, on the device
    for i, (x, y) in enumerate(windows):
        if i % args.world != args.rank:
            continue  # another rank's
        with autocast(args):
            total += model(x, y)[1].item() * y.numel()
        count += y.numel()
    model.train()
    sums = torch.tensor([total, count], dtype=torch.float64, device=reduce_device(args))  # (2,)
    if args.world > 1:
        dist.all_reduce(sums)  # every rank now holds the sums over all ranks
    return (sums[0] / sums[1]).item()


def lr_at(it: int, args) -> float:
    """Linear warmup to --lr over the first warmup_steps iterations, then a cosine down to MIN_LR * lr at
    max_steps, and MIN_LR * lr after that. (A run no longer than its warmup only warms up.)"""
    if it < args.warmup_steps:
        return args.lr * (it + 1) / args.warmup_steps
    progress = min(1.0, (it - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))  # 0 -> 1
    return args.lr * (MIN_LR + (1 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model) -> list[dict]:
    """Weight decay pulls weights toward 0: right for the matrices and embeddings (2-D), which multiply; wrong for
    biases and LayerNorm gains (1-D), which shift and scale, and whose right value is not near 0."""
    params = list(model.parameters())  # each once: lm_head's weight is wte's
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def accumulate(model, loader, micro_steps: int, args) -> torch.Tensor:
    """The gradient of one optimizer step, from micro_steps batches in turn. Each micro-batch's mean loss is divided
    by micro_steps before backward, so the gradients add up to those of the mean loss over all of them: the
    gradient of one batch micro_steps times as large. Returns that mean loss (what is logged).
    Under DDP every rank does this on its own batches; the last backward averages the gradients over the ranks,
    and the returned loss is averaged over them too: both are those of one process doing every rank's batches."""
    mean = torch.zeros((), device=args.device)
    for i in range(micro_steps):
        x, y = loader.next_batch()  # read from the shards, copied to the device
        last = i == micro_steps - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():  # all-reduce once
            with autocast(args):
                loss = model(x, y)[1]  # `_, loss =` would keep the (B, T, vocab) logits alive through backward
            loss = loss / micro_steps  # not the sum: a sum would scale the gradient by micro_steps
            loss.backward()  # adds to .grad; in the last micro-step DDP also averages .grad over the ranks
        mean += loss.detach()
    if args.world > 1:
        dist.all_reduce(mean)  # the sum over ranks: rank 0 logs the loss of every rank's batches, not its own
        mean /= args.world
    return mean


def autocast(args):
    """Inside it, matmuls (linear layers, attention) run in bf16: 7 stored bits of mantissa, fp32's exponent. The loss
    stays fp32, and on CUDA LayerNorm too; on a CPU it runs in the dtype of its input. Attention's softmax is inside
    SDPA's kernel, which keeps the scores and their running max and sum in fp32. The weights, their gradients and
    AdamW's state stay fp32 throughout."""
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")


def choose_dtype(args) -> str:
    """--dtype auto: bf16 where the device computes in it natively, fp32 elsewhere. Says which, and why."""
    native, why = device.bf16_native(args.device)
    if args.dtype == "auto":
        args.dtype = "bf16" if native else "fp32"
    if args.device.type == "cuda":  # fp32 matmuls on tensor cores, with 10 stored bits of mantissa: TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        why += "; fp32 matmuls in TF32" * native  # TF32, like bf16, came with Ampere (8.0): older GPUs ignore it
    return f"{args.dtype} ({why})"


def compiled(model, args, x, y):
    """torch.compile(model), tried on one batch (forward and backward, the graphs training needs). Where compiling
    fails (no C++ compiler, a device it does not support), the eager model, and why.
    Under DDP, model is the DDP module: compiled inside DDP's forward, the graph is cut at DDP's gradient buckets,
    so each bucket's all-reduce starts while backward goes on. A model compiled and first called before it is
    wrapped keeps its one graph, and every all-reduce waits for the whole backward."""
    if args.compile == "auto":
        args.compile = args.device.type == "cuda"  # on 2 CPU cores: ~30 s to compile, paid back late (diary 12)
    if not args.compile:
        return model, "compile off" + (" (on by default on CUDA only; --compile forces it)" if args.device.type !=
                                       "cuda" else "")
    start = time.perf_counter()
    try:
        fast = torch.compile(model)
        with autocast(args):
            fast(x, y)[1].backward()
        model.zero_grad(set_to_none=True)  # the trial's gradients, freed at once
        return fast, f"compiled in {time.perf_counter() - start:.0f} s"
    except Exception as e:  # torch.compile reports its failures at the first call, as any exception
        model.zero_grad(set_to_none=True)
        return model, f"compile failed ({cli.one_line(e, 120)}); running eager"


@contextlib.contextmanager
def ctrl_c_stops_between_iterations():
    """Ctrl-C sets a flag that the loop reads before each iteration, so a checkpoint never holds half of one.
    A second Ctrl-C stops at once."""
    stop = {"requested": False}

    def handler(signum, frame):
        if stop["requested"]:
            print("\nCtrl-C again: stopping now, saving nothing (a checkpoint saved before stays whole)",
                  file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nCtrl-C: stopping before the next iteration (again to stop now)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def resume_command(argv: list[str], out: Path) -> str:
    """The command that started this run, with --resume OUT in place of any --resume it had."""
    keep = [a for i, a in enumerate(argv) if not a.startswith("--resume") and (i == 0 or argv[i - 1] != "--resume")]
    nproc = f" NPROC={os.environ['LOCAL_WORLD_SIZE']}" if "LOCAL_WORLD_SIZE" in os.environ else ""  # torchrun's
    return f'make step N={STEP[:2]}{nproc} {cli.make_args([*keep, "--resume", str(out)])}'


def join_process_group(args) -> None:
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR:MASTER_PORT in the environment), join the other
    processes: NCCL between GPUs, one GPU per process on each machine; gloo between CPU processes. Alone, nothing."""
    if "RANK" not in os.environ:
        return
    if args.device.type == "cuda":
        if (n := int(os.environ["LOCAL_WORLD_SIZE"])) > torch.cuda.device_count():  # every rank refuses, rank 0 says so
            sys.exit(f"error: NPROC={n} on {cli.plural(torch.cuda.device_count(), 'GPU')}: NCCL takes a GPU for each "
                     f"process (NPROC={torch.cuda.device_count()}, or --device cpu for gloo between CPU processes)")
        args.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # this machine's k-th GPU
        torch.cuda.set_device(args.device)
    if args.device.type == "mps" and args.world > 1:  # every rank refuses, rank 0 says so
        sys.exit("error: NPROC on a Mac's GPU (mps): gloo, the backend between processes there, adds CPU tensors only "
                 "(give --device cpu)")
    backend = "nccl" if args.device.type == "cuda" else "gloo"
    # before the group exists: imported after it (AdamW does), it keeps the group alive at exit. Not `import
    # torch._dynamo`, which would make torch a name of this function's own, unbound in the lines above it.
    from torch import _dynamo  # noqa: F401
    try:
        dist.init_process_group(backend, rank=args.rank, world_size=args.world,
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
    except (RuntimeError, ValueError) as e:  # every rank says it: each fails on its own, on its own machine
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        print(f"error: rank {args.rank} of {args.world} could not join the process group at {where} within "
              f"{args.dist_timeout:g} s (--dist-timeout): {cli.one_line(e)}", file=sys.__stderr__)
        sys.exit(1)


def reduce_device(args) -> torch.device:
    """Where sums added over the ranks are made: NCCL adds on the GPU, gloo on the CPU (and MPS has no float64)."""
    return args.device if args.device.type == "cuda" else torch.device("cpu")


LAST_BARRIER = []  # leave_process_group's, kept to the end of the process


def leave_process_group(args) -> None:
    """Wait for every rank, then leave the group. The barrier's work holds on to the tensors of the exchanges before
    it; kept to the end of the process, it is never gloo's thread that lets go of them last. Freeing a tensor Python
    made needs the GIL, and the main thread holds the GIL while it waits for that thread to stop, when the group is
    freed (here, or later by DDP, which holds it): a deadlock."""
    if dist.is_initialized():  # joined, a group of one included: NCCL warns at exit of a group never left
        everyone = dist.barrier(async_op=True, device_ids=[args.device.index] if args.device.type == "cuda" else None)
        everyone.wait()
        dist.destroy_process_group()
        LAST_BARRIER.append(everyone)


def only_rank_0_speaks(rank: int) -> None:
    """The ranks run the same program on the same numbers: rank 0 prints for all of them (its log, its refusals).
    The others print nothing, except a crash of their own. When rank 0 stops alone (its log: a run into the same
    --out begun a moment before, a full disk), their next exchange with it fails: rank 0 has said why, and they stay
    quiet."""
    if rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")

        def crash(kind, e, tb):
            if "Connection closed by peer" not in str(e):  # gloo's words when rank 0 has gone
                traceback.print_exception(kind, e, tb, file=sys.__stderr__)
        sys.excepthook = crash


def rng_states() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(rng: dict, dev: torch.device) -> None:
    """The generators as rank 0 saved them. Each rank's GPU drew what rank 0's first GPU drew (one seed, the same
    draws), so that one is every rank's: rank 0's own view of the other GPUs holds generators it never used."""
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and dev.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"][0], dev)


@device.explain_out_of_memory
def main(argv=None):
    p = cli.parser(__doc__, STEP, max_steps=PRESETS["tiny"]["max_steps"])
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS], help="sizes and batch: tiny (minutes on a "
                   "laptop CPU) or gpt2 (GPT-2 124M, T=1024, build-nanogpt's 10B-token run); auto = gpt2 on CUDA "
                   "with --data, tiny elsewhere. The flags below override it, and --help shows the preset's values "
                   "as their defaults")
    p.add_argument("--n-layer", type=cli.positive_int, help="blocks")
    p.add_argument("--n-head", type=cli.positive_int, help="attention heads; must divide --n-embd")
    p.add_argument("--n-embd", type=cli.positive_int, help="width of the residual stream; the MLP is 4 times as wide")
    p.add_argument("--batch-size", type=cli.positive_int, help="windows per micro-batch (B)")
    p.add_argument("--seq-len", type=cli.positive_int, help="tokens per window (T), also the model's context")
    p.add_argument("--total-batch-size", type=cli.positive_int, help="tokens per optimizer step, gathered in "
                   "micro-batches of B x T on every process; a multiple of B x T x processes")
    p.add_argument("--lr", type=cli.learning_rate, help="the peak learning rate: the warmup rises to it, the cosine "
                   "decays to 10%% of it")
    p.add_argument("--warmup-steps", type=cli.non_negative_int, default=0, help="iterations of linear warmup to "
                   "--lr, then a cosine decay to 10%% of it; 0 = 10%% of --max-steps")
    p.add_argument("--dropout", type=cli.probability, default=0.0, help="dropout probability")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="bf16 autocasts the forward "
                   "pass; auto = bf16 where the device computes in bf16 natively, fp32 elsewhere")
    p.add_argument("--compile", default="auto", action=argparse.BooleanOptionalAction, help="torch.compile the "
                   "model for training; not given: on CUDA only")
    p.add_argument("--eval-every", type=cli.positive_int, help="iterations between validation losses (and "
                   "HellaSwag scores)")
    p.add_argument("--save-every", type=cli.positive_int, help="iterations between checkpoints")
    p.add_argument("--resume", type=cli.existing_dir, help="continue the run whose checkpoint.pt is in this directory, "
                   "with the command that started it; the run goes on writing there (another --out is refused)")
    p.add_argument("--max-new-tokens", type=cli.new_tokens, default=60, help="tokens of the sample written "
                   "at the end")
    p.add_argument("--dist-timeout", type=cli.positive_float, default=300, help="seconds a process waits for the "
                   "others (to start, and at each exchange) before it gives up; under torchrun only")
    p.add_argument("--data", type=shards.directory, help="a directory of token shards (make data); not given: shards "
                   "of tiny shakespeare, made on first use")
    p.add_argument("--shuffle", default=True, action=argparse.BooleanOptionalAction, help="read the shards, and the "
                   "windows in each, in an order shuffled by --seed (--no-shuffle: in order)")
    p.add_argument("--val-windows", type=cli.positive_int, help="validation windows, the first of the val shard")
    p.add_argument("--hellaswag", help="score HellaSwag at every evaluation: val (the 10,042 validation items, "
                   "downloaded on first use) or a .jsonl file in its format; not given: not scored")
    p.add_argument("--eval-only", action="store_true", help="score --model on --hellaswag, without training")
    p.add_argument("--model", help="for --eval-only: a model/ directory of a trainer step, or "
                   "gpt2 ... gpt2-xl from the hub (not given: gpt2)")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    except ValueError:
        sys.exit("error: RANK and WORLD_SIZE must be whole numbers (torchrun sets them; unset them to run alone)")
    only_rank_0_speaks(rank)
    args = cli.parse_with_preset(p, argv, PRESETS, lambda a: "gpt2" if device.pick(a.device).type == "cuda" and a.data
                                 else "tiny")  # not 19,073 steps on tiny shakespeare
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.hellaswag and args.seq_len < 2:  # an ending's first token is predicted from the context's last
        p.error(f"--hellaswag needs --seq-len 2 or more (got {args.seq_len})")
    if args.model is not None and not args.eval_only:
        p.error(f"--model {shlex.quote(args.model)} is for --eval-only: a training run builds a new model "
                "(--preset, --n-layer ...)")
    if args.eval_only and (unread := sorted(p.given - {"--eval-only", *EVAL_ONLY_READS})):
        p.error(f"{', '.join(unread)} with --eval-only: it scores --model on --hellaswag and reads only "
                f"{', '.join(EVAL_ONLY_READS)}")
    args.model = "gpt2" if args.model is None else args.model
    args.rank, args.world = rank, world
    if args.total_batch_size % (args.batch_size * args.seq_len * world):  # every rank refuses, rank 0 says so
        p.error(f"--total-batch-size {args.total_batch_size} is not a multiple of --batch-size x --seq-len"
                f"{' x processes' * (world > 1)} = {args.batch_size} x {args.seq_len}{f' x {world}' * (world > 1)} = "
                f"{args.batch_size * args.seq_len * world} tokens (the nearest that is: --total-batch-size "
                f"{cli.nearest_multiple(args.total_batch_size, args.batch_size * args.seq_len * world)})")
    micro_steps = args.total_batch_size // (args.batch_size * args.seq_len * world)  # on each rank
    args.warmup_steps = args.warmup_steps or max(1, args.max_steps // 10)
    args.device = device.pick(args.device)
    precision = choose_dtype(args)
    if args.eval_only:
        return score_only(args, precision)
    if args.warmup_steps > args.max_steps:  # allowed (a short try of a long run), but said
        print(f"note: --warmup-steps {args.warmup_steps} is more than --max-steps {args.max_steps}: the lr rises to "
              f"{args.max_steps / args.warmup_steps:.1%} of --lr and no further")
    if args.resume and "--out" in p.given and args.out.resolve() != args.resume.resolve():
        p.error(f"--out {args.out} with --resume {args.resume}: a resumed run goes on in the directory it resumes")
    runlog.refuse_if_running(args.resume or args.out)  # a second run into one --out: stopped before any work
    if args.resume:
        args.out = args.resume
    else:
        checkpoint.refuse_to_overwrite(args.out)
    join_process_group(args)
    torch.manual_seed(args.seed)  # the same on every rank: the same initial weights

    tok = data.gpt2_tokenizer()  # GPT-2's BPE: 50257 tokens
    config = GPTConfig(args.seq_len, tok.n_vocab, args.n_layer, args.n_head, args.n_embd, args.dropout)
    items = hellaswag.load(args.hellaswag) if args.hellaswag else None  # a bad file stops the run before the shards
    args.data = args.data or shakespeare_shards(args)
    val_file, train_files = shards.shard_files(args.data)  # checked: each a 1-D uint16 array, as its manifest says
    run = {"step": STEP, **dataclasses.asdict(config), "batch_size": args.batch_size,
           "total_batch_size": args.total_batch_size, "lr": args.lr,
           "max_steps": args.max_steps, "seed": args.seed, "dtype": args.dtype,
           "warmup_steps": args.warmup_steps, "data": f"{len(train_files)} shards in {args.data.resolve()}",
           "shuffle": args.shuffle}  # what must match for --resume
    state = checkpoint.load(args.out) if args.resume else None  # read and checked before any work
    if state:
        checkpoint.check_config(args.out, state["config"], run)
        if state["iter"] >= args.max_steps:  # nothing to do: leave its summary, model and loss curve as they are
            print(f"{args.out} holds a finished run ({state['iter']} of {args.max_steps} iterations): "
                  "nothing to resume")
            return
    val = np.load(val_file, mmap_mode="r")[: args.val_windows * args.seq_len + 1]  # the first --val-windows windows
    if len(val) <= args.seq_len:
        sys.exit(f"error: --seq-len {args.seq_len} does not fit {val_file}: a window needs {args.seq_len + 1} tokens")
    if (held := (len(val) - 1) // args.seq_len) < args.val_windows:  # said, not refused: the split is what it is
        print(f"note: {val_file} holds {held:,} validation windows of {args.seq_len} tokens, fewer than --val-windows "
              f"{args.val_windows:,}: each evaluation reads those {held:,}")
    shards.check_ids(val, val_file)
    val_ids = torch.from_numpy(val.astype(np.int64)).to(args.device)  # once: 8 bytes a token
    device.refuse_a_model_too_big(GPT, config, args.device)  # before minutes of building
    model = GPT(config).to(args.device)
    loader = Loader(train_files, args.batch_size, args.seq_len, args.seed, args.shuffle, rank=args.rank,
                    world=args.world, device=args.device)
    if loader.windows < args.batch_size * args.world:
        sys.exit(f"error: {args.data} has {loader.windows} training windows of {args.seq_len + 1} tokens, fewer than "
                 f"one batch of every process ({args.batch_size * args.world}); give more data or a smaller batch")
    print(f"step {STEP} on {args.device}: preset {args.preset}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters ({cli.plural(config.n_layer, 'layer')} of {config.n_embd}), batch "
          f"{args.total_batch_size:,} tokens = "
          f"{micro_steps} micro-batch{'es' * (micro_steps > 1)} of {args.batch_size} x {args.seq_len}"
          f"{f' on each of {args.world} processes' * (args.world > 1)}, {loader.tokens:,} training tokens in "
          f"{len(train_files)} shard{'s' * (len(train_files) > 1)} ({'shuffled' if args.shuffle else 'in order'}), "
          f"dtype {precision}")
    if args.total_batch_size > loader.tokens:  # GPT-2's 524,288 on tiny shakespeare: some windows twice a step
        print(f"note: a step of {args.total_batch_size:,} tokens is {args.total_batch_size / loader.tokens:.1f}x the "
              f"training tokens, and its first log line comes after all {micro_steps} micro-batches; a smaller "
              f"--total-batch-size (a multiple of {args.total_batch_size // micro_steps:,}) makes it shorter")
    shapes.show(model, loader.next_batch()[0][:4], depth=3)
    loader.pos = 0
    ddp = model
    if args.world > 1:  # DDP copies rank 0's weights to every rank; backward then averages gradients over them
        ddp = DDP(model, device_ids=[args.device.index] if args.device.type == "cuda" else None)
        print(f"DistributedDataParallel: {args.world} processes, backend {dist.get_backend()}")
    fast, compile_note = compiled(ddp, args, *loader.next_batch())  # fast: the model to train, compiled or not
    loader.pos = 0
    print(f"attention: F.scaled_dot_product_attention (flash where the device has it); {compile_note}")
    print(f"HellaSwag: {cli.plural(len(items), 'item')} at every evaluation" if items else
          "HellaSwag: off (--hellaswag val, or --hellaswag FILE, scores it at every evaluation)")

    fused = args.device.type in ("cpu", "cuda")  # one fused pass a parameter (mps has one too: untried here)
    opt = torch.optim.AdamW(param_groups(model), lr=args.lr, betas=BETAS, eps=EPS, fused=fused)
    start = 0
    if state:
        with checkpoint.restoring(args.out):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            restore_rng(state["rng"], args.device)
        start, loader.pos = state["iter"], state["loader"]
        print(f"resumed from {args.out / checkpoint.NAME} at iteration {start}")

    def save(it: int) -> None:  # `it` iterations are done; rank 0 writes, for every rank
        if args.rank == 0:
            checkpoint.save(args.out, {"config": run, "iter": it, "model": model.state_dict(),
                                       "optimizer": opt.state_dict(), "loader": loader.pos, "rng": rng_states()})

    log = runlog.RunLog(args.out, args.max_steps, args.log_every, start, fresh=not state, baseline=(
        "hellaswag", "GPT-2 124M", hellaswag.GPT2_ACC_NORM)) if args.rank == 0 else None
    val_loss, bench = math.nan, {}
    with ctrl_c_stops_between_iterations() as stop:
        for it in range(start, args.max_steps):
            if args.world > 1:  # all ranks stop at the same iteration, whichever saw the Ctrl-C
                flag = torch.tensor(float(stop["requested"]), device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop["requested"] = bool(flag)
            if stop["requested"]:
                save(it)
                go_on = resume_command(argv, args.out)
                if log:
                    log.close(interrupted={"iters_done": it, "resume": go_on}, val_loss=val_loss)  # the curve so far
                print(f"interrupted: {cli.plural(it, 'iteration')} done, checkpoint in {args.out / checkpoint.NAME}. "
                      f"To go on:\n  {go_on}", file=sys.stderr)
                leave_process_group(args)
                sys.exit(130)  # 128 + SIGINT: how a shell reports a command stopped by Ctrl-C
            opt.zero_grad(set_to_none=True)
            loss = accumulate(fast, loader, micro_steps, args)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)  # the norm before clipping
            lr = lr_at(it, args)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            if log:
                log.log(it, loss.item(), lr, tokens=args.total_batch_size,
                        grad_norm=norm.item())  # stops at a nan loss
            elif not math.isfinite(loss.item()):
                sys.exit(1)  # the loss is all-reduced: rank 0 sees the same nan and says so
            if (it + 1) % args.eval_every == 0 or it + 1 == args.max_steps:
                also = " and " + cli.plural(len(items), "HellaSwag item") if items else ""
                windows = cli.plural((len(val_ids) - 1) // args.seq_len, "validation window")
                print(f"iter {it:5d} | evaluating {windows}{also} ...", flush=True)
                val_loss = evaluate(model, val_ids, args)
                bench = dict(zip(("hellaswag_acc", "hellaswag_acc_norm"), hellaswag.evaluate(
                    model, items, tok, args, autocast(args)))) if items else {}  # every rank scores its share
                if log:
                    log.log_val(it, val_loss, **bench)
            if (it + 1) % args.save_every == 0 or it + 1 == args.max_steps:
                save(it + 1)
    leave_process_group(args)
    if args.rank != 0:
        return
    log.close(val_loss=val_loss, **bench, uniform_guess=math.log(tok.n_vocab))
    try:
        model.save_pretrained(args.out / "model")
    except OSError as e:  # a full disk: the checkpoint written at the last iteration holds the same weights
        sys.exit(f"error: cannot write {args.out / 'model'} ({e.strerror}); {args.out / checkpoint.NAME} holds the "
                 "trained weights")
    finally:  # a file half-written (a full disk, a Ctrl-C) would be left behind
        for half in (args.out / "model").glob("*.tmp"):
            half.unlink()
    print(f"model: {args.out / 'model'} (transformers.GPT2LMHeadModel.from_pretrained reads it, and so does "
          f"make step N=09 ARGS=\"--model {args.out / 'model'}\")")
    show_sample(model, tok, args)


def load_model(args) -> GPT:
    """--model for --eval-only, refused in one line when it cannot be read or holds nan or inf."""
    try:
        model = GPT.from_pretrained(args.model).to(args.device)
    except (OSError, ValueError) as e:
        sys.exit(f"error: --model {args.model}: {e}")
    if bad := [k for k, w in model.named_parameters() if not w.isfinite().all()]:  # saved from a diverged run
        sys.exit(f"error: --model {args.model}: nan or inf in {bad[0]} ({len(bad)} of its tensors), from a run "
                 "that diverged, or damaged")
    return model


def score_only(args, precision: str) -> None:
    """--eval-only: HellaSwag for a trained model, a model/ directory of a trainer step or gpt2 ... gpt2-xl."""
    if not args.hellaswag:
        sys.exit("error: --eval-only scores HellaSwag: give --hellaswag val or --hellaswag FILE")
    join_process_group(args)
    model = load_model(args)  # before the items: a --model mistyped is named before HellaSwag is looked for
    if model.config.vocab_size < data.gpt2_tokenizer().n_vocab:  # HellaSwag's text has ids past its table
        sys.exit(f"error: --model {args.model} knows {model.config.vocab_size:,} tokens; HellaSwag needs GPT-2's "
                 "50,257")
    items = hellaswag.load(args.hellaswag)
    print(f"step {STEP} on {args.device}: scoring {args.model} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters) on {cli.plural(len(items), 'HellaSwag item')}, dtype {precision}")
    start = time.perf_counter()
    acc, acc_norm = hellaswag.evaluate(model, items, data.gpt2_tokenizer(), args, autocast(args))
    print(f"hellaswag acc {acc:.4f} acc_norm {acc_norm:.4f} ({len(items) / (time.perf_counter() - start):.1f} items/s)"
          f"; GPT-2 124M scores acc 0.2859, acc_norm {hellaswag.GPT2_ACC_NORM} on the validation items")
    leave_process_group(args)


@torch.no_grad()
def show_sample(model, tok, args):
    model.eval()
    idx = torch.tensor([tok.encode(PROMPT)], device=args.device)  # (1, T)
    gen = torch.Generator(args.device).manual_seed(args.seed)  # sampling draws on the model's device
    out = model.generate(idx, args.max_new_tokens, generator=gen, top_k=50)  # (1, T + max_new_tokens)
    print("-" * 60)
    print(tok.decode(out[0].tolist()))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop: nothing half-written
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT: how a shell reports a command stopped by Ctrl-C
    except SystemExit as e:  # a refusal: every rank refuses the same input; rank 0 says why
        if e.code and os.environ.get("RANK", "0") != "0":
            time.sleep(2)  # torchrun stops every rank at the first exit: let rank 0 speak first
        raise

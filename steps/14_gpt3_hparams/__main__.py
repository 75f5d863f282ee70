"""Step 14: the same model, optimised as GPT-3 was: AdamW (0.9, 0.95), clipping, warmup, cosine, weight decay."""
import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import torch

from shared import checkpoint, cli, data, device, runlog, shapes

from .model import GPT, GPTConfig

STEP = "14_gpt3_hparams"

# --preset sets these; a flag given on the command line overrides its preset's value.
PRESETS = {
    # A small GPT over GPT-2's 50257 tokens: a default run of a few minutes on a 2-core CPU.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, batch_size=8, seq_len=64, lr=1e-3, max_steps=250,
                 eval_every=125, save_every=125),
    # GPT-2 small (124M) with its context of 1024 tokens, as build-nanogpt trains it on one GPU.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, batch_size=16, seq_len=1024, lr=6e-4, max_steps=50,
                 eval_every=25, save_every=25),
}
# GPT-3's optimisation (Brown et al., 2020, appendix B), as build-nanogpt uses it for GPT-2.
BETAS, EPS = (0.9, 0.95), 1e-8  # beta2 0.95: the second moment forgets in about 20 steps, not 1000
CLIP = 1.0  # the gradient's global norm is clipped to this
WEIGHT_DECAY = 0.1  # on the 2-D parameters only
MIN_LR = 0.1  # the cosine decays to 10% of --lr
PROMPT = "ROMEO:"


class Loader:
    """Consecutive windows of the training tokens. A batch is the next B*T + 1 tokens, cut into B rows of T;
    the next batch starts B*T tokens later; past the end of the split it starts again at 0. The position is
    its whole state, so a checkpoint that saves it resumes on exactly the next batch."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, pos: int = 0):
        self.ids, self.B, self.T, self.pos = ids, batch_size, seq_len, pos  # ids on the device: batches are views

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.B, self.T
        if self.pos + B * T + 1 > len(self.ids):
            self.pos = 0  # the next epoch
        buf = self.ids[self.pos : self.pos + B * T + 1]  # (B*T + 1,)
        self.pos += B * T
        return buf[:-1].view(B, T), buf[1:].view(B, T)  # x, y: (B, T), y is x shifted left by one


@torch.no_grad()
def evaluate(model, ids, args) -> float:
    """Mean loss over every window of ids, in order: the same number every time for the same weights."""
    model.eval()
    total, count = 0.0, 0
    for x, y in data.sequential_windows(ids, args.batch_size, args.seq_len):  # views of ids, on the device
        with autocast(args):
            total += model(x, y)[1].item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


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
    fails (no C++ compiler, a device it does not support), the eager model, and why."""
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
    return f'make step N={STEP[:2]} {cli.make_args([*keep, "--resume", str(out)])}'


def rng_states() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


@device.explain_out_of_memory
def main(argv=None):
    p = cli.parser(__doc__, STEP, max_steps=PRESETS["tiny"]["max_steps"])
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS], help="sizes and batch: tiny (minutes on a "
                   "laptop CPU) or gpt2 (GPT-2 124M, T=1024); auto = gpt2 on CUDA, tiny elsewhere. The flags "
                   "below override it, and --help shows the preset's values as their defaults")
    p.add_argument("--n-layer", type=cli.positive_int, help="blocks")
    p.add_argument("--n-head", type=cli.positive_int, help="attention heads; must divide --n-embd")
    p.add_argument("--n-embd", type=cli.positive_int, help="width of the residual stream; the MLP is 4 times as wide")
    p.add_argument("--batch-size", type=cli.positive_int, help="windows per batch (B)")
    p.add_argument("--seq-len", type=cli.positive_int, help="tokens per window (T), also the model's context")
    p.add_argument("--lr", type=cli.learning_rate, help="the peak learning rate: the warmup rises to it, the cosine "
                   "decays to 10%% of it")
    p.add_argument("--warmup-steps", type=cli.non_negative_int, default=0, help="iterations of linear warmup to "
                   "--lr, then a cosine decay to 10%% of it; 0 = 10%% of --max-steps")
    p.add_argument("--dropout", type=cli.probability, default=0.0, help="dropout probability")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="bf16 autocasts the forward "
                   "pass; auto = bf16 where the device computes in bf16 natively, fp32 elsewhere")
    p.add_argument("--compile", default="auto", action=argparse.BooleanOptionalAction, help="torch.compile the "
                   "model for training; not given: on CUDA only")
    p.add_argument("--eval-every", type=cli.positive_int, help="iterations between validation losses")
    p.add_argument("--save-every", type=cli.positive_int, help="iterations between checkpoints")
    p.add_argument("--resume", type=cli.existing_dir, help="continue the run whose checkpoint.pt is in this directory, "
                   "with the command that started it; the run goes on writing there (another --out is refused)")
    p.add_argument("--max-new-tokens", type=cli.new_tokens, default=60, help="tokens of the sample written "
                   "at the end")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = cli.parse_with_preset(p, argv, PRESETS, lambda a: "gpt2" if device.pick(a.device).type == "cuda" else "tiny")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    args.warmup_steps = args.warmup_steps or max(1, args.max_steps // 10)
    args.device = device.pick(args.device)
    precision = choose_dtype(args)
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
    torch.manual_seed(args.seed)

    tok = data.gpt2_tokenizer()  # GPT-2's BPE: 50257 tokens
    config = GPTConfig(args.seq_len, tok.n_vocab, args.n_layer, args.n_head, args.n_embd, args.dropout)
    run = {"step": STEP, **dataclasses.asdict(config), "batch_size": args.batch_size, "lr": args.lr,
           "max_steps": args.max_steps, "seed": args.seed, "dtype": args.dtype,
           "warmup_steps": args.warmup_steps}  # what must match for --resume
    state = checkpoint.load(args.out) if args.resume else None  # read and checked before any work
    if state:
        checkpoint.check_config(args.out, state["config"], run)
        if state["iter"] >= args.max_steps:  # nothing to do: leave its summary, model and loss curve as they are
            print(f"{args.out} holds a finished run ({state['iter']} of {args.max_steps} iterations): "
                  "nothing to resume")
            return
    train_ids, val_ids = data.split(torch.tensor(tok.encode(data.shakespeare())), args.seq_len, "--seq-len")
    if args.batch_size * args.seq_len + 1 > len(train_ids):  # a batch is the next B*T + 1 tokens
        sys.exit(f"error: a batch of {args.batch_size} x {args.seq_len} tokens does not fit the {len(train_ids):,} "
                 f"training tokens (use --batch-size {(len(train_ids) - 1) // args.seq_len} or less)")
    train_ids, val_ids = train_ids.to(args.device), val_ids.to(args.device)  # once: 8 bytes a token, 2.7 MB
    device.refuse_a_model_too_big(GPT, config, args.device)  # before minutes of building
    model = GPT(config).to(args.device)
    loader = Loader(train_ids, args.batch_size, args.seq_len)
    print(f"step {STEP} on {args.device}: preset {args.preset}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters ({cli.plural(config.n_layer, 'layer')} of {config.n_embd}), batch {args.batch_size} x "
          f"{args.seq_len} tokens, {len(train_ids):,} training tokens, dtype {precision}")
    shapes.show(model, loader.next_batch()[0][:4], depth=3)
    loader.pos = 0
    fast, compile_note = compiled(model, args, *loader.next_batch())  # fast: the model to train, compiled or not
    loader.pos = 0
    print(f"attention: F.scaled_dot_product_attention (flash where the device has it); {compile_note}")

    fused = args.device.type in ("cpu", "cuda")  # one fused pass a parameter (mps has one too: untried here)
    opt = torch.optim.AdamW(param_groups(model), lr=args.lr, betas=BETAS, eps=EPS, fused=fused)
    start = 0
    if state:
        with checkpoint.restoring(args.out):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["cpu"])
            if state["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(state["rng"]["cuda"][: torch.cuda.device_count()])  # on fewer GPUs too
        start, loader.pos = state["iter"], state["loader"]
        print(f"resumed from {args.out / checkpoint.NAME} at iteration {start}")

    def save(it: int) -> None:  # `it` iterations are done
        checkpoint.save(args.out, {"config": run, "iter": it, "model": model.state_dict(),
                                   "optimizer": opt.state_dict(), "loader": loader.pos, "rng": rng_states()})

    log = runlog.RunLog(args.out, args.max_steps, args.log_every, start, fresh=not state)
    val_loss = math.nan
    with ctrl_c_stops_between_iterations() as stop:
        for it in range(start, args.max_steps):
            if stop["requested"]:
                save(it)
                go_on = resume_command(argv, args.out)
                log.close(interrupted={"iters_done": it, "resume": go_on}, val_loss=val_loss)  # the curve so far
                print(f"interrupted: {cli.plural(it, 'iteration')} done, checkpoint in {args.out / checkpoint.NAME}. "
                      f"To go on:\n  {go_on}", file=sys.stderr)
                sys.exit(130)  # 128 + SIGINT: how a shell reports a command stopped by Ctrl-C
            x, y = loader.next_batch()  # views of the tokens already on the device: nothing is copied
            with autocast(args):
                loss = fast(x, y)[1]  # `_, loss =` would keep the (B, T, vocab) logits alive through backward
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)  # the norm before clipping
            lr = lr_at(it, args)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            log.log(it, loss.item(), lr, tokens=x.numel(), grad_norm=norm.item())  # stops at a nan loss
            if (it + 1) % args.eval_every == 0 or it + 1 == args.max_steps:
                windows = cli.plural((len(val_ids) - 1) // args.seq_len, "validation window")
                print(f"iter {it:5d} | evaluating {windows} ...", flush=True)  # the whole split: seconds on a CPU
                val_loss = evaluate(model, val_ids, args)
                log.log_val(it, val_loss)
            if (it + 1) % args.save_every == 0 or it + 1 == args.max_steps:
                save(it + 1)
    log.close(val_loss=val_loss, uniform_guess=math.log(tok.n_vocab))
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

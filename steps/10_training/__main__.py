"""Step 10: GPT-2 trained from scratch on tiny shakespeare: GPT-2's init, AdamW, a data loader, checkpoints."""
import contextlib
import dataclasses
import math
import signal
import sys
from pathlib import Path

import torch

from shared import checkpoint, cli, data, device, runlog, shapes

from .model import GPT, GPTConfig

STEP = "10_training"

# --preset sets these; a flag given on the command line overrides its preset's value.
PRESETS = {
    # A small GPT over GPT-2's 50257 tokens: a default run of a few minutes on a 2-core CPU.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, batch_size=8, seq_len=64, lr=1e-3, max_steps=250,
                 eval_every=125, save_every=125),
    # GPT-2 small (124M) with its context of 1024 tokens, as build-nanogpt trains it on one GPU.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, batch_size=16, seq_len=1024, lr=6e-4, max_steps=50,
                 eval_every=25, save_every=25),
}
PROMPT = "ROMEO:"


class Loader:
    """Consecutive windows of the training tokens. A batch is the next B*T + 1 tokens, cut into B rows of T;
    the next batch starts B*T tokens later; past the end of the split it starts again at 0. The position is
    its whole state, so a checkpoint that saves it resumes on exactly the next batch."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, pos: int = 0):
        self.ids, self.B, self.T, self.pos = ids, batch_size, seq_len, pos

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
    for x, y in data.sequential_windows(ids, args.batch_size, args.seq_len):
        x, y = x.to(args.device), y.to(args.device)
        total += model(x, y)[1].item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


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
    p.add_argument("--lr", type=cli.learning_rate, help="AdamW learning rate")
    p.add_argument("--dropout", type=cli.probability, default=0.0, help="dropout probability")
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
    args.device = device.pick(args.device)
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
           "max_steps": args.max_steps, "seed": args.seed}  # what must match for --resume
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
    device.refuse_a_model_too_big(GPT, config, args.device)  # before minutes of building
    model = GPT(config).to(args.device)
    loader = Loader(train_ids, args.batch_size, args.seq_len)
    print(f"step {STEP} on {args.device}: preset {args.preset}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters ({cli.plural(config.n_layer, 'layer')} of {config.n_embd}), batch {args.batch_size} x "
          f"{args.seq_len} tokens, {len(train_ids):,} training tokens")
    shapes.show(model, loader.next_batch()[0][:4].to(args.device), depth=3)
    loader.pos = 0

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)  # torch's default, 0.01, decays every
    # parameter, LayerNorm gains and biases included; step 14 decays only the 2-D weights (matrices, embeddings)
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
            x, y = (t.to(args.device) for t in loader.next_batch())
            loss = model(x, y)[1]  # `_, loss =` would keep the (B, T, vocab) logits alive through backward
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)  # measures, clips nothing
            opt.step()
            log.log(it, loss.item(), args.lr, tokens=x.numel(), grad_norm=norm.item())  # stops at a nan loss
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

"""Step 08: GPT-2's architecture: the 124M model counted part by part, then a small GPT trained like step 07."""
import math
import sys

import torch

from shared import cli, data, device, runlog, shapes

from .model import GPT, GPTConfig

STEP = "08_gpt2"

PROMPTS = ["ROMEO:", "First Citizen:\nWe are", "KING RICHARD III:\nNow is the winter"]  # of different lengths


def loss_of(model, x, y):
    _, loss = model(x, y)  # GPT computes the cross-entropy itself when given the targets
    return loss


@torch.no_grad()
def evaluate(model, ids, args) -> float:
    """Mean loss over every window of ids, in order: the same number every time for the same weights."""
    model.eval()
    total, count = 0.0, 0
    for x, y in data.sequential_windows(ids, args.batch_size, args.block_size):
        x, y = x.to(args.device), y.to(args.device)
        total += loss_of(model, x, y).item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


@device.explain_out_of_memory
def main(argv=None):
    p = cli.parser(__doc__, STEP, max_steps=1000)
    p.add_argument("--batch-size", type=cli.positive_int, default=4, help="windows per batch")
    p.add_argument("--block-size", type=cli.positive_int, default=32, help="tokens per window")
    p.add_argument("--n-embd", type=cli.positive_int, default=64, help="d_model; the MLP is 4 times as wide")
    p.add_argument("--n-head", type=cli.positive_int, default=4, help="attention heads; must divide --n-embd")
    p.add_argument("--n-layer", type=cli.positive_int, default=2, help="blocks")
    p.add_argument("--dropout", type=cli.probability, default=0.1, help="dropout probability")
    p.add_argument("--lr", type=cli.learning_rate, default=3e-3, help="AdamW learning rate")
    p.add_argument("--max-new-tokens", type=cli.new_tokens, default=40, help="tokens to write after each prompt")
    p.add_argument("--size", default="auto", choices=["auto", "small", "124M"],
                   help="124M = GPT-2 small (--n-embd, --n-head and --n-layer are then ignored); auto = 124M on a CUDA "
                   "GPU, small elsewhere")
    args = p.parse_args(argv)
    args.device = device.pick(args.device)
    if args.size == "auto":
        args.size = "124M" if args.device.type == "cuda" else "small"
    if args.size == "small" and args.n_embd % args.n_head:  # 124M ignores the sizes given
        p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.size == "124M" and args.block_size > GPTConfig().block_size:  # its position table has 1024 rows
        p.error(f"--block-size {args.block_size} is past GPT-2's context of {GPTConfig().block_size} tokens")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    tok = data.gpt2_tokenizer()  # GPT-2's BPE: 50257 tokens
    train_ids, val_ids = data.split(torch.tensor(tok.encode(data.shakespeare())), args.block_size)
    summary(GPTConfig())
    if args.size == "124M":
        model = GPT(GPTConfig(dropout=args.dropout))
    else:
        model = GPT(GPTConfig(args.block_size, tok.n_vocab, args.n_layer, args.n_head, args.n_embd, args.dropout))
    model.to(args.device)
    print(f"step {STEP} on {args.device}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocabulary of {tok.n_vocab} tokens, {len(train_ids):,} training tokens")
    shapes.show(model, data.random_windows(train_ids, 4, args.block_size, gen)[0].to(args.device), depth=3)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    log = runlog.RunLog(args.out, args.max_steps, args.log_every)
    with log.closed_on_ctrl_c():  # summary.json marked interrupted, and the loss curve so far
        for it in range(args.max_steps):
            x, y = (t.to(args.device) for t in data.random_windows(train_ids, args.batch_size, args.block_size, gen))
            loss = loss_of(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.log(it, loss.item(), args.lr, tokens=x.numel())
        print(f"evaluating {cli.plural((len(val_ids) - 1) // args.block_size, 'validation window')} ...",
              flush=True)  # it takes seconds: say so
        log.close(val_loss=evaluate(model, val_ids, args), uniform_guess=math.log(tok.n_vocab))
    show_samples(model, tok, args)


def summary(config: GPTConfig) -> None:
    """Parameters per part of GPT(config), counted on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        model = GPT(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # a tied matrix is counted once
    t = model.transformer
    block = [(f"  {name}", count(m)) for name, m in t.h[0].named_modules() if count(m) and not list(m.children())]
    rows = [("transformer.wte", count(t.wte)), ("transformer.wpe", count(t.wpe)),
            (f"transformer.h: {config.n_layer} blocks of", count(t.h[0])), *block,
            ("transformer.ln_f", count(t.ln_f)), ("lm_head: tied to wte", 0)]
    print(f"{config}")
    for name, n in rows:
        print(f"  {name:<32} {n:>13,}")
    print(f"  {'total':<32} {count(model):>13,}   ({count(model) + count(t.wte):,} if lm_head were not tied)")


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different length -> idx (B, T) padded on the left, attention_mask (B, T): 0 at padding."""
    T = max(len(r) for r in rows)
    idx = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows])  # (B, T)
    attention_mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])  # (B, T)
    return idx, attention_mask


@torch.no_grad()
def show_samples(model, tok, args):
    """One batch of prompts of different length: left padding and an attention mask, so all end at the last column."""
    model.eval()
    idx, attention_mask = pad_left([tok.encode(p) for p in PROMPTS], pad_id=tok.eot_token)
    gen = torch.Generator(args.device).manual_seed(args.seed)  # sampling draws on the model's device
    out = model.generate(idx.to(args.device), args.max_new_tokens, attention_mask.to(args.device), generator=gen)
    for row, mask in zip(out.tolist(), attention_mask.tolist()):  # out: (B, T + max_new_tokens)
        print("-" * 60)
        print(tok.decode(row[mask.count(0):]))  # without the padding


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the run's files are written (RunLog.closed_on_ctrl_c); no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT: how a shell reports a command stopped by Ctrl-C

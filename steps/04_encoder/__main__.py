"""Step 04: an encoder fills in hidden characters, reading the text on both sides of each gap."""
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared import cli, data, device, runlog, shapes

from .model import Encoder, padding_mask

STEP = "04_encoder"

PAD, MASK = 0, 1  # special ids, before the characters


class MaskedCharLM(nn.Module):
    """Encoder (no causal mask: every position sees both sides) -> linear head."""

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, d_ff: int, max_len: int,
                 dropout: float):
        super().__init__()
        self.encoder = Encoder(vocab_size, d_model, n_heads, n_layers, d_ff, max_len, dropout)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx):
        x = self.encoder(idx, padding_mask(idx, PAD))  # (B, S) -> (B, S, d_model)
        return self.head(x)  # (B, S, vocab_size) logits for the character at each position


def hide(x, gen, fraction: float = 0.15):
    """Windows x (B, S) -> random lengths, padded to S, and 15% of the real characters replaced by MASK.

    Returns x (B, S) with PAD and MASK ids, and y (B, S): the hidden character, -100 (ignored) elsewhere.
    """
    B, S = x.shape
    lengths = torch.randint(S // 2, S + 1, (B, 1), generator=gen)  # (B, 1)
    pad = torch.arange(S) >= lengths  # (B, S), True past each row's length
    hidden = (torch.rand(x.shape, generator=gen) < fraction) & ~pad  # (B, S), the positions to fill in
    if not hidden.any():  # a small batch may hide nothing, and a loss over no character is nan: hide one
        hidden[0, torch.randint(0, int(lengths[0]), (1,), generator=gen)] = True
    y = x.masked_fill(~hidden, -100)  # (B, S): the hidden characters; -100 elsewhere, which the loss ignores
    return x.masked_fill(hidden, MASK).masked_fill(pad, PAD), y


@torch.no_grad()
def evaluate(model, ids, args) -> float:
    """Mean loss over the hidden characters of every window of ids, in order, hidden by a generator of its own:
    the same number every time for the same weights."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    for x, _ in data.sequential_windows(ids, args.batch_size, args.block_size):
        x, y = (t.to(args.device) for t in hide(x, gen))  # (B, S) each
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        count += (y >= 0).sum().item()
    model.train()
    return total / count


@device.explain_out_of_memory
def main(argv=None):
    p = cli.parser(__doc__, STEP, max_steps=1000)
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="windows per batch")
    p.add_argument("--block-size", type=cli.positive_int, default=64, help="characters per window, at most")
    p.add_argument("--d-model", type=cli.even_positive_int, default=64,
                   help="width of every vector (even: its positions are sines and cosines in pairs)")
    p.add_argument("--n-heads", type=cli.positive_int, default=4, help="attention heads; must divide --d-model")
    p.add_argument("--n-layers", type=cli.positive_int, default=2, help="stacked layers")
    p.add_argument("--d-ff", type=cli.positive_int, default=256, help="width of the feed-forward hidden layer")
    p.add_argument("--dropout", type=cli.probability, default=0.1, help="dropout probability")
    p.add_argument("--lr", type=cli.learning_rate, default=1e-3, help="AdamW learning rate")
    args = p.parse_args(argv)
    if args.d_model % args.n_heads:
        p.error(f"--d-model {args.d_model} is not divisible by --n-heads {args.n_heads}")
    if args.block_size < 2:  # a window is cut to S // 2 to S characters: 0 of 1 leaves nothing to hide
        p.error(f"--block-size {args.block_size} is too short: give 2 or more")
    args.device = device.pick(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    text = data.shakespeare()
    tok = data.CharTokenizer(text, specials=("_", "#"))  # PAD shows as _, MASK as #: neither is in the corpus
    train_ids, val_ids = data.split(torch.tensor(tok.encode(text)), args.block_size)
    model = MaskedCharLM(tok.vocab_size, args.d_model, args.n_heads, args.n_layers, args.d_ff, args.block_size,
                         args.dropout).to(args.device)
    print(f"step {STEP} on {args.device}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocabulary of {tok.vocab_size} characters")
    shapes.show(model, hide(data.random_windows(train_ids, 4, args.block_size, gen)[0], gen)[0].to(args.device),
                depth=3)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    log = runlog.RunLog(args.out, args.max_steps, args.log_every)
    with log.closed_on_ctrl_c():  # summary.json marked interrupted, and the loss curve so far
        for it in range(args.max_steps):
            x, _ = data.random_windows(train_ids, args.batch_size, args.block_size, gen)  # (B, S)
            x, y = (t.to(args.device) for t in hide(x, gen))
            logits = model(x)  # (B, S, vocab_size)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # (B*S, vocab_size), (B*S,)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.log(it, loss.item(), args.lr, tokens=x.numel())
        print(f"evaluating {cli.plural((len(val_ids) - 1) // args.block_size, 'validation window')} ...",
              flush=True)  # it takes seconds: say so
        log.close(val_loss=evaluate(model, val_ids, args), uniform_guess=math.log(tok.vocab_size))
    show_fill_in(model, tok, val_ids, args, gen)


@torch.no_grad()
def show_fill_in(model, tok, ids, args, gen):
    model.eval()
    x, y = hide(data.random_windows(ids, 1, args.block_size, gen)[0], gen)  # (1, S)
    guess = model(x.to(args.device)).argmax(-1).cpu()  # (1, S)
    filled = torch.where(y >= 0, guess, x)  # model's guess at the hidden positions
    for label, row in ("input ", x), ("filled", filled), ("truth ", torch.where(y >= 0, y, x)):
        print(f"{label} | {tok.decode(row[0].tolist())!r}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the run's files are written (RunLog.closed_on_ctrl_c); no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT: how a shell reports a command stopped by Ctrl-C

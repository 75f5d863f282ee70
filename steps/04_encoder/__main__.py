"""Step 04: an encoder fills in hidden characters, reading the text on both sides of each gap."""
import math

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


def masked_batch(ids, batch_size: int, block_size: int, gen, hide: float = 0.15):
    """Windows of random length, padded to block_size; 15% of real characters replaced by MASK.

    Returns x (B, S) with PAD and MASK ids, and y (B, S): the hidden character, -100 (ignored) elsewhere.
    """
    x, _ = data.random_windows(ids, batch_size, block_size, gen)  # (B, S)
    lengths = torch.randint(block_size // 2, block_size + 1, (batch_size, 1), generator=gen)  # (B, 1)
    pad = torch.arange(block_size) >= lengths  # (B, S), True past each row's length
    hidden = (torch.rand(x.shape, generator=gen) < hide) & ~pad  # (B, S), the positions to fill in
    y = x.masked_fill(~hidden, -100)
    return x.masked_fill(hidden, MASK).masked_fill(pad, PAD), y


@torch.no_grad()
def evaluate(model, ids, args, gen, batches: int = 20) -> float:
    model.eval()
    losses = []
    for _ in range(batches):
        x, y = (t.to(args.device) for t in masked_batch(ids, args.batch_size, args.block_size, gen))
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def main(argv=None):
    p = cli.parser(__doc__, STEP, max_steps=1000)
    p.add_argument("--batch-size", type=cli.positive_int, default=64)
    p.add_argument("--block-size", type=cli.positive_int, default=64, help="characters per window, at most")
    p.add_argument("--d-model", type=cli.positive_int, default=64)
    p.add_argument("--n-heads", type=cli.positive_int, default=4)
    p.add_argument("--n-layers", type=cli.positive_int, default=2)
    p.add_argument("--d-ff", type=cli.positive_int, default=256)
    p.add_argument("--dropout", type=cli.probability, default=0.1)
    p.add_argument("--lr", type=cli.positive_float, default=1e-3)
    args = p.parse_args(argv)
    if args.d_model % args.n_heads:
        p.error(f"--d-model {args.d_model} is not divisible by --n-heads {args.n_heads}")
    args.device = device.pick(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    text = data.shakespeare()
    tok = data.CharTokenizer(text, specials=("_", "?"))  # PAD shows as _, MASK as ?
    train_ids, val_ids = data.split(torch.tensor(tok.encode(text)))
    model = MaskedCharLM(tok.vocab_size, args.d_model, args.n_heads, args.n_layers, args.d_ff, args.block_size,
                         args.dropout).to(args.device)
    print(f"step {STEP} on {args.device}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocabulary of {tok.vocab_size} characters")
    shapes.show(model, masked_batch(train_ids, 4, args.block_size, gen)[0].to(args.device), depth=3)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    log = runlog.RunLog(args.out)
    for it in range(args.max_steps):
        x, y = (t.to(args.device) for t in masked_batch(train_ids, args.batch_size, args.block_size, gen))
        logits = model(x)  # (B, S, vocab_size)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.log(it, loss.item(), tokens=x.numel())
    log.close(val_loss=evaluate(model, val_ids, args, gen), uniform_guess=math.log(tok.vocab_size))
    show_fill_in(model, tok, val_ids, args, gen)


@torch.no_grad()
def show_fill_in(model, tok, ids, args, gen):
    model.eval()
    x, y = masked_batch(ids, 1, args.block_size, gen)  # (1, S)
    guess = model(x.to(args.device)).argmax(-1).cpu()  # (1, S)
    filled = torch.where(y >= 0, guess, x)  # model's guess at the hidden positions
    for label, row in ("input ", x), ("filled", filled), ("truth ", torch.where(y >= 0, y, x)):
        print(f"{label} | {tok.decode(row[0].tolist())!r}")


if __name__ == "__main__":
    main()

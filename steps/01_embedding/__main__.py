"""Step 01: embeddings and a linear head learn which character follows which in tiny shakespeare."""
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared import cli, data, device, runlog, shapes

from .model import Embedder

STEP = "01_embedding"


class CharLM(nn.Module):
    """Embedder -> linear head: the logits at position t see only the character at t and its position t."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, dropout: float):
        super().__init__()
        self.embed = Embedder(vocab_size, d_model, max_len, dropout)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx):
        x = self.embed(idx)  # (B, T) -> (B, T, d_model)
        return self.head(x)  # (B, T, vocab_size) logits for the next character


@torch.no_grad()
def evaluate(model, ids, args) -> float:
    """Mean loss over every window of ids, in order: the same number every time for the same weights."""
    model.eval()
    total, count = 0.0, 0
    for x, y in data.sequential_windows(ids, args.batch_size, args.block_size):
        x, y = x.to(args.device), y.to(args.device)
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() * y.numel()  # (B*T, vocab_size), (B*T,)
        count += y.numel()
    model.train()
    return total / count


@device.explain_out_of_memory
def main(argv=None):
    p = cli.parser(__doc__, STEP, max_steps=300)
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="windows per batch")
    p.add_argument("--block-size", type=cli.positive_int, default=64, help="characters per window")
    p.add_argument("--d-model", type=cli.even_positive_int, default=64,
                   help="width of every vector (even: its positions are sines and cosines in pairs)")
    p.add_argument("--dropout", type=cli.probability, default=0.1, help="dropout probability")
    p.add_argument("--lr", type=cli.learning_rate, default=3e-3, help="AdamW learning rate")
    args = p.parse_args(argv)
    args.device = device.pick(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    text = data.shakespeare()
    tok = data.CharTokenizer(text)
    train_ids, val_ids = data.split(torch.tensor(tok.encode(text)), args.block_size)
    model = CharLM(tok.vocab_size, args.d_model, args.block_size, args.dropout).to(args.device)
    print(f"step {STEP} on {args.device}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocabulary of {tok.vocab_size} characters")
    shapes.show(model, data.random_windows(train_ids, 4, args.block_size, gen)[0].to(args.device), depth=3)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    log = runlog.RunLog(args.out, args.max_steps, args.log_every)
    with log.closed_on_ctrl_c():  # summary.json marked interrupted, and the loss curve so far
        for it in range(args.max_steps):
            x, y = (t.to(args.device) for t in data.random_windows(train_ids, args.batch_size, args.block_size, gen))
            logits = model(x)  # (B, T, vocab_size)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # (B*T, vocab_size), (B*T,)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.log(it, loss.item(), args.lr, tokens=x.numel())
        print(f"evaluating {cli.plural((len(val_ids) - 1) // args.block_size, 'validation window')} ...",
              flush=True)  # it takes seconds: say so
        log.close(val_loss=evaluate(model, val_ids, args), uniform_guess=math.log(tok.vocab_size))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the run's files are written (RunLog.closed_on_ctrl_c); no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT: how a shell reports a command stopped by Ctrl-C

"""Step 05: a decoder learns to write words backwards, reading a fixed memory of each word through cross-attention."""
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared import cli, data, device, runlog, shapes

from .model import Decoder, Embedder, causal_mask, padding_mask

STEP = "05_decoder"

PAD, BOS, EOS = 0, 1, 2  # special ids, before the letters
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VAL_WORDS = 1000  # the validation set: fixed words, drawn by a generator of its own


class FixedMemoryDecoder(nn.Module):
    """A frozen, random Embedder turns the source into a fixed memory; the Decoder reads it to write the target."""

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, d_ff: int, max_len: int,
                 dropout: float):
        super().__init__()
        self.memory = Embedder(vocab_size, d_model, max_len, dropout=0.0).requires_grad_(False)
        self.decoder = Decoder(vocab_size, d_model, n_heads, n_layers, d_ff, max_len, dropout)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, src, tgt):
        src_mask = padding_mask(src, PAD)  # (B, 1, 1, S)
        tgt_mask = padding_mask(tgt, PAD) & causal_mask(tgt.size(1), tgt.device)  # (B, 1, T, T)
        x = self.decoder(tgt, self.memory(src), tgt_mask, src_mask)  # (B, T, d_model)
        return self.head(x)  # (B, T, vocab_size) logits for the next target token


def reversal_batch(batch_size: int, max_letters: int, gen):
    """Made-up, deterministic task: src = 1 to max_letters random letters + EOS, tgt = BOS + reversed + EOS.

    Returns src (B, max_letters + 1) and tgt (B, max_letters + 2), PAD after the end of each row.
    """
    lengths = torch.randint(1, max_letters + 1, (batch_size,), generator=gen)  # (B,)
    letters = torch.randint(3, 3 + len(LETTERS), (batch_size, max_letters), generator=gen)  # (B, L)
    src = torch.full((batch_size, max_letters + 1), PAD)  # (B, L + 1)
    tgt = torch.full((batch_size, max_letters + 2), PAD)  # (B, L + 2)
    for i, n in enumerate(lengths.tolist()):
        word = letters[i, :n]  # (n,)
        src[i, : n + 1] = torch.cat([word, torch.tensor([EOS])])
        tgt[i, : n + 2] = torch.cat([torch.tensor([BOS]), word.flip(0), torch.tensor([EOS])])
    return src, tgt


def loss_of(model, src, tgt):
    logits = model(src, tgt[:, :-1])  # (B, T, vocab_size): teacher forcing, the target shifted right
    return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD)  # (B*T, vocab_size), (B*T,)


@torch.no_grad()
def evaluate(model, args, words: int = VAL_WORDS) -> float:
    """Mean loss over one fixed set of words, drawn by a generator of its own: the same number every time for
    the same weights."""
    model.eval()
    src, tgt = reversal_batch(words, args.max_letters, torch.Generator().manual_seed(0))
    total, count = 0.0, 0
    for i in range(0, words, args.batch_size):
        s, t = src[i : i + args.batch_size].to(args.device), tgt[i : i + args.batch_size].to(args.device)
        n = (t[:, 1:] != PAD).sum().item()  # the targets that count
        total += loss_of(model, s, t).item() * n
        count += n
    model.train()
    return total / count


@device.explain_out_of_memory
def main(argv=None):
    p = cli.parser(__doc__, STEP, max_steps=600)
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="words per batch")
    p.add_argument("--max-letters", type=cli.positive_int, default=10, help="longest word")
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
    args.device = device.pick(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    tok = data.CharTokenizer(LETTERS, specials=("_", "<", ">"))  # PAD shows as _, BOS as <, EOS as >
    model = FixedMemoryDecoder(tok.vocab_size, args.d_model, args.n_heads, args.n_layers, args.d_ff,
                               args.max_letters + 2, args.dropout).to(args.device)
    frozen = sum(p.numel() for p in model.memory.parameters())  # the source's embedder: counted, never trained
    print(f"step {STEP} on {args.device}: {sum(p.numel() for p in model.parameters()):,} parameters "
          f"({frozen:,} of them frozen), vocabulary of {tok.vocab_size} tokens")
    src, tgt = reversal_batch(4, args.max_letters, gen)
    shapes.show(model, src.to(args.device), tgt[:, :-1].to(args.device), depth=3)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    log = runlog.RunLog(args.out, args.max_steps, args.log_every)
    with log.closed_on_ctrl_c():  # summary.json marked interrupted, and the loss curve so far
        for it in range(args.max_steps):
            src, tgt = (t.to(args.device) for t in reversal_batch(args.batch_size, args.max_letters, gen))
            loss = loss_of(model, src, tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.log(it, loss.item(), args.lr, tokens=tgt.numel())
        print(f"evaluating {VAL_WORDS:,} fixed words ...", flush=True)  # it takes seconds: say so
        log.close(val_loss=evaluate(model, args), uniform_guess=math.log(tok.vocab_size))
    show_predictions(model, tok, args, gen)


@torch.no_grad()
def show_predictions(model, tok, args, gen, n: int = 200):
    """Teacher-forced: each predicted token is the model's guess given the true target before it."""
    model.eval()
    src, tgt = reversal_batch(n, args.max_letters, gen)
    out = model(src.to(args.device), tgt[:, :-1].to(args.device)).argmax(-1).cpu()  # (n, T)
    words = lambda ids: [tok.decode(row).partition(">")[0] for row in ids.tolist()]  # up to EOS
    sources, targets, outputs = words(src), words(tgt[:, 1:]), words(out)
    for s, t, o in list(zip(sources, targets, outputs))[:4]:
        print(f"input {s!r:14} target {t!r:14} output {o!r}")
    print(f"exactly right: {sum(t == o for t, o in zip(targets, outputs))}/{n}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the run's files are written (RunLog.closed_on_ctrl_c); no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT: how a shell reports a command stopped by Ctrl-C

"""Step 07: the decoder alone learns to continue tiny shakespeare, one GPT-2 BPE token at a time, then writes some."""
import math
import sys

import torch
import torch.nn.functional as F

from shared import cli, data, device, runlog, shapes

from .model import DecoderOnlyLM

STEP = "07_decoder_only"

PROMPTS = ["ROMEO:", "First Citizen:\nWe are", "KING RICHARD III:\nNow is the winter"]  # of different lengths


def loss_of(model, x, y):
    logits = model(x)  # (B, T, vocab_size): at position t, the scores for token t + 1
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())  # (B*T, vocab_size), (B*T,): y is x shifted left by one


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
    p.add_argument("--d-model", type=cli.even_positive_int, default=64,
                   help="width of every vector (even: its positions are sines and cosines in pairs)")
    p.add_argument("--n-heads", type=cli.positive_int, default=4, help="attention heads; must divide --d-model")
    p.add_argument("--n-layers", type=cli.positive_int, default=2, help="stacked layers")
    p.add_argument("--d-ff", type=cli.positive_int, default=256, help="width of the feed-forward hidden layer")
    p.add_argument("--dropout", type=cli.probability, default=0.1, help="dropout probability")
    p.add_argument("--lr", type=cli.learning_rate, default=3e-3, help="AdamW learning rate")
    p.add_argument("--max-new-tokens", type=cli.new_tokens, default=40, help="tokens to write after each prompt")
    p.add_argument("--size", default="auto", choices=["auto", "small", "base"],
                   help="base = the paper's base sizes (the sizes above are then ignored); auto = base on a CUDA "
                   "GPU, small elsewhere")
    args = p.parse_args(argv)
    args.device = device.pick(args.device)
    if args.size == "auto":
        args.size = "base" if args.device.type == "cuda" else "small"
    if args.size == "small" and args.d_model % args.n_heads:  # base ignores the sizes given
        p.error(f"--d-model {args.d_model} is not divisible by --n-heads {args.n_heads}")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    tok = data.gpt2_tokenizer()  # GPT-2's BPE: 50257 tokens
    train_ids, val_ids = data.split(torch.tensor(tok.encode(data.shakespeare())), args.block_size)
    if args.size == "base":
        model = DecoderOnlyLM(tok.n_vocab, max_len=args.block_size, dropout=args.dropout)
    else:
        model = DecoderOnlyLM(tok.n_vocab, args.d_model, args.n_heads, args.n_layers, args.d_ff, args.block_size,
                              args.dropout)
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

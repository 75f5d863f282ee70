"""Step 09: GPT-2 writes: pretrained weights from the HF hub or a saved directory, sampled among the top k tokens."""
import codecs
import os
import sys

import torch

from shared import cli, data, device

from .model import GPT, HUB_NAMES, GPTConfig

STEP = "09_from_pretrained"


# The logits are divided by it: a tiny temperature overflows float32 (1e-45 gives inf, then a nan softmax),
# and 0.01 already samples all but greedily.
temperature = cli.checked(float, lambda v: 0.01 <= v <= 100, "a temperature from 0.01 to 100")
# A model with more tokens than GPT-2's tokenizer is refused (the ids past it have no text): a larger k never fits.
top_k = cli.checked(int, lambda v: 0 < v <= GPTConfig.vocab_size, f"from 1 to {GPTConfig.vocab_size} tokens")


@device.explain_out_of_memory
def main(argv=None):
    p = cli.ArgumentParser(prog=f"python -m steps.{STEP}", description=__doc__,
                           formatter_class=cli.HelpFormatter,
                           hint=f'make step N={STEP[:2]} ARGS="--help"')
    p.add_argument("--model", default="auto", help=f"{', '.join(HUB_NAMES)} (from the hub), a directory written by "
                   "GPT2LMHeadModel.save_pretrained, random (an untrained GPT-2 124M), or auto: gpt2, or random with "
                   "a warning when gpt2 cannot be downloaded")
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="the text to continue ('' starts a "
                   "new document, as <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=cli.new_tokens, default=30, help="tokens to write per sample")
    p.add_argument("--num-samples", type=cli.positive_int, default=3, help="samples, one after the other")
    p.add_argument("--top-k", type=top_k, default=50, help="sample among the k most likely tokens; 1 is "
                   "greedy decoding")
    p.add_argument("--temperature", type=temperature, default=1.0, help="divides the logits: below 1 sharpens, "
                   "above 1 flattens (use --top-k 1 for greedy decoding)")
    p.add_argument("--seed", type=cli.seed, default=1337, help="random seed: the same seed gives the same text on the "
                   "same machine")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run; auto = cuda, else mps, else cpu")
    args = p.parse_args(argv)
    args.device = device.pick(args.device)
    torch.manual_seed(args.seed)

    if args.model == "random":
        model = GPT(GPTConfig()).eval()
    else:
        try:
            model = GPT.from_pretrained("gpt2" if args.model == "auto" else args.model)
        except OSError as e:
            if args.model != "auto":  # asked for by name: stop
                sys.exit(f"error: {e}\n(--model random runs an untrained GPT-2 without any download)")
            print(f"warning: {e}\nwriting with an untrained GPT-2 instead (--model random): expect noise (step 10 "
                  "saves one trained on tiny shakespeare: --model runs/10_training/model)",
                  file=sys.stderr)
            args.model, model = "random", GPT(GPTConfig()).eval()
        except ValueError as e:  # a name that is no model, or a directory whose weights do not fit
            named = args.model not in (*HUB_NAMES, "auto") and not os.path.isdir(args.model)
            sys.exit(f"error: {e}" + "; nor random, an untrained GPT-2" * named)
    model.to(args.device)
    if bad := [k for k, w in model.named_parameters() if not w.isfinite().all()]:  # saved from a diverged run
        sys.exit(f"error: --model {args.model}: nan or inf in {bad[0]} ({len(bad)} of its tensors), from a run "
                 "that diverged, or damaged")
    config = model.config
    print(f"step {STEP} on {args.device}: {'gpt2' if args.model == 'auto' else args.model}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{cli.plural(config.n_layer, 'layer')}, a context of {config.block_size} tokens")
    if args.top_k > config.vocab_size:
        sys.exit(f"error: --top-k {args.top_k} is more than the {config.vocab_size} tokens of the vocabulary")

    tok = data.gpt2_tokenizer()
    ids = tok.encode(args.prompt, allowed_special="all") or [tok.eot_token]  # an empty prompt: a new document
    if max(ids) >= config.vocab_size:
        sys.exit(f"error: the prompt has token {max(ids)}, but this model knows only {config.vocab_size} tokens")
    if config.vocab_size > tok.n_vocab:  # it could sample an id that has no text
        sys.exit(f"error: this model has {config.vocab_size:,} tokens, GPT-2's tokenizer {tok.n_vocab:,}: the ids "
                 "past it could be sampled and have no text")
    if len(ids) > config.block_size:
        print(f"warning: the prompt has {len(ids)} tokens; the model sees the last {config.block_size} of them",
              file=sys.stderr)
        ids = ids[-config.block_size :]
    gen = torch.Generator(args.device).manual_seed(args.seed)  # sampling draws on the model's device
    for i in range(args.num_samples):
        print(f"--- sample {i + 1} of {args.num_samples}")
        stream(model, tok, torch.tensor([ids], device=args.device), args, gen)  # idx: (1, T)


def stream(model, tok, idx, args, gen) -> None:
    """Print each token as soon as it is sampled. A token may end inside a multi-byte character: the
    incremental decoder keeps those bytes until the character is complete."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(tok.decode(idx[0].tolist()), end="", flush=True)
    try:
        for _ in range(args.max_new_tokens):
            idx = model.generate(idx, 1, temperature=args.temperature, top_k=args.top_k, generator=gen)  # (1, t + 1)
            print(utf8.decode(tok.decode_single_token_bytes(idx[0, -1].item())), end="", flush=True)
    finally:  # on Ctrl-C too: the text so far ends its line
        print(utf8.decode(b"", final=True))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while it writes: the text so far stays, without a traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT: how a shell reports a command stopped by Ctrl-C

"""GPT-2 (Radford et al., 2019): the decoder-only Transformer of step 07 with GPT-2's changes and names."""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save


@dataclass
class GPTConfig:
    """GPT-2 small (124M) by default. Medium, large and XL have (n_layer, n_head, n_embd) =
    (24, 16, 1024), (36, 20, 1280) and (48, 25, 1600)."""

    block_size: int = 1024  # the context: learned positions 0..1023
    vocab_size: int = 50257  # GPT-2's BPE tokens
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # d_model; the MLP is 4 * n_embd wide
    dropout: float = 0.1

    @property
    def padded_vocab_size(self) -> int:
        """The rows of the token table: vocab_size rounded up to a multiple of 128 (50257 -> 50304 = 393 x 128),
        a shape matmul kernels tile without a ragged edge. Ids from vocab_size on are never predicted."""
        return math.ceil(self.vocab_size / 128) * 128

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # openai-community/<name> on the HF hub
# HF's GPT-2 computes these with Conv1D, whose weight is (in, out): nn.Linear's (out, in), transposed.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# What GPT computes. A config.json that says otherwise is refused, rather than loaded into a model that differs.
GPT2_FIXED = {"model_type": "gpt2", "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True}
SIZES = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")  # config.json's names, in GPTConfig's order


def hub_download(name: str) -> Path:
    """The directory of one of HUB_NAMES in HF's cache, downloaded on first use."""
    from huggingface_hub import snapshot_download  # only needed online

    try:
        return Path(snapshot_download(f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors"]))
    except OSError as e:  # no network, or the hub did not answer
        raise OSError(f"could not download {name} from the HuggingFace hub ({type(e).__name__}): are you offline? "
                      "A directory written by GPT2LMHeadModel.save_pretrained loads without the network.") from None


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the weights in a directory written by save_pretrained.

    Tensors only (safetensors, or torch.load with weights_only=True): loading a checkpoint cannot run its code.
    """
    files = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
    weights = next((path / f for f in files if (path / f).exists()), None)
    if weights is None or not (path / "config.json").exists():
        hint = f": give {path / 'model'}, where a trainer's --out keeps it" if (path / "model").is_dir() else ""
        raise ValueError(f"{path} needs a config.json and one of {', '.join(files)}{hint}")
    try:
        shards = [weights]
        if weights.name.endswith(".index.json"):  # a big checkpoint in several files, named in the index
            shards = sorted({path / f for f in json.loads(weights.read_text())["weight_map"].values()})
        state = {}
        for f in shards:  # tensors only: safetensors, or a pickle read with weights_only=True
            state |= load_file(f) if f.suffix == ".safetensors" else torch.load(f, "cpu", weights_only=True, mmap=True)
        if bad := [k for k, w in state.items() if not (isinstance(k, str) and torch.is_tensor(w))]:
            raise ValueError(f"{bad[0]!r} is not a named tensor")
        config = json.loads((path / "config.json").read_text())
        if bad := {k: config.get(k) for k in SIZES if type(config.get(k)) is not int or config[k] < 1}:
            raise ValueError(f"config.json has {bad}; every size must be a whole number above 0")
        GPTConfig(*(config[k] for k in SIZES))
    except Exception as e:  # truncated, corrupt or not a GPT-2 checkpoint: say so, without a traceback
        raise ValueError(f"{path} does not hold a readable GPT-2 checkpoint ({type(e).__name__}: {e})") from None
    return config, state


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d_k)) v.  q: (B, H, T, d_k), k and v: (B, H, S, d_k).
    Written out, as the reference: the model calls F.scaled_dot_product_attention, which computes the same, fused.

    mask: bool, broadcastable to (B, H, T, S), True where query t may look at key s.
    Returns the output (B, H, T, d_k) and the attention weights (B, H, T, S).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)  # (B, H, T, S), each row sums to 1
    return weights @ v, weights  # (B, H, T, d_k), (B, H, T, S)


def causal_mask(T: int, device=None) -> torch.Tensor:
    """(1, 1, T, T): True on and below the diagonal, so position t sees positions 0..t only."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) attention mask, 1 at real tokens and 0 at padding -> (B, 1, T, T) bool.

    Causal, and no query looks at a pad. A pad looks at itself, so that no row of the softmax is all -inf.
    """
    T = attention_mask.size(1)
    real = rearrange(attention_mask.bool(), "b s -> b 1 1 s")  # (B, 1, 1, T): keys that are real tokens
    itself = torch.eye(T, dtype=torch.bool, device=attention_mask.device)  # (T, T)
    return causal_mask(T, attention_mask.device) & (real | itself)  # (B, 1, T, T)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with W^Q, W^K, W^V fused into one matrix, c_attn: one matmul instead of three."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # [W^Q | W^K | W^V], all heads side by side
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # W^O

    def forward(self, x, mask=None):
        """x: (B, T, n_embd), mask: (B, 1, T, T) for a padded batch, None for causal attention -> (B, T, n_embd)."""
        qkv = self.c_attn(x)  # (B, T, 3 * n_embd)
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.n_head)  # each (B, H, T, d_k)
        # attention(q, k, v, mask) in one fused kernel: the (T, T) weights are computed block by block and never
        # stored whole. is_causal=True lets it skip the blocks above the diagonal instead of reading a mask.
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d_k)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # True where a query may attend
        return self.c_proj(rearrange(out, "b h t d -> b t (h d)"))  # heads side by side again


class MLP(nn.Module):
    """The position-wise FFN, 4 * n_embd wide, with GELU (tanh approximation, as GPT-2 computed it) for ReLU."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (B, T, n_embd) -> (B, T, 4 n_embd) -> back


class Block(nn.Module):
    """Pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x)). The residual stream itself is never normalised."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None):
        """x: (B, T, n_embd), mask: (B, 1, T, T) or None."""
        x = x + self.dropout(self.attn(self.ln_1(x), mask))  # the sub-layer sees a normalised copy of x
        return x + self.dropout(self.mlp(self.ln_2(x)))  # (B, T, n_embd)


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, n_layer pre-LN blocks, a final LayerNorm, the tied lm_head.

    The parameter names are those of HF's GPT2LMHeadModel (transformer.wte, transformer.h.0.attn.c_attn, ...).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # tokens, no longer scaled by sqrt(d_model)
            wpe=nn.Embedding(config.block_size, config.n_embd),  # positions: learned, not a sinusoid
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),  # pre-LN leaves the last block's output unnormalised
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one (padded_vocab_size, n_embd) matrix, used twice
        for name, p in self.named_parameters():  # GPT-2's init (lm_head is wte: the same tensor, set once)
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:  # the matrices and the two embedding tables; LayerNorm weights stay at 1
                residual = name.endswith("c_proj.weight")  # the two writes into the residual stream per block
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer) if residual else 0.02)

    def forward(self, idx, targets=None, attention_mask=None):
        """idx: (B, T) token ids; targets: (B, T), idx shifted left by one; attention_mask: (B, T), 0 at padding.

        Returns logits (B, T, padded_vocab_size), -inf for the padded ids, and the cross-entropy loss against the
        targets (None without them).
        """
        T = idx.size(1)
        if attention_mask is None:
            mask, pos = None, torch.arange(T, device=idx.device)  # causal attention, (T,)
        else:
            mask = padded_causal_mask(attention_mask)  # (B, 1, T, T)
            pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at the first real token
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, n_embd)
        for block in self.transformer.h:
            x = block(x, mask)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, padded_vocab_size)
        logits[..., self.config.vocab_size :] = float("-inf")  # no token the tokenizer cannot decode: probability 0
        # cross_entropy over B*T rows: logits (B*T, padded_vocab_size), targets (B*T,)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @classmethod
    def from_pretrained(cls, name_or_dir: str) -> "GPT":
        """GPT-2's weights: gpt2, gpt2-medium, gpt2-large or gpt2-xl from the HF hub, or any directory written by
        GPT2LMHeadModel.save_pretrained. Every key and shape is checked; a ValueError names the one that does not fit.
        """
        path = Path(name_or_dir)
        if not name_or_dir or not path.is_dir():  # Path("") is ".", the directory the command runs in
            if name_or_dir not in HUB_NAMES:
                raise ValueError(f"{name_or_dir!r} is neither a directory nor one of {', '.join(HUB_NAMES)}")
            path = hub_download(name_or_dir)
        hf, theirs = load_checkpoint(path)
        if unlike := {k: hf[k] for k, v in GPT2_FIXED.items() if hf.get(k, v) != v}:
            raise ValueError(f"{name_or_dir}: config.json has {unlike}; this GPT is {GPT2_FIXED}")
        numbered = [re.match(r"(?:transformer\.)?h\.(\d+)\.", k) for k in theirs]  # h.0.attn..., h.1.mlp...
        blocks = len({m[1] for m in numbered if m})  # the blocks the weights hold
        if blocks != hf["n_layer"]:  # before the model is built: a wrong n_layer of 10 million would take all memory
            raise ValueError(f"{name_or_dir}: config.json says n_layer {hf['n_layer']}; the weights hold {blocks} "
                             "blocks")
        with torch.device("meta"):  # shapes only, no memory: the checkpoint's tensors become the parameters
            model = cls(GPTConfig(*(hf[k] for k in SIZES)))
        ours = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: wte's tensor again
        # The hub's files have no "transformer." in their keys, and keep the causal mask as a buffer (attn.bias).
        theirs = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in theirs.items()
                  if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))}
        if missing := sorted(ours.keys() - theirs.keys()):
            raise ValueError(f"{name_or_dir}: no {missing[0]} in the checkpoint ({len(missing)} keys missing)")
        if unknown := sorted(theirs.keys() - ours.keys()):
            raise ValueError(f"{name_or_dir}: the checkpoint has {unknown[0]}, which GPT has not ({len(unknown)} keys)")
        for key, w in theirs.items():  # memory-mapped from the file: read on first use, copied only when written to
            w = (w.t() if key.endswith(CONV1D) else w).float()  # Conv1D's (in, out) -> (out, in): a view, no copy
            if key == "transformer.wte.weight" and len(w) == hf["vocab_size"]:  # pad: the new rows are never used
                w = torch.cat([w, w.new_zeros(ours[key].size(0) - len(w), w.size(1))])  # (padded_vocab_size, n_embd)
            if w.shape != ours[key].shape:
                raise ValueError(f"{name_or_dir}: {key} is {tuple(w.shape)} (after any Conv1D transpose), "
                                 f"GPT needs {tuple(ours[key].shape)}")
            model.load_state_dict({key: w}, strict=False, assign=True)  # the parameter is now w itself
        model.lm_head.weight = model.transformer.wte.weight  # assign replaced wte's parameter: tie it again
        return model.eval()  # as HF's from_pretrained: no dropout until .train()

    def save_pretrained(self, path: Path) -> None:
        """Write this model as a GPT2LMHeadModel directory (config.json + model.safetensors), which HF's
        from_pretrained and step 09's command read. Each file is written whole under a temporary name first."""
        c = self.config
        config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
                  "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
                  "bos_token_id": 50256, "eos_token_id": 50256, **GPT2_FIXED}
        state = {k: (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in self.state_dict().items()
                 if k != "lm_head.weight"}  # tied: stored once, as wte; Conv1D's (in, out) layout again
        state["transformer.wte.weight"] = state["transformer.wte.weight"][: c.vocab_size].contiguous()  # unpadded
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json.tmp").write_text(json.dumps(config, indent=1) + "\n")
        (path / "model.safetensors.tmp").write_bytes(save(state, metadata={"format": "pt"}))  # save_file: mode 0600
        for name in ("config.json", "model.safetensors"):
            (path / f"{name}.tmp").replace(path / name)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, attention_mask=None, temperature: float = 1.0, generator=None,
                 top_k: int | None = None):
        """Sample a token from softmax(logits / temperature), append it, repeat. -> (B, T + max_new_tokens) ids.

        top_k: sample among the k most likely tokens only; top_k=1 is greedy decoding.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        for _ in range(max_new_tokens):
            crop = -self.config.block_size  # the model sees the last block_size tokens at most
            logits = self(idx[:, crop:], attention_mask=attention_mask[:, crop:])[0][:, -1]  # (B, padded_vocab_size)
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1): the k-th largest logit
                logits = logits.masked_fill(logits < kth, float("-inf"))  # the rest get probability 0
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)  # (B, t + 1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)  # (B, t + 1): new token is real
        return idx

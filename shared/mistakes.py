"""make mistake: a classic mistake made on purpose in a temporary copy of a step, and the tests that catch it.

    make mistake                          the mistakes: an id, the step it belongs to, what it is
    make mistake M=untied-head            made in the first step it belongs to (08), shown as a diff, its tests run
    make mistake N=12 M=untied-head       made in step 12 instead
    make mistake ARGS=--check             every mistake on every step it applies to, as CI runs it

Each mistake is data: a file, a line as the step has it, the line with the mistake, and the tests that must fail
with it. It applies to every step from its own on whose file has that line (a later step that carries the code
carries the mistake). steps/ is never touched: the project is copied to a temporary directory, which is removed
at the end, Ctrl-C included.
"""
import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from shared import cli
from shared.steps import ROOT, STEPS_DIR, all_steps, resolve


@dataclass(frozen=True)
class Mistake:
    id: str
    step: str  # the first step it belongs to, e.g. "08"
    what: str  # one line
    file: str  # in the step's directory; "shared/..." for a file of the project's own, made once, for step `step`
    right: str  # a line as the code has it, or a few lines (exactly once in the file)
    wrong: str  # the same line with the mistake
    tests: tuple[str, ...]  # the tests that must fail: every one of them that runs on the step
    read: str  # where the mistake is explained
    also: tuple[tuple[str, str], ...] = ()  # (right, wrong): the line as some later steps spell it

    def spelling(self, text: str) -> tuple[str, str] | None:
        """(right, wrong) as this file's text spells the line (exactly once), or None where it lacks it."""
        return next(((r, w) for r, w in ((self.right, self.wrong), *self.also) if text.count(r) == 1), None)

    def steps(self) -> list[str]:
        """The steps it applies to: its own and every later one whose file has the line."""
        first = resolve(self.step)
        if self.file.startswith("shared/"):
            return [first]
        later = all_steps()[all_steps().index(first):]
        return [s for s in later if (STEPS_DIR / s / self.file).exists()
                and self.spelling((STEPS_DIR / s / self.file).read_text())]

    def path(self, root: Path, step: str) -> Path:
        return root / self.file if self.file.startswith("shared/") else root / "steps" / step / self.file


MISTAKES = [
    Mistake("sinusoid-halves", "01", "the position table with its sines and cosines in two halves, not interleaved",
            "model.py",
            'return rearrange(table, "pos i two -> pos (i two)").float()',
            'return rearrange(table, "pos i two -> pos (two i)").float()',
            ("test_sinusoid_matches_distilbert",), "diary/01_embedding.md, The mistake to avoid"),
    Mistake("angles-in-float32", "01", "the sinusoid's angles in float32: the table 1.8e-5 off at position 511",
            "model.py",
            "pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (max_len, 1)\n"
            "    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)",
            "pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (max_len, 1)\n"
            "    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)",
            ("test_sinusoid_matches_distilbert", "test_sinusoid_is_marians_table_with_the_channels_reordered"),
            "diary/01_embedding.md, The mistake to avoid"),
    Mistake("heads-merged-wrong", "02", "the heads put back side by side in the wrong order: (d h) for (h d)",
            "model.py",
            'rearrange(out, "b h t d -> b t (h d)")',
            'rearrange(out, "b h t d -> b t (d h)")',
            ("test_multi_head_attention_matches_torch_multihead_attention", "test_matches_marian_for_causal_lm_logits",
             "test_logits_match_gpt2lmheadmodel"),
            "diary/02_attention.md and diary/08_gpt2.md, The mistake(s) to avoid"),
    Mistake("heads-viewed-without-transpose", "02", "(B, H, T, d) viewed as (B, T, C), no transpose: position t "
            "reads later positions", "model.py",
            'rearrange(out, "b h t d -> b t (h d)")',
            "out.reshape(out.size(0), out.size(2), -1)",
            ("test_causal_output_at_t_ignores_later_inputs",
             "test_multi_head_attention_matches_torch_multihead_attention",
             "test_matches_marian_for_causal_lm_logits", "test_logits_match_gpt2lmheadmodel"),
            "diary/02_attention.md, The mistake to avoid"),
    Mistake("no-causal-mask", "02", "a causal mask that hides nothing: every position sees the later ones",
            "model.py",
            "return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]",
            "return torch.ones(T, T, dtype=torch.bool, device=device)[None, None]",
            ("test_causal_mask_gives_no_weight_to_the_future", "test_decoder_output_at_t_ignores_later_targets"),
            "diary/05_decoder.md, The mistake to avoid"),
    Mistake("ffn-per-position", "03", "the position-wise FFN as a different MLP at each position",
            "model.py",
            "self.fc1 = nn.Linear(d_model, d_ff)\n"
            "        self.fc2 = nn.Linear(d_ff, d_model)\n\n"
            "    def forward(self, x):\n"
            "        return self.fc2(F.relu(self.fc1(x)))  # (B, T, d_model) -> (B, T, d_ff) -> (B, T, d_model)",
            "self.fc1 = nn.ModuleList(nn.Linear(d_model, d_ff) for _ in range(64))  # an MLP for each position\n"
            "        self.fc2 = nn.ModuleList(nn.Linear(d_ff, d_model) for _ in range(64))\n\n"
            "    def forward(self, x):\n"
            "        return torch.stack([self.fc2[t](F.relu(self.fc1[t](x[:, t]))) for t in range(x.size(1))],\n"
            "                           dim=1)  # (B, T, d_model): position t through MLP t",
            ("test_feed_forward_is_one_mlp_applied_at_every_position", "test_feed_forward_parameter_count"),
            "diary/03_feedforward.md, The mistake to avoid"),
    Mistake("padding-mask-on-queries", "04", "the padding mask over the wrong axis: pad queries hidden, pad keys seen",
            "model.py",
            'return rearrange(idx != pad_id, "b s -> b 1 1 s")',
            'return rearrange(idx != pad_id, "b s -> b 1 s 1")',
            ("test_padding_does_not_change_the_real_positions", "test_encoder_matches_torch_transformer_encoder"),
            "diary/04_encoder.md, The mistake to avoid"),
    Mistake("target-not-shifted", "05", "the decoder's output at t scored on the token it read there, not the next one",
            "__main__.py",
            "return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD)",
            "return F.cross_entropy(logits.flatten(0, 1), tgt[:, :-1].flatten(), ignore_index=PAD)",
            ("test_training_reads_the_target_without_its_last_token_and_scores_each_position_on_the_next",),
            "diary/05_decoder.md, The mistake to avoid"),
    Mistake("separate-output-matrix", "06", "the pre-softmax linear layer as a matrix of its own, not the shared "
            "embedding", "model.py",
            "self.out_proj.weight = self.encoder.embed.tok.weight",
            "# self.out_proj.weight = self.encoder.embed.tok.weight",
            ("test_one_embedding_is_shared_by_source_target_and_output",),
            "diary/06_transformer.md, The mistake to avoid"),
    Mistake("pad-sees-nothing", "07", "a left pad that may look at nothing: its softmax row is all -inf, then nan",
            "model.py",
            "return causal_mask(T, attention_mask.device) & (real | itself)",
            "return causal_mask(T, attention_mask.device) & real",
            ("test_padded_causal_mask_hides_pads_and_the_future",), "diary/07_decoder_only.md, The mistake to avoid"),
    Mistake("untied-head", "08", "the output layer as a matrix of its own instead of the token table (no tying)",
            "model.py",
            "self.lm_head.weight = self.transformer.wte.weight",
            "# self.lm_head.weight = self.transformer.wte.weight",
            ("test_gpt2_small_has_124_439_808_parameters", "test_lm_head_is_the_token_embedding"),
            "diary/08_gpt2.md, The mistakes to avoid"),
    Mistake("exact-gelu", "08", "the exact GELU where GPT-2 computed the tanh approximation (HF's gelu_new)",
            "model.py",
            'F.gelu(self.c_fc(x), approximate="tanh")',
            "F.gelu(self.c_fc(x))",
            ("test_logits_match_gpt2lmheadmodel",), "diary/08_gpt2.md, The mistakes to avoid"),
    Mistake("conv1d-not-transposed", "09", "GPT-2's Conv1D weights, (in, out), loaded as nn.Linear's (out, in)",
            "model.py",
            "w = (w.t() if key.endswith(CONV1D) else w).float()",
            "w = w.float()",
            ("test_from_pretrained_gives_hf_logits",), "diary/09_from_pretrained.md, The mistake to avoid"),
    Mistake("c-proj-not-transposed", "09", "every Conv1D weight transposed but attn.c_proj, the one square one: "
            "no shape check can see it", "model.py",
            'CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")',
            'CONV1D = ("attn.c_attn.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")',
            ("test_from_pretrained_gives_hf_logits",), "diary/09_from_pretrained.md, The mistake to avoid"),
    Mistake("adamw-default-decay", "10", "AdamW built with torch's default weight decay, 0.01 on every parameter",
            "__main__.py",
            "lr=args.lr, weight_decay=0.0)",
            "lr=args.lr)",
            ("test_before_step_14_no_parameter_is_decayed",), "diary/10_training.md and diary/14_gpt3_hparams.md"),
    Mistake("residual-init-unscaled", "10", "the residual projections initialised at 0.02, not 0.02 / sqrt(2 x layers)",
            "model.py",
            "nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer) if residual else 0.02)",
            "nn.init.normal_(p, std=0.02)",
            ("test_gpt2_init_statistics_per_parameter_group",), "diary/10_training.md"),
    Mistake("logits-kept", "10", "the forward's logits kept under a name (`_, loss =`): alive through backward",
            "__main__.py",
            "loss = model(x, y)[1]",
            "_, loss = model(x, y)",
            ("test_a_training_forwards_logits_are_freed_before_its_backward",), "diary/10_training.md",
            also=(("loss = fast(x, y)[1]", "_, loss = fast(x, y)"),)),  # 12-14 train the compiled model, fast
    Mistake("weights-in-bf16", "11", "the model itself cast to bf16 (model.bfloat16()), not autocast: the weights "
            "lose their small updates", "__main__.py",
            "    model = GPT(config).to(args.device)",
            "    model = GPT(config).to(args.device).bfloat16()",
            ("test_the_weights_stay_fp32_when_training_in_bf16",), "diary/11_mixed_precision.md, The mistake to avoid"),
    Mistake("bf16-where-emulated", "11", "--dtype auto trusting torch.cuda.is_bf16_supported(), which says yes "
            "where bf16 is only emulated", "shared/device.py",
            "if major >= 8:  # Ampere (A100, RTX 30xx) and later have bf16 tensor cores",
            "if torch.cuda.is_bf16_supported():  # yes on a T4 too, where bf16 is emulated",
            ("test_bf16_is_native_on_a_gpu_of_compute_capability_8_or_newer",),
            "diary/11_mixed_precision.md, What this step adds"),
    Mistake("is-causal-with-pads", "12", "is_causal=True for a padded batch too: causal, but the pads are seen",
            "model.py",
            "out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)",
            "out = F.scaled_dot_product_attention(q, k, v, is_causal=True)",
            ("test_left_padded_logits_match_gpt2lmheadmodel_with_the_same_positions",),
            "diary/12_compile_flash.md, The mistake to avoid"),
    Mistake("float-mask", "12", "a 0/1 float mask for SDPA: it is added to the scores, and hides nothing",
            "model.py",
            "out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)",
            "out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.float())",
            ("test_left_padded_logits_match_gpt2lmheadmodel_with_the_same_positions",),
            "diary/12_compile_flash.md, The mistake to avoid"),
    Mistake("padded-ids-sampled", "13", "the 47 padded ids of the 50304-row table left with logits of their own",
            "model.py",
            'logits[..., self.config.vocab_size :] = float("-inf")',
            "pass",
            ("test_sampling_never_returns_a_padded_id_even_when_its_row_would_win",
             "test_padded_ids_get_no_probability_and_no_gradient"), "diary/13_vocab_50304.md, The mistake to avoid"),
    Mistake("decay-everything", "14", "weight decay on the biases and LayerNorm gains too",
            "__main__.py",
            '{"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}',
            '{"params": [p for p in params if p.dim() < 2], "weight_decay": WEIGHT_DECAY}',
            ("test_exactly_the_matrices_and_embeddings_are_decayed",),
            "diary/14_gpt3_hparams.md, The mistake to avoid"),
    Mistake("summed-micro-losses", "15", "the micro-batch losses summed, not averaged, before backward",
            "__main__.py",
            "loss = loss / micro_steps  # not the sum: a sum would scale the gradient by micro_steps",
            "loss = loss  # summed: the gradient micro_steps times too large",
            ("test_k_micro_batches_give_the_gradient_and_loss_of_one_batch_k_times_as_large",),
            "diary/15_grad_accum.md, The mistake to avoid"),
    Mistake("all-reduce-every-micro-step", "16", "DDP's gradients all-reduced after every micro-batch (no no_sync)",
            "__main__.py",
            'with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():',
            "with contextlib.nullcontext():",
            ("test_gradients_are_all_reduced_once_an_optimizer_step_not_once_a_micro_step",),
            "diary/16_ddp.md, The mistakes to avoid"),
    Mistake("same-windows-every-rank", "16", "every rank reading the same windows",
            "__main__.py",
            "start = self.pos + B * T * self.rank",
            "start = self.pos",
            ("test_each_rank_reads_its_own_windows_and_together_they_read_one_process_batches",),
            "diary/16_ddp.md, The mistakes to avoid"),
    Mistake("rank-0-logs-its-own-loss", "16", "the logged loss not all-reduced: rank 0 logs 1/N of the batch",
            "__main__.py",
            "dist.all_reduce(mean)  # the sum over ranks: rank 0 logs the loss of every rank's batches, not its own\n"
            "        mean /= args.world",
            "pass  # rank 0 keeps the loss of its own batches",
            ("test_two_processes_log_the_loss_of_one_process_over_the_same_windows",),
            "diary/16_ddp.md, The mistakes to avoid"),
    Mistake("shards-in-file-order", "17", "the shards and their windows read in file order, not shuffled",
            "__main__.py",
            "np.random.default_rng([self.seed, *key]).permutation(n) if self.shuffle",
            "np.arange(n) if self.shuffle",
            ("test_an_epoch_reads_every_window_of_every_shard_once_in_a_shuffled_order",),
            "diary/17_fineweb_hellaswag.md, The mistakes to avoid"),
    Mistake("same-shard-windows-every-rank", "17", "every rank reading the same windows of the shuffled shards",
            "__main__.py",
            "first = self.pos + self.B * self.rank  # this rank's windows",
            "first = self.pos  # this rank's windows",
            ("test_two_ranks_read_disjoint_windows_whose_union_is_what_one_process_reads",),
            "diary/17_fineweb_hellaswag.md, The mistakes to avoid"),
    Mistake("ending-without-its-space", "17", "a HellaSwag ending tokenized without the space before it",
            "hellaswag.py",
            'end = tok.encode_ordinary(" " + ending)',
            "end = tok.encode_ordinary(ending)",
            ("test_a_row_is_the_context_then_a_space_and_the_ending_which_alone_is_scored",),
            "diary/17_fineweb_hellaswag.md, The mistakes to avoid"),
    Mistake("context-scored-too", "17", "a HellaSwag ending scored with its context's tokens in the loss",
            "hellaswag.py",
            "scored[r, start - 1 : len(row) - 1] = True",
            "scored[r, : len(row) - 1] = True",
            ("test_ending_losses_equal_those_from_gpt2lmheadmodels_logits",),
            "diary/17_fineweb_hellaswag.md, The mistakes to avoid"),
    Mistake("acc-norm-by-the-sum", "17", "acc_norm taken from the summed losses: it favours the shortest ending",
            "hellaswag.py",
            "(mean.argmin(1) == labels).sum().item()",
            "(summed.argmin(1) == labels).sum().item()",
            ("test_acc_takes_the_lowest_summed_loss_and_acc_norm_the_lowest_loss_per_token",),
            "diary/17_fineweb_hellaswag.md, The mistakes to avoid"),
    Mistake("int16-tokens", "17", "token ids stored as int16: the ids above 32,767 wrap round to negative numbers",
            "shared/shards.py",
            "buf = np.empty(shard_tokens, dtype=np.uint16)",
            "buf = np.empty(shard_tokens, dtype=np.int16)",
            ("test_shards_are_uint16_in_build_nanogpts_layout_with_validation_first",),
            "diary/17_fineweb_hellaswag.md, The mistakes to avoid"),
    Mistake("int64-tokens", "17", "token ids stored as int64, torch's own: 4x the bytes on disk for the same ids",
            "shared/shards.py",
            "buf = np.empty(shard_tokens, dtype=np.uint16)",
            "buf = np.empty(shard_tokens, dtype=np.int64)",
            ("test_shards_are_uint16_in_build_nanogpts_layout_with_validation_first",),
            "diary/17_fineweb_hellaswag.md, The mistakes to avoid"),
    Mistake("no-end-of-text", "17", "documents run together, with no <|endoftext|> between them",
            "shared/shards.py",
            "ids = np.empty(len(tokens) + 1, dtype=np.uint16)  # (1 + tokens,)\n"
            "        ids[0], ids[1:] = EOT, tokens",
            "ids = np.array(tokens, dtype=np.uint16)  # (tokens,): the document alone",
            ("test_decoded_shards_give_back_every_document_in_order_each_after_one_end_of_text",),
            "diary/17_fineweb_hellaswag.md, The mistakes to avoid"),
    Mistake("cached-token-at-position-0", "18", "each new token taken at position 0 instead of after the cache",
            "model.py",
            "mask, pos = None, torch.arange(past, past + T, device=idx.device)",
            "mask, pos = None, torch.arange(0, T, device=idx.device)",
            ("test_after_a_prefill_and_cached_steps_the_logits_are_a_full_forwards",),
            "diary/18_kv_cache.md, The mistakes to avoid"),
    Mistake("cached-keys-shifted", "18", "past the context, the cache's oldest position dropped and the other keys "
            "kept: each still carries the position it was computed at", "model.py",
            "elif cache is None or idx.size(1) > window:  # the prefill, or past the context: a new cache",
            "elif cache is not None and idx.size(1) > window:  # past the context: the oldest position dropped\n"
            "                for layer in cache:  # every key and value one place down, as it was computed\n"
            "                    layer.k[:, :, :-1] = layer.k[:, :, 1:].clone()\n"
            "                    layer.v[:, :, :-1] = layer.v[:, :, 1:].clone()\n"
            "                    layer.length -= 1\n"
            "                logits = self(idx[:, -1:], cache=cache)[0][:, -1]\n"
            "            elif cache is None:  # the prefill: a new cache",
            ("test_past_the_context_the_logits_with_the_cache_are_those_without_it",),
            "diary/18_kv_cache.md, The mistakes to avoid"),
]
BY_ID = {m.id: m for m in MISTAKES}


def listing(step: str | None = None) -> str:
    """The mistakes, or those that apply to one step (its own and those of earlier steps in the code it carries)."""
    chosen = [m for m in MISTAKES if step is None or step in m.steps()]
    lines = [f"{'id':<30} {'step':<5} what", "-" * 100] + [f"{m.id:<30} {m.step:<5} {m.what}" for m in chosen]
    return "\n".join(lines + ["", "make mistake M=<id> [N=<step>] makes one in a temporary copy and runs its tests"])


def copy_project(into: Path) -> Path:
    """The project as it is (steps, tests, shared, pyproject), without the virtual environment, runs or caches."""
    root = into / "gpt2-steps"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "book", "data", "__pycache__",
                                                              ".pytest_cache", ".hypothesis", "*.egg-info"))
    return root


def make(mistake: Mistake, root: Path, step: str) -> str:
    """Makes the mistake in the copy at root; returns it as a unified diff."""
    path = mistake.path(root, step)
    before = path.read_text()
    if (spelled := mistake.spelling(before)) is None:
        lines = " or ".join(f"`{right}`" for right, _ in ((mistake.right, mistake.wrong), *mistake.also))
        sys.exit(f"error: {mistake.id}: {path.relative_to(root)} does not have the line {lines} exactly once")
    after = before.replace(*spelled)
    path.write_text(after)
    name = str(path.relative_to(root))
    diff = difflib.unified_diff(before.splitlines(True), after.splitlines(True), name, name + " (mistake)", n=1)
    return "".join(diff)


def run_tests(root: Path, mistake: Mistake, step: str | None) -> list[tuple]:
    """Runs the mistake's tests in the copy, on one step or on all, as pytest reports them. The tests of a mistake
    in shared/ code name no step: they run whatever the step."""
    from shared import data

    report = root / "report.xml"
    files = sorted(str(f.relative_to(root)) for f in (root / "tests").glob("test_*.py")  # only those: less to collect
                   if any(f"def {name}(" in f.read_text() for name in mistake.tests))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", " or ".join(mistake.tests),
           f"--junitxml={report}", "-o", "junit_family=xunit1", "--tb=no", *files]
    if step and not mistake.file.startswith("shared/"):
        cmd += ["--step", step]
    env = {**os.environ, "GPT2STEPS_DATA": str(data.data_dir().resolve()), "PYTHONDONTWRITEBYTECODE": "1",
           "GPT2STEPS_EVERY_STEP": "1"}  # no test left to the first and last step alone: the mistake is in all
    subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not report.exists():
        sys.exit("error: pytest wrote no report; run the tests by hand to see why")
    results = []  # (test, its parameters, passed / skipped / FAILED / ERROR, what it said or None)
    for case in ET.parse(report).getroot().iter("testcase"):
        name, _, param = case.get("name").partition("[")
        if name not in mistake.tests:
            continue
        if (failed := case.find("failure")) is not None:  # an assertion of the test: what catches a mistake
            results.append((name, param.rstrip("]"), "FAILED", said(failed.get("message") or "failed")))
        elif (error := case.find("error")) is not None:  # its set-up (a fixture) broke: it checked nothing
            results.append((name, param.rstrip("]"), "ERROR", said(error.get("message") or "error", width=None)))
        elif (skipped := case.find("skipped")) is not None:  # not run here (no GPU, no browser): no catch either
            results.append((name, param.rstrip("]"), "skipped", said(skipped.get("message") or "skipped")))
        else:
            results.append((name, param.rstrip("]"), "passed", None))
    return results


def said(message: str, width: int | None = 160) -> str:
    """A failure's first line (cut to width), and the greatest difference where torch.testing.assert_close gives one."""
    lines = message.splitlines() or [""]
    worst = next((line.strip() for line in lines if line.strip().startswith("Greatest absolute difference")), None)
    first = lines[0] if width is None or len(lines[0]) <= width else lines[0][:width] + " ..."
    return first + (f" ({worst[:120]})" if worst else "")


def on(results: list, step: str, mistake: Mistake) -> list:
    """[(test, passed / skipped / FAILED / ERROR, what it said or None)] for the tests that ran on this step (a test
    of shared/ code is on the step it is made for). A test fails when any of its cases does (k=1 of k micro-batches
    cannot); one that only errored could not run."""
    ran, rank = {}, {"passed": 0, "skipped": 1, "ERROR": 2, "FAILED": 3}  # a test's worst case, the first of its kind
    for name, param, status, what in results:
        on_step = mistake.file.startswith("shared/") or step in param.split("-")
        if on_step and (name not in ran or rank[status] > rank[ran[name][0]]):
            ran[name] = status, what
    return [(name, status, what) for name, (status, what) in ran.items()]


def reading(mistake: Mistake, step: str) -> str:
    """Where to read about it: the diary of the step it is made in, where that names it; else the mistake's own."""
    diary = f"diary/{step}.md"
    names_it = (ROOT / diary).exists() and f"make mistake M={mistake.id}" in (ROOT / diary).read_text()
    return diary if names_it and not mistake.read.startswith(diary) else mistake.read


def data_there() -> None:
    """Every data file the tests read, fetched (or downloaded) and checked now: without them each test would stop in
    its set-up or its first line, and what it said would be about the data, not the mistake."""
    from shared import data

    for name in data.FILES:
        data.fetch(name)  # a missing or damaged file: its one line, and exit 1


def show(mistake: Mistake, step: str) -> int:
    data_there()
    with tempfile.TemporaryDirectory(prefix="gpt2-steps-mistake-") as tmp:
        root = copy_project(Path(tmp))
        print(f"{mistake.id}: {mistake.what}. Made in a temporary copy of step {step}; steps/ is untouched:\n")
        print(make(mistake, root, step))
        print(f"running the tests named for it on step {step} ...", flush=True)
        results = on(run_tests(root, mistake, step), step, mistake)
    if not results:
        print(f"none of its tests runs on step {step}")
        return 1
    for name, status, what in results:
        print(f"  {status:<6}  {name}" + (f"\n          {what}" if what else ""))
    if errored := sum(status == "ERROR" for _, status, _ in results):
        print(f"\nNOT caught: {cli.plural(errored, 'test')} above could not run (ERROR: its set-up failed before it "
              "checked anything); put that right and run make mistake again")
        return 1
    caught = all(status == "FAILED" for _, status, _ in results)
    print(f"\n{'caught' if caught else 'NOT caught'}: read {reading(mistake, step)}, and the test"
          f"{'s' * (len(results) > 1)} above in tests/.")
    return 0 if caught else 1


def check() -> int:
    """Every mistake on every step it applies to: each of its tests that runs there must fail. One copy and one
    pytest run a mistake, the mistake made in all its steps at once."""
    data_there()
    bad = []
    for mistake in MISTAKES:
        steps = mistake.steps()
        with tempfile.TemporaryDirectory(prefix="gpt2-steps-mistake-") as tmp:
            root = copy_project(Path(tmp))
            for step in steps:
                make(mistake, root, step)
            results = run_tests(root, mistake, None)
        for step in steps:
            ran = on(results, step, mistake)
            if not ran:
                bad.append(f"{mistake.id} on {step}: none of its tests ran")
            bad += [f"{mistake.id} on {step}: {name} " + {"passed": "passed", "skipped": f"was skipped: {what}",
                                                          "ERROR": f"could not run: {what}"}[status]
                    for name, status, what in ran if status != "FAILED"]
        print(f"{'ok  ' if not any(b.startswith(mistake.id + ' ') for b in bad) else 'FAIL'} {mistake.id:<30} "
              f"{', '.join(steps)}", flush=True)
    for line in bad:
        print("error: " + line, file=sys.stderr)
    print(f"{len(MISTAKES)} mistakes, {sum(len(m.steps()) for m in MISTAKES)} (mistake, step) pairs: "
          f"{'every one caught' if not bad else f'{len(bad)} not caught'}")
    return 1 if bad else 0


class Once(argparse.Action):
    """A flag given twice (M=untied-head and ARGS="--id exact-gelu") is refused: the last is not silently taken."""
    def __call__(self, parser, namespace, value, option_string=None):
        if (before := getattr(namespace, self.dest)) is not None:
            parser.error(f"{option_string} given twice, {before} and {value} (M= gives --id, N= gives --step)")
        setattr(namespace, self.dest, value)


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="make mistake", description=__doc__.split("\n\n")[0],
                           hint='make mistake ARGS="--help"')
    p.add_argument("--step", action=Once, help="the step to make it in (make mistake N=08); default: the first it "
                   "belongs to")
    p.add_argument("--id", action=Once, help="the mistake (make mistake M=<id>); none: the list")
    p.add_argument("--check", action="store_true", help="every mistake on every step it applies to (CI)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.check and (args.id or args.step):
        p.error("--check makes every mistake on every step, for CI: it takes no M= or N=")
    if args.check:
        return check()
    try:
        step = resolve(args.step) if args.step else None
    except ValueError as e:
        p.error(str(e))
    if not args.id:  # the list: every mistake, or (N=) those that apply to that step
        print(listing(step))
        return 0
    if args.id not in BY_ID:
        ids = [m.id for m in MISTAKES if step is None or step in m.steps()]  # N= given: the ids of that step
        if near := difflib.get_close_matches(args.id, list(BY_ID), n=1):  # a typo: the id meant, not all of them
            where = f" (it applies from step {BY_ID[near[0]].step[:2]} on)" if near[0] not in ids else ""
            p.error(f"no mistake {args.id!r}: did you mean {near[0]}?{where} (make mistake"
                    f"{f' N={step[:2]}' if step else ''} lists them)")
        p.error(f"no mistake {args.id!r}; the ids{f' in step {step}' if step else ''}: {', '.join(ids)}")
    mistake = BY_ID[args.id]
    if step and step not in mistake.steps():
        p.error(f"{mistake.id} is not in step {step}: it applies to {', '.join(mistake.steps())}")
    return show(mistake, step or resolve(mistake.step))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the temporary copy is already gone: TemporaryDirectory removes it on the way out
        print("interrupted: the temporary copy is removed, steps/ was never touched", file=sys.stderr)
        sys.exit(130)

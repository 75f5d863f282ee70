"""Step 09's lesson: GPT.from_pretrained (HF's GPT-2 weights, Conv1D transposed), top-k sampling, the generation
command. All offline: the checkpoints are randomly initialised GPT2LMHeadModels saved to a temporary directory."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from shared import data
from shared.steps import ROOT
from tests.conftest import ctrl_c_as_in_a_terminal
from tests.refs import distinct_biases, distinct_layer_norms
from tests.test_gpt2 import INIT, gpt2_params, rows

pytestmark = pytest.mark.per_model_file  # model.py's from_pretrained; the command tests run on step 09 alone

# fp32: HF computes the same products, summed in another order. 1e-5 at n_embd 32 (up to 2.9e-6 measured, logits up
# to about 6: weights of std INIT, LayerNorms and biases drawn); at 124M size the sums run over 768 and 3072 terms
# through 12 layers (1e-6 to 3e-6 measured here), and 1e-4 is still a few hundred float32 rounding steps at the size of
# these logits (up to about 3).
ATOL, ATOL_124M = 1e-5, 1e-4

IDX = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11], [464, 2068, 7586, 21831, 18045, 625, 262, 16931]])


def hf_small():
    """A randomly initialised GPT2LMHeadModel over GPT-2's 50257 tokens, 2 layers of n_embd 32, LayerNorms and biases
    distinct, weights of std INIT (0.2, where the exact GELU shows: test_gpt2.py)."""
    config = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=INIT)
    return distinct_biases(distinct_layer_norms(GPT2LMHeadModel(config).eval()))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One small random GPT2LMHeadModel, written by save_pretrained, shared by the tests of this file."""
    path = tmp_path_factory.mktemp("gpt2-small-random")
    torch.manual_seed(0)  # fixed weights: greedy decoding then never meets a near-tie between two tokens
    hf = hf_small()
    hf.save_pretrained(path)
    return hf, path


def hub_layout(hf, path):
    """The files as the hub has them for gpt2: keys without "transformer.", the causal mask kept as attn.bias."""
    path.mkdir()
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}  # tied: stored once, as wte
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, n, n).tril()
    save_file(state, path / "model.safetensors")
    hf.config.to_json_file(path / "config.json")
    return path


@pytest.mark.check("reference")
@pytest.mark.needs("GPT.from_pretrained")
def test_from_pretrained_gives_hf_logits(step, saved):
    hf, path = saved
    model = step.model.GPT.from_pretrained(str(path))
    torch.testing.assert_close(model(IDX)[0][..., :50257], hf(IDX).logits, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def saved_124m(tmp_path_factory):
    """A randomly initialised GPT2LMHeadModel at GPT-2 small's full size, written by save_pretrained."""
    path = tmp_path_factory.mktemp("gpt2-124m-random")
    torch.manual_seed(0)
    hf = distinct_biases(distinct_layer_norms(GPT2LMHeadModel(GPT2Config()).eval()))
    hf.save_pretrained(path)
    return hf, path


@pytest.mark.needs("GPT.from_pretrained")
def test_from_pretrained_gives_hf_logits_at_the_full_124m_size(step, saved_124m):
    hf, path = saved_124m
    model = step.model.GPT.from_pretrained(str(path))
    assert sum(p.numel() for p in model.parameters()) == gpt2_params(rows(model.config), 1024, 12, 768)
    with torch.no_grad():
        torch.testing.assert_close(model(IDX)[0][..., :50257], hf(IDX).logits, atol=ATOL_124M, rtol=0)


PEAK_MEMORY = """
import importlib, sys, torch
model_py = importlib.import_module("steps.{step}.model")
def peak_mb():  # the most this process has held in memory so far: Linux's VmHWM, which starts afresh at exec
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024  # (getrusage's maxrss
    # would start at the peak of the parent that forked it: pytest's, after it built a 124M model)
before = peak_mb()
model = model_py.GPT.from_pretrained(sys.argv[1])
touched = sum(p.double().sum().item() for p in model.parameters())  # read every weight at least once
print(peak_mb() - before, sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
"""


@pytest.mark.needs("GPT.from_pretrained")
@pytest.mark.first_and_last  # a 124M load, 4 s: 09 as it came, and the newest, which carries 10's and 13's changes
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from Linux's /proc")
def test_from_pretrained_holds_about_one_copy_of_the_weights(step, saved_124m):
    r = subprocess.run([sys.executable, "-c", PEAK_MEMORY.format(step=step.name), str(saved_124m[1])],
                       capture_output=True, text=True, check=True)
    peak, weights = map(float, r.stdout.split())
    # One copy is 475 MB. Building a random GPT first and copying the checkpoint over it peaked at 955 MB here;
    # from step 13 on, padding the token table to 50304 rows makes one new table (147 MB) besides the file's.
    # 1.3 copies leave room for torch's own buffers and one tensor converted to float64 above.
    padding = 50304 * 768 * 4 / 2**20 if hasattr(step.model.GPTConfig, "padded_vocab_size") else 0
    assert peak < 1.3 * weights + padding, f"peak {peak:.0f} MB for {weights:.0f} MB of weights"


@pytest.mark.needs("GPT.from_pretrained")
def test_greedy_decoding_gives_hfs_generate_tokens_for_20_steps(step, saved):
    hf, path = saved
    model = step.model.GPT.from_pretrained(str(path))
    ours = model.generate(IDX, max_new_tokens=20, top_k=1)  # sampling among the top 1 is greedy
    theirs = hf.generate(IDX, attention_mask=torch.ones_like(IDX), do_sample=False, max_new_tokens=20,
                         min_new_tokens=20, pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.needs("GPT.from_pretrained")
def test_files_laid_out_as_on_the_hub_load_too(step, saved, tmp_path):
    hf, _ = saved
    model = step.model.GPT.from_pretrained(str(hub_layout(hf, tmp_path / "hub")))
    torch.testing.assert_close(model(IDX)[0][..., :50257], hf(IDX).logits, atol=ATOL, rtol=0)


@pytest.mark.needs("GPT.from_pretrained")
def test_a_checkpoint_in_several_shards_loads(step, saved, tmp_path):
    hf, _ = saved
    hf.save_pretrained(tmp_path, max_shard_size="500KB")  # what save_pretrained does with a big model
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = step.model.GPT.from_pretrained(str(tmp_path))
    torch.testing.assert_close(model(IDX)[0][..., :50257], hf(IDX).logits, atol=ATOL, rtol=0)


@pytest.mark.needs("GPT.from_pretrained")
def test_a_pytorch_model_bin_loads_with_weights_only(step, saved, tmp_path):
    hf, _ = saved
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # the format before safetensors
    hf.config.to_json_file(tmp_path / "config.json")
    model = step.model.GPT.from_pretrained(str(tmp_path))
    torch.testing.assert_close(model(IDX)[0][..., :50257], hf(IDX).logits, atol=ATOL, rtol=0)


@pytest.mark.needs("GPT.from_pretrained")
def test_conv1d_weights_loaded_without_transposing_give_wrong_logits(step, saved, monkeypatch):
    """The classic mistake. c_attn (32 -> 96) would not even fit; the square c_proj fits, and only the logits tell."""
    hf, path = saved
    monkeypatch.setattr(step.model, "CONV1D", tuple(k for k in step.model.CONV1D if k != "attn.c_proj.weight"))
    model = step.model.GPT.from_pretrained(str(path))  # attn.c_proj loaded (in, out) as if it were (out, in)
    assert not torch.allclose(model(IDX)[0][..., :50257], hf(IDX).logits, atol=ATOL)


@pytest.mark.needs("GPT.from_pretrained")
def test_a_weight_of_the_wrong_shape_is_named(step, saved, tmp_path):
    hf, _ = saved
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["transformer.h.1.attn.c_attn.weight"] = state["transformer.h.1.attn.c_attn.weight"].t().contiguous()
    save_file(state, tmp_path / "model.safetensors")  # c_attn stored as nn.Linear would have it: (96, 32)
    hf.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_attn\.weight is \(32, 96\)"):
        step.model.GPT.from_pretrained(str(tmp_path))


@pytest.mark.needs("GPT.from_pretrained")
def test_a_missing_weight_is_named(step, saved, tmp_path):
    hf, _ = saved
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if k not in ("lm_head.weight", "transformer.ln_f.bias")}
    save_file(state, tmp_path / "model.safetensors")
    hf.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"no transformer\.ln_f\.bias"):
        step.model.GPT.from_pretrained(str(tmp_path))


@pytest.mark.needs("GPT.from_pretrained")
@pytest.mark.parametrize("damage, words", [
    ("truncated weights", "SafetensorError"), ("config without sizes", "config.json has {'n_positions': None,"),
    ("a key that is not a name", "7 is not")])
def test_a_corrupt_checkpoint_is_refused_with_a_message(step, saved, tmp_path, damage, words):
    hf, _ = saved
    hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "truncated weights":  # a download that stopped half-way
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "config without sizes":
        (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    else:  # a pickle of what a step never writes
        torch.save({**load_file(weights), 7: torch.zeros(1)}, tmp_path / "pytorch_model.bin")
        weights.unlink()
    with pytest.raises(ValueError, match="does not hold a readable GPT-2 checkpoint") as error:
        step.model.GPT.from_pretrained(str(tmp_path))
    assert words in str(error.value)


@pytest.mark.needs("GPT.from_pretrained")
def test_a_trainers_out_given_for_its_model_directory_names_the_directory_to_give(step, saved, tmp_path):
    hf, _ = saved
    hf.save_pretrained(tmp_path / "model")  # as a trainer leaves it: runs/NN_x/model/
    with pytest.raises(ValueError) as error:
        step.model.GPT.from_pretrained(str(tmp_path))
    assert f"give {tmp_path / 'model'}, where a trainer's --out keeps it" in str(error.value)


@pytest.mark.needs("GPT.from_pretrained")
@pytest.mark.parametrize("setting, words", [
    ({"n_positions": -1}, "{'n_positions': -1}; every size must be a whole number above 0"),
    ({"n_positions": "64"}, "{'n_positions': '64'}; every size must be a whole number above 0"),
    ({"n_embd": "32"}, "{'n_embd': '32'}; every size must be a whole number above 0"),  # text, not a number
    ({"n_head": 2.0}, "{'n_head': 2.0}; every size must be a whole number above 0"),
    ({"n_layer": 10_000_000}, "config.json says n_layer 10000000; the weights hold 2 blocks"),  # not 10M blocks built
])
def test_a_config_json_with_impossible_sizes_is_refused_before_the_model_is_built(step, saved, tmp_path, setting,
                                                                                  words):
    hf, _ = saved
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | setting))
    with pytest.raises(ValueError) as error:
        step.model.GPT.from_pretrained(str(tmp_path))
    assert words in str(error.value)


@pytest.mark.needs("GPT.from_pretrained")
@pytest.mark.parametrize("setting", [{"activation_function": "relu"}, {"scale_attn_weights": False},
                                     {"layer_norm_epsilon": 1e-3}, {"scale_attn_by_inverse_layer_idx": True},
                                     {"tie_word_embeddings": False}],
                         ids=lambda s: next(iter(s)))  # each gives other logits than this GPT computes
def test_a_config_this_gpt_does_not_compute_is_refused(step, tmp_path, setting):
    hf = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **setting))
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=next(iter(setting))):
        step.model.GPT.from_pretrained(str(tmp_path))


@pytest.mark.needs("GPT.from_pretrained")
@pytest.mark.parametrize("name, n_layer, n_head, n_embd, expected", [
    ("gpt2", 12, 12, 768, 124_439_808),
    ("gpt2-medium", 24, 16, 1024, 354_823_168),
    ("gpt2-large", 36, 20, 1280, 774_030_080),
    ("gpt2-xl", 48, 25, 1600, 1_557_611_200),
])
@pytest.mark.check("parameters")
def test_parameter_counts_of_the_four_sizes(step, name, n_layer, n_head, n_embd, expected):
    assert name in step.model.HUB_NAMES
    with torch.device("meta"):  # 1.5 billion parameters of shape only: no memory, no time
        model = step.model.GPT(step.model.GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    padding = (rows(model.config) - 50257) * n_embd  # step 13 on: the table's padded rows
    assert sum(p.numel() for p in model.parameters()) == gpt2_params(rows(model.config), 1024, n_layer, n_embd)
    assert sum(p.numel() for p in model.parameters()) == expected + padding


@pytest.mark.needs("GPT.from_pretrained")
def test_top_k_samples_only_among_the_k_most_likely_tokens(step, saved):
    model = step.model.GPT.from_pretrained(str(saved[1]))
    prompt = IDX[:1, :3].repeat(200, 1)  # 200 draws of the next token after the same prompt
    top5 = set(model(IDX[:1, :3])[0][0, -1].topk(5).indices.tolist())
    drawn = model.generate(prompt, 1, top_k=5, generator=torch.Generator().manual_seed(0))[:, -1]
    assert set(drawn.tolist()) == top5  # all five turn up in 200 draws, nothing else does


# The generation command (`make step N=09 ARGS="..."`).

def run(step, capsys, *args):
    step.main.main([*args, "--device", "cpu", "--seed", "0"])
    return capsys.readouterr()


def continuations(out: str, prompt: str) -> list[str]:
    """What each sample wrote after its prompt (each sample: its --- sample line, the prompt, the new text)."""
    texts = [sample.split("\n", 1)[1] for sample in out.split("--- sample ")[1:]]
    assert all(t.startswith(prompt) for t in texts), out
    return [t.removeprefix(prompt).rstrip("\n") for t in texts]


@pytest.mark.main_needs("stream")
def test_command_streams_the_prompt_and_its_continuation(step, saved, capsys):
    out = run(step, capsys, "--model", str(saved[1]), "--prompt", "Hello", "--max-new-tokens", "5",
              "--num-samples", "2").out
    texts = continuations(out, "Hello")
    assert len(texts) == 2 and all(texts)  # two samples, each with text after the prompt


@pytest.mark.main_needs("stream")
def test_command_with_the_same_seed_writes_the_same_text(step, saved, capsys):
    a = run(step, capsys, "--model", str(saved[1]), "--prompt", "Hello", "--max-new-tokens", "8").out
    b = run(step, capsys, "--model", str(saved[1]), "--prompt", "Hello", "--max-new-tokens", "8").out
    assert a == b and all(continuations(a, "Hello"))  # the same new text, not only the same prompt


@pytest.mark.main_needs("stream")
def test_command_crops_a_prompt_longer_than_the_context_with_a_warning(step, saved, capsys):
    err = run(step, capsys, "--model", str(saved[1]), "--prompt", "to be or not " * 40, "--max-new-tokens", "2").err
    assert "warning:" in err and "the last 64" in err


@pytest.mark.main_needs("stream")
def test_command_samples_with_its_temperature_and_top_k_from_the_prompts_last_tokens(step, saved, capsys,
                                                                                     monkeypatch):
    asked = []

    def recorded(model, idx, max_new_tokens, temperature, top_k, generator):
        asked.append((idx[0].tolist(), temperature, top_k))
        return torch.cat([idx, idx[:, -1:]], dim=1)  # the last token again

    monkeypatch.setattr(step.main.GPT, "generate", recorded)
    prompt = "to be or not " * 40  # 160 tokens; the context is 64
    run(step, capsys, "--model", str(saved[1]), "--prompt", prompt, "--temperature", "0.5", "--top-k", "7",
        "--max-new-tokens", "1", "--num-samples", "1")
    assert asked == [(data.gpt2_tokenizer().encode(prompt)[-64:], 0.5, 7)]


@pytest.mark.main_needs("stream")
def test_command_without_a_model_falls_back_to_an_untrained_one_when_offline(step, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    out = run(step, capsys, "--prompt", "Hello", "--max-new-tokens", "2", "--num-samples", "1")
    assert "warning: could not download gpt2" in out.err and "untrained GPT-2" in out.err
    assert "runs/10_training/model" in out.err  # where a model worth reading comes from offline
    assert "random, 124,439,808 parameters" in out.out and "Hello" in out.out


@pytest.mark.main_needs("stream")
def test_ctrl_c_while_it_writes_stops_it_in_one_line(step):
    proc = subprocess.Popen([sys.executable, "-m", f"steps.{step.name}", "--model", "random", "--device", "cpu",
                             "--prompt", "Hello", "--max-new-tokens", "10000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=ctrl_c_as_in_a_terminal)
    assert proc.stdout.readline().startswith(f"step {step.name} on cpu: random")  # built: the writing begins
    assert proc.stdout.readline().startswith("--- sample 1")
    proc.stdout.read(len("Hello") + 5)  # the prompt and a few characters of the sample: it is writing
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "interrupted\n", err[-2000:]  # 128 + SIGINT, no traceback
    assert out.endswith("\n")  # the text so far ends its line: "interrupted" is not glued to its last word

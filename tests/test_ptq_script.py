"""scripts/ptq.py: one-shot post-training quantization of the real pretrained MiniLM on Brown corpus text."""

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def run_ptq(tmp_path, *overrides):
    cmd = [sys.executable, "scripts/ptq.py", f"hydra.run.dir={tmp_path}", "calibration.sentences=64",
           "evaluation.sentences=32"]  # fmt: skip
    return subprocess.run(cmd + list(overrides), cwd=ROOT, capture_output=True, text=True, timeout=900)


def _metric(stdout, key):
    return float(next(ln for ln in stdout.splitlines() if ln.startswith(f"{key}:")).split(":")[1])


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "bits", "min_cosine"), [("gptq_int4", 4, 0.9), ("smoothquant_w8a8", 8, 0.98)])
def test_recipes_run_one_shot_on_minilm(tmp_path, recipe, bits, min_cosine):
    proc = run_ptq(tmp_path, f"+compress={recipe}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _metric(proc.stdout, "embedding_cosine") >= min_cosine
    tensors = load_file(tmp_path / "quantized.safetensors")
    codes = tensors["encoder.layer.0.intermediate.dense/weight.codes"]
    assert codes.shape == (1536, 384) and int(codes.abs().max()) <= 2 ** (bits - 1)
    assert "| encoder.layer.5.output.dense | FakeQuantLinear | 384×1536 |" in (tmp_path / "report.md").read_text()


def test_a_training_recipe_is_refused(tmp_path):
    proc = run_ptq(tmp_path, "+compress=qat_int8")
    assert proc.returncode != 0
    assert "needs post-training recipes" in proc.stderr


def tiny_llama_folder(tmp_path: Path) -> Path:
    """Any Hugging Face folder: a small random Llama with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_compress.examples.pretrained import load_tokenizer

    folder = tmp_path / "tiny-llama"
    tokenizer = load_tokenizer("smollm2")
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_causal_lm(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_ptq(tmp_path / "run", "task=causal_lm", f"pretrained={tiny_llama_folder(tmp_path)}", *overrides,
                   "calibration.sequences=8", "calibration.seq_len=64", "calibration.batch_size=4",
                   "evaluation.sequences=4")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        ["+compress=gptq_int4"],
        ["+compress=wanda_24"],
        ["+compress=sparsegpt_24", "+callbacks.sparsegpt.bits=4"],
        ["+compress=awq_gptq_int4"],
        ["+compress=[sparsegpt_24,gptq_int4]"],  # prune, then GPTQ: the 2:4 zeros stay
    ],
)
def test_a_causal_lm_is_calibrated_on_windows_and_judged_by_perplexity(tmp_path, recipe):
    proc = run_causal_lm(tmp_path, *recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = _metric(proc.stdout, "perplexity_fp32"), _metric(proc.stdout, "perplexity")
    assert before > 1 and 0.5 < after / before < 2  # a random model's perplexity, moved a little by int4
    tensors = load_file(tmp_path / "run" / "quantized.safetensors")
    if "gptq" in recipe[0] or len(recipe) > 1:  # int4 codes (SparseGPT with bits=4: in the same pass as 2:4)
        codes = tensors["model.layers.1.mlp.down_proj/weight.codes"]
        assert codes.shape == (64, 128) and int(codes.abs().max()) <= 8
    if "_24" in recipe[0]:  # the pruners' keep-masks: exactly 2 of every 4
        mask = tensors["model.layers.1.mlp.down_proj/mask"]
        assert mask.shape == (64, 128) and bool((mask.reshape(64, -1, 4).sum(-1) == 2).all())
    assert "held-out perplexity" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "save"), [("gptq_gguf", "gguf"), ("gptq_fp8", "compressed-tensors"), ("gptq_int4", "compressed-tensors")]
)
def test_the_result_is_saved_for_a_serving_stack_that_loads_it(tmp_path, recipe, save):
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    proc = run_causal_lm(tmp_path, f"+compress={recipe}", f"save={save}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "run" / save
    if save == "gguf":
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
    else:  # asymmetric int4: dequantized on load (see tests/export/test_compressed.py)
        config = CompressedTensorsConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config)
    codes = load_file(tmp_path / "run" / "quantized.safetensors")["model.layers.1.mlp.down_proj/weight.codes"]
    scale = load_file(tmp_path / "run" / "quantized.safetensors")["model.layers.1.mlp.down_proj/weight.scale"]
    if recipe == "gptq_int4":
        return  # the codes' round trip is tests/export's; here: the script wrote a folder transformers loads
    want = codes.float() * scale.repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)
    assert torch.equal(model.get_submodule("model.layers.1.mlp.down_proj").weight, want)  # our grid, exactly


def test_an_unknown_serving_format_is_refused_before_loading(tmp_path):
    proc = run_ptq(tmp_path, "+compress=gptq_int4", "save=onnx")
    assert proc.returncode != 0
    assert "format='onnx' is not a serving format; allowed: null, compressed-tensors, gguf" in proc.stderr


@pytest.mark.slow
def test_streamed_calibration_writes_the_folder_the_in_memory_run_saves_and_resumes_from_its_checkpoint(tmp_path):
    import json

    import torch

    from lightning_compress.export.compressed import checkpoint_tensors

    folder = tiny_llama_folder(tmp_path)
    common = ["task=causal_lm", f"pretrained={folder}", "+compress=gptq_int4", "calibration.sequences=8",
              "calibration.seq_len=64", "calibration.batch_size=4", "evaluation.sequences=4"]  # fmt: skip
    memory = run_ptq(tmp_path / "memory", *common, "save=compressed-tensors")
    assert memory.returncode == 0, memory.stderr[-3000:]
    ck = tmp_path / "ck"
    streamed = run_ptq(tmp_path / "streamed", *common, "calibration.streamed=true", f"checkpoint_dir={ck}")
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    a = checkpoint_tensors(tmp_path / "memory" / "compressed-tensors")
    b = checkpoint_tensors(tmp_path / "streamed" / "compressed-tensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "streamed" / "compressed-tensors" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert (tmp_path / "streamed" / "compressed-tensors" / "tokenizer.json").is_file()  # the source's tokenizer
    assert not list(ck.iterdir())


def test_streamed_calibration_refuses_what_it_cannot_stream(tmp_path):
    proc = run_ptq(tmp_path, "lm=smollm2", "+compress=gptq_int4", "calibration.streamed=true")
    assert proc.returncode != 0 and "needs pretrained= a local folder of safetensors shards" in proc.stderr
    proc = run_ptq(tmp_path, "+compress=gptq_int4", f"checkpoint_dir={tmp_path / 'ck'}")
    assert proc.returncode != 0 and "checkpoint_dir=" in proc.stderr
    assert "needs calibration.streamed=true" in proc.stderr

"""Streamed calibration (lightning_compress.streaming): weights stay on disk, read block by block; resumable."""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_compress import AWQCalibrate, GPTQFinalize, SmoothQuantCalibrate, SparseGPTPrune, WandaPrune
from lightning_compress.export.compressed import checkpoint_tensors, load_compressed, save_compressed
from lightning_compress.nn.quantized import QuantizedLayer
from lightning_compress.streaming import MANIFEST, StreamedBlocks, calibrate_streamed
from tests.export.test_compressed import from_pretrained
from tests.tiny_models import tiny_llama, token_batches

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 4


def source(tmp_path: Path, hidden: int = 32, name: str = "src") -> Path:
    """A random Llama of BLOCKS blocks saved as several safetensors shards (as big checkpoints are)."""
    folder = tmp_path / name
    tiny_llama(layers=BLOCKS, hidden=hidden).save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def in_memory(folder: Path, batches, out: Path, **options) -> tuple[torch.nn.Module, Path]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    GPTQFinalize(**options).apply(model, batches)
    return model, save_compressed(model, out)


def assert_same_folder(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory):
    """One model, its in-memory GPTQ folder and its streamed one."""
    tmp = tmp_path_factory.mktemp("streamed")
    folder, batches = source(tmp), token_batches(3)
    model, memory = in_memory(folder, batches, tmp / "memory", bits=4)
    streamed = calibrate_streamed(GPTQFinalize(bits=4), folder, batches, tmp / "streamed")
    return folder, batches, model, memory, streamed


def test_streamed_gptq_writes_exactly_what_the_in_memory_path_writes(streamed_run):
    folder, batches, model, memory, streamed = streamed_run
    assert_same_folder(memory, streamed)
    index = json.loads((streamed / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == BLOCKS + 1  # one shard per block, one for the rest
    assert not list(streamed.parent.glob(".streamed*"))  # the temporary stage is gone
    loaded = load_compressed(streamed)  # our loader, shard by shard
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, model(**batches[0]).logits)


def test_a_tied_head_is_streamed_as_in_memory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")  # writes the embedding table once
    batches = token_batches(2)
    _, memory = in_memory(tmp_path / "tied", batches, tmp_path / "memory", bits=4)
    streamed = calibrate_streamed(GPTQFinalize(bits=4), tmp_path / "tied", batches, tmp_path / "streamed")
    assert_same_folder(memory, streamed)
    assert "lm_head.weight" not in checkpoint_tensors(streamed)


def test_transformers_loads_the_streamed_folder(streamed_run):
    _, batches, model, _, streamed = streamed_run
    client = from_pretrained(streamed, dequantize=True)  # asymmetric int4: see from_pretrained
    with torch.no_grad():
        torch.testing.assert_close(client(**batches[0]).logits, model(**batches[0]).logits, atol=1e-5, rtol=1e-5)


def test_only_one_block_is_in_memory_at_a_time(tmp_path, monkeypatch):
    folder, batches = source(tmp_path), token_batches(2)
    seen = []
    load = StreamedBlocks.load

    def counting(self, index, block):
        load(self, index, block)
        blocks = self.model.get_submodule(self.prefix)
        real = [i for i, b in enumerate(blocks) if any(not p.is_meta for p in b.parameters())]
        outside = [n for n, p in self.model.named_parameters() if not n.startswith(self.prefix) and not p.is_meta]
        gc.collect()  # count what is held, not cycles left for the collector (an earlier test's, say)
        codes = sum(isinstance(o, QuantizedLayer) for o in gc.get_objects())  # earlier blocks' codes, anywhere
        seen.append((index, real, outside, codes))

    monkeypatch.setattr(StreamedBlocks, "load", counting)
    calibrate_streamed(GPTQFinalize(bits=4), folder, batches, tmp_path / "out")
    # block i alone; embeddings and head freed after capture; no codes of the blocks already written are held
    assert seen == [(i, [i], [], 0) for i in range(BLOCKS)]


KILLER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from lightning_compress import AWQCalibrate, GPTQFinalize, SmoothQuantCalibrate, SparseGPTPrune, WandaPrune
from lightning_compress.streaming import StreamedBlocks, calibrate_streamed
from tests.tiny_models import token_batches

release = StreamedBlocks.release
def release_then_die(self, index, *args):
    release(self, index, *args)
    if index == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
StreamedBlocks.release = release_then_die
calibrate_streamed(GPTQFinalize(bits=4), Path({src!r}), token_batches(3), Path({out!r}), checkpoint_dir=Path({ck!r}))
"""


def test_a_run_killed_midway_resumes_at_the_next_block_and_gives_the_same_folder(streamed_run, tmp_path, monkeypatch):
    folder, batches, _, _, streamed = streamed_run
    out, ck = tmp_path / "out", tmp_path / "ck"
    script = KILLER.format(root=str(ROOT), kill_at=1, src=str(folder), out=str(out), ck=str(ck))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()  # nothing a later step could take for a finished result
    assert json.loads((ck / MANIFEST).read_text())["finished"] == 1
    loaded = []
    load = StreamedBlocks.load
    monkeypatch.setattr(StreamedBlocks, "load", lambda self, i, b: loaded.append(i) or load(self, i, b))
    calibrate_streamed(GPTQFinalize(bits=4), folder, batches, out, checkpoint_dir=ck)
    assert loaded == [2, 3]  # blocks 0 and 1 were committed before the kill
    assert_same_folder(streamed, out)
    assert not list(ck.iterdir())  # the checkpoint is cleared once the folder is written


# every calibration callback on the engine's walk streams (a pruner alone writes plain weights)
CALLBACKS = {
    "smoothquant": lambda: SmoothQuantCalibrate(explicit_scales=False, act_granularity="tensor"),
    "awq": lambda: AWQCalibrate(bits=4, grid=4),
    "sparsegpt_int4": lambda: SparseGPTPrune(sparsity=0.5, bits=4),
    "wanda_2_4": lambda: WandaPrune(pattern="2:4"),
}


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_every_calibration_callback_streams_and_resumes_to_what_it_writes_in_memory(tmp_path, monkeypatch, name):
    from transformers import AutoModelForCausalLM

    folder, batches = source(tmp_path), token_batches(3)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    callback = CALLBACKS[name]()
    callback.apply(model, batches)
    if callback.quantized:
        memory = save_compressed(model, tmp_path / "memory")
    else:
        model.save_pretrained(memory := tmp_path / "memory")
    ck, out = tmp_path / "ck", tmp_path / "streamed"
    release = StreamedBlocks.release

    def die(self, index, *args):
        raise KeyboardInterrupt  # a crash once blocks 0 and 1 are committed

    monkeypatch.setattr(StreamedBlocks, "release", lambda self, i, *a: release(self, i, *a) if i < 2 else die(self, i))
    streamed_callback = CALLBACKS[name]()
    with pytest.raises(KeyboardInterrupt):
        calibrate_streamed(streamed_callback, folder, batches, out, checkpoint_dir=ck)
    monkeypatch.undo()
    assert not out.exists()
    resumed = CALLBACKS[name]()
    calibrate_streamed(resumed, folder, batches, out, checkpoint_dir=ck)
    assert not resumed.quantized and not getattr(resumed, "masks", {})  # written blocks' results are not kept
    assert_same_folder(memory, out)
    loaded = load_compressed(out) if callback.quantized else AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, model(**batches[0]).logits)
    if not callback.quantized:
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        assert all(float((m == 0).float().mean()) == 0.5 for m in [loaded.model.layers[0].mlp.up_proj.weight])


def test_smoothquant_with_explicit_scales_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(ValueError, match="explicit_scales=False"):
        calibrate_streamed(SmoothQuantCalibrate(), tmp_path / "no-such-folder", token_batches(1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_run_is_refused_saying_what_differs(tmp_path, monkeypatch):
    folder, batches = source(tmp_path), token_batches(2)
    ck = tmp_path / "ck"

    def die(self, index, *args):
        raise KeyboardInterrupt  # a crash after the first block is committed

    release = StreamedBlocks.release
    monkeypatch.setattr(StreamedBlocks, "release", lambda self, i, *a: release(self, i, *a) if i == 0 else die(self, i))
    with pytest.raises(KeyboardInterrupt):
        calibrate_streamed(GPTQFinalize(bits=4), folder, batches, tmp_path / "out", checkpoint_dir=ck)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"recipe\.options: was .*bits=4.*now .*bits=3"):
        calibrate_streamed(GPTQFinalize(bits=3), folder, batches, tmp_path / "out", checkpoint_dir=ck)
    with pytest.raises(ValueError, match=r"calibration: was"):
        calibrate_streamed(GPTQFinalize(bits=4), folder, token_batches(2, seed=5), tmp_path / "out", checkpoint_dir=ck)
    other = source(tmp_path, name="other")
    config = (other / "config.json").read_text()
    (other / "config.json").write_text(config.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    with pytest.raises(ValueError, match=r"model\.config: was"):
        calibrate_streamed(GPTQFinalize(bits=4), other, batches, tmp_path / "out", checkpoint_dir=ck)
    assert not (tmp_path / "out").exists()


def _shard_with(folder: Path, key: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / index[key]


def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(tmp_path):
    folder = source(tmp_path)
    key = "model.layers.2.mlp.down_proj.weight"
    shard = _shard_with(folder, key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").unlink()  # no index to tell: the model's own list of tensors does
    with pytest.raises(ValueError, match=r"lacks tensor 'model\.layers\.2\.mlp\.down_proj\.weight'"):
        calibrate_streamed(GPTQFinalize(bits=4), folder, token_batches(1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shards_of_another_model_are_refused_naming_the_file(tmp_path):
    folder, other = source(tmp_path), source(tmp_path, hidden=64, name="wide")
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    for shard in other.glob("*.safetensors"):
        (folder / shard.name).write_bytes(shard.read_bytes())
    (folder / "model.safetensors.index.json").write_text((other / "model.safetensors.index.json").read_text())
    with pytest.raises(ValueError, match=r"model-\d+-of-\d+\.safetensors: tensor .* has shape .*another model"):
        calibrate_streamed(GPTQFinalize(bits=4), folder, token_batches(1), tmp_path / "out")


def test_a_truncated_shard_is_refused_naming_the_file(tmp_path):
    folder = source(tmp_path)
    shard = _shard_with(folder, "model.layers.1.self_attn.q_proj.weight")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shard.name} is not a complete safetensors file"):
        calibrate_streamed(GPTQFinalize(bits=4), folder, token_batches(1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_leaves_no_partial_file_and_the_run_resumes(streamed_run, tmp_path, monkeypatch):
    folder, batches, _, _, streamed = streamed_run
    import safetensors.torch as st

    calls, save = [0], st.save_file

    def full_after_three(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] > 3:
            with open(path, "wb") as f:
                f.write(b"partial")  # what a full disk leaves of the file being written
            raise OSError(errno.ENOSPC, "No space left on device")
        save(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", full_after_three)
    ck, out = tmp_path / "ck", tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        calibrate_streamed(GPTQFinalize(bits=4), folder, batches, out, checkpoint_dir=ck)
    monkeypatch.undo()
    assert not out.exists()
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    for shard in ck.glob("*.safetensors"):  # every file there is complete
        with safe_open(shard, "pt"):
            pass
    calibrate_streamed(GPTQFinalize(bits=4), folder, batches, out, checkpoint_dir=ck)
    assert_same_folder(streamed, out)


def test_layers_outside_the_block_stack_are_refused_before_anything_is_written(tmp_path):
    folder = source(tmp_path)
    with pytest.raises(ValueError, match=r"lm_head.*outside"):
        calibrate_streamed(GPTQFinalize(bits=4, targets=[".*proj", "lm_head"]), folder, token_batches(1),
                           tmp_path / "out", checkpoint_dir=tmp_path / "ck")  # fmt: skip
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck" / MANIFEST).exists()


def test_a_callback_that_is_not_post_training_is_refused(tmp_path):
    from lightning_compress import QATFakeQuant

    with pytest.raises(TypeError, match="post-training calibration callback"):
        calibrate_streamed(QATFakeQuant(), source(tmp_path), token_batches(1), tmp_path / "out")


def _rank_main(rank: int, folder: str, out: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        batches = token_batches(4)[rank::2]  # each rank its half
        calibrate_streamed(GPTQFinalize(bits=4), Path(folder), batches, Path(out), checkpoint_dir=Path(out + ".ck"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes_on_all_the_batches(tmp_path):
    import torch.multiprocessing as mp

    folder = source(tmp_path)
    one = calibrate_streamed(GPTQFinalize(bits=4), folder, token_batches(4), tmp_path / "one")
    port = 29500 + os.getpid() % 1000
    mp.spawn(_rank_main, args=(str(folder), str(tmp_path / "two"), port), nprocs=2, join=True)
    ta, tb = checkpoint_tensors(one), checkpoint_tensors(tmp_path / "two")
    assert ta.keys() == tb.keys()
    for key in ta:  # Hessians summed across ranks: the same codes; scales to float rounding
        torch.testing.assert_close(tb[key], ta[key], atol=1e-6, rtol=1e-6, msg=key)

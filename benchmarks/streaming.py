"""Models bigger than memory: streamed GPTQ (weights read block by block from safetensors) against the in-memory path.

Every run is its own process (``python -m benchmarks.streaming worker ...``), so each peak RSS (``VmHWM``,
:func:`~benchmarks.peak_rss_mb`) is that run's alone:

- a Llama-shaped model of ~1.5 GB in FP32 with random weights (memory and time do not depend on the values), saved
  as safetensors shards: in-memory GPTQ 4-bit (``from_pretrained``, ``GPTQFinalize.apply``, ``save_compressed``)
  vs ``calibrate_streamed``; then the streamed run killed (SIGKILL) after a random block and run again on its
  ``checkpoint_dir``; both written folders compared tensor by tensor with the in-memory one;
- SmolLM2-135M (its GGUF dequantized and saved as safetensors): streamed vs in-memory codes for GPTQ and
  SmoothQuant, and streamed GPTQ on 1 vs 2 processes (DDP over gloo, each rank half the batches).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks import Table, peak_rss_mb

CACHE = Path(__file__).resolve().parents[1] / "outputs" / "benchmarks" / "streaming"
# ~1.5 GB in FP32: 32 Llama blocks of hidden 1024 (16 query / 4 key-value heads), MLP 2816, vocab 32000, tied head.
BIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 32, "num_attention_heads": 16,
       "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": True,
       "max_position_embeddings": 2048}  # fmt: skip
SEQUENCES, SEQ_LEN, BATCH = 16, 256, 4


def batches(vocab: int, sequences: int = SEQUENCES, rank: int = 0, world: int = 1) -> list[dict[str, torch.Tensor]]:
    """Random-token calibration batches (``sequences`` × ``SEQ_LEN``), a rank's share of them under DDP."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (sequences, SEQ_LEN), generator=g)
    out = [{"input_ids": ids[i : i + BATCH], "attention_mask": torch.ones(BATCH, SEQ_LEN, dtype=torch.long)}
           for i in range(0, sequences, BATCH)]  # fmt: skip
    return out[rank::world]


def big_model() -> Path:
    """The random ~1.5 GB Llama as safetensors shards (built once, in a child process, then cached)."""
    folder = CACHE / "llama-1.5gb"
    if not (folder / "model.safetensors.index.json").is_file():
        code = (
            "import torch, sys; from transformers import LlamaConfig, LlamaForCausalLM; torch.manual_seed(0); "
            f"m = LlamaForCausalLM(LlamaConfig(**{BIG!r})); m.save_pretrained(sys.argv[1], max_shard_size='400MB')"
        )
        subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return folder


def smollm2_folder() -> Path:
    """SmolLM2-135M (the installed GGUF, dequantized to FP32) as a safetensors folder."""
    folder = CACHE / "smollm2-safetensors"
    if not (folder / "config.json").is_file():
        code = (
            "import sys; from lightning_compress.examples.pretrained import load_pretrained; "
            "from lightning_compress.export.compressed import dequantized_load; "
            "m, t = load_pretrained('smollm2', task='causal_lm'); t.save_pretrained(sys.argv[1])\n"
            "with dequantized_load(m): m.save_pretrained(sys.argv[1])"
        )
        subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return folder


# ------------------------------------------------------------------------------------------------ the worker
RECIPES = {"gptq": "GPTQFinalize(bits=4)", "smoothquant": "SmoothQuantCalibrate(explicit_scales=False)"}


def _callback(recipe: str):  # type: ignore[no-untyped-def]
    from lightning_compress import GPTQFinalize, SmoothQuantCalibrate

    return {"gptq": lambda: GPTQFinalize(bits=4), "smoothquant": lambda: SmoothQuantCalibrate(explicit_scales=False)}[
        recipe
    ]()


def _stamp(**values: float) -> None:
    print(json.dumps(values), flush=True)  # read back by measure(), even from a killed run


def worker(mode: str, folder: str, out: str, kill_at: int = -1, ranks: int = 1, recipe: str = "gptq",
           kill_after: float = 0.0) -> None:  # fmt: skip
    """One measured run; prints ``{"seconds", "peak_mb"}`` as JSON. ``mode``: ``idle`` (imports only: the runtime),
    ``memory``, ``streamed`` or ``ddp``. A streamed run stamps the wall time of its first block's start
    (``first_block``) and of each commit (``committed``); with ``kill_at >= 0`` it SIGKILLs itself ``kill_after``
    seconds after block ``kill_at`` is committed (in the middle of the next block: that part is lost)."""
    import threading

    import transformers

    from lightning_compress.export.compressed import save_compressed
    from lightning_compress.streaming import StreamedBlocks, calibrate_streamed

    vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
    start = time.perf_counter()
    if mode == "memory":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        _callback(recipe).apply(model, batches(vocab))
        save_compressed(model, out)
    elif mode == "streamed":
        load, release = StreamedBlocks.load, StreamedBlocks.release

        def stamped_load(self, index, block):  # type: ignore[no-untyped-def]
            if not getattr(self, "_stamped", False):
                self._stamped = True
                _stamp(first_block=time.time())
            load(self, index, block)

        def stamped_release(self, index, *args):  # type: ignore[no-untyped-def]
            release(self, index, *args)
            _stamp(committed=time.time(), block=index)
            if index == kill_at:
                threading.Timer(kill_after, os.kill, (os.getpid(), signal.SIGKILL)).start()

        StreamedBlocks.load, StreamedBlocks.release = stamped_load, stamped_release  # type: ignore[method-assign]
        calibrate_streamed(_callback(recipe), folder, batches(vocab), out, checkpoint_dir=out + ".ck")
    elif mode == "ddp":
        import torch.multiprocessing as mp

        mp.spawn(_rank, args=(folder, out, vocab, ranks), nprocs=ranks, join=True)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    if mode == "ddp":  # the largest rank's
        peak = max(float(Path(f"{out}.peak{r}").read_text()) for r in range(ranks))
    print(json.dumps({"seconds": seconds, "peak_mb": peak}))


def _rank(rank: int, folder: str, out: str, vocab: int, world: int) -> None:
    import torch.distributed as dist

    from lightning_compress.streaming import calibrate_streamed

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29731")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        calibrate_streamed(_callback("gptq"), folder, batches(vocab, rank=rank, world=world), out)
        Path(f"{out}.peak{rank}").write_text(str(peak_rss_mb()))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def measure(
    mode: str,
    folder: Path,
    out: Path,
    kill_at: int = -1,
    ranks: int = 1,
    recipe: str = "gptq",
    kill_after: float = 0,
    resume: bool = False,
) -> dict[str, float]:
    """Run :func:`worker` in a fresh process (``out`` and its checkpoint removed first unless ``resume``); its
    JSON, with ``began`` / ``ended`` (wall times around the process), the last ``committed`` and the ``first_block``
    stamps, and ``killed: True`` when it was SIGKILLed."""
    cmd = [sys.executable, "-m", "benchmarks.streaming", "worker", mode, str(folder), str(out), str(kill_at),
           str(ranks), recipe, str(kill_after)]  # fmt: skip
    if not resume:  # nothing of an earlier run left to continue from
        for stale in (out, Path(f"{out}.ck")):
            shutil.rmtree(stale, ignore_errors=True)
    began, start = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    stamps: dict[str, float] = {"began": began, "ended": time.time(), "process_seconds": time.perf_counter() - start}
    for line in proc.stdout.strip().splitlines():
        if line.startswith("{"):
            stamps.update(json.loads(line))
    if proc.returncode == -signal.SIGKILL and kill_at >= 0:
        return {**stamps, "seconds": stamps["process_seconds"], "killed": True}
    if proc.returncode:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return stamps


def same_folder(a: Path, b: Path) -> bool:
    """Whether two compressed-tensors folders hold the same tensors, bit for bit."""
    from lightning_compress.export.compressed import checkpoint_tensors

    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def big_table() -> Table:
    """The ~1.5 GB random Llama: in-memory vs streamed vs killed + resumed."""
    folder = big_model()
    runs = CACHE / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    idle = measure("idle", folder, runs / "idle")
    memory = measure("memory", folder, runs / "memory")
    streamed = measure("streamed", folder, runs / "streamed")
    pick = random.Random(int(time.time()))
    kill_at = pick.randrange(1, BIG["num_hidden_layers"] - 2)
    per_block = (streamed["committed"] - streamed["first_block"]) / BIG["num_hidden_layers"]
    kill_after = pick.uniform(0.2, 0.9) * per_block  # in the middle of block kill_at + 1
    killed = measure("streamed", folder, runs / "resumed", kill_at=kill_at, kill_after=kill_after)
    resumed = measure("streamed", folder, runs / "resumed", resume=True)
    hidden = BIG["hidden_size"]
    block = (4 * hidden * hidden * 5 // 8 + 3 * hidden * BIG["intermediate_size"]) * 4  # q, o + k, v (GQA) + MLP
    embeddings = BIG["vocab_size"] * hidden * 4
    activations = 2 * SEQUENCES * SEQ_LEN * hidden * 4  # a block's inputs and outputs
    bound = (block + embeddings + activations) / 2**20 + idle["peak_mb"] + 500
    table = Table(
        f"Streamed GPTQ 4-bit, a Llama-shaped model of {_bytes(folder) / 1e9:.2f} GB (FP32, random weights)",
        ["path", "peak RSS MB", "× in-memory", "wall s", "same tensors as in-memory"],
    )
    table.rows.append(["in memory (from_pretrained, apply, save_compressed)", f"{memory['peak_mb']:.0f}", "1.00",
                       f"{memory['seconds']:.0f}", "—"])  # fmt: skip
    table.rows.append(["streamed (calibrate_streamed)", f"{streamed['peak_mb']:.0f}",
                       f"{streamed['peak_mb'] / memory['peak_mb']:.2f}", f"{streamed['seconds']:.0f}",
                       "yes" if same_folder(runs / "memory", runs / "streamed") else "NO"])  # fmt: skip
    total = killed["seconds"] + resumed["process_seconds"]
    table.rows.append([f"streamed, SIGKILL inside block {kill_at + 1}, then resumed", f"{resumed['peak_mb']:.0f}",
                       f"{resumed['peak_mb'] / memory['peak_mb']:.2f}", f"{killed['seconds']:.0f} + "
                       f"{resumed['process_seconds']:.0f} = {total:.0f}",
                       "yes" if same_folder(runs / "memory", runs / "resumed") else "NO"])  # fmt: skip
    lost = killed["ended"] - killed["committed"]  # the killed block's work, redone
    startup = resumed["first_block"] - resumed["began"]  # process start, model build, inputs of the resumed block
    overhead = lost + startup
    difference = total - streamed["process_seconds"]
    table.notes += [
        f"Calibration: {SEQUENCES} random-token sequences of {SEQ_LEN} (batches of {BATCH}); GPTQFinalize(bits=4) "
        "defaults (asymmetric per channel, act order, clipping search); random weights: memory and time only.",
        f"Runtime alone (Python, torch, transformers imported, nothing loaded): {idle['peak_mb']:.0f} MB. Memory "
        f"bound of the issue, one block ({block / 2**20:.0f} MB) + activations ({activations / 2**20:.0f} MB) + "
        f"embeddings ({embeddings / 2**20:.0f} MB) + runtime + 500 MB: {bound:.0f} MB; streamed peak "
        f"{streamed['peak_mb']:.0f} MB.",
        f"Kill + resume overhead: {overhead:.0f} s = {lost:.0f} s of block {kill_at + 1} lost (killed "
        f"{kill_after:.0f} s after block {kill_at}'s commit) + {startup:.0f} s start-up of the resumed run (process, "
        f"empty model, embeddings, the saved inputs); target: one block ({per_block:.0f} s) + start-up "
        f"({streamed['first_block'] - streamed['began']:.0f} s, the uninterrupted run's). Total wall time minus the "
        f"uninterrupted run's: {difference:+.0f} s (that difference also holds the run-to-run noise of 32 blocks).",
        f"Output: {_bytes(runs / 'streamed') / 1e6:.0f} MB of compressed-tensors shards.",
    ]
    return table


def smollm2_table() -> Table:
    """SmolLM2-135M: streamed vs in-memory codes; the streamed run on 1 and 2 processes."""
    folder = smollm2_folder()
    runs = CACHE / "runs-smollm2"
    runs.mkdir(parents=True, exist_ok=True)
    memory = measure("memory", folder, runs / "memory")
    streamed = measure("streamed", folder, runs / "streamed")
    one = measure("ddp", folder, runs / "ddp1", ranks=1)
    two = measure("ddp", folder, runs / "ddp2", ranks=2)
    sq_memory = measure("memory", folder, runs / "sq-memory", recipe="smoothquant")
    sq_streamed = measure("streamed", folder, runs / "sq-streamed", recipe="smoothquant")
    table = Table("Streamed calibration on SmolLM2-135M (FP32 safetensors of the installed GGUF)",
                  ["recipe", "path", "processes", "peak RSS MB", "wall s", "same tensors as in-memory"])  # fmt: skip
    gptq, sq = RECIPES["gptq"], RECIPES["smoothquant"]
    table.rows.append([gptq, "in memory", 1, f"{memory['peak_mb']:.0f}", f"{memory['seconds']:.0f}", "—"])
    table.rows.append([gptq, "streamed", 1, f"{streamed['peak_mb']:.0f}", f"{streamed['seconds']:.0f}",
                       "yes" if same_folder(runs / "memory", runs / "streamed") else "NO"])  # fmt: skip
    for run, n in ((one, 1), (two, 2)):
        same = same_folder(runs / "memory", runs / f"ddp{n}")
        table.rows.append([gptq, "streamed, DDP (gloo)", n, f"{run['peak_mb']:.0f} (largest process)",
                           f"{run['seconds']:.0f}", "yes" if same else "NO"])  # fmt: skip
    table.rows.append([sq, "in memory", 1, f"{sq_memory['peak_mb']:.0f}", f"{sq_memory['seconds']:.0f}", "—"])
    table.rows.append([sq, "streamed", 1, f"{sq_streamed['peak_mb']:.0f}", f"{sq_streamed['seconds']:.0f}",
                       "yes" if same_folder(runs / "sq-memory", runs / "sq-streamed") else "NO"])  # fmt: skip
    table.notes += [
        f"Calibration: {SEQUENCES} random-token sequences of {SEQ_LEN}; under DDP each rank takes every other batch "
        f"and {max(1, (os.cpu_count() or 2) // 2)} thread(s) of this machine's {os.cpu_count()} cores; Hessians are "
        "all-reduced, and the layers of each group (q, k, v; gate, up) are shared out among the ranks, each solved "
        "by one rank and broadcast; a group of one layer (o_proj, down_proj) is solved by one rank while the other "
        "waits.",
        "SmoothQuant W8A8 (dynamic per-token activations) folds into the norms only (explicit x / s divisors have no "
        "compressed-tensors form); the streamed run verifies each fold on its block's outputs, as in memory.",
    ]
    return table


def run() -> Iterator[Table]:
    """The two tables, each written as soon as it is measured."""
    yield big_table()
    yield smollm2_table()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7],
               float(sys.argv[8]))  # fmt: skip

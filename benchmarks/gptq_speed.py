"""GPTQ solver speed on CPU, one layer, the Hessian given (16k calibration tokens).

Weights ``(out, in)`` of 384→1536, 1536→384 and 4096→4096 layers at 4 bits: per channel (the targets), group 128
and ``act_order``. Each call of ``gptq_quantize`` (dampening, Cholesky, the blocked solve), with the thread policy the
GPTQ driver uses (``threads=gptq_threads``: one thread but for the large products), is timed quiet and beside
a busy neighbour: a subprocess spinning single-threaded matrix products, i.e. one core of this 2-core host taken by
another job. The neighbour is started once and paused (SIGSTOP) for the quiet runs, so quiet and busy calls
alternate in one process; medians reported.

Calibration inputs are correlated and uneven (``X = Z·A`` with a random mixing matrix ``A``, 1 in 32 input
channels heavy-tailed and 10× larger, like the outlier features of LLM activations), seeded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from benchmarks import Table
from lightning_compress.calibration.threads import gptq_threads
from lightning_compress.functional.gptq import GPTQOptions, gptq_quantize, hessian_update

TOKENS = 16_384
# (in, out): target seconds per channel, calls timed per row (quiet and beside the neighbour each)
SHAPES = {(384, 1536): (0.2, 15), (1536, 384): (0.45, 15), (4096, 4096): (6.0, 5)}
CONFIGS = {"per channel": {}, "group 128": {"group_size": 128}, "act_order": {"act_order": True}}
THREADS = torch.get_num_threads()
NEIGHBOUR = """
import os, torch
torch.set_num_threads(1)
a, parent = torch.randn(256, 256), os.getppid()
print(flush=True)
while os.getppid() == parent:  # ends with the benchmark
    a = torch.tanh(a @ a)
"""


def problem(n_in: int, n_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight ``(n_out, n_in)`` and the float64 Hessian of TOKENS correlated, partly heavy-tailed inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5
    hot = torch.randperm(n_in, generator=g)[: n_in // 32]
    hessian = None
    for _ in range(TOKENS // 4096):
        x = torch.randn(4096, n_in, generator=g) @ mix
        tail = torch.randn(4096, hot.numel(), generator=g) / torch.rand(4096, hot.numel(), generator=g).add(0.05)
        x[:, hot] = 10 * tail  # heavy-tailed (slash distribution), 10× larger
        hessian = hessian_update(hessian, x)
    return 0.02 * torch.randn(n_out, n_in, generator=g), hessian


def _others_busy(seconds: float = 1.0) -> float:
    """Cores busy in other processes over ``seconds`` while this one sleeps (the host is shared)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            jiffies = [int(v) for v in f.readline().split()[1:]]
        return sum(jiffies), jiffies[3] + jiffies[4]  # total, idle + iowait

    (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def quiet_and_busy(fn: Callable[[], object], neighbour: subprocess.Popen, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` with the neighbour paused and running, alternated, after one warm-up call each."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats + 1):
        for busy in (False, True):
            neighbour.send_signal(signal.SIGCONT if busy else signal.SIGSTOP)
            time.sleep(0.2)  # let the scheduler settle
            t0 = time.perf_counter()
            fn()
            if r:
                times[busy].append(time.perf_counter() - t0)
    neighbour.send_signal(signal.SIGSTOP)
    return sorted(times[False])[repeats // 2], sorted(times[True])[repeats // 2]


def _control() -> None:
    """A fixed single-threaded job (~0.1 s): how much of one core the host gives us, paused or spinning beside us."""
    torch.set_num_threads(1)
    try:
        a = torch.ones(512, 512) / 512
        for _ in range(40):
            a = a @ a
    finally:
        torch.set_num_threads(THREADS)


def speed_table() -> Table:
    """Median seconds per ``gptq_quantize`` call, quiet and beside a busy neighbour, for each shape and config."""
    headers = ["layer (in→out)", "config", "s, neighbour paused", "target", "s, neighbour spinning", "ratio", "others"]
    table = Table(
        f"GPTQ solver on CPU, 4 bits, Hessian given ({TOKENS:,} tokens): quiet vs beside a busy neighbour", headers
    )
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], stdout=subprocess.PIPE, text=True)

    def row(layer: str, config: str, fn: Callable[[], object], repeats: int, target: str = "") -> None:
        others = _others_busy()  # the neighbour is paused
        quiet, busy = quiet_and_busy(fn, neighbour, repeats)
        table.rows.append(
            [layer, config, f"{quiet:.3f}", target, f"{busy:.3f}", f"{busy / quiet:.2f}×", f"{others:.1f}"]
        )

    try:
        neighbour.stdout.readline()  # imported and spinning
        neighbour.send_signal(signal.SIGSTOP)
        for (n_in, n_out), (target, repeats) in SHAPES.items():
            w, h = problem(n_in, n_out)
            for name, kwargs in CONFIGS.items():
                fn = partial(gptq_quantize, w, h, GPTQOptions(bits=4, **kwargs), threads=gptq_threads)
                row(f"{n_in}→{n_out}", name, fn, repeats, "" if kwargs else f"≤ {target:g} s")
        row("control", "one-thread matrix products", _control, 15)
    finally:
        neighbour.kill()
        neighbour.wait()
    table.notes += [
        f"{torch.get_num_threads()} torch threads, medians of 15 calls (5 for 4096→4096) each, paused and spinning "
        "alternated. The neighbour is one process spinning 256×256 matrix products on one thread (one of the "
        f"{os.cpu_count()} cores).",
        "Targets (issue #5): per channel ≤ 0.2 s, ≤ 0.45 s, ≤ 6 s quiet; beside the busy neighbour < 2× slower "
        "(ratio = spinning / paused). The IST-DASLab reference gptq.py measured 0.18–0.20 s, 0.37–0.45 s and 5–6.6 s "
        "quiet on these machines, and 6.2 s and 21 s on the first two beside a busy process at two threads (its "
        "per-column loop of tiny ops).",
        "others: cores kept busy by other processes on the shared host, sampled for 1 s before the row. At 0 the "
        "paused column is the quiet figure; above 0 both columns ran beside them too, and the neighbour then costs any "
        "job its share of the CPU (see the control row, a fixed single-threaded job), not thread synchronisation.",
    ]
    return table


def run() -> list[Table]:
    """The speed table."""
    return [speed_table()]

"""Torch thread policies for the solvers in ``functional/`` (which never touch torch's global thread state).

:func:`gptq_threads` is the policy the GPTQ driver passes to
:func:`~lightning_compress.functional.gptq.gptq_quantize` (``threads=gptq_threads``): its loop of small ops on one
thread, only the large products and the Cholesky factorisation on all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

# Matrix products and factorisations with fewer multiply-adds (~25 ms on one core) run on one thread, as does all
# elementwise work: beside a busy process, every parallel step of two threads waits ~10 ms for the descheduled one.
PARALLEL_MIN_WORK = 2**30

# The torch thread count in force when the outermost gptq_threads context was entered; None outside one.
_SOLVE_THREADS: ContextVar[int | None] = ContextVar("solve_threads", default=None)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(n)``; the count before is restored after, also on error."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def gptq_threads(work: int) -> Iterator[None]:
    """Run an operation of ``work`` multiply-adds on all threads if it is large, else on one.

    All threads are the torch thread count in force when the outermost ``gptq_threads`` context (the solve, entered
    with ``work=0``) began; an operation of at least :data:`PARALLEL_MIN_WORK` multiply-adds runs on them, anything
    smaller (and the solve's loop of elementwise ops) on one thread. The count is restored on exit.

    Args:
        work: multiply-adds of the operation inside; 0 for a loop of small ops.

    Yields:
        Nothing; the body runs on the chosen thread count.
    """
    full = _SOLVE_THREADS.get()
    full = torch.get_num_threads() if full is None else full  # outermost: the solve begins now
    token = _SOLVE_THREADS.set(full)
    try:
        with torch_threads(full if work >= PARALLEL_MIN_WORK else 1):
            yield
    finally:
        _SOLVE_THREADS.reset(token)

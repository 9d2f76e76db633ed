"""Sparsity schedules: Zhu & Gupta's gradual cubic ramp and geometric rounds."""

from __future__ import annotations

import math

from lightning_compress.functional.masks import check_sparsity


def cubic_sparsity(
    step: int,
    final_sparsity: float,
    num_steps: int,
    initial_sparsity: float = 0.0,
    begin_step: int = 0,
    frequency: int = 1,
) -> float:
    """Gradual pruning schedule of Zhu & Gupta (2017), "To prune, or not to prune".

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3`` for ``t`` in ``{t0, t0 + dt, ..., t0 + n * dt}``.
    Between pruning steps the value of the last pruning step holds; before ``t0`` it is 0 (nothing pruned yet)
    and after ``t0 + n * dt`` it stays at ``s_f``.

    Args:
        step: the current step ``t`` (e.g. optimizer steps taken).
        final_sparsity: ``s_f`` in ``[0, 1)``.
        num_steps: ``n``, the number of pruning steps, >= 1.
        initial_sparsity: ``s_i`` in ``[0, s_f]``.
        begin_step: ``t0``.
        frequency: ``dt``, steps between two pruning steps, >= 1.

    Returns:
        The target sparsity at ``step``.
    """
    check_sparsity(final_sparsity, "final_sparsity")
    check_sparsity(initial_sparsity, "initial_sparsity")
    if initial_sparsity > final_sparsity:
        raise ValueError(f"initial_sparsity={initial_sparsity} must not exceed final_sparsity={final_sparsity}")
    if num_steps < 1 or frequency < 1:
        raise ValueError(f"num_steps and frequency must be >= 1, got num_steps={num_steps}, frequency={frequency}")
    if step < begin_step:
        return 0.0
    done = min((step - begin_step) // frequency, num_steps)  # pruning steps completed after t0
    progress = done / num_steps
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


def geometric_rounds(target: float, rate: float) -> list[float]:
    """Cumulative sparsity after each round of "prune ``rate`` of what remains" until ``target``.

    Round k reaches ``1 - (1 - rate)^k``; the last round is clipped to ``target``. E.g. target 0.5, rate 0.2:
    ``[0.2, 0.36, 0.488, 0.5]``.

    Args:
        target: final sparsity in ``[0, 1)``.
        rate: fraction of the remaining weights pruned per round, in ``(0, 1)``.

    Returns:
        Increasing sparsities ending exactly at ``target`` (empty for target 0).
    """
    check_sparsity(target, "target")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate!r}")
    if target == 0.0:
        return []
    rounds = math.ceil(math.log1p(-target) / math.log1p(-rate) - 1e-9)
    levels = [1.0 - (1.0 - rate) ** k for k in range(1, rounds)]
    return [*levels, float(target)]


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor of BERT fine-tuning (Devlin et al. 2019): linear from 0 to 1 over ``warmup_steps``,
    then linear down to 0 at ``total_steps`` (transformers' ``get_linear_schedule_with_warmup``).

    ``step / warmup`` for ``step < warmup``, else ``max(0, (total - step) / max(1, total - warmup))``.
    """
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

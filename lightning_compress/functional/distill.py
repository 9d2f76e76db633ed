"""Knowledge-distillation losses: temperature softmax, the KD loss, hidden-state losses.

Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network") train a student on the teacher's softened
class probabilities ``p_T = softmax(z / T)``; the soft term is scaled by ``T²`` so its gradients keep their size
as ``T`` grows. Sanh et al. 2019 (DistilBERT) add a cosine loss between student and teacher hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

HIDDEN_LOSSES = ("cosine", "mse")


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def softmax_with_temperature(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(z / T)`` over the last dimension; ``T > 1`` spreads probability onto the non-top classes.

    Args:
        logits: ``(..., classes)``.
        temperature: ``T > 0``.

    Returns:
        Probabilities of ``logits``' shape (float32 or wider).
    """
    _check_temperature(temperature)
    return torch.softmax(logits.float() / temperature, dim=-1)


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """``T² · KL(p_T(teacher) ‖ p_T(student))``, averaged over the samples (Hinton et al. 2015).

    Zero exactly when the two logit vectors agree up to a constant per sample. No gradient reaches the teacher.
    For a language model every (real) token is a sample: ``(B, T, vocab)`` logits with a ``(B, T)`` ``mask``.

    Args:
        student_logits: ``(N, classes)`` or ``(..., classes)`` (flattened to samples).
        teacher_logits: same shape.
        temperature: ``T > 0``.
        mask: optional bool ``(...)`` over the leading dims: only these samples count.

    Returns:
        0-dim float32 loss.
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} differ"
        )
    student, teacher = _samples(student_logits, mask), _samples(teacher_logits.detach(), mask)
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def _samples(logits: Tensor, mask: Tensor | None) -> Tensor:
    """``(..., classes)`` logits as ``(N, classes)`` rows, only the rows ``mask`` keeps; ValueError for a mask of
    another shape or one that keeps nothing."""
    if mask is None:
        return logits.reshape(-1, logits.shape[-1])
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must have the logits' leading shape {tuple(logits.shape[:-1])}")
    if not mask.any():
        raise ValueError("mask keeps no sample")
    return logits[mask.bool()]


def top_k_logits(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest logits of each sample and their class indices: ``(..., k)`` float32 and int64."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be an int in [1, {logits.shape[-1]}] (the number of classes), got {k!r}")
    values, indices = logits.detach().float().topk(k, dim=-1)
    return values, indices


def top_k_kd_loss(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """:func:`kd_loss` against a teacher kept as its ``k`` largest logits per sample (what a cache of top-k logits
    holds): the teacher's distribution is ``softmax(values / T)`` renormalised over those ``k`` classes, so

    ``L = T² · mean_samples Σ_{i ∈ top-k} p_t,i · (log p_t,i − log p_T(student)_i)``

    with the student's full ``log_softmax(z / T)`` over every class. With ``k`` = every class it equals
    :func:`kd_loss`.

    Args:
        student_logits: ``(..., classes)``.
        teacher_values, teacher_indices: ``(..., k)`` from :func:`top_k_logits`.
        temperature: ``T > 0``.
        mask: optional bool ``(...)``: only these samples count.

    Returns:
        0-dim float32 loss.
    """
    _check_temperature(temperature)
    if teacher_values.shape != teacher_indices.shape or teacher_values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher_values {tuple(teacher_values.shape)} and teacher_indices {tuple(teacher_indices.shape)} must be "
            f"(..., k) with the student's leading shape {tuple(student_logits.shape[:-1])}"
        )
    log_p_s = F.log_softmax(_samples(student_logits, mask).float() / temperature, dim=-1)
    log_p_t = F.log_softmax(_samples(teacher_values, mask).float() / temperature, dim=-1)
    picked = log_p_s.gather(-1, _samples(teacher_indices, mask).to(log_p_s.device))
    return (log_p_t.exp() * (log_p_t - picked)).sum(-1).mean() * temperature**2


def hidden_state_loss(student: Tensor, teacher: Tensor, kind: str = "cosine", mask: Tensor | None = None) -> Tensor:
    """Distance between student and teacher hidden states, averaged over (real) tokens.

    ``"cosine"``: ``1 − cos(h_s, h_t)`` per token (DistilBERT); ``"mse"``: mean squared error per element.

    Args:
        student: ``(..., width)`` (projected to the teacher's width beforehand when they differ).
        teacher: same shape; detached.
        kind: ``"cosine"`` or ``"mse"``.
        mask: optional ``(...)`` bool / 0-1 mask over the leading dims (e.g. ``(B, T)`` attention mask).

    Returns:
        0-dim float32 loss.
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"kind={kind!r} is not supported; allowed: {list(HIDDEN_LOSSES)}")
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden states {tuple(student.shape)} and teacher's {tuple(teacher.shape)} differ")
    s, t = student.float(), teacher.detach().float()
    per_token = 1 - F.cosine_similarity(s, t, dim=-1) if kind == "cosine" else (s - t).pow(2).mean(dim=-1)
    if mask is None:
        return per_token.mean()
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)

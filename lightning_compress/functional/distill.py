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


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · KL(p_T(teacher) ‖ p_T(student))``, averaged over the samples (Hinton et al. 2015).

    Zero exactly when the two logit vectors agree up to a constant per sample. No gradient reaches the teacher.

    Args:
        student_logits: ``(N, classes)`` or ``(..., classes)`` (flattened to samples).
        teacher_logits: same shape.
        temperature: ``T > 0``.

    Returns:
        0-dim float32 loss.
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} differ"
        )
    classes = student_logits.shape[-1]
    log_p_s = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float().reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


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

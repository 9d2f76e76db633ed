"""SmoothQuant smoothing factors and their exact folding into neighbouring layers (Xiao et al. 2023).

Activation outliers sit in a few input channels ``j``. SmoothQuant divides those channels of the activation by
``s_j`` and multiplies the matching weight columns by ``s_j``, which leaves the product unchanged,
``Y = X W^T = (X diag(s)^-1) (W diag(s))^T``, but moves quantization difficulty from activations to weights:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

The division of ``X`` costs nothing at inference: it is folded into whatever produced ``X``, a LayerNorm
(:func:`fold_into_norm`) or a Linear (:func:`fold_into_linear`); the multiplication goes into the consuming weights
(:func:`scale_weight`). All functions are pure tensor math and return new tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _check_factors(s: Tensor, size: int, what: str) -> None:
    if s.dim() != 1 or s.shape[0] != size:
        raise ValueError(f"s must have shape ({size},) to match {what}, got {tuple(s.shape)}")


def smoothing_factors(act_absmax: Tensor, weight_absmax: Tensor, alpha: float = 0.5, eps: float = 1e-5) -> Tensor:
    """Per-input-channel smoothing factors ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    Both statistics are clamped to ``>= eps`` first, so a dead channel (all-zero activations or weights) gets a
    finite, positive factor. ``alpha = 1`` gives ``s = max|X|`` (all difficulty to the weights), ``alpha = 0`` gives
    ``s = 1 / max|W|``.

    Args:
        act_absmax: ``(in,)`` per-channel ``max |X_j|`` of the calibration activations.
        weight_absmax: ``(in,)`` per-column ``max |W_j|`` over all weights reading ``X`` (see :func:`weight_absmax`).
        alpha: migration strength in ``[0, 1]``.
        eps: lower clamp of both statistics.

    Returns:
        ``(in,)`` float tensor of positive factors, in the dtype of ``act_absmax``.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, ``eps`` not positive, or shapes that differ.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if act_absmax.shape != weight_absmax.shape:
        raise ValueError(
            f"weight_absmax shape {tuple(weight_absmax.shape)} must equal act_absmax shape {tuple(act_absmax.shape)}"
        )
    a = act_absmax.abs().clamp(min=eps)
    w = weight_absmax.to(a.dtype).abs().clamp(min=eps)
    return a.pow(alpha) / w.pow(1.0 - alpha)


def weight_absmax(weights: Sequence[Tensor]) -> Tensor:
    """Per-input-channel ``max |W_j|`` over the rows of all weights that read the same input (e.g. q, k, v).

    Args:
        weights: non-empty sequence of ``(out_i, in)`` weights sharing ``in``.

    Returns:
        ``(in,)`` tensor, ``max_i max_r |W_i[r, j]|``.

    Raises:
        ValueError: no weights, a weight that is not 2-D, or differing input dimensions.
    """
    if len(weights) == 0:
        raise ValueError("weights must hold at least one (out, in) weight")
    in_features = weights[0].shape[-1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != in_features:
            raise ValueError(f"weights must all be (out_i, {in_features}), got {tuple(w.shape)}")
    return torch.cat([w.detach() for w in weights], dim=0).abs().amax(dim=0)


def fold_into_norm(norm_weight: Tensor, norm_bias: Tensor | None, s: Tensor) -> tuple[Tensor, Tensor | None]:
    """Fold ``X / s`` into the affine parameters of the LayerNorm that produces ``X``: ``(gamma / s, beta / s)``.

    ``LN(x) / s = ((x - mu) / sigma) * (gamma / s) + beta / s``.

    Args:
        norm_weight: ``(in,)`` LayerNorm ``gamma``.
        norm_bias: ``(in,)`` LayerNorm ``beta`` or ``None``.
        s: ``(in,)`` smoothing factors.

    Returns:
        ``(gamma / s, beta / s)``; the bias stays ``None`` when it was ``None``.
    """
    _check_factors(s, norm_weight.shape[0], "norm_weight")
    s = s.to(norm_weight.dtype)
    return norm_weight / s, None if norm_bias is None else norm_bias / s


def fold_into_linear(prev_weight: Tensor, prev_bias: Tensor | None, s: Tensor) -> tuple[Tensor, Tensor | None]:
    """Fold ``X / s`` into a preceding Linear whose output is ``X``: its rows (and bias) divided by ``s``.

    ``(x A^T + b) / s = x (diag(s)^-1 A)^T + b / s``, valid only with nothing nonlinear in between.

    Args:
        prev_weight: ``(in, k)`` weight of the producing Linear (its output dimension is the smoothed ``in``).
        prev_bias: ``(in,)`` bias or ``None``.
        s: ``(in,)`` smoothing factors.

    Returns:
        ``(A / s[:, None], b / s)``; the bias stays ``None`` when it was ``None``.
    """
    _check_factors(s, prev_weight.shape[0], "prev_weight rows")
    s = s.to(prev_weight.dtype)
    return prev_weight / s[:, None], None if prev_bias is None else prev_bias / s


def scale_weight(weight: Tensor, s: Tensor) -> Tensor:
    """Multiply the input columns of a consuming weight by ``s``: ``W diag(s)``.

    Args:
        weight: ``(out, in)`` weight reading the smoothed ``X``.
        s: ``(in,)`` smoothing factors.

    Returns:
        ``(out, in)`` tensor ``W[:, j] * s_j``.
    """
    _check_factors(s, weight.shape[-1], "weight columns")
    return weight * s.to(weight.dtype)

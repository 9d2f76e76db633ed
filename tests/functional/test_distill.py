"""KD loss, temperature softmax (pinned values), hidden-state losses."""

import pytest
import torch

from lightning_compress.functional.distill import hidden_state_loss, kd_loss, softmax_with_temperature


@pytest.mark.parametrize(
    ("temperature", "expected"),
    [(1, [0.9714, 0.0178, 0.0108]), (5, [0.5388, 0.2421, 0.2191]), (20, [0.3821, 0.3128, 0.3051])],
)
def test_temperature_softmax_pinned(temperature, expected):
    p = softmax_with_temperature(torch.tensor([5.0, 1.0, 0.5]), temperature)
    assert torch.allclose(p, torch.tensor(expected), atol=5e-5)
    assert p.sum().item() == pytest.approx(1.0)


def test_kd_loss_is_zero_when_student_equals_teacher_and_positive_otherwise():
    z = torch.randn(8, 5)
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(z + 3.0, z, 4.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant per sample
    assert kd_loss(torch.randn(8, 5), z, 4.0) > 0


def test_kd_loss_is_t_squared_kl_against_a_reference():
    s, t, temp = torch.randn(6, 4), torch.randn(6, 4), 3.0
    p_t, p_s = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    reference = (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * temp**2
    assert kd_loss(s, t, temp).item() == pytest.approx(reference.item(), rel=1e-5)


def test_no_gradient_reaches_the_teacher():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_hidden_state_losses():
    h = torch.randn(2, 5, 8)
    assert hidden_state_loss(h, h).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss(h, -h).item() == pytest.approx(2.0, abs=1e-6)
    assert hidden_state_loss(h, h + 1.0, "mse").item() == pytest.approx(1.0, abs=1e-6)
    other = h.clone()
    other[1, 3:] = -other[1, 3:]  # differs only at masked-out tokens
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    assert hidden_state_loss(h, other, mask=mask).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: softmax_with_temperature(torch.ones(3), 0), "temperature must be a positive number, got 0"),
        (lambda: kd_loss(torch.ones(2, 3), torch.ones(2, 4)), "differ"),
        (lambda: hidden_state_loss(torch.ones(2, 3), torch.ones(2, 3), "l1"), "kind='l1' is not supported"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()

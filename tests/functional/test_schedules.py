import pytest

from lightning_compress.functional.schedules import cubic_sparsity, geometric_rounds


def test_cubic_endpoints_and_formula():
    kw = dict(final_sparsity=0.9, num_steps=10, initial_sparsity=0.1, begin_step=100, frequency=5)
    assert cubic_sparsity(99, **kw) == 0.0
    assert cubic_sparsity(100, **kw) == pytest.approx(0.1)
    assert cubic_sparsity(150, **kw) == pytest.approx(0.9)
    assert cubic_sparsity(10_000, **kw) == pytest.approx(0.9)
    # t = 125: 5 of 10 pruning steps done -> s_f + (s_i - s_f)(1 - 0.5)^3
    assert cubic_sparsity(125, **kw) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    # holds between pruning steps
    assert cubic_sparsity(127, **kw) == cubic_sparsity(125, **kw)


def test_cubic_is_monotone_and_front_loaded():
    values = [cubic_sparsity(t, 0.8, num_steps=100) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert values[50] > 0.8 * 0.5  # prunes fast early, slowly late
    with pytest.raises(ValueError, match="final_sparsity"):
        cubic_sparsity(0, 1.0, num_steps=10)


def test_geometric_rounds():
    assert geometric_rounds(0.5, 0.2) == pytest.approx([0.2, 0.36, 0.488, 0.5])
    assert geometric_rounds(0.36, 0.2) == pytest.approx([0.2, 0.36])
    assert geometric_rounds(0.0, 0.2) == []
    with pytest.raises(ValueError, match="rate must be in"):
        geometric_rounds(0.5, 1.0)

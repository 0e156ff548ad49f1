"""The gradient norm for clipping: each tensor's sum of squares, accumulated in float64 whatever its dtype."""

import pytest
import torch

from lightning_smartmoe.clipping import squared_norms, squared_row_norms


def reference(t: torch.Tensor) -> float:
    return t.double().square().sum().item()


def test_squared_norms_of_mixed_dtypes_match_float64_sums():
    torch.manual_seed(0)
    tensors = [torch.randn(1000, 37), torch.randn(5, dtype=torch.float64), torch.randn(300).bfloat16(),
               torch.randn(2, 3, 4), torch.zeros(7)]
    got = squared_norms(tensors)
    assert got.dtype == torch.float64 and got.shape == (5,)
    for i in range(4):  # float32 and bfloat16 inputs are exact in float64: only the summation order differs
        assert got[i].item() == pytest.approx(reference(tensors[i]), rel=1e-13)
    assert got[4].item() == 0.0
    assert squared_norms([]).shape == (0,)


def test_squared_row_norms_sum_each_row():
    torch.manual_seed(0)
    w = torch.randn(4, 16, 8)  # 4 expert slots of [16, 8]
    got = squared_row_norms(w)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([reference(w[i]) for i in range(4)], rel=1e-13)

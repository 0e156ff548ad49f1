"""Routing primitives against direct definitions."""

import pytest
import torch

from triton_ops import grouped_mm, permute, unpermute


def test_grouped_mm_matches_per_group_matmul_and_its_gradients():
    torch.manual_seed(0)
    counts = [3, 0, 5, 1]
    x = torch.randn(sum(counts), 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, counts), (x, w))
    want = torch.cat([a @ b for a, b in zip(x.split(counts), w)])
    torch.testing.assert_close(grouped_mm(x, w, counts), want)
    with pytest.raises(ValueError, match="3 group counts for 4 weight groups"):
        grouped_mm(x[:8], w, counts[:3])  # a group's weight gradient would be left unwritten


def test_permute_unpermute_roundtrip_with_drops():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    slots = torch.tensor([[2, 0], [1, -1], [2, 1], [-1, -1], [0, 2]])
    weights = torch.rand(5, 2, dtype=torch.float64)
    rows, order, counts = permute(x, slots, num_slots=3)
    assert counts.tolist() == [2, 2, 3]
    assert order.tolist() == [1, 8, 2, 5, 0, 4, 9]  # by slot, then by flat assignment index
    out = unpermute(rows * 2, order, weights, num_tokens=5)
    want = torch.stack([sum(2 * weights[t, j] * x[t] for j in range(2) if slots[t, j] >= 0) if (slots[t] >= 0).any() else torch.zeros(3, dtype=torch.float64) for t in range(5)])
    torch.testing.assert_close(out, want)

"""Routing primitives (torch path) against direct definitions, their implementation choice, and bad input."""

import pytest
import torch

from triton_ops import expert_ffn, expert_histogram, grouped_mm, permute, topk_softmax, unpermute
from triton_ops.expert_ffn import expert_ffn_reference
from triton_ops.grouped_mm import _LibraryGroupedMM, choose_grouped_mm, grouped_mm_reference


def per_group(x, w, counts):
    """Direct definition: y[rows of e] = x[rows of e] @ w[e], zero past the groups."""
    ys = [a @ b for a, b in zip(x[: sum(counts)].split(counts), w)]
    return torch.cat(ys + [x.new_zeros(x.shape[0] - sum(counts), w.shape[2])])


@pytest.mark.parametrize("counts_as", ["list", "tensor"])
def test_grouped_mm_matches_per_group_matmul_and_its_gradients(counts_as):
    torch.manual_seed(0)
    counts = [3, 0, 5, 1]
    x = torch.randn(sum(counts) + 2, 4, dtype=torch.float64, requires_grad=True)  # 2 rows past the groups
    w = torch.randn(4, 4, 6, dtype=torch.float64, requires_grad=True)
    c = counts if counts_as == "list" else torch.tensor(counts)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, c), (x, w))
    torch.testing.assert_close(grouped_mm(x, w, c), per_group(x, w, counts))
    grouped_mm(x, w, c).sum().backward()
    assert not w.grad[1].any() and not x.grad[-2:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,h", [(16, 24), (5, 7), (3, 9)])  # 5, 7, 3, 9 break F.grouped_mm's 16-byte stride rule
def test_library_grouped_mm_matches_the_loop_at_any_alignment(dtype, d, h):
    torch.manual_seed(0)
    counts = torch.tensor([4, 0, 9, 2])
    x = torch.randn(17, d, dtype=dtype)
    w = torch.randn(4, d, h, dtype=dtype)
    outs = []
    for impl in (grouped_mm_reference, _LibraryGroupedMM.apply):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = impl(xi, wi, counts)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad, wi.grad))
    aligned = d * x.element_size() % 16 == 0 and h * x.element_size() % 16 == 0
    for a, b in zip(*outs):  # aligned: the same products, bitwise; padded: zeros added in another order
        torch.testing.assert_close(a, b, rtol=0 if aligned else 1e-6, atol=0 if aligned else 1e-6)
    assert not outs[1][0][15:].any() and not outs[1][1][15:].any()  # rows past the groups: zero, and zero gradient


def test_expert_ffn_paths_agree_and_match_the_definition():
    torch.manual_seed(0)
    counts = [5, 0, 8, 3]
    x = torch.randn(18, 8, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 8, 12, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 12, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: expert_ffn(a, b, c, counts), (x, w1, w2))
    want = per_group(torch.nn.functional.gelu(per_group(x, w1, counts)), w2, counts)
    torch.testing.assert_close(expert_ffn(x, w1, w2, counts), want)
    xf, w1f, w2f = (t.detach().float().requires_grad_(True) for t in (x, w1, w2))
    c = torch.tensor(counts)
    outs = []
    for impl in (expert_ffn_reference, lambda *a: grouped_mm(torch.nn.functional.gelu(grouped_mm(a[0], a[1], a[3])), a[2], a[3])):
        y = impl(xf, w1f, w2f, c)
        outs.append([y, *torch.autograd.grad(y, [xf, w1f, w2f], torch.ones_like(y))])
    for a, b in zip(*outs):
        assert torch.equal(a, b)  # so the measured choice between them never changes a result


def test_float64_takes_the_exact_loop_and_cpu_choices_are_measured():
    x, w, c = torch.randn(8, 4, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64), torch.tensor([3, 5])
    assert choose_grouped_mm(x, w, c) == "loop"
    assert choose_grouped_mm(x.float(), w.float(), c) in ("loop", "library")
    assert choose_grouped_mm(torch.randn(8, 5), torch.randn(2, 5, 4), c) == "loop"  # F.grouped_mm would need padding


def test_topk_softmax_matches_definitions():
    torch.manual_seed(0)
    logits = torch.randn(9, 5, dtype=torch.float64)
    probs, weights, ids, lse = topk_softmax(logits, 2, renormalize=True)
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    torch.testing.assert_close(probs, p)
    torch.testing.assert_close(lse, torch.log(torch.exp(logits).sum(1)))
    assert ids.tolist() == [sorted(range(5), key=lambda e: -p[t, e])[:2] for t in range(9)]
    chosen = p.gather(1, ids)
    torch.testing.assert_close(weights, chosen / chosen.sum(1, keepdim=True))
    _, raw, _, _ = topk_softmax(logits, 2, renormalize=False)
    torch.testing.assert_close(raw, chosen)
    assert topk_softmax(logits.bfloat16(), 2, True)[0].dtype == torch.float32  # bf16 logits (autocast): fp32 math


def test_histogram_counts_and_offsets_skip_dropped():
    counts, offsets = expert_histogram(torch.tensor([[2, -1], [0, 2], [-1, -1], [2, 0]]), 4)
    assert counts.tolist() == [2, 0, 3, 0]
    assert offsets.tolist() == [0, 2, 2, 5, 5]


def test_permute_unpermute_roundtrip_with_drops():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    slots = torch.tensor([[2, 0], [1, -1], [2, 1], [-1, -1], [0, 2]])
    weights = torch.rand(5, 2, dtype=torch.float64)
    rows, order, counts = permute(x, slots, num_slots=3)
    assert counts.tolist() == [2, 2, 3]
    assert order.tolist() == [1, 8, 2, 5, 0, 4, 9, -1, -1, -1]  # by slot, then flat assignment index; dropped last
    assert torch.equal(rows[:7], x[order[:7] // 2]) and not rows[7:].any()
    out = unpermute(rows * 2, order, weights, num_tokens=5)
    want = torch.stack([sum((2 * weights[t, j] * x[t] for j in range(2) if slots[t, j] >= 0), torch.zeros(3, dtype=torch.float64)) for t in range(5)])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(unpermute(rows[:7] * 2, order[:7], weights, num_tokens=5), want)  # kept rows only


def test_all_assignments_dropped_and_no_tokens():
    x = torch.randn(4, 3, requires_grad=True)
    w1, w2 = torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 5, 3, requires_grad=True)
    weights = torch.rand(4, 2, requires_grad=True)
    rows, order, counts = permute(x, torch.full((4, 2), -1), 2)
    assert counts.tolist() == [0, 0] and (order == -1).all() and not rows.any()
    y = unpermute(expert_ffn(rows, w1, w2, counts), order, weights, 4)
    y.sum().backward()
    assert not y.any()
    for t in (x, w1, w2, weights):
        assert t.grad is not None and not t.grad.any()
    rows, order, counts = permute(torch.randn(0, 3), torch.zeros(0, 2, dtype=torch.long), 2)
    assert rows.shape == (0, 3) and order.shape == (0,) and counts.tolist() == [0, 0]
    assert unpermute(rows, order, torch.zeros(0, 2), 0).shape == (0, 3)


BAD = [
    (lambda: grouped_mm(torch.randn(8, 4), torch.randn(3, 4, 6), [3, 5]), "counts must be 3 non-negative integers"),
    (lambda: grouped_mm(torch.randn(8, 4), torch.randn(2, 4, 6), [3, 6]), "summing to at most the 8 rows"),
    (lambda: grouped_mm(torch.randn(8, 4), torch.randn(2, 4, 6), torch.tensor([3, 6])), "sum to at most the 8 rows"),
    (lambda: grouped_mm(torch.randn(8, 4), torch.randn(2, 4, 6), torch.tensor([9, -1])), "must be >= 0"),
    (lambda: grouped_mm(torch.randn(8, 4), torch.randn(2, 4, 6), torch.tensor([3.0, 5.0])), "counts must be integers"),
    (lambda: grouped_mm(torch.randn(8, 4), torch.randn(2, 4, 6), torch.tensor([[3, 5]])), r"counts must be \[2\]"),
    (lambda: grouped_mm(torch.randn(8, 4), torch.randn(2, 5, 6), [3, 5]), "the same d"),
    (lambda: grouped_mm(torch.randn(8, 4), torch.randn(2, 4, 6, dtype=torch.float64), [3, 5]), "same floating-point dtype"),
    (lambda: grouped_mm(torch.randn(8, 4).bfloat16(), torch.randn(2, 4, 6), [3, 5]), "same floating-point dtype"),
    (lambda: expert_ffn(torch.randn(8, 4), torch.randn(2, 4, 6), torch.randn(2, 5, 4), [3, 5]), "w2 must be"),
    (lambda: permute(torch.randn(4, 3), torch.tensor([[0, 2]] * 4), 2), r"slot_ids must lie in \[-1, 2\)"),
    (lambda: permute(torch.randn(4, 3), torch.tensor([[0, -2]] * 4), 2), r"slot_ids must lie in \[-1, 2\)"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(3, 2, dtype=torch.long), 2), "the same T"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(4, 2), 2), "slot_ids must be an integer tensor"),
    (lambda: unpermute(torch.randn(8, 3), torch.arange(7), torch.rand(4, 2), 4), r"order \[R\]"),
    (lambda: unpermute(torch.randn(8, 3), torch.arange(8) + 1, torch.rand(4, 2), 4), r"order must lie in \[-1, 8\)"),
    (lambda: unpermute(torch.randn(8, 3), torch.arange(8), torch.rand(3, 2), 4), r"weights must be \[num_tokens=4"),
    (lambda: topk_softmax(torch.randn(4, 3), 4, True), "k=4 must be between 1 and the number of experts 3"),
    (lambda: topk_softmax(torch.randint(0, 3, (4, 3)), 1, True), "logits must be floating point"),
    (lambda: expert_histogram(torch.tensor([0, 5]), 4), r"ids must lie in \[-1, 4\)"),
]


@pytest.mark.parametrize("call,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_refused_with_what_is_allowed(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_kernel_choice_from_environment(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MOE_KERNELS='cuda' is unknown; allowed: torch, triton"):
        permute(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long), 1)
    monkeypatch.setenv("MOE_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs Triton's interpreter: set TRITON_INTERPRET=1"):
        permute(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long), 1)
    monkeypatch.setenv("MOE_KERNELS", "torch")
    assert permute(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long), 1)[2].tolist() == [2]

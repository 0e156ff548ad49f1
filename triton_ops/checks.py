"""Input checks shared by the ops: each raises ValueError naming the argument and what is allowed."""

import torch
from torch import Tensor


def require(cond: Tensor, message: str) -> None:
    """Raise ValueError(message) unless the 0-d bool tensor `cond` is true. On CPU that costs nothing extra;
    on an accelerator the check is asynchronous (a device-side assert) so that it never waits for the device."""
    if cond.device.type == "cpu":
        if not bool(cond):
            raise ValueError(message)
    else:
        torch._assert_async(cond, message)


def check_ids(ids: Tensor, num_bins: int, op: str, name: str) -> None:
    """`ids` is an integer tensor with values in [-1, num_bins)."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must be an integer tensor, got {ids.dtype}")
    if num_bins < 0:
        raise ValueError(f"{op}: the number of bins ({num_bins}) must be >= 0")
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        require((lo >= -1) & (hi < num_bins), f"{op}: {name} must lie in [-1, {num_bins}) (-1 = dropped)")


def check_counts(counts: Tensor, rows: int, groups: int, op: str) -> None:
    """`counts` holds `groups` non-negative integers summing to at most `rows`."""
    if counts.dim() != 1 or counts.shape[0] != groups:
        raise ValueError(f"{op}: counts must be [{groups}] (one per weight group), got shape {tuple(counts.shape)}")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"{op}: counts must be integers, got {counts.dtype}")
    require(
        (counts.min() >= 0) & (counts.sum() <= rows),
        f"{op}: counts must be >= 0 and sum to at most the {rows} rows of x (rows past the sum get zeros)",
    )

"""A group of expert FFNs computed over expert-contiguous tokens."""

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_smartmoe import init
from triton_ops import expert_ffn


class GroupedExperts(nn.Module):
    """`num_slots` expert FFNs, stored stacked: GELU (w1, w2) or SwiGLU (w1 the gate, w3 the up projection, w2).

    w1, w3: [num_slots, d_model, hidden], w2: [num_slots, hidden, d_model]. Slot i holds logical expert
    `logical_ids[i]`, or nothing if -1 (checkpoints key expert weights by it, so they do not depend on the
    layout or placement). Every parameter is such a stack (dispatch, migration, replicas and checkpoints index
    them by slot). After `shard_hidden` each rank of a tensor-parallel group holds a slice of every expert's
    hidden units, and its output is that slice's partial sum.
    """

    def __init__(self, num_slots: int, d_model: int, hidden: int, out_std: float = 0.02, activation: str = "gelu") -> None:
        super().__init__()
        self.w1 = init.normal_(nn.Parameter(torch.empty(num_slots, d_model, hidden)), std=0.02)
        self.w3 = init.normal_(nn.Parameter(torch.empty(num_slots, d_model, hidden)), std=0.02) if activation == "swiglu" else None
        self.w2 = init.normal_(nn.Parameter(torch.empty(num_slots, hidden, d_model)), std=out_std)
        self.logical_ids = list(range(num_slots))

    @property
    def num_slots(self) -> int:
        return self.w1.shape[0]

    @property
    def params_per_expert(self) -> int:
        """Parameters of one slot (of this rank's shard of it)."""
        return sum(p[0].numel() for p in self.parameters())

    def forward(self, rows: Tensor, counts: Tensor | list[int]) -> Tensor:
        """Apply slot i's FFN to the i-th block of rows.

        Args:
            rows: [N, d_model] tokens grouped by slot, N >= sum(counts).
            counts: [num_slots] rows per slot (int tensor or list).

        Returns:
            [N, d_model]; rows past sum(counts) are zero.
        """
        device = rows.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else rows.dtype
        with torch.autocast(device, enabled=False):  # mixed precision: compute in the autocast dtype
            w3 = None if self.w3 is None else self.w3.to(dtype)
            return expert_ffn(rows.to(dtype), self.w1.to(dtype), self.w2.to(dtype), counts, w3)

    @torch.no_grad()
    def shard_hidden(self, tp_group: dist.ProcessGroup) -> None:
        """Keep this rank's contiguous slice of the hidden units: w1 and w3 [slots, d, hidden / tp] (`tp_shard_dim`
        2), w2 [slots, hidden / tp, d] (`tp_shard_dim` 1)."""
        tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        hidden = self.w1.shape[2]
        if hidden % tp:
            raise ValueError(f"expert hidden size {hidden} is not divisible by the tensor-parallel size {tp}")
        part = slice(rank * hidden // tp, (rank + 1) * hidden // tp)
        for name, p in list(self.named_parameters()):
            dim = 1 if name == "w2" else 2
            shard = init.new_parameter(p.narrow(dim, part.start, part.stop - part.start).contiguous(), p)
            shard.tp_shard_dim = dim
            setattr(self, name, shard)

    @torch.no_grad()
    def select(self, experts: list[int]) -> None:
        """Keep the slots holding the given logical experts, in that order; -1 makes an empty (zero) slot.
        E.g. this rank's share of a full set of experts."""
        index = [self.logical_ids.index(e) if e >= 0 else 0 for e in experts]
        full = torch.tensor([e >= 0 for e in experts], device=self.w1.device).view(-1, 1, 1)
        index_t = torch.tensor(index, dtype=torch.long, device=self.w1.device)
        for name, p in list(self.named_parameters()):
            setattr(self, name, init.new_parameter(p.index_select(0, index_t) * full, p))
        self.logical_ids = list(experts)


def default_out_std(n_layers: int) -> float:
    """GPT-2 style scaled init of residual-branch output projections."""
    return 0.02 / math.sqrt(2 * n_layers)

"""Dense feed-forward blocks, column- then row-parallel under tensor parallelism: x [B, S, d] -> [B, S, d] (under
sequence parallelism [B, S/tp, d] in and out). Used as the dense layers of the models and as MoE shared experts."""

import torch.distributed as dist
from torch import Tensor, nn

from lightning_smartmoe import init
from lightning_smartmoe.tensor_parallel import ColumnParallelLinear, RowParallelLinear, enter_tp

ACTIVATIONS = ("gelu", "swiglu")


class GeluMLP(nn.Module):
    """proj(gelu(fc(x))), with biases; fc [hidden, d], proj [d, hidden]."""

    def __init__(self, d_model: int, hidden: int, out_std: float = 0.02) -> None:
        super().__init__()
        self.fc = ColumnParallelLinear(d_model, hidden)
        self.proj = RowParallelLinear(hidden, d_model)
        init.normal_(self.fc.weight, std=0.02)
        init.normal_(self.proj.weight, std=out_std)
        init.zeros_(self.fc.bias)
        init.zeros_(self.proj.bias)

    def shard(self, tp_group: dist.ProcessGroup, sequence_parallel: bool) -> None:
        self.fc.shard(tp_group, sequence_parallel)
        self.proj.shard(tp_group, sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(nn.functional.gelu(self.fc(x)))


class SwiGLUMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), no biases; gate_proj and up_proj [hidden, d], down_proj
    [d, hidden] (Llama's and the Hugging Face MoE models' names)."""

    def __init__(self, d_model: int, hidden: int, out_std: float = 0.02) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(d_model, hidden, bias=False)
        self.up_proj = ColumnParallelLinear(d_model, hidden, bias=False)
        self.down_proj = RowParallelLinear(hidden, d_model, bias=False)
        init.normal_(self.gate_proj.weight, std=0.02)
        init.normal_(self.up_proj.weight, std=0.02)
        init.normal_(self.down_proj.weight, std=out_std)

    def shard(self, tp_group: dist.ProcessGroup, sequence_parallel: bool) -> None:
        for linear in (self.gate_proj, self.up_proj, self.down_proj):
            linear.shard(tp_group, sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        h = enter_tp(x, self.gate_proj.tp_group, self.gate_proj.sequence_parallel)  # once for both projections
        return self.down_proj(nn.functional.silu(self.gate_proj.project(h)) * self.up_proj.project(h))


def mlp(activation: str, d_model: int, hidden: int, out_std: float = 0.02) -> GeluMLP | SwiGLUMLP:
    """The dense FFN of `activation` (gelu | swiglu)."""
    return {"gelu": GeluMLP, "swiglu": SwiGLUMLP}[activation](d_model, hidden, out_std)

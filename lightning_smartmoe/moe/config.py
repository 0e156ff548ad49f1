"""MoE layer settings (Megatron/NeMo names in comments)."""

from dataclasses import dataclass

from lightning_smartmoe.errors import ConfigError

GATES = ("naive", "gshard", "switch")


@dataclass
class MoEConfig:
    num_experts: int = 8  # num_moe_experts
    top_k: int = 2  # moe_router_topk
    gate: str = "naive"  # naive | gshard | switch
    capacity_factor: float | None = None  # moe_expert_capacity_factor; None = dropless
    aux_loss_coeff: float = 0.01  # moe_aux_loss_coeff
    z_loss_coeff: float = 0.0  # moe_z_loss_coeff
    every: int = 1  # an MoE FFN in every `every`-th layer (moe_layer_freq)
    expert_hidden: int | None = None  # expert FFN hidden size; None = the model's ffn_hidden
    jitter_eps: float = 0.01  # switch gate: router input noise x * U(1 - eps, 1 + eps) in training
    random_routing: bool = True  # gshard gate: keep the 2nd expert with probability 2 * its weight in training

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise ConfigError(f"moe.gate={self.gate!r} is unknown; allowed: {', '.join(GATES)}")
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"moe.top_k={self.top_k} must be between 1 and moe.num_experts={self.num_experts}"
            )
        if self.gate == "gshard" and self.top_k != 2:
            raise ConfigError(f"moe.gate=gshard routes to 2 experts; set moe.top_k=2 (got {self.top_k})")
        if self.gate == "switch" and self.top_k != 1:
            raise ConfigError(f"moe.gate=switch routes to 1 expert; set moe.top_k=1 (got {self.top_k})")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(
                f"moe.capacity_factor={self.capacity_factor} must be > 0, or null for dropless routing"
            )
        if self.aux_loss_coeff < 0 or self.z_loss_coeff < 0:
            raise ConfigError("moe.aux_loss_coeff and moe.z_loss_coeff must be >= 0")
        if self.every < 1:
            raise ConfigError(f"moe.every={self.every} must be >= 1")
        if self.expert_hidden is not None and self.expert_hidden < 1:
            raise ConfigError(f"moe.expert_hidden={self.expert_hidden} must be >= 1 or null")
        if not 0 <= self.jitter_eps < 1:
            raise ConfigError(f"moe.jitter_eps={self.jitter_eps} must be in [0, 1)")

"""MoE layer settings (Megatron/NeMo names in comments)."""

from dataclasses import dataclass

from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.mlp import ACTIVATIONS

GATES = ("naive", "gshard", "switch")
SCORES = ("softmax", "sigmoid")


@dataclass
class MoEConfig:
    num_experts: int = 8  # num_moe_experts
    top_k: int = 2  # moe_router_topk
    gate: str = "naive"  # naive | gshard | switch
    capacity_factor: float | None = None  # moe_expert_capacity_factor; None = dropless
    aux_loss_coeff: float = 0.01  # moe_aux_loss_coeff
    z_loss_coeff: float = 0.0  # moe_z_loss_coeff
    every: int = 1  # an MoE FFN in every `every`-th layer (moe_layer_freq)
    first_dense: int = 0  # the first layers have a dense FFN whatever `every` says (first_k_dense_replace)
    expert_hidden: int | None = None  # expert FFN hidden size; None = the model's ffn_hidden
    activation: str = "gelu"  # expert FFN: gelu (w1, w2) | swiglu (w1 gate, w3 up, w2 down); shared experts too
    shared_experts: int = 0  # always-on experts every token passes through (moe_shared_expert_intermediate_size)
    shared_expert_hidden: int | None = None  # their hidden size together; None = shared_experts * expert hidden
    shared_expert_gate: bool = False  # scale the shared experts' output by sigmoid(x . w) (Qwen2-MoE)
    score: str = "softmax"  # naive gate: softmax | sigmoid (DeepSeek-V3) router scores (moe_router_score_function)
    renormalize: bool = True  # naive gate: rescale the top-k weights to sum to 1 (HF norm_topk_prob)
    scaling_factor: float = 1.0  # naive gate: gate weights times this (moe_router_topk_scaling_factor)
    bias_update_rate: float = 0.0  # > 0: aux-loss-free balancing with a per-expert selection bias updated by
    # this much per optimizer step (moe_router_enable_expert_bias, moe_router_bias_update_rate); 0 = off
    groups: int = 1  # naive gate: group-limited routing over this many expert groups (moe_router_num_groups)
    group_top_k: int = 1  # ... choosing from the best group_top_k groups only (moe_router_group_topk)
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
        if self.first_dense < 0:
            raise ConfigError(f"moe.first_dense={self.first_dense} must be >= 0")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"moe.activation={self.activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
        if self.shared_experts < 0:
            raise ConfigError(f"moe.shared_experts={self.shared_experts} must be >= 0")
        if self.shared_expert_hidden is not None and self.shared_expert_hidden < 1:
            raise ConfigError(f"moe.shared_expert_hidden={self.shared_expert_hidden} must be >= 1 or null")
        if (self.shared_expert_hidden is not None or self.shared_expert_gate) and not self.shared_experts:
            raise ConfigError("moe.shared_expert_hidden and moe.shared_expert_gate need moe.shared_experts >= 1")
        if self.score not in SCORES:
            raise ConfigError(f"moe.score={self.score!r} is unknown; allowed: {', '.join(SCORES)}")
        if not self.scaling_factor > 0:
            raise ConfigError(f"moe.scaling_factor={self.scaling_factor} must be > 0")
        if not self.bias_update_rate >= 0:
            raise ConfigError(f"moe.bias_update_rate={self.bias_update_rate} must be >= 0 (0: no expert bias)")
        if self.groups < 1 or self.num_experts % self.groups:
            raise ConfigError(f"moe.groups={self.groups} must be >= 1 and divide moe.num_experts={self.num_experts}")
        if not 1 <= self.group_top_k <= self.groups or self.top_k < self.group_top_k:
            raise ConfigError(
                f"moe.group_top_k={self.group_top_k} must be between 1 and moe.groups={self.groups}, and at most "
                f"moe.top_k={self.top_k}"
            )
        if self.top_k > self.group_top_k * (self.num_experts // self.groups):
            raise ConfigError(
                f"moe.top_k={self.top_k} is more than the {self.group_top_k} chosen groups of "
                f"{self.num_experts // self.groups} experts hold"
            )
        naive_only = {"score": self.score != "softmax", "renormalize": not self.renormalize,
                      "scaling_factor": self.scaling_factor != 1.0, "bias_update_rate": self.bias_update_rate > 0,
                      "groups": self.groups > 1}
        for key, changed in naive_only.items():
            if changed and self.gate != "naive":
                raise ConfigError(f"moe.{key}={getattr(self, key)!r} needs moe.gate=naive (got {self.gate})")

    def is_moe_layer(self, i: int) -> bool:
        """Layer i has an MoE FFN: past the first `first_dense`, every `every`-th (all when every = 1)."""
        return i >= self.first_dense and (i - self.first_dense) % self.every == self.every - 1

    def shared_hidden(self, expert_hidden: int) -> int:
        """The shared experts' hidden size, all together (0 without shared experts), for experts of `expert_hidden`."""
        return self.shared_expert_hidden or self.shared_experts * expert_hidden

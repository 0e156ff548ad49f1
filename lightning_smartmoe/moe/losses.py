"""Router regularisers: the load-balancing (aux) loss and the router z-loss.

Both are written per rank so that the mean over data-parallel ranks (which is what gradient averaging
computes) equals the single-process loss over the global batch.
"""

import torch
from torch import Tensor


def load_balancing_loss(probs: Tensor, routed: Tensor) -> Tensor:
    """Switch/GShard auxiliary loss, E * sum_e f_e * P_e; equals 1 under a perfectly uniform router.

    Args:
        probs: [T, E] router probabilities of this rank's tokens; P_e is their mean over tokens.
        routed: [E] top-k assignments per expert before capacity drops, summed over the global batch
            (no gradient); f_e = routed_e / routed.sum().
    """
    num_experts = probs.shape[1]
    f = routed.to(probs.dtype) / routed.sum()
    return num_experts * torch.dot(f, probs.mean(dim=0))


def router_z_loss(lse: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, from lse [T] (fp32 or wider)."""
    return lse.square().mean()

"""Parallel sizes, their checks, and the device mesh and process groups they induce."""

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_smartmoe.errors import ConfigError

BUILT = {"tp": 1, "pp": 1}  # sizes this release implements; larger values are refused


@dataclass(frozen=True)
class ParallelSizes:
    """world = dp * tp * pp. Experts are sharded over ep ranks (ep divides dp); each expert then has dp / ep
    replicas, whose gradients are averaged over the expert-data-parallel group."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for key in ("dp", "tp", "pp", "ep"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{key}={value!r} must be an integer >= 1")
            if key in BUILT and value > BUILT[key]:
                raise ConfigError(
                    f"parallel.{key}={value} is not supported yet; this release trains with parallel.{key}=1"
                )
        if self.dp % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} must divide parallel.dp={self.dp}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def edp(self) -> int:
        """Replicas of each expert: the expert-data-parallel size."""
        return self.dp // self.ep

    @classmethod
    def resolve(cls, world_size: int, dp: int | None, tp: int, pp: int, ep: int) -> "ParallelSizes":
        """Sizes for `world_size` processes; dp=None takes whatever tp and pp leave."""
        if dp is None:
            if world_size % (tp * pp):
                raise ConfigError(
                    f"world size {world_size} (trainer.devices x trainer.num_nodes) must be divisible by "
                    f"parallel.tp x parallel.pp = {tp * pp}"
                )
            dp = world_size // (tp * pp)
        sizes = cls(dp=dp, tp=tp, pp=pp, ep=ep)
        if sizes.world_size != world_size:
            raise ConfigError(
                f"world size {world_size} (trainer.devices x trainer.num_nodes) must equal "
                f"parallel.dp x parallel.tp x parallel.pp = {dp} x {tp} x {pp} = {sizes.world_size}"
            )
        return sizes

    def check_experts(self, num_experts: int) -> None:
        if num_experts % self.ep:
            raise ConfigError(f"moe.num_experts={num_experts} must be divisible by parallel.ep={self.ep}")


@dataclass
class ParallelLayout:
    """The sizes and the groups built from them.

    The mesh is (edp, ep): ranks r with the same r // ep form an expert-parallel group (together they hold
    every expert once); ranks with the same r % ep form an expert-data-parallel group (they hold the same
    experts). Dense parameters are averaged over all dp ranks. Gradient averaging gets groups of its own
    (`grad_dp_group`, `grad_edp_group`), so its asynchronous all-reduces never share a communicator with the
    all-to-alls that run in the same backward.
    """

    sizes: ParallelSizes
    mesh: DeviceMesh | None = None
    grad_dp_group: dist.ProcessGroup | None = None
    grad_edp_group: dist.ProcessGroup | None = None

    @classmethod
    def build(cls, sizes: ParallelSizes, device_type: str) -> "ParallelLayout":
        """Create the mesh and groups (collective: every rank calls it) or, for one process, none."""
        if sizes.world_size == 1:
            return cls(sizes)
        mesh = init_device_mesh(device_type, (sizes.edp, sizes.ep), mesh_dim_names=("edp", "ep"))
        grad_dp = dist.new_group(list(range(sizes.world_size)))
        edp_groups = [dist.new_group(list(range(j, sizes.world_size, sizes.ep))) for j in range(sizes.ep)]
        return cls(sizes, mesh, grad_dp, edp_groups[dist.get_rank() % sizes.ep])

    def _group(self, dim: str) -> dist.ProcessGroup | None:
        return None if self.mesh is None else self.mesh[dim].get_group()

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return self._group("ep")

    @property
    def edp_group(self) -> dist.ProcessGroup | None:
        return self._group("edp")

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return None if self.mesh is None else dist.group.WORLD

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else dist.get_rank()

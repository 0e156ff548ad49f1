"""Parallel sizes, their checks, and the device mesh and process groups they induce (built once per process)."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_smartmoe.errors import ConfigError


@dataclass(frozen=True)
class ParallelSizes:
    """world = pp * dp * tp. Within a pipeline stage the dp * tp ranks form a plane; experts are sharded over
    expert-parallel groups of ep ranks of that plane (ep divides dp * tp), and each expert then has
    dp * tp / ep replicas, whose gradients are averaged over the expert-data-parallel group.

    With `expert_tp`, each expert's FFN is instead sharded over the tp ranks, and expert parallelism runs
    among the dp ranks of each tp rank (ep divides dp; dp / ep replicas of each expert shard).
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    expert_tp: bool = False

    def __post_init__(self) -> None:
        for key in ("dp", "tp", "pp", "ep"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{key}={value!r} must be an integer >= 1")
        if self.expert_tp and self.dp % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} must divide parallel.dp={self.dp} with parallel.expert_tp=true")
        if self.plane % self.ep:
            raise ConfigError(
                f"parallel.ep={self.ep} must divide parallel.dp x parallel.tp = {self.dp} x {self.tp} = {self.plane}"
            )

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def plane(self) -> int:
        """Ranks of one pipeline stage: dp * tp."""
        return self.dp * self.tp

    @property
    def edp(self) -> int:
        """Replicas of each expert (of each expert shard, with expert_tp): the expert-data-parallel size."""
        return (self.dp if self.expert_tp else self.plane) // self.ep

    @classmethod
    def resolve(cls, world_size: int, dp: int | None, tp: int, pp: int, ep: int, expert_tp: bool = False) -> "ParallelSizes":
        """Sizes for `world_size` processes; dp=None takes whatever tp and pp leave."""
        if dp is None:
            if world_size % (tp * pp):
                raise ConfigError(
                    f"world size {world_size} (trainer.devices x trainer.num_nodes) must be divisible by "
                    f"parallel.tp x parallel.pp = {tp * pp}"
                )
            dp = world_size // (tp * pp)
        sizes = cls(dp=dp, tp=tp, pp=pp, ep=ep, expert_tp=expert_tp)
        if sizes.world_size != world_size:
            raise ConfigError(
                f"world size {world_size} (trainer.devices x trainer.num_nodes) must equal "
                f"parallel.dp x parallel.tp x parallel.pp = {dp} x {tp} x {pp} = {sizes.world_size}"
            )
        return sizes

    def check_experts(self, num_experts: int) -> None:
        if num_experts % self.ep:
            raise ConfigError(f"moe.num_experts={num_experts} must be divisible by parallel.ep={self.ep}")

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp, dp, tp) coordinates of a global rank; tp varies fastest, pp slowest."""
        return rank // self.plane, rank // self.tp % self.dp, rank % self.tp


class _Built:
    """This process's groups and meshes, by what they were built from: each is built once and reused, so a process
    that sets up layout after layout (fits in the same ranks) holds one communicator per distinct group (gloo: three
    threads on each member) rather than a new set per fit, and the groups a Trainer's model holds stay valid for its
    later runs. They belong to the current default process group: after `dist.destroy_process_group()` and a new
    `init_process_group`, everything is built afresh."""

    world: dist.ProcessGroup | None = None
    items: dict[tuple, Any] = {}

    @classmethod
    def get(cls, key: tuple, build: Callable[[], Any]) -> Any:
        """`build()` the first time `key` is asked for (collective as `build` is: every rank asks for the same keys
        in the same order), the same object afterwards."""
        if cls.world is not dist.group.WORLD:
            cls.world, cls.items = dist.group.WORLD, {}
        if key not in cls.items:
            cls.items[key] = build()
        return cls.items[key]


def _my_group(role: str, rank_lists: list[list[int]], rank: int) -> dist.ProcessGroup | None:
    """This rank's group of one group per list (None if it is in none): created for `role` once per process
    (collective: every rank creates all of them, in order). Roles with the same lists get distinct communicators."""

    def build() -> dist.ProcessGroup | None:
        groups = [(dist.new_group(ranks), ranks) for ranks in rank_lists]
        return next((group for group, ranks in groups if rank in ranks), None)

    return _Built.get((role, tuple(map(tuple, rank_lists))), build)


def _mesh(device_type: str, shape: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """The DeviceMesh of all ranks in this shape, built once per process."""
    return _Built.get(("mesh", device_type, shape, names), lambda: init_device_mesh(device_type, shape, mesh_dim_names=names))


@dataclass
class ParallelLayout:
    """The sizes and the groups built from them (all None in one process).

    Ranks are laid out (pp, dp, tp), tp fastest. Pipeline stage s holds the plane of ranks
    s*dp*tp ... (s+1)*dp*tp - 1; within it, plane index j = dp_rank * tp + tp_rank. Expert-parallel groups
    are runs of ep consecutive plane indices; the expert-data-parallel group of a rank is the plane ranks
    with the same j % ep. With expert_tp the same holds for the dp ranks of each tp rank separately.

    Groups used in forward and backward: `tp_group` (tensor parallelism), `pp_group` (stage-to-stage
    sends), `ep_group` (token all-to-all), `plane_group` (routing statistics over a stage's tokens).
    Gradient averaging gets groups of its own, so its asynchronous all-reduces never share a communicator
    with the collectives that run in the same backward: `grad_dp_group` (same stage and tp rank: dense
    parameters), `grad_plane_group` (the stage: parameters whose gradient is partial over tp, such as the
    router), `grad_edp_group` (copies of an expert slot over data parallelism), `grad_ep_group` (the ep_group's
    ranks again: replicas of an expert placed on several of them sum their gradients), `embedding_group` (with
pp > 1, the first and the last stage's ranks of the same plane index, None elsewhere: a head tied to the token
embedding sums the two stages' gradients of their copies after backward). `mesh` is the
    (pp, dp, tp) DeviceMesh; its "tp" dimension describes tensor-parallel shards to checkpoints, and its
    "dp" dimension blocks of dense parameters cut by ZeRO. `expert_mesh` (built on request: for ZeRO-cut experts)
    is the same ranks as (pp, edp, ep, etp): etp is tp with expert_tp and 1 otherwise; its "edp" dimension
    describes the experts' ZeRO blocks. Layouts of one process share the groups and meshes they have in common,
    role by role (`_Built`).
    """

    sizes: ParallelSizes
    mesh: DeviceMesh | None = None
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    plane_group: dist.ProcessGroup | None = None
    grad_dp_group: dist.ProcessGroup | None = None
    grad_plane_group: dist.ProcessGroup | None = None
    grad_edp_group: dist.ProcessGroup | None = None
    grad_ep_group: dist.ProcessGroup | None = None
    embedding_group: dist.ProcessGroup | None = None
    expert_mesh: DeviceMesh | None = None
    rank: int = 0

    @classmethod
    def build(cls, sizes: ParallelSizes, device_type: str, expert_mesh: bool = False) -> "ParallelLayout":
        """Create the mesh and groups (collective: every rank calls it) or, for one process, none."""
        if sizes.world_size == 1:
            return cls(sizes)
        rank = dist.get_rank()
        pp, dp, tp, ep, plane = sizes.pp, sizes.dp, sizes.tp, sizes.ep, sizes.plane
        mesh = _mesh(device_type, (pp, dp, tp), ("pp", "dp", "tp"))
        stages = [list(range(s * plane, (s + 1) * plane)) for s in range(pp)]
        dp_lists = [stage[t::tp] for stage in stages for t in range(tp)]
        expert_planes = dp_lists if sizes.expert_tp else stages  # the ranks that split the experts among them
        ep_lists = [ranks[g : g + ep] for ranks in expert_planes for g in range(0, len(ranks), ep)]
        edp_lists = [ranks[j::ep] for ranks in expert_planes for j in range(ep)]
        ends = [[first, last] for first, last in zip(stages[0], stages[-1])] if pp > 1 else []
        groups = dict(ep_group=ep_lists, plane_group=stages, grad_dp_group=dp_lists, grad_plane_group=stages,
                      grad_edp_group=edp_lists, grad_ep_group=ep_lists, embedding_group=ends)
        return cls(
            sizes,
            mesh,
            tp_group=mesh["tp"].get_group(),
            pp_group=mesh["pp"].get_group(),
            **{role: _my_group(role, lists, rank) for role, lists in groups.items()},
            expert_mesh=cls._expert_mesh(sizes, device_type) if expert_mesh else None,
            rank=rank,
        )

    @staticmethod
    def _expert_mesh(sizes: ParallelSizes, device_type: str) -> DeviceMesh:
        etp = sizes.tp if sizes.expert_tp else 1
        return _mesh(device_type, (sizes.pp, sizes.edp, sizes.ep, etp), ("pp", "edp", "ep", "etp"))

    @property
    def stage(self) -> int:
        return self.sizes.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.sizes.coords(self.rank)[1]

    def stage_rank(self, stage: int) -> int:
        """Global rank of this rank's peer (same dp and tp coordinates) in pipeline stage `stage`."""
        return stage * self.sizes.plane + self.rank % self.sizes.plane

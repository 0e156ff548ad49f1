"""SmartMoEStrategy: a Lightning strategy for data- and expert-parallel MoE training."""

import shutil
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torch.distributed.constants import default_pg_timeout
from torch.optim import Optimizer

from lightning_smartmoe import checkpoint as ckpt_io
from lightning_smartmoe.grad_sync import GradientSynchronizer
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.layout import ParallelLayout, ParallelSizes
from lightning_smartmoe.moe import GroupedExperts, MoELayer
from lightning_smartmoe.placement import Placement
from lightning_smartmoe.placement.migration import migrate
from lightning_smartmoe.placement.replica_sync import sync_replica_grads


class _SpawnLauncher(_MultiProcessingLauncher):
    """Spawn launcher that checks the model against the sizes before starting processes, and does not
    copy rank 0's weights back into the parent's model: with sharded experts rank 0 holds only its
    share, so the parent keeps its own (use checkpoints for the result)."""

    def launch(self, function: Callable, *args: Any, trainer: "pl.Trainer | None" = None, **kwargs: Any) -> Any:
        self._strategy.check_model(self._strategy.lightning_module)
        return super().launch(function, *args, trainer=trainer, **kwargs)

    def _recover_results_in_main_process(self, worker_output: Any, trainer: "pl.Trainer") -> None:
        if worker_output.weights_path is not None:
            self._strategy.checkpoint_io.remove_checkpoint(worker_output.weights_path)
            worker_output = worker_output._replace(weights_path=None)
        super()._recover_results_in_main_process(worker_output, trainer)


class SmartMoEStrategy(ParallelStrategy):
    """Hybrid data/expert parallelism for models built from `MoELayer`s.

    Args:
        dp, tp, pp, ep: parallel sizes; world = dp * tp * pp, ep divides dp. dp=None takes the rest of the
            world. tp and pp above 1 are refused in this release.
        start_method: "spawn" starts the processes from this one (works under pytest and in scripts);
            "popen" re-runs the command per process (the CLI). Under torchrun or SLURM the cluster
            environment has created the processes and no launcher is used.
        bucket_mb: gradient all-reduce bucket size.
        extra_slots: expert slots per rank beyond num_experts / ep, for replicas of hot experts
            (placement.extra_slots); used by dynamic placement.
    """

    strategy_name = "smartmoe"

    def __init__(
        self,
        dp: int | None = None,
        tp: int = 1,
        pp: int = 1,
        ep: int = 1,
        start_method: Literal["spawn", "popen"] = "spawn",
        bucket_mb: float = 25.0,
        extra_slots: int = 0,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta = default_pg_timeout,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._requested = dict(dp=dp, tp=tp, pp=pp, ep=ep)
        ParallelSizes(dp=dp or ep, tp=tp, pp=pp, ep=ep)  # refuse bad sizes at construction
        self._start_method = start_method
        self._bucket_bytes = int(bucket_mb * 2**20)
        if extra_slots < 0:
            raise ConfigError(f"placement.extra_slots={extra_slots} must be >= 0")
        self._extra_slots = extra_slots
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._sizes: ParallelSizes | None = None
        self.layout: ParallelLayout | None = None
        self._grad_sync: GradientSynchronizer | None = None
        self.num_nodes = 1

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="SmartMoE hybrid-parallel MoE strategy")

    # ---- sizes and processes -------------------------------------------------------------------------

    @property
    def sizes(self) -> ParallelSizes:
        """The resolved parallel sizes (raises ConfigError if they do not fit the world size)."""
        if self._sizes is None:
            self._sizes = ParallelSizes.resolve(self.num_nodes * self.num_processes, **self._requested)
        return self._sizes

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 1

    @property
    def is_distributed(self) -> bool:
        return self.sizes.world_size > 1

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.sizes.dp, "rank": self.layout.dp_rank if self.layout else self.global_rank}

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False

    def _configure_launcher(self) -> None:
        _ = self.sizes  # size errors surface here, before any process is started
        if self.sizes.ep > 1 and getattr(self.precision_plugin, "precision", None) == "16-mixed":
            # each rank's GradScaler would judge overflow from different expert gradients and skip different steps
            raise ConfigError("trainer.precision=16-mixed is not supported with parallel.ep > 1; use bf16-mixed")
        assert self.cluster_environment is not None
        if self.sizes.world_size == 1 or self.cluster_environment.creates_processes_externally:
            return
        if self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _SpawnLauncher(self, start_method=self._start_method)

    def check_model(self, model: nn.Module | None) -> None:
        """Raise ConfigError if the model's MoE layers do not fit the parallel sizes."""
        for layer in model.modules() if model is not None else ():
            if isinstance(layer, MoELayer):
                self.sizes.check_experts(layer.cfg.num_experts)

    def connect(self, model: nn.Module) -> None:
        self.check_model(model)
        super().connect(model)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.sizes.world_size > 1:
            reset_seed()
            self.set_world_ranks()
            backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
            _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
        self.layout = ParallelLayout.build(self.sizes, self.root_device.type)

    # ---- model ---------------------------------------------------------------------------------------

    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.model is not None and self.layout is not None
        if trainer.state.fn == TrainerFn.PREDICTING and self.sizes.world_size > 1:
            # Lightning's predict sampler gives ranks unequal batch counts; MoE layers run collectives per batch
            raise ConfigError("trainer.predict needs one process with the smartmoe strategy (devices=1)")
        self.accelerator.setup(trainer)
        if self.layout.mesh is not None:
            for layer in self.moe_layers:
                layer.distribute(self.layout.ep_group, self.layout.dp_group, self._extra_slots)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if self.layout.mesh is not None and trainer.state.fn == TrainerFn.FITTING:
            self._grad_sync = self._build_grad_sync(self.model)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if self.layout.mesh is not None:
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.model.modules() if isinstance(m, MoELayer)] if self.model is not None else []

    def migrate(self, layer: MoELayer, placement: Placement) -> int:
        """Switch one MoE layer to `placement` between optimizer steps (collective; every rank passes the same
        placement). Returns the elements this rank sent."""
        return migrate(layer, placement, self.optimizers)

    def _build_grad_sync(self, model: nn.Module) -> GradientSynchronizer:
        """Dense parameters average over all dp ranks; expert parameters over their expert-dp group."""
        expert = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
        params = list(model.parameters())
        sync = GradientSynchronizer(divisor=self.sizes.dp, bucket_bytes=self._bucket_bytes)
        sync.add([p for p in params if id(p) not in expert], self.layout.grad_dp_group)
        sync.add([p for p in params if id(p) in expert], self.layout.grad_edp_group)
        return sync

    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        if self._grad_sync is not None and self._grad_sync.enabled:
            self._grad_sync.reset()  # several backwards per optimizer step (manual optimization)

    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        if self._grad_sync is not None:
            self._grad_sync.end_backward()

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        """Clip by the norm of the whole model's gradient: each expert counted once, wherever it lives.

        Dense gradients are identical on every rank after synchronisation; expert gradients are summed
        over the expert-parallel group, each slot weighted by 1 / its expert's replicas (0 if empty).
        """
        shares = {id(p): layer.slot_shares() for layer in self.moe_layers for p in (layer.experts.w1, layer.experts.w2)}
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        sq = torch.zeros(2, dtype=torch.float64, device=self.root_device)
        for p in params:
            g = p.grad.detach().double().square()
            share = shares.get(id(p))
            if share is None:
                sq[0] += g.sum()
            else:
                sq[1] += (g.flatten(1).sum(1) * share.to(g.device)).sum()
        dist.all_reduce(sq[1:], group=self.layout.ep_group)
        scale = clip_val / (sq.sum().sqrt() + 1e-6)
        if scale < 1:
            torch._foreach_mul_([p.grad for p in params], scale.item())

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        if self._grad_sync is None:
            yield
            return
        self._grad_sync.enabled = False
        try:
            yield
        finally:
            self._grad_sync.enabled = True

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_sync() -> Any:
            result = closure()
            if self._grad_sync is not None:
                self._grad_sync.finish()
                for layer in self.moe_layers:
                    sync_replica_grads(layer)
            return result

        return super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)

    # ---- collectives ---------------------------------------------------------------------------------

    def barrier(self, name: str | None = None) -> None:
        if _distributed_is_initialized():
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # ---- checkpoints ---------------------------------------------------------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # written by `save_checkpoint` from the live module, keyed by logical expert

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        return {}  # likewise

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        meta["parallel"] = vars(self.sizes).copy()
        meta["placements"] = [layer.placement.slot_expert for layer in self.moe_layers]
        ckpt_io.save(filepath, self.lightning_module, self.optimizers, meta)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        meta = ckpt_io.read_meta(path)
        self._adopt_saved_placements(meta)
        meta = ckpt_io.load(path, self.lightning_module, self.optimizers, meta)
        meta.setdefault("state_dict", {})
        return meta

    def _adopt_saved_placements(self, meta: dict[str, Any]) -> None:
        """Continue with the checkpoint's placements if they fit this layout (same ep and slots per rank);
        otherwise keep the current ones. Either way each rank then loads the logical experts it holds."""
        layers, saved = self.moe_layers, meta.get("placements", [])
        if len(saved) != len(layers) or meta.get("parallel", {}).get("ep") != self.sizes.ep:
            return
        for layer, table in zip(layers, saved):
            current = layer.placement
            if len(table) == len(current.slot_expert):
                layer.relabel(Placement(current.num_experts, current.ep, tuple(table)))

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # loaded in `load_checkpoint`

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # loaded in `load_checkpoint`

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def teardown(self) -> None:
        super().teardown()
        if self._grad_sync is not None:
            self._grad_sync.remove()
            self._grad_sync = None

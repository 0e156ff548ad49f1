"""SmartMoEStrategy: a Lightning strategy for data-, tensor-, pipeline- and expert-parallel MoE training."""

import shutil
import signal
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _set_num_threads_if_needed,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer

from lightning_smartmoe import checkpoint as ckpt_io
from lightning_smartmoe import init, tensor_parallel
from lightning_smartmoe.clipping import squared_norms, squared_row_norms
from lightning_smartmoe.grad_sync import GradientSynchronizer
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.launchers import ScriptLauncher
from lightning_smartmoe.layout import ParallelLayout, ParallelSizes
from lightning_smartmoe.moe import GroupedExperts, MoELayer
from lightning_smartmoe.pipeline import SCHEDULES, PipelineRunner
from lightning_smartmoe.placement import Placement
from lightning_smartmoe.placement.migration import migrate, slot_fields
from lightning_smartmoe.placement.replica_sync import OverlappedReplicaSync, sync_replica_grads
from lightning_smartmoe.signals import STOP_SIGNALS, StopSignal, signal_name
from lightning_smartmoe.zero import STAGES, ZeroOptimizer

DEFAULT_TIMEOUT = timedelta(minutes=5)  # collectives; torch's default is 30 minutes
_CONFIG_ERROR = f"{ConfigError.__module__}.{ConfigError.__name__}: "


def parallel_model(module: nn.Module) -> nn.Module:
    """The submodule that shards and cuts itself (see SmartMoEStrategy)."""
    for m in module.modules():
        if all(hasattr(m, f) for f in ("check_parallel", "shard_tensor_parallel", "keep_stages", "stage_io", "loss")):
            return m
    raise ConfigError(
        "parallel.tp > 1 or parallel.pp > 1 need a model with check_parallel, shard_tensor_parallel, keep_stages, "
        "stage_io and loss methods (such as lightning_smartmoe.models.GPTMoE)"
    )


def pipeline_stages(layout: ParallelLayout, virtual_stages: int) -> list[int]:
    """The pipeline stages a rank holds, of pp * virtual_stages (rank r: r, r + pp, ...)."""
    return [layout.stage + i * layout.sizes.pp for i in range(virtual_stages)]


def expert_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}


def reduction_groups(model: nn.Module, layout: ParallelLayout) -> list[tuple[list[nn.Parameter], dist.ProcessGroup, bool]]:
    """Every gradient is summed over a group and divided by dp: dense parameters over the dp ranks of their
    stage and tp rank; parameters whose gradient is partial over tp (`tp_partial`) over the whole stage;
    expert parameters over their expert-data-parallel group. (parameters, group, whether ZeRO may cut them)."""
    expert = expert_param_ids(model)
    params = list(model.parameters())
    dense = [p for p in params if id(p) not in expert]
    return [
        ([p for p in dense if not getattr(p, "tp_partial", False)], layout.grad_dp_group, True),
        ([p for p in dense if getattr(p, "tp_partial", False)], layout.grad_plane_group, False),
        ([p for p in params if id(p) in expert], layout.grad_edp_group, True),
    ]


def keep_share(module: nn.Module, layout: ParallelLayout, virtual_stages: int = 1, sequence_parallel: bool = False,
               extra_slots: int = 0) -> None:
    """Cut `module` (whole, on any device, meta included) down to rank layout.rank's part: its tensor-parallel
    shard, its pipeline stages, its expert slots (with `extra_slots` empty ones per rank for replicas)."""
    sizes = layout.sizes
    if sizes.tp > 1:
        parallel_model(module).shard_tensor_parallel(layout.tp_group, sequence_parallel)
    if sizes.pp > 1:
        parallel_model(module).keep_stages(pipeline_stages(layout, virtual_stages), sizes.pp * virtual_stages)
    for layer in (m for m in module.modules() if isinstance(m, MoELayer)):
        if layout.mesh is None:
            layer.relabel(Placement.contiguous(layer.cfg.num_experts, 1))
        else:
            placement = Placement.contiguous(layer.cfg.num_experts, dist.get_world_size(layout.ep_group), extra_slots)
            layer.distribute(layout.ep_group, layout.plane_group, placement, layout.tp_group, sequence_parallel,
                             sizes.expert_tp)


class _SpawnLauncher(_MultiProcessingLauncher):
    """Spawn launcher that checks the model against the sizes before starting processes (building a model that
    `configure_model` builds on the meta device first, which the processes then receive), forwards stop signals to
    the ranks, re-raises a rank's ConfigError as one ConfigError here, and does not copy rank 0's weights back into
    the parent's model: with sharded experts rank 0 holds only its share, so the parent keeps its own (use
    checkpoints for the result)."""

    def launch(self, function: Callable, *args: Any, trainer: "pl.Trainer | None" = None, **kwargs: Any) -> Any:
        module = self._strategy.lightning_module
        if module is not None and is_overridden("configure_model", module):
            with self._strategy.tensor_init_context(), self._strategy.precision_plugin.module_init_context():
                module.configure_model()
        self._strategy.check_model(module)
        previous = {s: signal.signal(s, lambda signum, _: self.kill(signum)) for s in STOP_SIGNALS}
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except mp.ProcessRaisedException as err:
            last = str(err).strip().splitlines()[-1]
            if last.startswith(_CONFIG_ERROR):
                raise ConfigError(last[len(_CONFIG_ERROR) :]) from None
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def get_extra_results(self, trainer: "pl.Trainer") -> dict[str, Any]:
        return {**super().get_extra_results(trainer), "stop_signal": trainer.strategy.stop_signal}

    def update_main_process_results(self, trainer: "pl.Trainer", extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        trainer.strategy.stop_signal = extra["stop_signal"]

    def _recover_results_in_main_process(self, worker_output: Any, trainer: "pl.Trainer") -> None:
        if worker_output.weights_path is not None:
            self._strategy.checkpoint_io.remove_checkpoint(worker_output.weights_path)
            worker_output = worker_output._replace(weights_path=None)
        super()._recover_results_in_main_process(worker_output, trainer)


class SmartMoEStrategy(ParallelStrategy):
    """Hybrid data/tensor/pipeline/expert parallelism for models built from `MoELayer`s.

    Tensor and pipeline parallelism need a model that can shard and cut itself: a submodule of the
    LightningModule with `check_parallel(tp, pp, expert_tp, virtual_stages)`,
    `shard_tensor_parallel(tp_group, sequence_parallel)`, `keep_stages(stages, num_stages)`,
    `stage_io(batch, seq_len, stage)`, `forward(x, stage)` and `loss(logits, target)` (GPTMoE has them). Under pipeline
    parallelism the LightningModule's training and validation steps call `strategy.pipeline.train_step`
    and `eval_step`, which run the schedule, backward included.

    Args:
        dp, tp, pp, ep: parallel sizes; world = dp * tp * pp, ep divides dp * tp (expert parallelism folds
            over the data- and tensor-parallel ranks of a stage). dp=None takes the rest of the world.
        microbatches: micro-batches per batch in the pipeline schedule (pp > 1).
        pp_schedule: "gpipe", "1f1b" or "interleaved_1f1b".
        virtual_stages: pipeline stages per rank (interleaved_1f1b: at least 2; rank r holds stages
            r, r + pp, ...).
        sequence_parallel: with tp > 1, keep layer norms, dropouts and the MoE layers on a slice of the
            sequence (Megatron's sequence parallelism).
        expert_tp: with tp > 1, shard each expert's FFN over the tp ranks instead of giving each tp rank a
            slice of the tokens; ep then divides dp.
        start_method: "spawn" starts the processes from this one (works under pytest and in scripts);
            "popen" re-runs the command per process (the CLI). Under torchrun or SLURM the cluster
            environment has created the processes and no launcher is used.
        bucket_mb: gradient all-reduce bucket size.
        timeout: how long a collective may wait (parallel.timeout_s): a rank that hangs or dies ends the job
            after this at the latest.
        extra_slots: expert slots per rank beyond num_experts / ep, for replicas of hot experts
            (placement.extra_slots); used by dynamic placement.
        zero: 0 keeps whole optimizer state on every data-parallel replica; 1 shards it (ZeRO stage 1: each
            replica steps a 1/n block of every parameter and the blocks are all-gathered); 2 also reduce-scatters
            the gradients (stage 2). Dense parameters shard over their data-parallel group, experts over their
            expert-data-parallel group (lightning_smartmoe.zero; stage 3 is not offered, see there).
    """

    strategy_name = "smartmoe"

    def __init__(
        self,
        dp: int | None = None,
        tp: int = 1,
        pp: int = 1,
        ep: int = 1,
        microbatches: int = 1,
        pp_schedule: str = "1f1b",
        virtual_stages: int = 1,
        sequence_parallel: bool = False,
        expert_tp: bool = False,
        start_method: Literal["spawn", "popen"] = "spawn",
        bucket_mb: float = 25.0,
        extra_slots: int = 0,
        zero: int = 0,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._requested = dict(dp=dp, tp=tp, pp=pp, ep=ep, expert_tp=expert_tp)
        if dp is not None:
            ParallelSizes(**self._requested)  # refuse bad sizes at construction
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise ConfigError(f"parallel.microbatches={microbatches!r} must be an integer >= 1")
        if pp_schedule not in SCHEDULES:
            raise ConfigError(f"parallel.pp_schedule={pp_schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
        if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or virtual_stages < 1:
            raise ConfigError(f"parallel.virtual_stages={virtual_stages!r} must be an integer >= 1")
        if (pp_schedule == "interleaved_1f1b") != (virtual_stages > 1):
            raise ConfigError(
                f"parallel.virtual_stages={virtual_stages} does not fit parallel.pp_schedule={pp_schedule}: "
                "interleaved_1f1b needs parallel.virtual_stages >= 2, the other schedules 1"
            )
        if pp == 1 and (microbatches > 1 or virtual_stages > 1):
            raise ConfigError(
                "parallel.microbatches > 1 and parallel.virtual_stages > 1 need parallel.pp > 1; without a pipeline "
                "use trainer.accumulate_grad_batches"
            )
        if pp > 1 and pp_schedule != "gpipe" and microbatches < pp:
            raise ConfigError(
                f"parallel.pp_schedule={pp_schedule} needs parallel.microbatches >= parallel.pp={pp} "
                f"(got {microbatches}); use more micro-batches or parallel.pp_schedule=gpipe"
            )
        if pp_schedule == "interleaved_1f1b" and microbatches % max(1, microbatches // pp):
            raise ConfigError(
                f"parallel.microbatches={microbatches} must be a multiple of its rounds of parallel.pp={pp} "
                f"micro-batches ({max(1, microbatches // pp)}) for interleaved_1f1b"
            )
        self.microbatches, self._pp_schedule, self._sequence_parallel = microbatches, pp_schedule, sequence_parallel
        self._virtual_stages = virtual_stages
        self._start_method = start_method
        self._bucket_bytes = int(bucket_mb * 2**20)
        if extra_slots < 0:
            raise ConfigError(f"placement.extra_slots={extra_slots} must be >= 0")
        self._extra_slots = extra_slots
        if isinstance(zero, bool) or zero not in STAGES:
            raise ConfigError(
                f"parallel.zero={zero!r} is unknown; allowed: 0, 1 (optimizer state sharded), 2 (and gradients); "
                "3 (parameters) is not offered: see lightning_smartmoe/zero.py"
            )
        self.zero_stage = zero
        self._zero: ZeroOptimizer | None = None
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._sizes: ParallelSizes | None = None
        self.layout: ParallelLayout | None = None
        self._grad_sync: GradientSynchronizer | None = None
        self._replica_sync: OverlappedReplicaSync | None = None
        self.pipeline: PipelineRunner | None = None
        self.moe_num_experts: list[int] = []  # experts of each MoE layer of the whole model, by `MoELayer.index`
        self.num_nodes = 1
        self._stop = StopSignal()
        self.stop_signal = 0  # the signal the ranks agreed to stop on (fit), 0 if none

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
        sharded = self.sizes.ep > 1 or self.sizes.tp > 1 or self.sizes.pp > 1
        if sharded and getattr(self.precision_plugin, "precision", None) == "16-mixed":
            # each rank's GradScaler would judge overflow from different expert gradients and skip different steps
            # (and a pipeline's backward runs inside the schedule, without the scaler's loss scale)
            raise ConfigError(
                "trainer.precision=16-mixed is not supported with parallel.ep, tp or pp > 1; use bf16-mixed"
            )
        assert self.cluster_environment is not None
        if self.sizes.world_size == 1 or self.cluster_environment.creates_processes_externally:
            return
        if self._start_method == "popen":
            grace = min(30.0, self._timeout.total_seconds())
            self._launcher = ScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes, grace_s=grace)
        else:
            self._launcher = _SpawnLauncher(self, start_method=self._start_method)

    def check_model(self, model: nn.Module | None) -> None:
        """Raise ConfigError if the model does not fit the parallel sizes."""
        if model is None:
            return
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                self.sizes.check_experts(layer.cfg.num_experts)
        if self.sizes.tp > 1 or self.sizes.pp > 1:
            parallel_model(model).check_parallel(self.sizes.tp, self.sizes.pp, self.sizes.expert_tp, self._virtual_stages)


    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.sizes.world_size > 1:
            # in every rank, however started; Lightning's rule: OMP_NUM_THREADS if set, else the CPUs / processes
            _set_num_threads_if_needed(num_processes=self.num_processes)
            reset_seed()
            self.set_world_ranks()
            backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
            _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
        if self.layout is None:  # a later fit or validate of the same trainer keeps the groups its model uses
            expert_mesh = self.zero_stage > 0 and self.sizes.edp > 1
            self.layout = ParallelLayout.build(self.sizes, self.root_device.type, expert_mesh)

    # ---- model ---------------------------------------------------------------------------------------

    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.model is not None and self.layout is not None
        if trainer.state.fn == TrainerFn.PREDICTING and self.sizes.world_size > 1:
            # Lightning's predict sampler gives ranks unequal batch counts; MoE layers run collectives per batch
            raise ConfigError("trainer.predict needs one process with the smartmoe strategy (devices=1)")
        self.accelerator.setup(trainer)
        tensor_parallel.set_rank_random_state({})  # each fit draws as a fresh process would, from the seed
        self.check_model(self.lightning_module)
        self._split_model()
        self._materialize()
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if self.layout.mesh is not None and trainer.state.fn == TrainerFn.FITTING:
            if self.zero_stage:
                self._zero = ZeroOptimizer(
                    self.zero_stage, reduction_groups(self.model, self.layout), expert_param_ids(self.model),
                    getattr(self.precision_plugin, "precision", None) == "bf16-mixed", self._bucket_bytes,
                )
            self._grad_sync = self._build_grad_sync(self.model)
            self._replica_sync = self._build_replica_sync()
        if self.sizes.pp > 1 and self.pipeline is None:
            self.pipeline = PipelineRunner(
                parallel_model(self.lightning_module), self.layout, pipeline_stages(self.layout, self._virtual_stages), self._pp_schedule,
                self.microbatches, self.root_device, before_backward=self._reset_grad_sync,
            )
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            if self._zero is not None:
                self._zero.shard_optimizers(self.optimizers)
        self.setup_precision_plugin()
        if self.layout.mesh is not None:
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _split_model(self) -> None:
        """Number the MoE layers of the whole model, then keep this rank's part: its tensor-parallel shard,
        its pipeline stage, its experts. Idempotent (a second fit or validate keeps the part)."""
        if not self.moe_num_experts:
            for index, layer in enumerate(self.moe_layers):
                layer.index = index
            self.moe_num_experts = [layer.cfg.num_experts for layer in self.moe_layers]
        layout, sizes = self.layout, self.sizes
        if sizes.tp > 1 or sizes.pp > 1:
            model = parallel_model(self.lightning_module)
            split_by = getattr(model, "_smartmoe_layout", layout)
            if split_by is not layout:
                raise ConfigError(
                    "this model was already sharded for another SmartMoEStrategy's tensor/pipeline layout; "
                    "build a new LightningModule for each Trainer"
                )
            model._smartmoe_layout = layout
        keep_share(self.lightning_module, layout, self._virtual_stages, self._sequence_parallel, self._extra_slots)

    def _materialize(self) -> None:
        """Allocate this rank's part of a meta-built model on its device and initialise it from the seed of rank 0
        (lightning_smartmoe.init: the values do not depend on the layout). A module with a `weights_source` (a
        model to start from pretrained weights, e.g. `LlamaMoE` with `init_from`) then reads its share from it,
        once."""
        tp_rank = dist.get_rank(self.layout.tp_group) if self.sizes.tp > 1 else 0
        if init.has_meta_tensors(self.model):
            seed = int(self.broadcast(torch.initial_seed()))
            try:
                init.materialize(self.model, self.root_device, seed, tp_rank, self.sizes.tp)
            except ValueError as err:
                raise ConfigError(str(err)) from err
        for module in self.model.modules():
            if getattr(module, "weights_source", None) is not None:
                module.weights_source.load(module, tp_rank, self.sizes.tp)
                module.weights_source = None

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """Modules built in `configure_model` or under `Trainer.init_module()` go on the meta device (unless
        empty_init=False); `setup` materialises each rank's share."""
        with torch.device("meta") if empty_init is not False else nullcontext(), self.precision_plugin.tensor_init_context():
            yield

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.model.modules() if isinstance(m, MoELayer)] if self.model is not None else []

    def migrate(self, layer: MoELayer, placement: Placement) -> int:
        """Switch one MoE layer to `placement` between optimizer steps (collective; every rank passes the same
        placement). Returns the elements this rank sent."""
        return migrate(layer, placement, self.optimizers, self.optimizer_tensor)

    def slot_fields(self, layer: MoELayer) -> list[Tensor]:
        """The per-slot tensors a migration of `layer` moves (weights, and optimizer state wherever it lives)."""
        return slot_fields(layer, self.optimizers, self.optimizer_tensor)

    def _build_grad_sync(self, model: nn.Module) -> GradientSynchronizer:
        """Buckets over `reduction_groups`; under pipeline parallelism a bucket starts in the schedule's backward of
        the last micro-batch that touches it; with ZeRO stage 2 the cut parameters are reduce-scattered."""
        sync = GradientSynchronizer(divisor=self.sizes.dp, bucket_bytes=self._bucket_bytes, backwards_per_step=self.microbatches)
        scattered = self._zero.shards if self._zero is not None and self.zero_stage == 2 else None
        for params, group, _ in reduction_groups(model, self.layout):
            sync.add(params, group, scattered)
        return sync

    @property
    def replica_sync_overlapped(self) -> bool:
        """Whether replicas of an expert sum their gradients during backward (see `_build_replica_sync`)."""
        return self._replica_sync is not None

    def _build_replica_sync(self) -> OverlappedReplicaSync | None:
        """Replicas of an expert sum their gradients during backward when nothing else reduces expert
        gradients (one copy of each slot: edp = 1) and each optimizer step has one backward that counts
        (automatic optimization). Otherwise, and without extra slots for replicas, this is None and
        `optimizer_step` sums them after the expert-data-parallel average."""
        if self.sizes.ep == 1 or self.sizes.edp > 1 or not self._extra_slots:
            return None
        if not self.lightning_module.automatic_optimization:
            return None
        return OverlappedReplicaSync(self.moe_layers, self.layout.grad_ep_group, self.microbatches)

    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        """Under pipeline parallelism the schedule has already run backward in the training step: here its
        gradients come back and only the hooks around backward run."""
        if self.pipeline is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self.pipeline.restore_grads()
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        if self.pipeline is None:
            self._reset_grad_sync()  # several backwards per optimizer step (manual optimization)

    def _reset_grad_sync(self) -> None:
        """Before a backward (under pipelining: before the schedule, whose backwards start the buckets)."""
        if self._grad_sync is not None and self._grad_sync.enabled:
            self._grad_sync.reset()
        if self._replica_sync is not None and self._replica_sync.enabled:
            self._replica_sync.reset()

    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        if self._grad_sync is not None:
            self._grad_sync.end_backward()

    def _sum_tied_grads(self) -> None:
        """A head tied to the token embedding under pipeline parallelism: the first and the last stage each hold a copy
        (`pp_tied`); after the data-parallel average each sums the two copies' gradients (of its ZeRO block: both
        stages cut the tensor alike), so both take the same optimizer step."""
        group = self.layout.embedding_group
        tied = [self.optimizer_tensor(p) for p in self.model.parameters() if getattr(p, "pp_tied", False)]
        if group is None or not tied:
            return
        for t in tied:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        flat = torch.cat([t.grad.reshape(-1) for t in tied])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in tied:
            t.grad.copy_(flat[offset : offset + t.numel()].view_as(t.grad))
            offset += t.numel()

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        """Clip by the norm of the whole model's gradient, each element counted once wherever it lives.

        After synchronisation a stage's copies of a gradient are identical, so each rank adds the squares of the
        gradients its optimizer steps weighted by 1 / (copies of them in the stage) and one all-reduce over the
        world sums the stages: tensor-parallel shards have dp copies, other dense parameters dp * tp, an expert
        slot replicas * edp (0 for an empty slot); a ZeRO block has 1 / n of its parameter's copies. A head tied to the
        embedding has a copy on the first and on the last stage: each counts half.
        """
        sizes = self.sizes
        shares = {id(self.optimizer_tensor(p)): layer.slot_shares()
                  for layer in self.moe_layers for p in layer.experts.parameters()}
        params = {id(self.optimizer_tensor(p)): p for p in self.model.parameters()}
        stepped = [t for group in optimizer.param_groups for t in group["params"] if t.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=self.root_device)
        dense, weights = [], []
        for t in stepped:
            p = params.get(id(t), t)
            cut = self._zero.shards[id(p)].n if self._zero is not None and id(p) in self._zero.shards else 1
            share = shares.get(id(t))
            if share is not None:
                sq += (squared_row_norms(t.grad.detach()) * share.to(sq.device)).sum() * cut / sizes.edp
            else:
                copies = (sizes.dp if hasattr(p, "tp_shard_dim") else sizes.plane) * (2 if getattr(p, "pp_tied", False) else 1)
                dense.append(t.grad.detach())
                weights.append(cut / copies)
        if dense:
            sq += (squared_norms(dense) * torch.tensor(weights, dtype=torch.float64, device=sq.device)).sum()
        dist.all_reduce(sq)
        scale = (clip_val / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # on the device: no host sync (x 1.0 changes no bit)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in stepped:
            by_dtype.setdefault(t.grad.dtype, []).append(t.grad)
        for dtype, grads in by_dtype.items():
            torch._foreach_mul_(grads, scale.to(dtype))

    def optimizer_tensor(self, p: Tensor) -> Tensor:
        """The tensor the optimizer steps for parameter p: p, or under ZeRO its block's master."""
        return p if self._zero is None else self._zero.master(p)

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        if self._grad_sync is None:
            yield
            return
        self._grad_sync.enabled = False
        if self._replica_sync is not None:
            self._replica_sync.enabled = False
        try:
            yield
        finally:
            self._grad_sync.enabled = True
            if self._replica_sync is not None:
                self._replica_sync.enabled = True

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_sync() -> Any:
            result = closure()
            if self._replica_sync is not None:
                self._replica_sync.finish()  # before the average below divides the expert gradients in place
            if self._grad_sync is not None:
                self._grad_sync.finish()
                if self._zero is not None:
                    self._zero.set_master_grads()
                self._sum_tied_grads()
                if self._replica_sync is None:
                    for layer in self.moe_layers:
                        stepped = [self.optimizer_tensor(p) for p in layer.experts.parameters()]
                        sync_replica_grads(layer, self.layout.grad_ep_group, stepped)
            return result

        result = super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)
        if self._zero is not None:
            self._zero.gather_params()
        self._update_expert_biases()
        self._stop_if_signalled()
        return result

    def _update_expert_biases(self) -> None:
        """Aux-loss-free balancing: move each MoE layer's expert bias by the sign of its load error over the global
        batch of the step just taken (the routed counts of every micro-batch, summed over the stage's ranks in one
        all-reduce for all its layers), so the bias is the same on every rank."""
        layers = [layer for layer in self.moe_layers if layer.router.expert_bias is not None]
        if not layers:
            return
        load = torch.stack([layer.take_bias_load().to(self.root_device) for layer in layers])
        if self.layout.mesh is not None:
            dist.all_reduce(load, group=self.layout.plane_group)
        for layer, row in zip(layers, load):
            layer.router.update_bias(row)

    # ---- stopping on signals -------------------------------------------------------------------------

    def on_train_start(self) -> None:
        """Take SIGTERM and SIGINT over from Lightning (whose SIGTERM handler runs a collective inside the
        handler) for the training loop; `optimizer_step` then stops every rank after the same step."""
        super().on_train_start()
        self.stop_signal = self._stop.received = 0
        self._stop.install()

    def _stop_if_signalled(self) -> None:
        """At the step boundary after an optimizer step: if any rank received a stop signal, every rank stops
        training after this step (the fit then ends as it would at max_steps, checkpoint callbacks included)."""
        trainer = self.lightning_module.trainer
        if self.stop_signal or not trainer.training:
            return
        signum = self._stop.agree(self.root_device)
        if signum:
            self.stop_signal = signum
            trainer.should_stop = True
            rank_zero_info(f"smartmoe: {signal_name(signum)} received, stopping after step {trainer.global_step + 1}")

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
        """`tensor` reduced in place over `group` (the world by default) with "mean" (or "avg": a sum divided by
        the group's size), "sum", "max", "min" or a ReduceOp; anything else is returned as it is. One all-reduce:
        Lightning's own reduce puts a barrier before it, one more world-wide wait every step (on NCCL a host
        synchronisation too)."""
        if not isinstance(tensor, Tensor) or not dist.is_initialized():
            return tensor
        mean = isinstance(reduce_op, str) and reduce_op.lower() in ("mean", "avg")
        if mean:
            op = dist.ReduceOp.SUM
        else:
            op = getattr(dist.ReduceOp, reduce_op.upper()) if isinstance(reduce_op, str) else reduce_op
        dist.all_reduce(tensor, op=op, group=group)
        if not mean:
            return tensor
        n = dist.get_world_size(group)
        return tensor.div_(n) if tensor.is_floating_point() else tensor.copy_(tensor / n)

    # ---- checkpoints ---------------------------------------------------------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # written by `save_checkpoint` from the live module, keyed by logical expert

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        return {}  # likewise

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        meta["parallel"] = vars(self.sizes).copy()
        meta["placements"] = self.placement_tables()
        ckpt_io.save(filepath, self.lightning_module, self.optimizers, meta, self.stored_tensor)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        meta = ckpt_io.read_meta(path)
        self._adopt_saved_placements(meta)
        meta = ckpt_io.load(path, self.lightning_module, self.optimizers, meta, self.stored_tensor)
        if self._zero is not None:
            self._zero.gather_params()  # the blocks were loaded into the masters
        meta.setdefault("state_dict", {})
        return meta

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        """The tensor-parallel mesh dimension (None when tp = 1): checkpoints write TP shards as DTensors on it."""
        return self.layout.mesh["tp"] if self.layout.mesh is not None and self.sizes.tp > 1 else None

    def stored_tensor(self, p: nn.Parameter) -> tuple[Tensor, ckpt_io.Sharding | None]:
        """What checkpoints store for parameter p, and where it sits in the logical tensor: p itself, or its ZeRO
        block's master, cut over the (expert-)data-parallel mesh dimension and/or the tensor-parallel one."""
        held = self.optimizer_tensor(p)
        zero = self._zero.shards.get(id(p)) if self._zero is not None else None
        tp_dim = getattr(p, "tp_shard_dim", None)
        if zero is None and tp_dim is None:
            return held, None
        expert = id(p) in expert_param_ids(self.model)
        offset = int(expert)  # an expert stack's dims are those of each slot's tensor, + 1
        shape = [n * self.sizes.tp if d == tp_dim else n for d, n in enumerate(p.shape)][offset:]
        dims, names = [], []
        if zero is not None:
            dims.append(zero.dim - offset)
            names.append("edp" if expert else "dp")
        if tp_dim is not None:
            dims.append(tp_dim - offset)
            names.append("etp" if expert and zero is not None else "tp")
        mesh = self.layout.expert_mesh if expert and zero is not None else self.layout.mesh
        return held, ckpt_io.Sharding(mesh[tuple(names)] if len(names) > 1 else mesh[names[0]], tuple(dims), tuple(shape))

    def placement_tables(self) -> list[tuple[int, ...]]:
        """Each MoE layer's slot -> logical expert table, for every layer of the whole model (collective:
        the pipeline stages hold different layers)."""
        tables = {layer.index: layer.placement.slot_expert for layer in self.moe_layers}
        if self.sizes.pp > 1:
            parts: list[dict] = [None] * self.sizes.world_size  # type: ignore[list-item]
            dist.all_gather_object(parts, tables)
            tables = {i: t for part in parts for i, t in part.items()}
        return [tables[i] for i in range(len(self.moe_num_experts))]

    def _adopt_saved_placements(self, meta: dict[str, Any]) -> None:
        """Continue with the checkpoint's placements if they fit this layout (same ep and slots per rank);
        otherwise keep the current ones. Either way each rank then loads the logical experts it holds."""
        saved = meta.get("placements", [])
        if len(saved) != len(self.moe_num_experts) or meta.get("parallel", {}).get("ep") != self.sizes.ep:
            return
        for layer in self.moe_layers:
            current, table = layer.placement, saved[layer.index]
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
        self._stop.restore()
        if self._grad_sync is not None:
            self._grad_sync.remove()
            self._grad_sync = None
        if self._replica_sync is not None:
            self._replica_sync.remove()
            self._replica_sync = None

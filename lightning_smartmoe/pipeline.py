"""Pipeline parallelism: this rank's stage of the model, run by a torch.distributed.pipelining schedule.

The strategy cuts the model into equal stages of layers; each rank keeps one (several, interleaved, with
virtual stages). A training step is one `schedule.step`: every micro-batch's forward and backward, with the
stage-to-stage sends, inside it.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from lightning_smartmoe.layout import ParallelLayout
from lightning_smartmoe.moe import MoELayer

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


class _AttachAuxLoss(torch.autograd.Function):
    """Returns x unchanged; in backward gives `aux` the gradient `scale`. Hangs a stage's MoE aux losses on
    its output, so they reach the gradients when the output's gradient arrives from the next stage."""

    @staticmethod
    def forward(ctx, x: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class _Stage(nn.Module):
    """forward(x) -> pipeline stage `stage`'s output, with its summed MoE aux loss attached at weight
    `aux_weight`."""

    def __init__(self, model: nn.Module, stage: int) -> None:
        super().__init__()
        self.model, self.stage = model, stage
        self.aux_weight = 1.0

    def forward(self, x: Tensor) -> Tensor:
        out, aux = self.model(x, self.stage)
        return _AttachAuxLoss.apply(out, aux, self.aux_weight)


class PipelineRunner:
    """Runs this rank's pipeline stages `stages` of `model` (one, or several for an interleaved schedule).

    `model` is the rank's part (see GPTMoE.keep_stages): forward(x, stage) -> (output, aux loss),
    `model.stage_io(batch, seq_len, stage)` gives meta tensors shaped like a stage's input and output (so
    the schedule runs no shape-inference forward through the MoE layers), and `model.loss(logits, target)`
    gives the mean cross-entropy on the last stage. Each micro-batch's loss (cross-entropy plus every
    stage's aux losses) is weighted 1 / (microbatches * accumulate), so the gradients equal those of the
    whole batch's mean loss, as without pipelining. Every batch must have the first batch's shape.

    Lightning zeroes gradients between the training step and backward (on the first batch of each
    accumulation cycle), but here backward runs inside the training step: `train_step` therefore
    zeroes the gradients itself at the start of a cycle and holds the schedule's gradients aside until
    the strategy's backward calls `restore_grads`. `before_backward` runs before each training schedule
    (the strategy resets its gradient buckets there, which the schedule's backwards then start).
    """

    def __init__(
        self, model: nn.Module, layout: ParallelLayout, stages: list[int], schedule: str, microbatches: int,
        device: torch.device, before_backward: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.layout, self.microbatches, self.device = model, layout, microbatches, device
        self.schedule_name = schedule
        self.num_stages = layout.sizes.pp * len(stages)
        self.is_first, self.is_last = 0 in stages, self.num_stages - 1 in stages
        self._stage_modules = [_Stage(model, stage) for stage in stages]
        self.schedule = None
        self._shape: torch.Size | None = None
        self._weight = 1.0
        self._ce: list[Tensor] = []
        self._moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._held: list[Tensor | None] | None = None
        self._before_backward = before_backward

    def _build(self, shape: torch.Size) -> None:
        """Create the stage and schedule for batches of `shape` [B, S] (on the first step)."""
        batch, seq_len = shape
        if batch % self.microbatches:
            raise ValueError(f"a batch of {batch} sequences cannot be cut into parallel.microbatches={self.microbatches}")
        stages = []
        for module in self._stage_modules:
            inp, out = self.model.stage_io(batch // self.microbatches, seq_len, module.stage)
            stages.append(PipelineStage(
                module, module.stage, self.num_stages, self.device, input_args=inp, output_args=out,
                group=self.layout.pp_group,
            ))
        interleaved = self.schedule_name == "interleaved_1f1b"
        self.schedule = SCHEDULES[self.schedule_name](
            stages if interleaved else stages[0], self.microbatches, loss_fn=self._loss, scale_grads=False
        )
        self._shape = shape

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        ce = self.model.loss(logits, target)
        self._ce.append(ce.detach())
        return ce * self._weight

    def _run(self, batch: tuple[Tensor, Tensor], train: bool) -> Tensor:
        x, y = batch
        if self.schedule is None:
            self._build(x.shape)
        elif x.shape != self._shape:
            raise ValueError(f"pipeline batches must all have the shape of the first, {list(self._shape)}; got {list(x.shape)}")
        self._ce = []
        for layer in self._moe_layers:
            layer.stats, layer.sum_stats = None, True  # sum over the micro-batches
        run = self.schedule.step if train else self.schedule.eval
        if self.is_first:
            run(x)
        elif self.is_last:
            run(target=y, losses=[])
        else:
            run()
        loss = torch.stack(self._ce).double().mean() if self.is_last else torch.zeros((), dtype=torch.float64, device=x.device)
        dist.broadcast(loss, src=self.layout.stage_rank(self.layout.sizes.pp - 1), group=self.layout.pp_group)
        return loss

    def train_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, accumulate: int = 1) -> Tensor:
        """Forward and backward of every micro-batch of `batch` ([B, S] inputs and targets), batch `batch_idx`
        of accumulation cycles of `accumulate` batches; returns the mean cross-entropy [] (detached), the
        same on every stage. The gradients wait for `restore_grads`."""
        if batch_idx % accumulate == 0:
            for p in self._params:
                p.grad = None
        self._weight = 1.0 / (self.microbatches * accumulate)
        for module in self._stage_modules:
            module.aux_weight = self._weight
        if self._before_backward is not None:
            self._before_backward()
        loss = self._run(batch, train=True)
        self._held = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        return loss

    def restore_grads(self) -> None:
        """Put back the gradients the last `train_step` held aside."""
        for p, grad in zip(self._params, self._held):
            p.grad = grad
        self._held = None

    @torch.no_grad()
    def eval_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Forward only; returns the mean cross-entropy [] of `batch`, the same on every stage."""
        self._weight = 1.0
        return self._run(batch, train=False)

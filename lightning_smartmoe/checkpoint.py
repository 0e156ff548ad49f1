"""Layout-independent checkpoints: expert tensors keyed by logical expert id, written with torch DCP.

A checkpoint is a folder: DCP shards holding `model/<name>` and `optim<i>/<name>/<state>` tensors, where
an expert parameter `<name>` of shape [slots, ...] is stored per logical expert as `<name>:<expert>`, plus
`meta.pt` with everything else Lightning saves (loops, schedulers, callbacks, optimizer hyperparameters).
Any layout that can build the model can load it: each rank reads the keys of the experts it holds.
Tensor-parallel shards and ZeRO blocks (and their optimizer state) are written as DTensors of the logical
tensor (see Sharding), so DCP stores the whole tensor and any tp size or ZeRO stage reads its part; a
pipeline stage writes and reads only its own parameters, whose names do not depend on the stage.
"""

import math
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.optim import Optimizer

from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.moe.experts import GroupedExperts

META = "meta.pt"
_NOT_HPARAMS = ("params", "fused", "foreach", "capturable", "differentiable")  # how this layout steps, not what


def _hparams(group: dict[str, Any]) -> dict[str, Any]:
    """An optimizer param group's hyperparameters (lr, betas, weight decay, ...), as a checkpoint carries them to
    any layout: not its tensors, nor the implementation choices the resuming layout makes for itself (a ZeRO
    group holding column blocks is not fused)."""
    return {k: v for k, v in group.items() if k not in _NOT_HPARAMS}


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.(?P<kind>tmp|old)$")  # save()'s working names


@dataclass(frozen=True)
class Sharding:
    """Where a rank's tensor sits in the logical tensor it is part of: its dim `dims[i]` is split over dimension i
    of `mesh` (DTensor Shard placements, uneven as torch.chunk cuts) and the logical tensor has `shape`. For a
    stack of experts, dims and shape are those of one expert's tensor."""

    mesh: DeviceMesh
    dims: tuple[int, ...]
    shape: tuple[int, ...]

    def whole(self, t: Tensor) -> DTensor:
        stride = tuple(math.prod(self.shape[d + 1 :]) for d in range(len(self.shape)))
        return DTensor.from_local(t, self.mesh, [Shard(d) for d in self.dims], run_check=False, shape=self.shape, stride=stride)


Stored = Callable[[nn.Parameter], tuple[Tensor, Sharding | None]]


def unsharded(p: nn.Parameter) -> tuple[Tensor, None]:
    """A parameter stored whole by every rank that holds it, with its optimizer state keyed by itself."""
    return p, None


def expert_ids(module: nn.Module) -> dict[int, list[int]]:
    """id(expert parameter) -> logical expert of each of its slots."""
    return {id(p): m.logical_ids for m in module.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}


def entries(name: str, tensor: Tensor, like: Tensor, ids: list[int] | None, sharding: Sharding | None) -> list[tuple[str, Tensor]]:
    """(`name` or `name:<expert>`, tensor or its slot) pairs for a stored tensor `like` (a parameter or its ZeRO
    master) or a piece of its optimizer state `tensor`; empty slots are left out, and a per-parameter scalar
    (Adam's step) is repeated per expert. Under a `sharding`, a tensor shaped like `like` becomes a DTensor of
    the logical tensor. Replicas of a tensor on several ranks write the same key: DCP keeps one copy."""
    shaped = tensor.shape == like.shape
    sharding = sharding if shaped else None

    def whole(t: Tensor) -> Tensor:
        return t if sharding is None else sharding.whole(t)

    if ids is None:
        return [(name, whole(tensor))]
    return [(f"{name}:{e}", whole(tensor[i]) if shaped else tensor) for i, e in enumerate(ids) if e >= 0]


def model_tensors(module: nn.Module, stored: Stored = unsharded) -> dict[str, Tensor]:
    """`model/<name>[:<expert>]` -> tensor (views of the live parameters, or the masters holding them, and buffers)."""
    ids = expert_ids(module)
    params = {id(p) for p in module.parameters()}
    out: dict[str, Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        held, sharding = stored(t) if id(t) in params else (t, None)
        out.update(entries(f"model/{name}", held.detach(), held, ids.get(id(t)), sharding))
    return out


def optimizer_tensors(module: nn.Module, optimizer: Optimizer, index: int, stored: Stored = unsharded) -> dict[str, Tensor]:
    """`optim<index>/<param name>[:<expert>]/<state>` -> tensor (views of the live optimizer state)."""
    ids = expert_ids(module)
    out: dict[str, Tensor] = {}
    for name, p in module.named_parameters():
        held, sharding = stored(p)
        for state, value in optimizer.state.get(held, {}).items():
            if isinstance(value, Tensor):
                for key, t in entries(f"optim{index}/{name}", value, held, ids.get(id(p)), sharding):
                    out[f"{key}/{state}"] = t
    return out


def _all_tensors(module: nn.Module, optimizers: list[Optimizer], stored: Stored) -> dict[str, Tensor]:
    tensors = model_tensors(module, stored)
    for i, opt in enumerate(optimizers):
        tensors.update(optimizer_tensors(module, opt, i, stored))
    return tensors


def _init_optimizer_state(module: nn.Module, optimizer: Optimizer, index: int, saved: dict[str, Any], stored: Stored) -> None:
    """Create zero optimizer state shaped like the checkpoint's, so DCP can load into it."""
    ids = expert_ids(module)
    for name, p in module.named_parameters():
        held = stored(p)[0]
        if held in optimizer.state and optimizer.state[held]:
            continue
        expert = ids.get(id(p))
        kept = [e for e in expert if e >= 0] if expert is not None else None
        if kept == []:
            continue  # only empty slots here: nothing to load
        prefix = f"optim{index}/{name}" + (f":{kept[0]}" if kept is not None else "") + "/"
        state = {}
        for key, meta in saved.items():
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
                shape = tuple(meta.size)
                if len(shape) == held.ndim - (kept is not None):
                    shape = tuple(held.shape)  # shaped like the stored tensor (per expert; maybe another shard)
                # per-parameter scalars (Adam's step) live on the CPU, as torch.optim keeps them
                device = held.device if shape else torch.device("cpu")
                state[key[len(prefix) :]] = torch.zeros(shape, dtype=meta.properties.dtype, device=device)
        if state:
            optimizer.state[held] = state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _first_message(message: str | None) -> str | None:
    """The first rank's message among the ranks that have one, None if none has (collective)."""
    if not dist.is_initialized():
        return message
    box: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(box, message)
    return next((m for m in box if m is not None), None)


def _describe(err: BaseException) -> str:
    """One line for an error; for DCP's CheckpointException, the first failing rank's underlying error."""
    if isinstance(err, CheckpointException) and err.failures:
        rank = min(err.failures)
        cause = err.failures[rank]
        cause = cause[0] if isinstance(cause, tuple) else cause
        return f"rank {rank}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _broadcast_path(path: Path) -> Path:
    if not dist.is_initialized():
        return path
    box = [str(path)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _is_checkpoint(path: Path) -> bool:
    return (path / META).is_file() and (path / ".metadata").is_file()


def save(
    path: str | Path, module: nn.Module, optimizers: list[Optimizer], meta: dict[str, Any], stored: Stored = unsharded
) -> None:
    """Collective save (`stored`: how each parameter is stored, see Sharding). Written to a temporary folder that
    replaces `path` by renames only, so a crash at any point leaves the old or the new checkpoint whole (under its
    name or, until `recover` runs, a working name). A failed save removes its temporary folder. An existing `path`
    that is not a checkpoint is refused, not overwritten."""
    path = _broadcast_path(Path(path))
    if path.exists() and not _is_checkpoint(path):
        raise ConfigError(f"checkpoint path {str(path)!r} exists and is not a smartmoe checkpoint; refusing to replace it")
    tmp = _broadcast_path(path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        dcp.save(_all_tensors(module, optimizers, stored), checkpoint_id=tmp)
        if rank == 0:
            meta = dict(meta, optimizer_hparams=[[_hparams(g) for g in opt.param_groups] for opt in optimizers])
            torch.save(meta, tmp / META)
        _barrier()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # every surviving rank tries: the one that made it may be gone
        raise
    if rank == 0:
        old = tmp.with_suffix(".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    _barrier()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's non-tensor state (loops, schedulers, placements, ...)."""
    path = Path(path)
    if not (path / META).is_file():
        raise ConfigError(f"ckpt_path={str(path)!r} is not a smartmoe checkpoint folder (no {META})")
    try:
        return torch.load(path / META, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigError(f"ckpt_path={str(path)!r}: {META} could not be read: {err}") from err


def load(
    path: str | Path, module: nn.Module, optimizers: list[Optimizer], meta: dict[str, Any], stored: Stored = unsharded
) -> dict[str, Any]:
    """Collective load into the live module and optimizers; `meta` is `read_meta(path)`. Returns the metadata
    for Lightning."""
    path = Path(path)
    try:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        for i, opt in enumerate(optimizers):
            _init_optimizer_state(module, opt, i, saved, stored)
        tensors = _all_tensors(module, optimizers, stored)
        missing = sorted(k for k in tensors if k not in saved)
        # every rank raises the same error, so none waits in dcp.load for the others
        problem = _first_message(f"lacks tensors this model needs: {len(missing)}, e.g. {missing[:3]}" if missing else None)
        if problem is not None:
            raise ConfigError(f"ckpt_path={str(path)!r} {problem}")
        dcp.load(tensors, checkpoint_id=path)
    except ConfigError:
        raise
    except (Exception, CheckpointException) as err:  # a damaged file surfaces as many different errors
        raise ConfigError(f"ckpt_path={str(path)!r} could not be read: {_describe(err)}") from err
    for opt, groups in zip(optimizers, meta.pop("optimizer_hparams", [])):
        for group, saved_group in zip(opt.param_groups, groups):
            group.update(_hparams(saved_group))
    return meta


def validate(path: str | Path, module: nn.Module) -> dict[str, Any]:
    """Check, in one process and before any rank starts, that checkpoint folder `path` loads into `module` (the
    whole model, every expert in its own slot): `meta.pt` and `.metadata` are readable, every shard file the
    metadata names is there and long enough, every tensor the model needs is present with the model's shape, no
    model tensor is left over, and optimizer state is shaped like its parameter. Raises ConfigError naming the
    first bad file or tensor. Returns the metadata."""
    path = Path(path)
    where = f"ckpt_path={str(path)!r}"
    meta = read_meta(path)
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as err:
        raise ConfigError(f"{where}: .metadata could not be read: {_describe(err)}") from err
    sizes: dict[str, int | None] = {}
    for index, info in metadata.storage_data.items():
        if info.relative_path not in sizes:
            shard = path / info.relative_path
            sizes[info.relative_path] = shard.stat().st_size if shard.is_file() else None
        size, end = sizes[info.relative_path], info.offset + info.length
        if size is None:
            raise ConfigError(f"{where}: shard {info.relative_path} is missing (it holds {index.fqn})")
        if size < end:
            raise ConfigError(f"{where}: shard {info.relative_path} is truncated at {size} bytes; {index.fqn} needs bytes up to {end}")
    saved = metadata.state_dict_metadata
    want = {key: tuple(t.shape) for key, t in model_tensors(module).items()}
    for key, shape in want.items():
        if key not in saved:
            raise ConfigError(f"{where}: tensor {key} is missing; the model needs it with shape {list(shape)}")
        have = tuple(saved[key].size) if isinstance(saved[key], TensorStorageMetadata) else None
        if have != shape:
            raise ConfigError(f"{where}: tensor {key} has shape {list(have or ())} in the checkpoint; the model needs {list(shape)}")
    for key, item in saved.items():
        if key.startswith("model/") and key not in want:
            raise ConfigError(f"{where}: tensor {key} is not in this model (was it saved from another model config?)")
        if key.startswith("optim"):
            param = "model/" + key.split("/")[1]
            shape = tuple(item.size) if isinstance(item, TensorStorageMetadata) else None
            if param not in want or shape not in ((), want[param]):
                raise ConfigError(f"{where}: optimizer state {key} does not fit the model's {param} {list(want.get(param, ()))}")
    return meta


def newest(folder: str | Path) -> Path | None:
    """The most recently written complete checkpoint (`*.ckpt` folder with meta.pt and .metadata) in `folder`, or
    None."""
    folder = Path(folder)
    done = [p for p in folder.glob("*.ckpt") if _is_checkpoint(p)] if folder.is_dir() else []
    return max(done, key=lambda p: (p / META).stat().st_mtime_ns, default=None)


def recover(folder: str | Path) -> list[str]:
    """Finish or undo what interrupted saves left in `folder` (run by one process, before training starts): a
    complete temporary folder replaces the checkpoint it was written for (it is the newer save); incomplete ones
    and leftover old copies are removed; an old copy whose checkpoint is gone takes its name back. Returns what was
    done, one line each."""
    folder = Path(folder)
    done: list[str] = []
    if not folder.is_dir():
        return done
    for kind in ("tmp", "old"):
        for work in sorted(folder.iterdir()):
            match = _TEMPORARY.match(work.name)
            if not match or match["kind"] != kind or not work.is_dir():
                continue
            target = folder / match["name"]
            if _is_checkpoint(work) and (kind == "tmp" or not target.exists()):
                if target.exists():
                    shutil.rmtree(target)
                work.rename(target)
                done.append(f"{work.name} -> {target.name}")
            else:
                shutil.rmtree(work)
                done.append(f"removed {work.name}")
    return done

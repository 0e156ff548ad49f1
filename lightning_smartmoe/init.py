"""Parameter initialisation that does not depend on the layout: meta-device construction, then each rank
materialises and fills only the tensors it keeps.

A module declares how each parameter is initialised with `normal_`, `zeros_` or `ones_` (which also fill a
parameter at once when it is not on the meta device, from torch's default generator, as nn.init would). After
the strategy has cut a meta-built model down to a rank's share, `materialize` allocates that share on the
rank's device and draws every declared value from its own generator, seeded by (seed, parameter name, logical
expert, block of rows): so any shard of any tensor gets the values the single-process model has there, whatever
the tensor-parallel split, pipeline stage or expert placement, and no rank ever allocates more than its share
plus one block of rows. Parameters without a declaration are initialised by their module's
`reset_parameters()`, under a generator seeded by (seed, module name).
"""

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_RULE = "smartmoe_init"
_BLOCK_ELEMENTS = 1 << 20  # rows are drawn in blocks of about this many elements


@dataclass(frozen=True)
class InitRule:
    kind: str  # "normal", "zeros" or "ones"
    std: float = 0.0


def _declare(p: Tensor, rule: InitRule) -> Tensor:
    setattr(p, _RULE, rule)
    if not p.is_meta:
        with torch.no_grad():
            if rule.kind == "normal":
                nn.init.normal_(p, std=rule.std)
            else:
                p.fill_(1.0 if rule.kind == "ones" else 0.0)
    return p


def normal_(p: Tensor, std: float) -> Tensor:
    """Declare (and, off the meta device, apply) N(0, std^2) initialisation of p."""
    return _declare(p, InitRule("normal", std))


def zeros_(p: Tensor) -> Tensor:
    return _declare(p, InitRule("zeros"))


def ones_(p: Tensor) -> Tensor:
    return _declare(p, InitRule("ones"))


def _seed(*parts: object) -> int:
    """A stable 63-bit seed from the parts (Python's hash() differs between processes)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw(rule: InitRule, shape: tuple[int, ...], seed: int, name: str, expert: int | None,
         region: tuple[slice, ...]) -> Tensor:
    """The values of `region` of a logical tensor of `shape` (one expert's, for a stacked expert tensor), on
    the CPU in float32. Rows (dim 0) are drawn in blocks, each from a generator of its own, so any region costs
    at most one block beyond itself."""
    rows = region[0]
    size = tuple(len(range(*s.indices(n))) for s, n in zip(region, shape))
    if rule.kind != "normal":
        return torch.full(size, 1.0 if rule.kind == "ones" else 0.0)
    row_elements = math.prod(shape[1:])
    block = max(1, _BLOCK_ELEMENTS // max(1, row_elements))
    start, stop, _ = rows.indices(shape[0])
    parts = []
    for b in range(start // block, -(-stop // block)):
        first, last = b * block, min((b + 1) * block, shape[0])
        gen = torch.Generator().manual_seed(_seed(seed, name, expert, b))
        values = torch.empty((last - first, *shape[1:])).normal_(0.0, rule.std, generator=gen)
        parts.append(values[max(start, first) - first : min(stop, last) - first])
    out = torch.cat(parts) if parts else torch.empty((0, *shape[1:]))
    return out[(slice(None), *region[1:])]


def _tp_region(p: Tensor, shape: tuple[int, ...], dim: int | None, tp_rank: int) -> tuple[slice, ...]:
    """The region of the logical tensor of `shape` that this rank's shard p (of `shape` except along dim) holds."""
    region = [slice(0, n) for n in shape]
    if dim is not None:
        region[dim] = slice(tp_rank * p.shape[dim], (tp_rank + 1) * p.shape[dim])
    return tuple(region)


Values = Callable[[str, int | None, tuple[int, ...], tuple[slice, ...]], Tensor]
"""(logical tensor name, logical expert or None, its logical shape, region of it) -> the region's values."""


def fill_(p: Tensor, values: Values, name: str, tp_rank: int = 0, tp_size: int = 1,
          expert_ids: list[int] | None = None) -> None:
    """Fill the materialised parameter p (this rank's shard of logical tensor `name`) with `values` of its region.

    p may be a tensor-parallel shard (`tp_shard_dim`, of `tp_size` equal shards) and, with `expert_ids`, a stack
    [slots, ...] of experts (slot i holds logical expert expert_ids[i]; -1: an empty slot, filled with zeros).
    """
    dim = getattr(p, "tp_shard_dim", None)
    with torch.no_grad():
        if expert_ids is None:
            shape = tuple(n * tp_size if i == dim else n for i, n in enumerate(p.shape))
            p.copy_(values(name, None, shape, _tp_region(p, shape, dim, tp_rank)))
            return
        expert_dim = None if dim is None else dim - 1
        shape = tuple(n * tp_size if i == expert_dim else n for i, n in enumerate(p.shape[1:]))
        for slot, expert in enumerate(expert_ids):
            if expert < 0:
                p[slot].zero_()
            else:
                p[slot].copy_(values(name, expert, shape, _tp_region(p[slot], shape, expert_dim, tp_rank)))


def new_parameter(data: Tensor, like: nn.Parameter) -> nn.Parameter:
    """A Parameter holding `data` that keeps what `like` declares (init rule, tp_shard_dim, tp_partial), for a
    shard or a selection of `like`."""
    new = nn.Parameter(data, requires_grad=like.requires_grad)
    new.__dict__.update(like.__dict__)
    return new


def _materialize_tensor(t: Tensor, device: torch.device) -> Tensor:
    new = torch.empty_like(t, device=device)
    if isinstance(t, nn.Parameter):
        return new_parameter(new, t)
    new.__dict__.update(t.__dict__)  # a buffer's init rule
    return new


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def materialize(module: nn.Module, device: torch.device, seed: int, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Allocate every meta parameter and buffer of `module` on `device` and initialise it (see the module
    docstring). The parameters of a module with `logical_ids` (GroupedExperts) are stacks of experts, slot i
    holding logical expert logical_ids[i]. Tensors already materialised are left alone. Raises ValueError naming
    a module whose meta tensors nothing can initialise."""
    done: dict[int, Tensor] = {}  # a tensor shared by several modules (tied weights) stays shared
    for mod_name, mod in module.named_modules():
        names = [n for n, t in (*mod._parameters.items(), *mod._buffers.items()) if t is not None and t.is_meta]
        if not names:
            continue
        for n in names:
            slot = mod._parameters if n in mod._parameters else mod._buffers
            old = slot[n]
            if id(old) not in done:
                done[id(old)] = _materialize_tensor(old, device)
            slot[n] = done[id(old)]
        undeclared = [n for n in names if getattr(getattr(mod, n), _RULE, None) is None]
        if undeclared:
            reset = getattr(mod, "reset_parameters", None)
            if not callable(reset):
                raise ValueError(
                    f"{mod_name or type(module).__name__}.{undeclared[0]} was built on the meta device, but neither an "
                    f"init rule (lightning_smartmoe.init) nor {type(mod).__name__}.reset_parameters() initialises it"
                )
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(_seed(seed, mod_name))
                reset()
        for n in names:
            t = getattr(mod, n)
            rule = getattr(t, _RULE, None)
            if rule is not None:
                full = f"{mod_name}.{n}" if mod_name else n
                drawn = lambda name, expert, shape, region, rule=rule: draw(rule, shape, seed, name, expert, region)  # noqa: E731
                fill_(t, drawn, full, tp_rank, tp_size, getattr(mod, "logical_ids", None))


def load_(module: nn.Module, values: Values, tp_rank: int = 0, tp_size: int = 1, skip: Callable[[str], bool] = lambda n: False) -> None:
    """Overwrite every parameter of `module` (this rank's share of it, names relative to `module`) with `values`
    of its region, except those whose name `skip` accepts (e.g. to load another model's weights: each rank reads
    only what it keeps)."""
    for mod_name, mod in module.named_modules():
        for n, t in mod._parameters.items():
            full = f"{mod_name}.{n}" if mod_name else n
            if t is not None and not skip(full):
                fill_(t, values, full, tp_rank, tp_size, getattr(mod, "logical_ids", None))

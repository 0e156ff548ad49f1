"""What the cost model knows about a machine: compute rates, collective fits, memory. Either measured by
smartmoe-profile (a YAML calibration file) or a built-in profile of datasheet figures.

Collectives are fitted per operation, scope (`intra`: the group's ranks share a node; `inter`: they span nodes)
and group size n as t = latency_s + payload / bytes_per_s, the payload being each rank's input: the tensor of an
all-reduce, the local shard of an all-gather, the local full input of a reduce-scatter, the local send buffer of
an all-to-all, the message of a point-to-point send. The algorithm (ring factors such as 2 (n - 1) / n) is inside
the fitted rate, so nothing about it is assumed. A profile of one device has no collective fits (`collectives` is
empty): it prices one rank only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import yaml

from lightning_smartmoe.errors import ConfigError

OPS = ("all_to_all", "all_reduce", "all_gather", "reduce_scatter", "p2p")
SCOPES = ("intra", "inter")
T = TypeVar("T")


@dataclass(frozen=True)
class Link:
    latency_s: float
    bytes_per_s: float

    def time(self, payload: float) -> float:
        """Seconds of one collective whose per-rank payload is `payload` bytes (0 bytes: nothing sent)."""
        return 0.0 if payload <= 0 else self.latency_s + payload / self.bytes_per_s


@dataclass(frozen=True)
class Hardware:
    """One device kind and its interconnect.

    gemm_flops: dense matrix-multiply FLOP/s at transformer shapes, forward and backward alike.
    expert_flops: expert FFN FLOP/s on large groups of rows; expert_group_s: seconds each non-empty expert group
        adds per forward + backward (small groups run slower per row: this is where it shows).
    attention_flops: FLOP/s of the attention core (scores and weighted sum).
    optimizer_s_per_param: seconds of the optimizer step per parameter it steps: AdamW, after gradient clipping
        where training clips (the gradients' norm and their scaling).
    collectives[op][scope][n]: the Link fit of `op` on a group of n ranks (empty: none measured, one device).
    layer_s, layer_token_s: the seconds of a layer's forward + backward per micro-batch that the rates above do not
        price (norms, activations, softmax, routing, permutes, the framework's per-op dispatch), fixed and per token;
    ends_s, ends_token_s: the same of the embedding, the final norm and the loss, once per micro-batch.
    sharing: how many times longer a rank's compute takes when every rank of its node computes at once than when
        it computes alone: 1 where each rank has a device of its own; on a CPU with more processes than cores
        about processes / cores. The rates above are the all-busy ones.
    dispatch_s[n]: the seconds per MoE layer and micro-batch, forward + backward, that dispatching over an
        expert-parallel group of n ranks adds beyond what the all-to-all fits price (the host read of the split
        sizes, the re-sort of the received rows, the blocking calls' hand-offs): measured on the node's groups by
        smartmoe-profile at the model's shapes; empty (nothing added) for built-in profiles and one device.
    sync_s, sync_work_s: where ranks share the node's cores, they reach a collective from their compute at
        different times (the scheduler ran some longer than others), and the first wait for the last beyond the
        collective's own time: after work_s seconds of compute (at the all-busy rate) sync_s x work_s / (work_s +
        sync_work_s), measured by smartmoe-profile; 0 (nothing added) where each rank has a core or a device.
    """

    name: str
    source: str  # "measured ..." or "datasheet ..."
    gpus_per_node: int
    memory_gb: float
    gemm_flops: float
    expert_flops: float
    expert_group_s: float
    attention_flops: float
    optimizer_s_per_param: float
    collectives: dict[str, dict[str, dict[int, Link]]] = field(default_factory=dict)
    layer_s: float = 0.0
    layer_token_s: float = 0.0
    ends_s: float = 0.0
    ends_token_s: float = 0.0
    sharing: float = 1.0
    dispatch_s: dict[int, float] = field(default_factory=dict)
    sync_s: float = 0.0
    sync_work_s: float = 0.0

    def layer_overhead(self, tokens: float) -> float:
        return self.layer_s + self.layer_token_s * tokens

    def ends_overhead(self, tokens: float) -> float:
        return self.ends_s + self.ends_token_s * tokens

    def sync_wait(self, work_s: float) -> float:
        """Seconds a collective reached after `work_s` seconds of compute waits for the node's ranks that share its
        cores, beyond its own time (see the class doc)."""
        if self.sync_s == 0 or work_s <= 0:
            return 0.0
        return self.sync_s * work_s / (work_s + self.sync_work_s)

    def dispatch(self, n: int) -> float:
        """dispatch_s of an expert-parallel group of n ranks: the nearest measured size at or above n, else the
        largest; 0 for one rank or where nothing was measured."""
        return 0.0 if n < 2 or not self.dispatch_s else _nearest(self.dispatch_s, n)

    @property
    def scopes(self) -> list[str]:
        """The scopes (of SCOPES) that every op has fits of; none for a profile of one device."""
        return [s for s in SCOPES if self.collectives and all(s in scopes for scopes in self.collectives.values())]

    def link(self, op: str, n: int, inter: bool = False) -> Link:
        """The fit of `op` on n ranks (inter: spanning nodes; a scope without fits takes the other's); the nearest
        measured size at or above n, else the largest (a fit measured on fewer ranks is optimistic, which the name
        says). ConfigError if there is no fit of `op` (a profile of one device)."""
        if n < 2:
            return Link(0.0, math.inf)
        scopes = self.collectives.get(op)
        if not scopes:
            raise ConfigError(f"hardware {self.name!r} ({self.source}) has no fit of {op} on {n} ranks: it was "
                              "profiled on one device; profile on >= 2 devices, or on one with smartmoe-profile's "
                              f"collectives_from={'|'.join(BUILTIN)}|FILE")
        wanted = "inter" if inter else "intra"
        return _nearest(scopes[wanted] if wanted in scopes else next(iter(scopes.values())), n)

    def calibrated(self, expert_flops: float, link_bytes_per_s: float | None = None, group_sizes: tuple[int, ...] = (2,)) -> Hardware:
        """This machine with the expert FFN rate, and optionally the all-to-all and point-to-point links of the given
        group sizes, replaced by figures measured in place (placement.calibrate: no latency term, one scope)."""
        changes: dict = {"name": f"{self.name} (calibrated)", "expert_flops": expert_flops}
        if link_bytes_per_s is not None:
            fits = {n: Link(0.0, link_bytes_per_s) for n in group_sizes}
            changes["collectives"] = {**self.collectives, **{op: {"intra": fits} for op in ("all_to_all", "p2p")}}
        return replace(self, **changes)

    def to_yaml(self, path: str | Path) -> None:
        data = asdict(self)
        data["collectives"] = {op: {scope: {n: [l.latency_s, l.bytes_per_s] for n, l in fits.items()}
                                    for scope, fits in scopes.items()} for op, scopes in self.collectives.items()}
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def _nearest(by_size: dict[int, T], n: int) -> T:
    """The entry of the nearest group size at or above n, else of the largest."""
    sizes = sorted(by_size)
    above = [s for s in sizes if s >= n]
    return by_size[above[0] if above else sizes[-1]]


_NUMBERS = ("memory_gb", "gemm_flops", "expert_flops", "expert_group_s", "attention_flops", "optimizer_s_per_param")
_SECONDS = ("layer_s", "layer_token_s", "ends_s", "ends_token_s", "sync_s", "sync_work_s")  # optional (older files: 0)
_OPTIONAL = (*_SECONDS, "sharing", "dispatch_s")  # older files: their defaults


def from_dict(data: object, where: str) -> Hardware:
    """A checked Hardware from a mapping (a calibration file's content); ConfigError naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a hardware calibration must be a mapping of fields, got {type(data).__name__}")
    fields = {f for f in Hardware.__dataclass_fields__}
    missing = sorted(fields - set(data) - set(_OPTIONAL))
    if missing:
        raise ConfigError(f"{where}: field {missing[0]!r} is missing; a calibration has {', '.join(sorted(fields))}")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: field {unknown[0]!r} is unknown; allowed: {', '.join(sorted(fields))}")
    for key in ("name", "source"):
        if not isinstance(data[key], str):
            raise ConfigError(f"{where}: {key}={data[key]!r} must be a string")
    if isinstance(data["gpus_per_node"], bool) or not isinstance(data["gpus_per_node"], int) or data["gpus_per_node"] < 1:
        raise ConfigError(f"{where}: gpus_per_node={data['gpus_per_node']!r} must be an integer >= 1")
    for key in _NUMBERS + tuple(k for k in _SECONDS if k in data):
        value = data[key]
        zero_ok = key in ("expert_group_s", *_SECONDS)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(f"{where}: {key}={value!r} must be a finite number {'>= 0' if zero_ok else '> 0'}")
    sharing = data.get("sharing", 1.0)
    if isinstance(sharing, bool) or not isinstance(sharing, int | float) or not 1 <= sharing < math.inf:
        raise ConfigError(f"{where}: sharing={sharing!r} must be a finite number >= 1")
    dispatch = data.get("dispatch_s", {})
    if not isinstance(dispatch, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 2 and isinstance(t, int | float)
            and not isinstance(t, bool) and math.isfinite(t) and t >= 0 for n, t in dispatch.items()):
        raise ConfigError(f"{where}: dispatch_s={dispatch!r} must map group sizes >= 2 to seconds >= 0")
    collectives = data["collectives"]
    if not isinstance(collectives, dict) or (collectives and sorted(collectives) != sorted(OPS)):
        raise ConfigError(f"{where}: collectives must map exactly {', '.join(OPS)} to their fits, or be empty {{}} "
                          "(a profile of one device)")
    parsed: dict[str, dict[str, dict[int, Link]]] = {}
    for op, scopes in collectives.items():
        if not isinstance(scopes, dict) or not scopes or not set(scopes) <= set(SCOPES):
            raise ConfigError(f"{where}: collectives.{op} must map 'intra', 'inter' or both to fits by group size")
        parsed[op] = {}
        for scope, fits in scopes.items():
            if not isinstance(fits, dict) or not fits:
                raise ConfigError(f"{where}: collectives.{op}.{scope} must map group sizes to [latency_s, bytes_per_s]")
            parsed[op][scope] = {}
            for n, fit in fits.items():
                ok = (isinstance(n, int) and not isinstance(n, bool) and n >= 2 and isinstance(fit, list | tuple)
                      and len(fit) == 2 and all(isinstance(x, int | float) and not isinstance(x, bool) for x in fit)
                      and fit[0] >= 0 and fit[1] > 0)
                if not ok:
                    raise ConfigError(f"{where}: collectives.{op}.{scope}.{n}={fit!r}: need a group size >= 2 mapped to "
                                      "[latency_s >= 0, bytes_per_s > 0]")
                parsed[op][scope][n] = Link(float(fit[0]), float(fit[1]))
    values = {k: data[k] for k in fields if k not in ("collectives", "dispatch_s") and k in data}
    return Hardware(**values, collectives=parsed, dispatch_s={n: float(t) for n, t in dispatch.items()})


def load(path: str | Path, key: str = "hardware") -> Hardware:
    """A calibration file written by smartmoe-profile; ConfigError naming `key` if unreadable or malformed."""
    where = f"{key}={str(path)!r}"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; give a built-in name ({', '.join(BUILTIN)}) or a smartmoe-profile file") from None
    except OSError as err:
        raise ConfigError(f"{where}: not a readable YAML calibration: {err}") from None
    except yaml.YAMLError as err:  # its message spans lines: the problem and where it is
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not a readable YAML calibration: {getattr(err, 'problem', None) or err}{at}") from None
    return from_dict(data, where)


def _datasheet(name: str, flops: float, hbm_bytes_per_s: float, memory_gb: float, nvlink_bytes_per_s: float,
               nic_bytes_per_s: float) -> Hardware:
    """A profile from datasheet peaks, not measurements: every rate is the vendor's peak (no efficiency factor),
    NVLink and NIC bandwidths per direction per GPU, collectives by ring algebra over them with 10 us (NVLink)
    and 20 us (network) per call; AdamW's step reads and writes 28 bytes per parameter at the HBM rate."""

    def ring(bandwidth: float, latency: float) -> dict[str, dict[int, Link]]:
        sizes = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        factor = {"all_to_all": lambda n: (n - 1) / n, "all_reduce": lambda n: 2 * (n - 1) / n,
                  "all_gather": lambda n: n - 1, "reduce_scatter": lambda n: (n - 1) / n, "p2p": lambda n: 1.0}
        return {op: {n: Link(latency, bandwidth / f(n)) for n in sizes} for op, f in factor.items()}

    intra, inter = ring(nvlink_bytes_per_s, 10e-6), ring(nic_bytes_per_s, 20e-6)
    collectives = {op: {"intra": intra[op], "inter": inter[op]} for op in OPS}
    return Hardware(
        name=name, source=f"datasheet peaks of the {name.upper()} (not measured); collectives by ring algebra",
        gpus_per_node=8, memory_gb=memory_gb, gemm_flops=flops, expert_flops=flops, expert_group_s=0.0,
        attention_flops=flops, optimizer_s_per_param=28 / hbm_bytes_per_s, collectives=collectives,
    )


BUILTIN = {  # SXM parts, bf16 dense tensor-core peak, HBM, NVLink per direction, one 400/200 Gb/s NIC per GPU
    "h100": _datasheet("h100", 989e12, 3.35e12, 80, 450e9, 50e9),
    "h200": _datasheet("h200", 989e12, 4.8e12, 141, 450e9, 50e9),
    "a100": _datasheet("a100", 312e12, 2.0e12, 80, 300e9, 25e9),
}


def resolve(name_or_path: str, key: str = "hardware") -> Hardware:
    """`hardware=` (or another `key`): a built-in name or a smartmoe-profile calibration file."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    return load(name_or_path, key)

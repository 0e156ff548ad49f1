"""The one cost model: a layout's predicted step time, term by term, and its memory (planner.memory), from the
model config, the layout, the expert placement, the per-expert load and the machine (planner.hardware).

Per micro-batch, each pipeline stage's ranks run their layers forward and backward (3x a forward's FLOPs; full
recomputation adds a forward of each block, selective one of the attention core):
  dense      attention projections, dense FFN layers, shared experts (their weights counted from the model, so
             grouped-query and latent attention and SwiGLU are priced as built), router and LM head:
             FLOPs / gemm_flops (1/tp each);
  attention  the attention core (S x the heads' query-key + value widths FLOPs per token forward, causal):
             / attention_flops;
  experts    the busiest rank of each MoE layer's expert-parallel group under its placement: its rows x the
             FLOPs per row / expert_flops + its non-empty slots x expert_group_s;
  all_to_all each MoE layer's dispatch and combine, forward and backward (again when recomputed), each as long as
             the busiest rank's traffic: max(rows it receives from others, rows it sends away) x d x bytes; plus
             the dispatcher's work around them that no fit prices (hardware.dispatch(ep), per micro-batch);
  tp         the tensor-parallel all-reduces (all-gathers and reduce-scatters under sequence parallelism) of each
             layer, the embedding's, the MoE layer's token gather;
  p2p        a pipeline stage's sends of activations forward and their gradients backward;
  overhead   each layer's forward + backward work that no rate above prices (hardware.layer_overhead) and, on the
             last stage, the embedding's, final norm's and loss's (hardware.ends_overhead);
  control    the latency-bound collectives that synchronise the ranks: per MoE layer the router's counts
             all-reduced over the stage's tokens (for the aux loss) and the all-to-all of the dispatch's row counts;
  sync       where ranks share their node's cores: the wait at each collective a rank reaches from its own compute
             (the router's counts, the all-to-alls after expert and downstream compute, every tensor-parallel
             collective, each pipeline send) for the ranks the scheduler ran less (hardware.sync_wait of the stage's
             compute per such collective);
A step is the pipeline of those stage times over the micro-batches: m x (the slowest stage) plus the bubble
(the other stages once, /virtual stages for interleaved 1F1B), times the accumulation steps; then
  grad_sync  each stage's gradient all-reduce (reduce-scatter at ZeRO 2) over its data-parallel groups, the part
             the last micro-batch's backward cannot hide (at least the last bucket's); a head tied to the embedding
             under pp then sums the first and last stages' gradients of it;
  replicas   the replicated experts' gradient exchange (placement/replica_sync.py), net of what later MoE
             layers' backward hides when it overlaps;
  zero       the all-gather of the updated ZeRO blocks after the step;
  optimizer  the optimizer step (gradient clipping and AdamW, as profiled) over what this rank steps;
  control    (again, per step) the world's scalar all-reduces: the loss the module reduces, the
             gradient-clipping norm, the stop-signal check, Lightning's stop-flag broadcast; under
             pipelining the loss's broadcast over the stages (each at all_reduce prices). The MoE statistics'
             pair runs only every trainer.log_every_n_steps steps and is left out;
  sync       (again, per step) the wait at those and at each gradient reduction, as above;
  migration  the seconds a placement policy spends moving experts, per step (from a simulation over the load).
Every rank of a stage runs the same dense work, so the stage time is its ranks' common work plus its busiest
expert-parallel rank's.

Ranks that share their node's cores (Hardware.sharing > 1: more processes than cores, as on a small CPU box) run
`sharing` times faster while others wait than when all compute, and the rates are the all-busy ones. So an MoE
layer's experts take the longer of the busiest rank's compute / sharing and the ranks' mean; a pipeline takes the
longer of its span (m x the slowest stage plus the bubble) / sharing and m x the stages' mean (its stages run
alone through the bubble); and no collective hides under the backward, whose ranks keep every core busy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.models import ModelConfig
from lightning_smartmoe.planner.hardware import Hardware, Link
from lightning_smartmoe.planner.memory import (
    PARAM_DTYPES, Layout, ModelTable, RankMemory, activation_bytes, largest, state_bytes,
)

_INDEX = 8


def _attention_width(cfg: ModelConfig) -> int:
    """Per token, the query-key plus value widths over all heads: the attention core is S x this FLOPs per token
    forward, causal (GPT-MoE and grouped-query attention: 2 x heads x head size; latent attention: its own dims)."""
    if getattr(cfg, "attention", "mha") == "mla":
        return cfg.n_heads * (cfg.mla_qk_nope_head_dim + cfg.mla_qk_rope_head_dim + cfg.mla_v_head_dim)
    return 2 * cfg.n_heads * getattr(cfg, "head_size", cfg.d_model // cfg.n_heads)


def itemsizes(precision: str) -> tuple[int, int]:
    """(bytes per activation element, bytes per weight / gradient / optimizer-state element the optimizer steps)
    under a Lightning precision: mixed precisions compute in 16 bits and step fp32."""
    precision = str(precision)
    if precision in PARAM_DTYPES:
        master = PARAM_DTYPES[precision].itemsize
        return (2 if precision.startswith("bf16") else master), master
    half = precision.startswith(("16", "bf16"))
    return (2 if half else 4), (2 if precision.endswith("-true") and half else 4)


def activation_itemsize(precision: str) -> int:
    return itemsizes(precision)[0]


@dataclass(frozen=True)
class Scopes:
    """Whether each group of a layout spans nodes (ranks are laid out (pp, dp, tp), tp fastest)."""

    sizes: ParallelSizes
    gpus_per_node: int

    def _inter(self, span: int) -> bool:
        return span > self.gpus_per_node

    @property
    def tp(self) -> bool:
        return self._inter(self.sizes.tp)

    @property
    def dp(self) -> bool:  # same tp rank, consecutive dp ranks: they span dp * tp ranks
        return self._inter(self.sizes.plane)

    @property
    def ep(self) -> bool:  # consecutive plane indices (dp ranks with expert_tp)
        return self._inter(self.sizes.ep * (self.sizes.tp if self.sizes.expert_tp else 1))

    @property
    def edp(self) -> bool:
        return self._inter(self.sizes.plane)

    @property
    def pp(self) -> bool:  # a stage's peer is plane ranks away; some boundary crosses nodes once the stages do
        return self.sizes.plane >= self.gpus_per_node or self._inter(self.sizes.pp * self.sizes.plane)

    @property
    def ends(self) -> bool:  # the first and the last stage's peers: (pp - 1) planes apart
        return self._inter(self.sizes.world_size)


@dataclass(frozen=True)
class RankLoads:
    """Per rank of an expert-parallel group under one placement and load: rows computed, experts held, and the
    replica-gradient copies it sends inside its node and across nodes (2 (r - 1) / r per replicated expert)."""

    rows: tuple[float, ...]
    slots: tuple[int, ...]
    intra: tuple[float, ...]
    inter: tuple[float, ...]
    total: float


@dataclass(frozen=True)
class ExpertLayerCost:
    """The seconds per optimizer step of one MoE layer that depend on where its experts are, for one
    expert-parallel group of `ep` ranks; `load` arguments are rows per step computed by each expert (tokens
    routed to it, summed over the group and the step's micro-batches).

    row_s: expert forward + backward (+ recomputation) per row; group_s: per non-empty slot per step.
    a2a: the group's all-to-all fit, `calls` calls per step (per micro-batch dispatch and combine, forward and
        backward, and the recomputed forward's two), each moving one micro-batch's share of the busiest rank's
        traffic (rows x row_bytes / micro).
    exchange, exchange_inter: the replica-gradient links inside a node and across nodes
        (placement/replica_sync.py: each replica of an expert with r replicas sends 2 (r - 1) / r of its gradient
        of grad_bytes, half in each of two phases, point to point among the replicas' ranks; an expert whose
        replicas all sit on one node's `ranks_per_node` consecutive ranks of the group exchanges inside it); under
        the overlapped exchange the first `hidden_phases` phases hide under one later MoE layer's backward each,
        taken as 2/3 of this layer's compute in the last of the step's `micro` micro-batches.
    state_bytes: bytes one migrated expert sends (weights and optimizer state), in one all-to-all over `move`
        inside a node and `move_inter` across nodes.
    sharing: Hardware.sharing: row_s and group_s are rates with every rank of the node computing; a rank that
        computes while the others wait runs `sharing` times faster, so the layer's compute is the longer of the
        busiest rank's at that speed and the ranks' mean.
    """

    ep: int
    row_s: float
    group_s: float = 0.0
    a2a: Link = Link(0.0, math.inf)
    calls: int = 4
    row_bytes: float = 0.0
    exchange: Link = Link(0.0, math.inf)
    exchange_inter: Link | None = None  # None: the same as `exchange`
    ranks_per_node: int = 1 << 30
    grad_bytes: float = 0.0
    hidden_phases: int = 0
    micro: int = 1
    state_bytes: float = 0.0
    move: Link = Link(0.0, math.inf)
    move_inter: Link | None = None  # None: the same as `move`
    sharing: float = 1.0

    def __post_init__(self) -> None:
        sharing = self.sharing
        if isinstance(sharing, bool) or not isinstance(sharing, int | float) or not 1 <= sharing < math.inf:
            raise ValueError(f"cost.sharing={self.sharing!r} must be a finite number >= 1")
        for key in ("row_s", "group_s", "row_bytes", "grad_bytes", "state_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 or math.isinf(value):
                raise ValueError(f"cost.{key}={value!r} must be a finite number >= 0")
        for key, low in (("ep", 1), ("calls", 0), ("micro", 1), ("hidden_phases", 0), ("ranks_per_node", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"cost.{key}={value!r} must be an integer >= {low}")

    def _a2a(self, rows: Sequence[float], total: float) -> float:
        """All-to-all seconds per step: rank r receives its rows from the others ((ep - 1) / ep of them) and sends
        away the share of its own tokens (total / ep) routed to the other ranks' slots."""
        if self.ep == 1 or total <= 0:
            return 0.0
        # receiving grows with a rank's rows, sending shrinks: the busiest is the most or the least loaded rank
        busiest = max(max(rows) * (self.ep - 1) / self.ep, total / self.ep * (1 - min(rows) / total))
        return self.calls * self.a2a.time(busiest * self.row_bytes / self.micro)

    def _phase(self, copies: float, inter_copies: float) -> float:
        """Seconds of one phase of the replica exchange of a rank sending `copies` experts' gradients inside its node
        and `inter_copies` across nodes (see the class doc), half of them in each phase."""
        inter = self.exchange_inter or self.exchange
        return self.exchange.time(copies / 2 * self.grad_bytes) + inter.time(inter_copies / 2 * self.grad_bytes)

    def _exposed(self, phase: float, compute: float) -> float:
        """Exposed seconds of the two phases of `phase` seconds each (see the class doc); non-decreasing in phase."""
        hide = 2 / 3 * compute / self.micro
        return sum(max(0.0, phase - hide) if i < self.hidden_phases else phase for i in range(2))

    def rank_loads(self, rank_experts: Sequence[Sequence[int]], load: Sequence[float]) -> RankLoads:
        """What `terms` needs of a placement and a load: rank r holds the experts rank_experts[r], replicas split
        their load evenly, an expert whose replicas span nodes exchanges across them."""
        replicas = _replicas(rank_experts, len(load))
        spans = [False] * len(load)
        if self.ranks_per_node < len(rank_experts):
            first = [-1] * len(load)  # the node of each expert's first replica
            for r, experts in enumerate(rank_experts):
                node = r // self.ranks_per_node
                for e in experts:
                    if first[e] < 0:
                        first[e] = node
                    elif first[e] != node:
                        spans[e] = True
        share = [x / r if r else 0.0 for x, r in zip(load, replicas)]
        copies = [2 * (r - 1) / r if r > 1 else 0.0 for r in replicas]
        rows, intra, inter = [], [], []
        for experts in rank_experts:
            computed = inside = across = 0.0
            for e in experts:
                computed += share[e]
                if spans[e]:
                    across += copies[e]
                else:
                    inside += copies[e]
            rows.append(computed)
            intra.append(inside)
            inter.append(across)
        return RankLoads(tuple(rows), tuple(len(e) for e in rank_experts), tuple(intra), tuple(inter), float(sum(load)))

    def terms(self, rank_experts: Sequence[Sequence[int]], load: Sequence[float], scale: float = 1.0,
              loads: RankLoads | None = None) -> tuple[float, float, float]:
        """(expert compute, all-to-all, exposed replica exchange) seconds per step when rank r holds the experts
        rank_experts[r] and expert e computes load[e] x scale rows (`loads`: their rank_loads, if known): the
        busiest rank's compute, the busiest rank's traffic, the rank whose exchange is exposed longest."""
        loads = loads or self.rank_loads(rank_experts, load)
        rows = [r * scale for r in loads.rows]
        compute = self.compute_time([r * self.row_s + n * self.group_s for r, n in zip(rows, loads.slots)])
        phase = max(map(self._phase, loads.intra, loads.inter)) if any(loads.intra) or any(loads.inter) else 0.0
        exposed = self._exposed(phase, compute)
        return compute, self._a2a(rows, loads.total * scale), exposed

    def compute_time(self, rank_s: Sequence[float]) -> float:
        """Seconds until every rank has computed its `rank_s` seconds (at the all-busy rate): the busiest rank's
        alone (`sharing` times faster) or the ranks' mean, whichever is longer."""
        return max(max(rank_s) / self.sharing, sum(rank_s) / len(rank_s))

    def layout_time(self, rank_experts: Sequence[Sequence[int]], load: Sequence[float]) -> float:
        """Seconds per step when rank r holds the experts rank_experts[r] (the sum of `terms`)."""
        return sum(self.terms(rank_experts, load))

    def rows_bound(self, busiest: float) -> float:
        """A lower bound of layout_time over placements whose busiest rank computes `busiest` rows: that rank's
        compute (one slot at least) and its receiving (ep - 1) / ep of them; no exchange."""
        if busiest <= 0:
            return 0.0
        received = busiest * (self.ep - 1) / self.ep * self.row_bytes
        a2a = self.calls * self.a2a.time(received / self.micro) if self.calls else 0.0
        return (busiest * self.row_s + self.group_s) / self.sharing + a2a

    def ideal_time(self, load: Sequence[float]) -> float:
        """Perfect balance: every rank the mean rows and slots, balanced traffic, no replica exchange."""
        total, slots = sum(load), math.ceil(len(load) / self.ep)
        return total / self.ep * self.row_s + slots * self.group_s + self._a2a([total / self.ep] * self.ep, total)

    def migration_time(self, transfers: Sequence[tuple[int, int]]) -> float:
        """Seconds of one migration moving an expert (weights and optimizer state) along each (source rank,
        destination rank) of `transfers`: all of them in one all-to-all, as long as the rank that sends or receives
        the most, its same-node and cross-node bytes one after the other."""
        if not transfers:
            return 0.0
        inter_link = self.move_inter or self.move
        volume: dict[tuple[int, str, bool], int] = {}
        for src, dst in transfers:
            inter = src // self.ranks_per_node != dst // self.ranks_per_node
            for key in ((src, "send", inter), (dst, "recv", inter)):
                volume[key] = volume.get(key, 0) + 1
        ends = {(rank, way) for rank, way, _ in volume}
        return max(self.move.time(volume.get((rank, way, False), 0) * self.state_bytes)
                   + inter_link.time(volume.get((rank, way, True), 0) * self.state_bytes) for rank, way in ends)


def expert_layer_cost(hardware: Hardware, sizes: ParallelSizes, d_model: int, hidden: int, precision: str,
                      micro: int = 1, recompute: bool = False, hidden_phases: int = 0,
                      matrices: int = 2) -> ExpertLayerCost:
    """ExpertLayerCost of an MoE layer whose experts are d_model x `hidden` (this rank's share of each expert's hidden
    units) FFNs of `matrices` weight matrices (GELU 2, SwiGLU 3), on the expert-parallel group of `sizes`, `micro`
    micro-batches per step (recompute: each block's forward runs again in backward)."""
    scopes = Scopes(sizes, hardware.gpus_per_node)
    passes = 4 if recompute else 3  # forward + backward (2x), + the recomputed forward
    master = itemsizes(precision)[1]
    expert_params = matrices * d_model * hidden
    link = hardware.link("all_to_all", sizes.ep, scopes.ep)
    stride = sizes.tp if sizes.expert_tp else 1  # global ranks between consecutive ranks of the group
    per_node = max(1, hardware.gpus_per_node // stride)
    return ExpertLayerCost(
        ep=sizes.ep, row_s=passes * 2 * expert_params / hardware.expert_flops,  # 2 FLOPs per weight per row
        group_s=hardware.expert_group_s * passes / 3 * micro, a2a=link, calls=(6 if recompute else 4) * micro,
        row_bytes=d_model * activation_itemsize(precision), exchange=hardware.link("p2p", min(2, sizes.ep), False),
        exchange_inter=hardware.link("p2p", min(2, sizes.ep), True), ranks_per_node=per_node,
        grad_bytes=expert_params * master, micro=micro,
        hidden_phases=min(hidden_phases, 2) if hardware.sharing == 1 else 0,  # shared cores hide nothing
        state_bytes=expert_params * 3 * master,  # weight and AdamW's two moments
        move=hardware.link("all_to_all", min(sizes.ep, per_node), False), move_inter=link, sharing=hardware.sharing,
    )


def _work(stage: Breakdown) -> float:
    """A stage's compute seconds (at the all-busy rates)."""
    return stage.dense + stage.attention + stage.experts + stage.overhead


def _replicas(rank_experts: Sequence[Sequence[int]], num_experts: int) -> list[int]:
    replicas = [0] * num_experts
    for experts in rank_experts:
        for e in experts:
            replicas[e] += 1
    return replicas


TERMS = ("dense", "attention", "experts", "all_to_all", "tp", "p2p", "overhead", "control", "sync", "bubble",
         "grad_sync", "replicas", "zero", "optimizer", "migration")
_FIELDS = (*TERMS, "syncs")
_WORLD_SCALARS = 4  # per step: the loss's all-reduce, the clipping norm, the stop check, Lightning's broadcast


@dataclass(frozen=True)
class Breakdown:
    """Seconds per optimizer step by term (see the module docstring); the terms add up to `step_s`. `syncs` is a
    count, not a term: the collectives a rank reaches from its own compute, which `sync` prices."""

    dense: float = 0.0
    attention: float = 0.0
    experts: float = 0.0
    all_to_all: float = 0.0
    tp: float = 0.0
    p2p: float = 0.0
    overhead: float = 0.0
    control: float = 0.0
    sync: float = 0.0
    bubble: float = 0.0
    grad_sync: float = 0.0
    replicas: float = 0.0
    zero: float = 0.0
    optimizer: float = 0.0
    migration: float = 0.0
    syncs: float = 0.0

    @property
    def step_s(self) -> float:
        return sum(getattr(self, k) for k in TERMS)

    def scaled(self, factor: float) -> Breakdown:
        return Breakdown(*(getattr(self, k) * factor for k in _FIELDS))

    def __add__(self, other: Breakdown) -> Breakdown:
        return Breakdown(*(getattr(self, k) + getattr(other, k) for k in _FIELDS))

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in TERMS}


@dataclass(frozen=True)
class LayerPlacement:
    """One MoE layer as the step sees it: the experts each rank of its expert-parallel group holds, and the rows
    per step each expert computes there."""

    rank_experts: tuple[tuple[int, ...], ...]
    load: tuple[float, ...]
    scale: float = 1.0  # the rows are load x scale


@dataclass
class CostModel:
    """Step time and memory of layouts of one model on one machine (see the module docstring).

    `tables` caches a ModelTable per tensor-parallel cut, so pricing many layouts builds each cut once;
    `memories` each layout's memory."""

    cfg: ModelConfig
    hardware: Hardware
    tables: dict = field(default_factory=dict)
    memories: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)  # _stage_common by (layout, stage)
    experts: dict = field(default_factory=dict)  # expert_layer by its inputs
    loads: dict = field(default_factory=dict)  # RankLoads by (placement, load, ranks per node)
    pipelines: dict = field(default_factory=dict)  # _pipeline's of the last layout priced: pipelines_of
    pipelines_of: Layout | None = None
    states: dict = field(default_factory=dict)  # _stepped_state by layout

    # ---- per-layer pieces ---------------------------------------------------------------------------------------

    def tokens(self, layout: Layout) -> int:
        """Tokens of one micro-batch on one rank (whole sequences)."""
        return layout.micro_sequences * self.cfg.seq_len

    def expert_layer(self, layout: Layout, hidden_phases: int = 0) -> ExpertLayerCost:
        """The placement-dependent cost of one MoE layer under `layout` (hidden_phases: phases of its replica
        exchange that later MoE layers' backward can hide, 0-2)."""
        cfg, sizes = self.cfg, layout.sizes
        key = (sizes, layout.microbatches * layout.accumulate, layout.precision, hidden_phases)
        if key not in self.experts:
            hidden = (cfg.moe.expert_hidden or cfg.hidden) // (sizes.tp if sizes.expert_tp else 1)
            self.experts[key] = expert_layer_cost(self.hardware, sizes, cfg.d_model, hidden, layout.precision, key[1],
                                                  cfg.recompute == "full", hidden_phases,
                                                  3 if cfg.moe.activation == "swiglu" else 2)
        return self.experts[key]

    def rows_per_step(self, layout: Layout) -> float:
        """Assignments one expert-parallel group computes per step: its ranks' tokens x top_k."""
        sizes = layout.sizes
        routed = self.tokens(layout) / (1 if sizes.expert_tp else sizes.tp)
        return sizes.ep * routed * self.cfg.moe.top_k * layout.microbatches * layout.accumulate

    # ---- the step ---------------------------------------------------------------------------------------------

    def _dense_layer(self, layout: Layout, layer: int) -> Breakdown:
        """Per micro-batch, layer `layer`'s common work on a rank (everything but its experts and all-to-all)."""
        cfg, hw, sizes = self.cfg, self.hardware, layout.sizes
        scopes = Scopes(sizes, hw.gpus_per_node)
        moe, shared = cfg.is_moe_layer(layer), cfg.is_moe_layer(layer) and bool(cfg.moe.shared_experts)
        d, tp, T = cfg.d_model, sizes.tp, self.tokens(layout)
        b = activation_itemsize(layout.precision)
        full, selective = cfg.recompute == "full", cfg.recompute == "selective"
        passes = 4 if full else 3
        linear = 2 * self.table(layout).matrix_weights[layer] * T  # projections, dense FFN or shared experts, forward
        if moe:
            routed = T if sizes.expert_tp else T / tp
            linear += 2 * d * cfg.moe.num_experts * routed
        core = cfg.seq_len * _attention_width(cfg) / tp * T  # QK^T and AV, causal (half of 2 S x width)
        dense = passes * linear / hw.gemm_flops
        attention = (passes + (1 if selective else 0)) * core / hw.attention_flops
        again = 2 if full else 1  # forward collectives, run again when recomputed
        counted = moe and ((cfg.moe.aux_loss_coeff > 0 and sizes.plane > 1) or sizes.ep > 1)  # the router's counts
        own = Breakdown(dense=dense, attention=attention, overhead=passes / 3 * hw.layer_overhead(T),
                        control=self._moe_control(layout) if moe else 0.0, syncs=again * counted)
        if tp == 1:
            return own
        ar, ag, rs = (hw.link(op, tp, scopes.tp) for op in ("all_reduce", "all_gather", "reduce_scatter"))
        full_bytes, slice_bytes = T * d * b, T / tp * d * b
        # tensor-parallel regions: attention, the dense FFN or the expert-TP output, the shared experts
        regions = (2 if (not moe or sizes.expert_tp) else 1) + shared
        if layout.sequence_parallel:  # an (all-gather, reduce-scatter) pair each
            comm = regions * (again + 1) * (ag.time(slice_bytes) + rs.time(full_bytes))
            calls = regions * (again + 1) * 2
        else:
            comm = regions * (again + 1) * ar.time(full_bytes)
            calls = regions * (again + 1)
            if moe and not sizes.expert_tp:  # the MoE layer's token slices: gathered forward, gathered back in backward
                comm += (again + 1) * ag.time(slice_bytes)
                calls += again + 1
        if moe and cfg.moe.capacity_factor is not None and not sizes.expert_tp:
            comm += again * ag.time(T / tp * cfg.moe.top_k * _INDEX)  # expert choices, for capacity
            calls += again
        return own + Breakdown(tp=comm, syncs=calls)

    def _moe_control(self, layout: Layout) -> float:
        """One MoE layer's forward, per micro-batch: the router's per-expert counts all-reduced over the stage's
        ranks (the aux loss needs the global fractions) and the all-to-all of the row counts per slot."""
        cfg, hw, sizes = self.cfg, self.hardware, layout.sizes
        scopes = Scopes(sizes, hw.gpus_per_node)
        counts = 0.0
        if cfg.moe.aux_loss_coeff > 0:
            counts += hw.link("all_reduce", sizes.plane, scopes.dp).time(cfg.moe.num_experts * _INDEX)
        slots = cfg.moe.num_experts // sizes.ep + layout.extra_slots
        return counts + hw.link("all_to_all", sizes.ep, scopes.ep).time(slots * sizes.ep * _INDEX)

    def _stage(self, layout: Layout, stage: int, experts: dict[int, Breakdown]) -> Breakdown:
        """One rank of `stage` (all its virtual stages), one micro-batch: forward and backward of its layers."""
        sizes = layout.sizes
        chunks = [stage + i * sizes.pp for i in range(layout.virtual_stages)]
        per = self.cfg.n_layers // (sizes.pp * layout.virtual_stages)
        out = self._stage_common(layout, stage)
        for c in chunks:
            for i in range(c * per, (c + 1) * per):
                if i in experts:
                    out = out + experts[i]
        return out

    def _stage_common(self, layout: Layout, stage: int) -> Breakdown:
        """What _stage adds besides the experts and their all-to-all (cached per layout, slots aside)."""
        key = (replace(layout, extra_slots=0, zero=0), stage)  # neither changes the stage's work
        if key in self.stages:
            return self.stages[key]
        cfg, hw, sizes = self.cfg, self.hardware, layout.sizes
        chunks = [stage + i * sizes.pp for i in range(layout.virtual_stages)]
        per = cfg.n_layers // (sizes.pp * layout.virtual_stages)
        out = Breakdown()
        for c in chunks:
            for i in range(c * per, (c + 1) * per):
                out = out + self._dense_layer(layout, i)
        d, T, b = cfg.d_model, self.tokens(layout), activation_itemsize(layout.precision)
        last = sizes.pp * layout.virtual_stages - 1
        if last in chunks:  # LM head, embedding, final norm and loss (their per-op work: once per micro-batch)
            out = out + Breakdown(dense=3 * 2 * d * cfg.vocab_size / sizes.tp * T / hw.gemm_flops,
                                  overhead=hw.ends_overhead(T))
            if sizes.tp > 1:  # the head's input gradient all-reduced; the vocab-parallel loss's max and sums
                ar = hw.link("all_reduce", sizes.tp, Scopes(sizes, hw.gpus_per_node).tp)
                out = out + Breakdown(tp=ar.time(T * d * b) + ar.time(T * 4) + ar.time(2 * T * 4), syncs=3)
        if 0 in chunks and sizes.tp > 1:  # the vocab-parallel embedding's all-reduce
            out = out + Breakdown(tp=hw.link("all_reduce", sizes.tp, Scopes(sizes, hw.gpus_per_node).tp).time(T * d * b),
                                  syncs=1)
        if sizes.pp > 1:
            p2p = hw.link("p2p", 2, Scopes(sizes, hw.gpus_per_node).pp)
            sends = sum((c != last) + (c != 0) for c in chunks)
            out = out + Breakdown(p2p=sends * p2p.time(T * d * b / (sizes.tp if layout.sequence_parallel else 1)),
                                  syncs=sends)
        self.stages[key] = out
        return out

    def step(self, layout: Layout, placements: dict[int, LayerPlacement], migration_s: float = 0.0) -> Breakdown:
        """Seconds per optimizer step of `layout`, given each MoE layer's placement and load (layer index ->
        LayerPlacement; loads in rows per step of the layer's expert-parallel group) and the migration seconds per
        step of the placement policy."""
        out, stage_s = self._pipeline(layout, placements)
        return out + self._after_backward(layout, stage_s) + Breakdown(migration=migration_s)

    def _pipeline(self, layout: Layout, placements: dict[int, LayerPlacement]) -> tuple[Breakdown, float]:
        """step's terms up to the end of the last backward, and the slowest stage's time per micro-batch. ZeRO does
        not change them: the search prices a layout's ZeRO stages (each with every policy) one after another, so
        the results of the last layout priced are kept for the next."""
        base = replace(layout, zero=0)
        key = (base, tuple((i, p.rank_experts, p.load, p.scale) for i, p in placements.items()))
        if replace(base, extra_slots=0) != self.pipelines_of:  # the slots vary with the policy
            self.pipelines, self.pipelines_of = {}, replace(base, extra_slots=0)
        if key not in self.pipelines:
            self.pipelines[key] = self._price_pipeline(layout, placements)
        return self.pipelines[key]

    def _price_pipeline(self, layout: Layout, placements: dict[int, LayerPlacement]) -> tuple[Breakdown, float]:
        cfg, sizes = self.cfg, layout.sizes
        moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        m = layout.microbatches
        experts: dict[int, Breakdown] = {}
        exchange = [0.0] * sizes.pp  # exposed replica exchange of each stage's layers
        per = cfg.n_layers // (sizes.pp * layout.virtual_stages)
        overlap = self.replica_overlap(layout)
        dispatch = self.hardware.dispatch(sizes.ep) * (4 / 3 if cfg.recompute == "full" else 1)  # + a forward
        # reached from compute: the combine forward (again when recomputed), the combine's and dispatch's backward
        a2a_syncs = ((2 if cfg.recompute == "full" else 1) + 2) if sizes.ep > 1 else 0
        for stage in range(sizes.pp):
            layers = [i for i in moe_layers if (i // per) % sizes.pp == stage]
            for position, i in enumerate(sorted(layers)):  # forward order: layer i hides under the ones before it
                cost, p = self.expert_layer(layout, hidden_phases=position if overlap else 0), placements[i]
                key = (p.rank_experts, p.load, cost.ranks_per_node)
                if key not in self.loads:
                    self.loads[key] = cost.rank_loads(p.rank_experts, p.load)
                compute, a2a, exposed = cost.terms(p.rank_experts, p.load, p.scale, self.loads[key])
                micro = m * layout.accumulate
                experts[i] = Breakdown(experts=compute / micro, all_to_all=a2a / micro + dispatch, syncs=a2a_syncs)
                exchange[stage] += exposed
        stages = [self._with_sync(self._stage(layout, s, experts)) for s in range(sizes.pp)]
        slowest = max(range(sizes.pp), key=lambda s: stages[s].step_s)
        bubble = (sum(t.step_s for t in stages) - stages[slowest].step_s) / layout.virtual_stages
        span = stages[slowest].scaled(m) + Breakdown(bubble=bubble)
        # sharing the node's cores, the stages run faster while others wait, but no faster than their mean work
        mean = Breakdown(**{k: statistics.fmean(getattr(t, k) for t in stages) for k in TERMS}).scaled(m)
        pipe = span.scaled(1 / self.hardware.sharing)
        if mean.step_s > pipe.step_s:
            pipe = mean
        # per step: the world's scalars (the pipeline's loss broadcast) and each gradient reduction, reached from
        # the slowest stage's compute
        per_step = _WORLD_SCALARS + (sizes.pp > 1) + (sizes.dp > 1) + (sizes.edp > 1)
        sync = per_step * self.hardware.sync_wait(_work(stages[slowest]) / max(1.0, stages[slowest].syncs))
        out = pipe.scaled(layout.accumulate) + Breakdown(replicas=max(exchange), sync=sync)
        return out, stages[slowest].step_s

    def _with_sync(self, stage: Breakdown) -> Breakdown:
        """A stage's micro-batch with its `sync` term: each of its `syncs` collectives reached after an equal share
        of its compute."""
        if not stage.syncs or not self.hardware.sync_s:
            return stage
        return stage + Breakdown(sync=stage.syncs * self.hardware.sync_wait(_work(stage) / stage.syncs))

    def replica_overlap(self, layout: Layout) -> bool:
        """Whether the strategy sums replica gradients during backward (one copy of each slot: edp = 1)."""
        return layout.sizes.edp == 1 and layout.sizes.ep > 1

    def _after_backward(self, layout: Layout, stage_s: float) -> Breakdown:
        """Gradient reduction net of the last micro-batch's backward, the ZeRO all-gather and the optimizer step,
        on the busiest stage."""
        sizes, hw = layout.sizes, self.hardware
        scopes = Scopes(sizes, hw.gpus_per_node)
        dense, expert, stepped = self._stepped_state(layout)
        reduce_op = "reduce_scatter" if layout.zero == 2 else "all_reduce"
        dense_s = hw.link(reduce_op, sizes.dp, scopes.dp).time(dense) if sizes.dp > 1 else 0.0
        expert_s = hw.link(reduce_op, sizes.edp, scopes.edp).time(expert) if sizes.edp > 1 else 0.0
        reduce_s = dense_s + expert_s
        bucket = 25 * 2**20
        exposed = max(reduce_s - 2 / 3 * stage_s, reduce_s * min(1.0, bucket / max(1.0, dense + expert)))
        if hw.sharing > 1:  # the collectives' work needs the cores the backward keeps busy
            exposed = reduce_s
        zero_s = 0.0
        if layout.zero:
            zero_s = (hw.link("all_gather", sizes.dp, scopes.dp).time(dense / sizes.dp) if sizes.dp > 1 else 0.0) + (
                hw.link("all_gather", sizes.edp, scopes.edp).time(expert / sizes.edp) if sizes.edp > 1 else 0.0)
        if getattr(self.cfg, "tie_embeddings", False) and sizes.pp > 1:  # the head's copy of the embedding
            tied = self.cfg.vocab_size // sizes.tp * self.cfg.d_model // (sizes.dp if layout.zero else 1)
            exposed += hw.link("all_reduce", 2, scopes.ends).time(tied * itemsizes(layout.precision)[1])
        world = hw.link("all_reduce", sizes.world_size, sizes.world_size > hw.gpus_per_node)
        control = _WORLD_SCALARS * world.time(_INDEX)
        if sizes.pp > 1:
            control += hw.link("all_reduce", sizes.pp, scopes.pp).time(_INDEX)
        return Breakdown(grad_sync=exposed, zero=zero_s, optimizer=stepped * hw.optimizer_s_per_param, control=control)

    def _stepped_state(self, layout: Layout) -> tuple[float, float, float]:
        """On the stage with the most parameters: (dense, expert) gradient bytes it reduces, elements each rank steps."""
        key = (layout.sizes, layout.virtual_stages, layout.extra_slots, layout.precision, layout.sequence_parallel,
               layout.zero)
        if key not in self.states:
            sizes, table = layout.sizes, self.table(layout)
            stage = max(range(sizes.pp), key=lambda s: sum(math.prod(r.shape) for r in table.stage_records(layout, s)))
            records = [r for r in table.stage_records(layout, stage) if r.trainable]
            bf16_masters = bool(layout.zero) and layout.precision == "bf16-mixed"
            dense = sum(math.prod(r.shape) * (2 if bf16_masters else r.itemsize) for r in records if not r.expert)
            expert = sum(math.prod(r.shape) * (2 if bf16_masters else r.itemsize) for r in records if r.expert)
            if layout.zero:
                stepped = sum(math.prod(r.shape) / (sizes.edp if r.expert else sizes.dp) for r in records)
            else:
                stepped = sum(math.prod(r.shape) for r in records)
            self.states[key] = dense, expert, stepped
        return self.states[key]

    # ---- memory -------------------------------------------------------------------------------------------------

    def table(self, layout: Layout) -> ModelTable:
        key = (layout.sizes.tp, layout.sequence_parallel, layout.sizes.expert_tp, layout.precision)
        if key not in self.tables:
            self.tables[key] = ModelTable(self.cfg, *key)
        return self.tables[key]

    def memory(self, layout: Layout) -> RankMemory:
        """The largest rank's memory (planner.memory; ZeRO's block 0 is its group's largest)."""
        if layout not in self.memories:
            table = self.table(layout)
            self.memories[layout] = largest([
                RankMemory(stage * layout.sizes.plane, stage, *state_bytes(table.stage_records(layout, stage), layout),
                           activation_bytes(self.cfg, layout, stage)) for stage in range(layout.sizes.pp)])
        return self.memories[layout]

"""CostModel.step and CostModel.memory against the module docstring's formulas, worked by hand on a toy machine
(round rates, one Link per collective) and a tiny GPT-MoE (layer 0 dense, layer 1 MoE)."""

import dataclasses

import pytest

from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.models.gpt_moe import GPTMoE, GPTMoEConfig
from lightning_smartmoe.models.llama_moe import LlamaMoEConfig
from lightning_smartmoe.moe import MoEConfig
from lightning_smartmoe.planner.cost import TERMS, CostModel, LayerPlacement
from lightning_smartmoe.planner.hardware import OPS, Hardware, Link
from lightning_smartmoe.planner.memory import Layout, largest, rank_memory

LINKS = {  # every group size and scope gets the n=2 fit
    "all_to_all": Link(0.5, 1024.0),
    "all_reduce": Link(1.0, 4096.0),
    "all_gather": Link(0.0, 2048.0),
    "reduce_scatter": Link(0.0, 1024.0),
    "p2p": Link(1.0, 2048.0),
}
HW = Hardware(name="toy", source="test", gpus_per_node=8, memory_gb=1.0, gemm_flops=1e6, expert_flops=2e6,
              expert_group_s=1e-3, attention_flops=5e5, optimizer_s_per_param=1e-6,
              collectives={op: {"intra": {2: LINKS[op]}} for op in OPS})


def config(n_layers: int = 2, vocab_size: int = 64) -> GPTMoEConfig:
    """d 32, 4 heads, seq 16, dense FFN 128, 4 experts of hidden 64, top-2, MoE in every 2nd layer (1, 3, ...)."""
    return GPTMoEConfig(vocab_size=vocab_size, seq_len=16, n_layers=n_layers, d_model=32, n_heads=4,
                        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=64, every=2))


CFG = config()

# Every layout below gives a rank T = 2 sequences x 16 = 32 tokens per micro-batch. Forward FLOPs at tp=1:
ATTN_PROJ = 2 * 4 * 32 * 32 * 32  # qkv + output projection: 2 x 4 d^2 x T = 262144
FFN = 2 * 2 * 32 * 128 * 32  # dense FFN: 2 x 2 d H x T = 524288
ROUTER = 2 * 32 * 4 * 32  # 2 d E x T = 8192
HEAD = 2 * 32 * 64 * 32  # LM head: 2 d V x T = 131072
CORE = 2 * 16 * 32 * 32  # attention core: 2 S d x T = 32768
DENSE0 = 3 * (ATTN_PROJ + FFN) / 1e6  # forward + backward of layer 0 at gemm_flops: 2.359296 s
DENSE1 = 3 * (ATTN_PROJ + ROUTER) / 1e6  # layer 1 (MoE) without its experts: 0.811008 s
HEAD_S = 3 * HEAD / 1e6  # 0.393216 s
CORE_S = 3 * CORE / 5e5  # one layer's attention core at attention_flops: 0.196608 s
ROW_S = 3 * 2 * 2 * 32 * 64 / 2e6  # one routed row through an expert, forward + backward: 0.012288 s
BYTES = 32 * 32 * 4  # one micro-batch's hidden states [T, d] in fp32: 4096
# under tp = 2, on the last stage per micro-batch: the tied head's input-gradient all-reduce of [T, d] and the
# vocab-parallel loss's two all-reduces ([T] maxima, [2, T] sums, fp32): 2 + 1.03125 + 1.0625 s
HEAD_TP = (1.0 + BYTES / 4096) + (1.0 + 32 * 4 / 4096) + (1.0 + 2 * 32 * 4 / 4096)
SCALAR = 1.0 + 8 / 4096  # one scalar all-reduce (8 bytes)
ROUTED = 1.0 + 4 * 8 / 4096  # an MoE layer's 4 expert counts all-reduced over a stage of 2 ranks, per micro-batch

# Parameters, counted from the config (biases: ln, attn.proj, ffn.fc, ffn.proj; none on qkv, router, lm_head)
EMBED_P = 64 * 32 + 16 * 32  # token + position embeddings: 2560
ATTN_P = 2 * 32 + 3 * 32 * 32 + 32 * 32 + 32  # ln1, qkv, proj: 4192
BLOCK0_P = ATTN_P + 2 * 32 + (32 * 128 + 128) + (128 * 32 + 32)  # + ln2, fc, proj: 12608
BLOCK1_P = ATTN_P + 2 * 32 + 4 * 32  # + ln2, router (experts apart): 4384
EXPERT_P = 2 * 32 * 64  # w1 + w2 of one expert: 4096
HEAD_P = 2 * 32 + 64 * 32  # ln_f, lm_head: 2112
DENSE_P = EMBED_P + BLOCK0_P + BLOCK1_P + HEAD_P  # 21664


def even(experts: int = 4, rows: float = 16.0, ranks: int = 1) -> LayerPlacement:
    """Experts split contiguously over `ranks`, each computing `rows` rows per step."""
    per = experts // ranks
    return LayerPlacement(tuple(tuple(range(r * per, (r + 1) * per)) for r in range(ranks)), (rows,) * experts)


def only(breakdown, **terms) -> None:
    """The breakdown has exactly these non-zero terms (the others 0)."""
    want = {k: 0.0 for k in TERMS} | terms
    assert breakdown.as_dict() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_one_rank_step_is_compute_plus_optimizer():
    assert sum(p.numel() for p in GPTMoE(CFG).parameters()) == DENSE_P + 4 * EXPERT_P == 38048
    layout = Layout(ParallelSizes(), global_batch=2)
    got = CostModel(CFG, HW).step(layout, {1: LayerPlacement(((0, 1, 2, 3),), (40.0, 8.0, 8.0, 8.0))})
    only(got,
         dense=DENSE0 + DENSE1 + HEAD_S,  # 3 x (786432 + 270336 + 131072) / 1e6 = 3.56352
         attention=2 * CORE_S,
         experts=64 * ROW_S + 4 * 1e-3,  # the one rank computes all 64 rows, 4 non-empty slots x expert_group_s
         optimizer=38048 * 1e-6)


@pytest.mark.parametrize(("recompute", "dense_passes", "core_passes"), [("full", 4, 4), ("selective", 3, 4)])
def test_recomputation_adds_a_forward(recompute, dense_passes, core_passes):
    cfg = dataclasses.replace(CFG, recompute=recompute)
    got = CostModel(cfg, HW).step(Layout(ParallelSizes(), global_batch=2), {1: even()})
    assert got.dense == pytest.approx((dense_passes * (ATTN_PROJ + FFN + ATTN_PROJ + ROUTER) + 3 * HEAD) / 1e6)
    assert got.attention == pytest.approx(2 * core_passes * CORE / 5e5)
    assert got.experts == pytest.approx(dense_passes / 3 * (64 * ROW_S + 4 * 1e-3))


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_collectives(sequence_parallel):
    layout = Layout(ParallelSizes(tp=2), sequence_parallel=sequence_parallel, global_batch=2)
    got = CostModel(CFG, HW).step(layout, {1: even(rows=8.0)})  # 16 routed tokens per rank x top-2 = 32 rows
    ar = 1.0 + BYTES / 4096  # all-reduce of [T, d]: 2 s
    ag = BYTES / 2 / 2048  # all-gather of a [T/2, d] slice: 1 s
    rs = BYTES / 1024  # reduce-scatter of [T, d]: 4 s
    if sequence_parallel:  # (ag, rs) pairs forward and backward: layer 0 attention + FFN, layer 1 attention
        tp = 2 * 2 * (ag + rs) + 1 * 2 * (ag + rs) + ar  # + the embedding's all-reduce: 32 s
    else:  # layer 0: 2 regions x 2 all-reduces; layer 1: attention's 2 and the token slices gathered both ways
        tp = 2 * 2 * ar + 2 * ar + 2 * ag + ar  # 16 s
    assert got.tp == pytest.approx(tp + HEAD_TP)
    assert got.control == pytest.approx(ROUTED + 4 * SCALAR)  # the world's 4 scalar collectives per step
    # the dense GEMMs split over tp; the router sees this rank's 16 tokens, the attention core its heads
    assert got.dense == pytest.approx(3 * (ATTN_PROJ / 2 + FFN / 2 + ATTN_PROJ / 2 + ROUTER / 2 + HEAD / 2) / 1e6)
    assert got.attention == pytest.approx(2 * CORE_S / 2)
    assert got.experts == pytest.approx(32 * ROW_S + 4 * 1e-3) and got.p2p == 0.0


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_embedding_all_reduce_and_sliced_sends_under_a_pipeline(sequence_parallel):
    layout = Layout(ParallelSizes(tp=2, pp=2), microbatches=2, sequence_parallel=sequence_parallel, global_batch=4)
    got = CostModel(CFG, HW).step(layout, {1: even(rows=16.0)})
    ar, ag, rs = 1.0 + BYTES / 4096, BYTES / 2 / 2048, BYTES / 1024
    # stage 0: layer 0 and the embedding (the only one with its all-reduce); stage 1: layer 1 and the head
    stage0_tp = 2 * 2 * (ag + rs) + ar if sequence_parallel else 2 * 2 * ar + ar
    stage1_tp = (2 * (ag + rs) if sequence_parallel else 2 * ar + 2 * ag) + HEAD_TP
    p2p = 1.0 + BYTES / (2 if sequence_parallel else 1) / 2048  # under SP a stage sends its slice
    experts = (64 * ROW_S + 4 * 2e-3) / 2  # 16 routed tokens x top-2 x 2 micro-batches, per micro-batch
    stage0 = 3 * (ATTN_PROJ / 2 + FFN / 2) / 1e6 + CORE_S / 2 + stage0_tp + p2p
    stage1 = 3 * (ATTN_PROJ / 2 + ROUTER / 2 + HEAD / 2) / 1e6 + CORE_S / 2 + experts + stage1_tp + p2p + ROUTED
    slow_tp, fast = (stage0_tp, stage1) if stage0 > stage1 else (stage1_tp, stage0)  # SP: stage 0; else stage 1
    assert (stage0 > stage1) == sequence_parallel
    assert got.tp == pytest.approx(2 * slow_tp) and got.p2p == pytest.approx(2 * p2p)  # 2 micro-batches of it
    assert got.bubble == pytest.approx(fast)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_pipeline_is_microbatches_times_the_slowest_stage_plus_the_bubble(accumulate):
    layout = Layout(ParallelSizes(pp=2), microbatches=2, accumulate=accumulate, global_batch=4 * accumulate)
    micro = 2 * accumulate  # micro-batches per step, 32 tokens x top-2 = 64 rows each
    got = CostModel(CFG, HW).step(layout, {1: even(rows=64.0 * micro / 4)})
    p2p = 1.0 + BYTES / 2048  # one send per micro-batch and stage: 3 s
    stage0 = DENSE0 + CORE_S + p2p  # layer 0 + embedding, activations forward: 5.555904 s
    experts = (64 * micro * ROW_S + 4 * 1e-3 * micro) / micro  # the step's rows and slots, per micro-batch
    stage1 = DENSE1 + HEAD_S + CORE_S + experts + p2p  # layer 1 + head, gradients backward: 5.191264 s
    assert stage0 > stage1
    only(got, dense=micro * DENSE0, attention=micro * CORE_S, p2p=micro * p2p,  # m x the slowest stage ...
         bubble=accumulate * stage1,  # ... + the other stage once, per accumulation step
         optimizer=(BLOCK1_P + 4 * EXPERT_P + HEAD_P) * 1e-6,  # the stage with the most parameters: 22880
         control=5 * SCALAR)  # the world's 4 scalar collectives and the loss's broadcast over the stages


def test_interleaved_bubble_is_divided_by_the_virtual_stages():
    cfg = config(n_layers=4)  # layers 1 and 3 MoE; rank 0 holds chunks 0, 2 (layers 0, 2), rank 1 chunks 1, 3
    layout = Layout(ParallelSizes(pp=2), microbatches=2, pp_schedule="interleaved_1f1b", virtual_stages=2, global_batch=4)
    got = CostModel(cfg, HW).step(layout, {1: even(rows=32.0), 3: even(rows=32.0)})
    p2p = 1.0 + BYTES / 2048
    stage0 = 2 * DENSE0 + 2 * CORE_S + 3 * p2p  # chunk 0 sends forward, chunk 2 both ways: 14.111808 s
    stage1 = 2 * DENSE1 + HEAD_S + 2 * CORE_S + 2 * (128 * ROW_S + 4 * 2e-3) / 2 + 3 * p2p  # chunk 1 both ways, 3 back
    assert stage0 > stage1
    assert got.dense == pytest.approx(2 * 2 * DENSE0) and got.p2p == pytest.approx(2 * 3 * p2p)
    assert got.bubble == pytest.approx(stage1 / 2)  # 12.989312 s / 2


def llama(tie: bool = False) -> LlamaMoEConfig:
    """The Llama-style model at the toy shape: 2 key/value heads of 8 (grouped-query), a SwiGLU dense FFN of 128 in
    layer 0; in layer 1, 4 SwiGLU experts of 64 and a gated SwiGLU shared expert of 64."""
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=64, every=2, activation="swiglu", shared_experts=1,
                    shared_expert_hidden=64, shared_expert_gate=True)
    return LlamaMoEConfig(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                          tie_embeddings=tie, moe=moe)


GQA_PROJ = 2 * (32 * 32 + 2 * 16 * 32 + 32 * 32) * 32  # q, k, v, o: 2 x 3072 x T = 196608
SWIGLU_FFN = 2 * 3 * 32 * 128 * 32  # gate, up, down: 786432
SHARED = 2 * 3 * 32 * 64 * 32  # the shared expert: 393216
GATE = 2 * 32 * 32  # its gate, on every tp rank: 2048
SWIGLU_ROW_S = 3 * 2 * 3 * 32 * 64 / 2e6  # a routed row through a SwiGLU expert: 0.018432 s


@pytest.mark.parametrize("tp", [1, 2])
def test_llama_dense_terms_count_grouped_query_attention_swiglu_and_shared_experts(tp):
    layout = Layout(ParallelSizes(tp=tp), global_batch=2)
    got = CostModel(llama(), HW).step(layout, {1: even(rows=16.0 / tp)})
    assert got.dense == pytest.approx(3 * ((GQA_PROJ + SWIGLU_FFN + GQA_PROJ + SHARED + HEAD + ROUTER) / tp + GATE) / 1e6)
    assert got.attention == pytest.approx(2 * CORE_S / tp)  # query-key and value widths: 2 x 4 heads x 8 = 2 d
    assert got.experts == pytest.approx(64 / tp * SWIGLU_ROW_S + 4 * 1e-3)
    ar, ag = 1.0 + BYTES / 4096, BYTES / 2 / 2048
    # layer 0: attention and FFN; layer 1: attention, the shared expert, the token slices gathered; the embedding; the
    # head's input gradient and the vocab-parallel loss's max [T] and sums [2, T]
    ends = ar + ar + (1.0 + 32 * 4 / 4096) + (1.0 + 2 * 32 * 4 / 4096)
    assert got.tp == (0.0 if tp == 1 else pytest.approx(2 * 2 * ar + 2 * 2 * ar + 2 * ag + ends))


def test_a_tied_head_under_a_pipeline_sums_its_two_copies_gradients():
    layout = Layout(ParallelSizes(pp=2), microbatches=2, global_batch=4)
    untied, tied = (CostModel(llama(tie), HW).step(layout, {1: even(rows=16.0)}) for tie in (False, True))
    assert tied.grad_sync - untied.grad_sync == pytest.approx(1.0 + 64 * 32 * 4 / 4096)  # all-reduce of [V, d]: 3 s
    assert CostModel(llama(True), HW).step(Layout(ParallelSizes(), global_batch=2), {1: even()}).grad_sync == 0.0


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_data_parallel_gradient_sync_zero_and_optimizer(zero):
    layout = Layout(ParallelSizes(dp=2), zero=zero, global_batch=4)  # ep=1: experts reduced over edp = 2 too
    got = CostModel(CFG, HW).step(layout, {1: even()})
    dense, expert = DENSE_P * 4, 4 * EXPERT_P * 4  # gradient bytes: 86656 and 65536
    if zero == 2:  # reduce-scatter
        reduce_s = dense / 1024 + expert / 1024  # 148.625 s
    else:
        reduce_s = (1.0 + dense / 4096) + (1.0 + expert / 4096)  # 39.15625 s
    # one bucket holds it all: none of it hides under the last backward
    assert got.grad_sync == pytest.approx(reduce_s)
    if zero:
        assert got.zero == pytest.approx(dense / 2 / 2048 + expert / 2 / 2048)  # all-gather of each rank's half
        assert got.optimizer == pytest.approx((DENSE_P + 4 * EXPERT_P) / 2 * 1e-6)
    else:
        assert got.zero == 0.0 and got.optimizer == pytest.approx((DENSE_P + 4 * EXPERT_P) * 1e-6)


def test_zero_cuts_experts_over_their_expert_data_parallel_group():
    layout = Layout(ParallelSizes(dp=2, ep=2), zero=1, global_batch=4)  # edp = 1: each rank the only copy of its 2
    got = CostModel(CFG, HW).step(layout, {1: even(rows=32.0, ranks=2)})
    assert got.zero == pytest.approx(DENSE_P * 4 / 2 / 2048)  # only the dense half is gathered
    assert got.optimizer == pytest.approx((DENSE_P / 2 + 2 * EXPERT_P) * 1e-6)


@pytest.mark.parametrize("gemm_flops", [1e6, 1e5])
def test_gradient_sync_hides_under_the_last_backward_but_its_last_bucket(gemm_flops):
    v = 2**17  # a vocabulary of 131072: 32 MiB of embedding and head gradients, more than one 25 MiB bucket
    cfg, hw = config(vocab_size=v), dataclasses.replace(HW, gemm_flops=gemm_flops)
    layout = Layout(ParallelSizes(dp=2), global_batch=4)
    got = CostModel(cfg, hw).step(layout, {1: even()})
    head = 2 * 32 * v * 32  # the head's forward FLOPs
    stage = 3 * (ATTN_PROJ + FFN + ATTN_PROJ + ROUTER + head) / gemm_flops + 2 * CORE_S + 64 * ROW_S + 4e-3 + ROUTED
    dense = (v * 32 + 16 * 32 + BLOCK0_P + BLOCK1_P + 2 * 32 + v * 32) * 4  # 33624704 bytes
    expert = 4 * EXPERT_P * 4
    reduce_s = (1.0 + dense / 4096) + (1.0 + expert / 4096)
    last_bucket = reduce_s * 25 * 2**20 / (dense + expert)
    want = max(reduce_s - 2 / 3 * stage, last_bucket)
    assert want == (reduce_s - 2 / 3 * stage if gemm_flops == 1e6 else last_bucket)  # each case takes one side
    assert got.grad_sync == pytest.approx(want)


def test_expert_parallel_busiest_rank_and_all_to_all():
    layout = Layout(ParallelSizes(dp=2, ep=2), global_batch=4)  # 2 ranks x 32 tokens x top-2 = 128 rows
    got = CostModel(CFG, HW).step(layout, {1: LayerPlacement(((0, 1), (2, 3)), (80.0, 16.0, 16.0, 16.0))})
    assert got.experts == pytest.approx(96 * ROW_S + 2 * 1e-3)  # rank 0: 80 + 16 rows, 2 slots
    # rank 0 receives 96 / 2 of its rows from rank 1; rank 1 sends away 64 x 3/4 of its tokens' rows: 48 rows each
    # of d x 4 = 128 bytes, in each of 4 calls (dispatch and combine, forward and backward) of 6144 bytes
    assert got.all_to_all == pytest.approx(4 * (0.5 + 48 * 128 / 1024))  # 26 s
    assert got.replicas == 0.0
    assert got.optimizer == pytest.approx((DENSE_P + 2 * EXPERT_P) * 1e-6)  # 2 of the 4 experts per rank
    assert got.grad_sync == pytest.approx(1.0 + DENSE_P * 4 / 4096)  # edp = 1: only dense gradients reduced


@pytest.mark.parametrize(("recompute", "passes"), [("none", 3), ("full", 4)])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_dispatch_work_per_moe_layer_and_micro_batch(recompute, passes, accumulate):
    """hardware.dispatch(ep) once per MoE layer and micro-batch (a recomputed forward adds a third), in the
    all-to-all term; the nearest measured group size at or above ep, else the largest; nothing at ep = 1."""
    hw = dataclasses.replace(HW, dispatch_s={2: 0.25, 8: 0.75})
    cfg = dataclasses.replace(CFG, recompute=recompute)
    for ep, added in ((1, 0.0), (2, 0.25), (4, 0.75)):
        layout = Layout(ParallelSizes(dp=4, ep=ep), accumulate=accumulate, global_batch=8 * accumulate)
        placement = {1: even(rows=16.0 * accumulate, ranks=ep)}
        base, got = (CostModel(cfg, h).step(layout, placement) for h in (HW, hw))
        assert got.all_to_all == pytest.approx(base.all_to_all + accumulate * passes / 3 * added)
        assert dataclasses.replace(got, all_to_all=0.0) == dataclasses.replace(base, all_to_all=0.0)


REPLICATED = LayerPlacement(((0, 1, 2), (0, 3)), (80.0, 16.0, 16.0, 16.0))  # expert 0 on both ranks
PHASE = 1.0 + 16384 / 2 / 2048  # one phase of expert 0's exchange: 5 s
HIDE = 2 / 3 * ((40 + 16 + 16) * ROW_S + 3 * 1e-3)  # the backward of one MoE layer that hides a phase


def test_a_replicated_expert_exchanges_its_gradient():
    layout = Layout(ParallelSizes(dp=2, ep=2), extra_slots=1, global_batch=4)
    got = CostModel(CFG, HW).step(layout, {1: REPLICATED})
    assert got.experts == pytest.approx((40 + 16 + 16) * ROW_S + 3 * 1e-3)  # expert 0's rows split over its replicas
    # rows per rank 72 and 56: rank 0 receives 36, rank 1 sends away 64 x (1 - 56/128) = 36
    assert got.all_to_all == pytest.approx(4 * (0.5 + 36 * 128 / 1024))  # 20 s
    # each replica sends its 2 x 32 x 64 x 4 = 16384 gradient bytes, half in each phase; one MoE layer: none hidden
    assert got.replicas == pytest.approx(2 * PHASE)  # 10 s


def test_replica_exchange_hides_a_phase_under_a_later_layers_backward():
    cfg = config(n_layers=4)  # MoE layers 1 and 3
    layout = Layout(ParallelSizes(dp=2, ep=2), extra_slots=1, global_batch=4)
    got = CostModel(cfg, HW).step(layout, {1: REPLICATED, 3: REPLICATED})
    assert got.replicas == pytest.approx(2 * PHASE + (PHASE - HIDE + PHASE))  # one of the two hides a phase


@pytest.mark.parametrize(("layer", "replicas"), [(3, PHASE - HIDE + PHASE), (1, 2 * PHASE)],
                         ids=["layer3_replicated", "layer1_replicated"])
def test_the_first_layer_in_backward_is_the_one_that_hides(layer, replicas):
    cfg = config(n_layers=4)
    layout = Layout(ParallelSizes(dp=2, ep=2), extra_slots=1, global_batch=4)
    placements = {1: even(rows=32.0, ranks=2), 3: even(rows=32.0, ranks=2)} | {layer: REPLICATED}
    assert CostModel(cfg, HW).step(layout, placements).replicas == pytest.approx(replicas)


def test_migration_passes_through_and_the_terms_add_up():
    layout = Layout(ParallelSizes(dp=2, ep=2), extra_slots=1, global_batch=4)
    model = CostModel(CFG, HW)
    got, without = model.step(layout, {1: REPLICATED}, migration_s=2.5), model.step(layout, {1: REPLICATED})
    assert got.migration == 2.5 and got.step_s == pytest.approx(without.step_s + 2.5)
    assert tuple(f.name for f in dataclasses.fields(got)) == (*got.as_dict(), "syncs") == (*TERMS, "syncs")  # positional
    assert got.step_s == pytest.approx(sum(got.as_dict().values()))


@pytest.mark.parametrize("layout", [
    Layout(ParallelSizes(dp=2, ep=2), zero=1, extra_slots=1, global_batch=4),
    Layout(ParallelSizes(tp=2, pp=2), microbatches=2, sequence_parallel=True, global_batch=4),
], ids=["dp2_ep2_zero1", "tp2_pp2_sp"])
def test_memory_is_the_dry_runs_largest_rank(layout):
    assert CostModel(CFG, HW).memory(layout) == largest(rank_memory(CFG, layout))


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_unpriced_work_per_layer_and_at_the_ends(recompute):
    hw = dataclasses.replace(HW, layer_s=0.01, layer_token_s=1e-4, ends_s=0.02, ends_token_s=2e-4)
    cfg = dataclasses.replace(CFG, recompute=recompute)
    got = CostModel(cfg, hw).step(Layout(ParallelSizes(), global_batch=2), {1: even()})
    layer = (0.01 + 32 * 1e-4) * (4 / 3 if recompute == "full" else 1)  # T = 32 tokens; a recomputed forward adds a third
    assert got.overhead == pytest.approx(2 * layer + 0.02 + 32 * 2e-4)  # 2 layers, the ends once


def test_expert_parallel_control_collectives():
    layout = Layout(ParallelSizes(dp=2, ep=2), global_batch=4)
    got = CostModel(CFG, HW).step(layout, {1: LayerPlacement(((0, 1), (2, 3)), (16.0,) * 4)})
    counts = 0.5 + 2 * 2 * 8 / 1024  # the all-to-all of 2 slots x 2 ranks of int64 row counts
    assert got.control == pytest.approx(ROUTED + counts + 4 * SCALAR)


def test_a_layouts_zero_stages_priced_in_turn_equal_each_priced_alone():
    """The search prices ZeRO 0, 1, 2 of a layout one after another, reusing the pipeline terms; each must equal a
    fresh model's price, and a different layout in between must not see the last one's."""
    layouts = [Layout(ParallelSizes(dp=2, pp=2), microbatches=2, zero=z, global_batch=8) for z in (0, 1, 2)]
    other = Layout(ParallelSizes(dp=4), global_batch=8)
    shared = CostModel(CFG, HW)
    for layout in [*layouts, other, layouts[1]]:
        alone = CostModel(CFG, HW).step(layout, {1: even(rows=32.0)})
        assert shared.step(layout, {1: even(rows=32.0)}).as_dict() == alone.as_dict()


# ---- ranks that share a node's cores (Hardware.sharing > 1: more processes than cores) -------------------------------

CORES_SHARED = dataclasses.replace(HW, sharing=2.0)


def test_sharing_prices_an_imbalanced_layer_by_its_busiest_rank_alone_or_the_ranks_mean():
    """sharing 1.25: rank 0 computing 96 rows and rank 1 32, rank 0 alone (1.25x faster) is still longer than the
    ranks' mean; with 72 and 56 rows the mean is longer."""
    hw = dataclasses.replace(HW, sharing=1.25)
    layout = Layout(ParallelSizes(dp=2, ep=2), global_batch=4)
    ranks = ((0, 1), (2, 3))
    mean = (128 * ROW_S + 4e-3) / 2  # 2 slots each
    skewed = CostModel(CFG, hw).step(layout, {1: LayerPlacement(ranks, (80.0, 16.0, 16.0, 16.0))})
    assert skewed.experts == pytest.approx((96 * ROW_S + 2e-3) / 1.25) and skewed.experts > mean
    mild = CostModel(CFG, hw).step(layout, {1: LayerPlacement(ranks, (40.0, 32.0, 28.0, 28.0))})
    assert mild.experts == pytest.approx(mean) and (72 * ROW_S + 2e-3) / 1.25 < mean
    dedicated = CostModel(CFG, HW).step(layout, {1: LayerPlacement(ranks, (40.0, 32.0, 28.0, 28.0))})
    assert dedicated.experts == pytest.approx(72 * ROW_S + 2e-3)  # sharing 1: the busiest rank


def test_sharing_lets_a_pipelines_stages_run_alone_through_the_bubble_but_no_faster_than_their_mean_work():
    """2 stages, 2 micro-batches: dedicated devices take 2 x stage 0 + stage 1 (the bubble); ranks that share the
    cores run 2x faster alone, which would be stage 0 + stage 1 / 2, but the work is 2 x the stages' mean,
    stage 0 + stage 1: no bubble, every term the stages' mean."""
    layout = Layout(ParallelSizes(pp=2), microbatches=2, global_batch=4)
    p2p = 1.0 + BYTES / 2048
    experts = (128 * ROW_S + 4 * 2e-3) / 2  # the step's 128 rows and 2 x 4 slots, per micro-batch
    stage0, stage1 = DENSE0 + CORE_S + p2p, DENSE1 + HEAD_S + CORE_S + experts + p2p
    assert CostModel(CFG, HW).step(layout, {1: even(rows=32.0)}).bubble == pytest.approx(stage1)
    got = CostModel(CFG, CORES_SHARED).step(layout, {1: even(rows=32.0)})
    assert stage0 + stage1 / 2 < stage0 + stage1
    only(got, dense=DENSE0 + DENSE1 + HEAD_S, attention=2 * CORE_S, p2p=2 * p2p, experts=experts,
         optimizer=(BLOCK1_P + 4 * EXPERT_P + HEAD_P) * 1e-6, control=5 * SCALAR)


def test_sharing_hides_no_collective_under_the_backward():
    cfg = config(n_layers=4)
    layout = Layout(ParallelSizes(dp=2, ep=2), extra_slots=1, global_batch=4)
    got = CostModel(cfg, CORES_SHARED).step(layout, {1: REPLICATED, 3: REPLICATED})
    assert got.replicas == pytest.approx(4 * PHASE)  # neither layer's exchange hides (2 * PHASE + PHASE - HIDE + PHASE)
    v = 2**17
    big = config(vocab_size=v)
    dp = Layout(ParallelSizes(dp=2), global_batch=4)
    dense = (v * 32 + 16 * 32 + BLOCK0_P + BLOCK1_P + 2 * 32 + v * 32) * 4
    reduce_s = (1.0 + dense / 4096) + (1.0 + 4 * EXPERT_P * 4 / 4096)
    assert CostModel(big, CORES_SHARED).step(dp, {1: even()}).grad_sync == pytest.approx(reduce_s)  # all of it
    assert CostModel(big, HW).step(dp, {1: even()}).grad_sync < reduce_s


# ---- the wait at collectives reached from compute (Hardware.sync_s: ranks that share the cores) ------------------

SYNCED = dataclasses.replace(HW, sync_s=0.1, sync_work_s=0.5)


def wait(work: float) -> float:
    """SYNCED.sync_wait(work), by its formula."""
    return 0.1 * work / (work + 0.5)


def test_sync_prices_each_collective_reached_from_compute_at_its_share_of_the_stages_compute():
    """dp 2, ep 2: per micro-batch the router's counts all-reduce, the combine forward and the combine's and the
    dispatch's backward all-to-alls are reached from compute, 4 in all, each after a quarter of the stage's
    compute; per step the world's 4 scalars and the dense gradients' reduction (edp = 1: no expert one)."""
    layout = Layout(ParallelSizes(dp=2, ep=2), global_batch=4)
    placement = {1: LayerPlacement(((0, 1), (2, 3)), (16.0,) * 4)}
    base, got = (CostModel(CFG, hw).step(layout, placement) for hw in (HW, SYNCED))
    work = base.dense + base.attention + base.experts
    assert got.syncs == 4 and base.sync == 0.0 and ParallelSizes(dp=2, ep=2).edp == 1
    assert got.sync == pytest.approx(4 * wait(work / 4) + 5 * wait(work / 4))
    assert dataclasses.replace(got, sync=0.0) == base


def test_sync_counts_every_tensor_parallel_collective():
    """tp 2: layer 0's 2 regions x 2 all-reduces, layer 1's attention pair and its token slices gathered both ways,
    the head's 3 and the embedding's all-reduce, the router's counts: 13 per micro-batch; per step the 4 scalars
    and the expert gradients' reduction (edp = 2: each tensor-parallel rank computes its own tokens' rows)."""
    layout = Layout(ParallelSizes(tp=2), global_batch=2)
    base, got = (CostModel(CFG, hw).step(layout, {1: even(rows=8.0)}) for hw in (HW, SYNCED))
    work = base.dense + base.attention + base.experts
    assert got.syncs == 13 and ParallelSizes(tp=2).edp == 2
    assert got.sync == pytest.approx(13 * wait(work / 13) + 5 * wait(work / 13))


def test_sync_of_a_pipeline_counts_each_stages_sends_per_micro_batch():
    """pp 2, 2 micro-batches, no data or tensor parallelism: each stage reaches one send per micro-batch (no
    all-reduce of counts over a stage of one rank); the slowest stage's waits run every micro-batch, the other's
    in the bubble; per step the 4 scalars and the loss's broadcast over the stages."""
    layout = Layout(ParallelSizes(pp=2), microbatches=2, global_batch=4)
    base, got = (CostModel(CFG, hw).step(layout, {1: even(rows=32.0)}) for hw in (HW, SYNCED))
    stage0 = DENSE0 + CORE_S  # the slowest stage's compute per micro-batch
    stage1 = DENSE1 + HEAD_S + CORE_S + (128 * ROW_S + 4 * 2e-3) / 2
    assert stage0 > stage1
    assert got.sync == pytest.approx(2 * wait(stage0) + 5 * wait(stage0))
    assert got.bubble == pytest.approx(base.bubble + wait(stage1))

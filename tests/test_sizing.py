"""Tests of llmbook.sizing: the memory calculator against published parameter counts, hand-computed
ZeRO numbers, Chapter 3's formulas, activations measured on a simulated tensor-parallel rank, and
the bytes each rank holds in a real 2-process DDP / FSDP2 job."""

import math
from dataclasses import fields

import pytest
import torch
from torch import nn

from llmbook.data_parallel import tiny_config
from llmbook.launch import load_result, torchrun
from llmbook.memory import (MemoryBreakdown, activation_memory, block_activation_bytes, korthikanti_layer_bytes,
                            measure_saved_tensors, training_state_bytes)
from llmbook.model import GPT, Block, GPTConfig, parameter_count
from llmbook.sizing import (BF16, FP32, GPUS, GiB, LLAMA_SHAPES, STEP_COUNTER_BYTES, Layout, Precision,
                            block_activation_bytes_parallel, estimate_memory, fsdp_shard_numel,
                            in_flight_micro_batches, korthikanti_parallel_layer_bytes, llama_config, min_gpus,
                            parameter_shapes, shard_rows, stage_blocks, stage_parameters, tensor_parallel_shape,
                            usable_bytes)

AUTOCAST = Precision("fp32 weights, bf16 autocast", 4, 4, 0, 8, autocast=True)
LLAMA_TINY = dict(norm="rmsnorm", mlp="swiglu", pos_encoding="rope", n_kv_head=2, bias=False)


# ---------------------------------------------------------------- shapes and parameter counts

@pytest.mark.parametrize("size, exact", [("1B", 1_100_048_384), ("7B", 6_738_415_616), ("70B", 68_976_648_192)])
def test_llama_parameter_counts_match_published(size, exact):
    config = llama_config(size)
    assert parameter_count(config) == exact
    assert math.isclose(exact, LLAMA_SHAPES[size]["published"], rel_tol=5e-3)
    assert sum(math.prod(s) for s in parameter_shapes(config).values()) == exact


@pytest.mark.parametrize("overrides", [{}, dict(tie_weights=True), LLAMA_TINY, dict(bias=False)])
def test_parameter_shapes_match_the_model(overrides):
    config = tiny_config(**overrides)
    real = [(name, tuple(p.shape)) for name, p in GPT(config).named_parameters()]
    assert list(parameter_shapes(config).items()) == real


def test_shard_rows_is_torch_chunk():
    for rows in (1, 5, 64, 257):
        for world in (1, 2, 3, 4, 8):
            chunks = [len(c) for c in torch.arange(rows).chunk(world)]
            chunks += [0] * (world - len(chunks))
            assert [shard_rows(rows, world, r) for r in range(world)] == chunks
            assert sum(fsdp_shard_numel((rows, 3), world, r) for r in range(world)) == rows * 3
            assert fsdp_shard_numel((rows, 3), world, world - 1, padded=True) == math.ceil(rows / world) * 3


def test_tensor_parallel_split_rules():
    assert tensor_parallel_shape("blocks.0.attn.q_proj.weight", (64, 32), 4) == (16, 32)
    assert tensor_parallel_shape("blocks.0.attn.q_proj.bias", (64,), 4) == (16,)
    assert tensor_parallel_shape("blocks.0.attn.out_proj.weight", (32, 64), 4) == (32, 16)
    assert tensor_parallel_shape("blocks.0.attn.out_proj.bias", (32,), 4) == (32,)
    assert tensor_parallel_shape("blocks.0.norm1.weight", (32,), 4) == (32,)
    assert tensor_parallel_shape("tok_emb.weight", (257, 32), 2) == (129, 32)
    assert tensor_parallel_shape("tok_emb.weight", (257, 32), 2, vocab_parallel=False) == (257, 32)
    with pytest.raises(ValueError, match="not divisible"):
        tensor_parallel_shape("blocks.0.mlp.fc.weight", (66, 32), 4)


def test_tensor_ranks_together_hold_the_model_once_plus_replicas():
    config = llama_config("7B")
    shapes = parameter_shapes(config)
    for t in (2, 4, 8):
        local = sum(math.prod(tensor_parallel_shape(n, s, t)) for n, s in shapes.items())
        replicated = sum(math.prod(s) for n, s in shapes.items() if tensor_parallel_shape(n, s, t) == s)
        assert t * local - (t - 1) * replicated == parameter_count(config)


def test_pipeline_stages_partition_the_parameters():
    for config in (llama_config("1B"), tiny_config(), tiny_config(tie_weights=True)):
        for p in (1, 2, 3):
            if p > config.n_layer:
                continue
            names = [n for s in range(p) for n in stage_parameters(config, s, p)]
            layers = [i for s in range(p) for i in stage_blocks(config.n_layer, s, p)]
            assert layers == list(range(config.n_layer))
            extra = ["lm_head.weight"] if config.tie_weights and p > 1 else []  # Megatron's copy
            assert sorted(names) == sorted(list(parameter_shapes(config)) + extra)
    assert [len(stage_blocks(22, s, 4)) for s in range(4)] == [6, 6, 5, 5]
    with pytest.raises(ValueError, match="cannot fill"):
        stage_blocks(2, 0, 4)


# ---------------------------------------------------------------- ZeRO by hand

def _toy_config():
    # 2 layers, d = 8, no biases: every tensor has a dim 0 divisible by 4
    return GPTConfig(vocab_size=16, context_length=8, n_layer=2, n_head=2, d_model=8, d_ff=16,
                     bias=False, tie_weights=False)


def test_zero_stages_by_hand():
    config = _toy_config()
    shapes = parameter_shapes(config)
    psi, n = parameter_count(config), len(shapes)
    assert psi == 2 * (8 * 8 * 4 + 2 * 8 * 16 + 2 * 8) + 8 + 16 * 8 * 2 + 8 * 8  # blocks, norm_f, emb + head, positions
    d, w, g, k = 4, 2, 2, 12  # bf16: weights 2, gradients 2, master + moments 12
    expected = {0: (psi * w, psi * g, psi * k + 4 * n),
                1: (psi * w, psi * g, psi * k // d + 4),
                2: (psi * w, psi * g // d, psi * k // d + 4),
                3: (psi * w // d, psi * g // d, psi * k // d + 4 * n)}
    for zero, (weights, grads, optimizer) in expected.items():
        e = estimate_memory(config, Layout(data=d, zero=zero), seq_len=8, precision=BF16)
        assert (e.weights, e.gradients, e.optimizer) == (weights, grads, optimizer), zero


def test_zero_paper_figure_1():
    # Rajbhandari et al. (2020): 7.5B parameters, d = 64, K = 12 -> 120, 31.4, 16.6, 1.9 GB.
    # The 7B shape, scaled: the per-parameter ratios must be those of the paper's formulas.
    config = llama_config("7B")
    psi = parameter_count(config)
    n = len(parameter_shapes(config))
    paper = [16 * psi, 4 * psi + 12 * psi / 64, 2 * psi + 14 * psi / 64, 16 * psi / 64]
    for zero in range(4):
        states = estimate_memory(config, Layout(data=64, zero=zero), seq_len=8).model_states
        assert states == paper[zero] + STEP_COUNTER_BYTES * (n if zero in (0, 3) else 1)
    assert [round(v / psi * 7.5e9 / 1e9, 1) for v in paper] == [120.0, 31.4, 16.6, 1.9]


def test_uneven_zero3_shards_follow_fsdp():
    config = tiny_config(vocab_size=257)
    total = sum(estimate_memory(config, Layout(data=2, zero=3), seq_len=8, precision=FP32,
                                data_rank=r).weights for r in range(2))
    assert total == 4 * parameter_count(config)
    rank0, rank1 = (estimate_memory(config, Layout(data=2, zero=3), seq_len=8, precision=FP32, data_rank=r)
                    for r in range(2))
    assert rank0.weights - rank1.weights == 2 * 64 * 4  # one extra row of tok_emb and of lm_head


# ---------------------------------------------------------------- consistency and monotonicity

@pytest.mark.parametrize("overrides", [{}, LLAMA_TINY, dict(dropout=0.1), dict(attention="naive")])
def test_one_gpu_equals_chapter_3(overrides):
    config = tiny_config(**overrides)
    state = training_state_bytes(parameter_count(config))
    for precision in (FP32, AUTOCAST):
        for checkpoint in (False, True):
            e = estimate_memory(config, Layout(), micro_batch_size=2, seq_len=32, precision=precision,
                                checkpoint=checkpoint)
            a = activation_memory(config, 2, 32, autocast=precision.autocast, checkpoint=checkpoint)
            assert e.activations == a.total and e.transient == a.recompute
            assert e.weights == e.gradients == 4 * parameter_count(config)
            assert e.optimizer == 8 * parameter_count(config) + 4 * len(parameter_shapes(config))
            # the estimate is Chapter 3's MemoryBreakdown plus transient buffers (and step counters)
            assert isinstance(e, MemoryBreakdown)
            assert e.total == state.total + 4 * len(parameter_shapes(config)) + a.total + a.recompute
            assert e.model_states == e.weights + e.gradients + e.optimizer


def test_more_sharding_never_costs_more():
    config = llama_config("7B")
    for checkpoint in (False, True):
        totals = [estimate_memory(config, Layout(8, zero=z), checkpoint=checkpoint).model_states for z in range(4)]
        assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
        by_d = [estimate_memory(config, Layout(d, zero=3), checkpoint=checkpoint) for d in (1, 2, 8, 64)]
        assert [e.model_states for e in by_d] == sorted((e.model_states for e in by_d), reverse=True)
        assert len({e.activations for e in by_d}) == 1  # data parallelism never splits activations
        by_t = [estimate_memory(config, Layout(1, t, sequence_parallel=t > 1), checkpoint=checkpoint) for t in (1, 2, 4, 8)]
        assert [e.total for e in by_t] == sorted((e.total for e in by_t), reverse=True)
    plain = estimate_memory(config, Layout(1, 4))
    with_sp = estimate_memory(config, Layout(1, 4, sequence_parallel=True))
    assert with_sp.activations < plain.activations and with_sp.model_states == plain.model_states
    assert estimate_memory(config, checkpoint=True).activations < estimate_memory(config).activations


def test_pipeline_first_stage_holds_p_micro_batches():
    config = llama_config("7B")
    assert [in_flight_micro_batches(s, 4) for s in range(4)] == [4, 3, 2, 1]
    assert [in_flight_micro_batches(s, 4, 2) for s in range(4)] == [2, 2, 2, 1]
    assert in_flight_micro_batches(3, 4, 8, "gpipe") == 8
    first = estimate_memory(config, Layout(pipeline=4), stage=0)
    whole = activation_memory(config, 1, 4096, autocast=True)
    # p micro-batches of L/p blocks: all blocks' activations plus p copies of the embedding inputs
    assert first.activations == whole.blocks + 4 * whole.embedding
    assert estimate_memory(config, Layout(pipeline=4)).stage == 0


def test_tensor_parallel_activations_reduce_to_chapter_3_and_korthikanti():
    for overrides in ({}, LLAMA_TINY, dict(dropout=0.1)):
        config = GPTConfig(vocab_size=64, context_length=16, n_layer=1, n_head=4, d_model=32, **overrides)
        for autocast in (False, True):
            assert block_activation_bytes_parallel(config, 2, 16, autocast, 1) == \
                block_activation_bytes(config, 2, 16, autocast)
            full_sp = [block_activation_bytes_parallel(config, 2, 16, autocast, t, t > 1) for t in (1, 2, 4)
                       if config.n_kv_head % t == 0]
            assert full_sp == sorted(full_sp, reverse=True)
    assert korthikanti_parallel_layer_bytes(2048, 4, 1024, 16) == korthikanti_layer_bytes(2048, 4, 1024, 16)
    s, b, h, a = 2048, 4, 1024, 16
    assert korthikanti_parallel_layer_bytes(s, b, h, a, 4) == s * b * h * (10 + 24 // 4) + 5 * a * s * s * b // 4
    assert korthikanti_parallel_layer_bytes(s, b, h, a, 4, True) == korthikanti_layer_bytes(s, b, h, a) // 4


def _rank_block(config, t):
    """One block as one of t tensor-parallel ranks computes it."""
    block = Block(config).train()
    d, kv, f, bias = config.d_model, config.n_kv_head * config.head_dim, config.d_ff, config.bias
    block.attn.q_proj = nn.Linear(d, d // t, bias=bias)
    block.attn.k_proj = nn.Linear(d, kv // t, bias=bias)
    block.attn.v_proj = nn.Linear(d, kv // t, bias=bias)
    block.attn.out_proj = nn.Linear(d // t, d, bias=bias)
    if config.mlp == "swiglu":
        block.mlp.gate_proj, block.mlp.up_proj = nn.Linear(d, f // t, bias=bias), nn.Linear(d, f // t, bias=bias)
        block.mlp.down_proj = nn.Linear(f // t, d, bias=bias)
    else:
        block.mlp.fc, block.mlp.proj = nn.Linear(d, f // t, bias=bias), nn.Linear(f // t, d, bias=bias)
    return block


@pytest.mark.parametrize("overrides", [{}, LLAMA_TINY, dict(attention="naive", dropout=0.1)])
def test_tensor_parallel_block_formula_matches_a_measured_rank(overrides):
    config = GPTConfig(vocab_size=64, context_length=16, n_layer=1, n_head=4, d_model=32, **overrides)
    for t in (2, 4):
        if config.n_kv_head % t:
            continue
        for autocast in (False, True):
            block = _rank_block(config, t)
            x = torch.randn(2, 12, 32, requires_grad=True)

            def forward():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    return block(x, torch.arange(12))

            _, report = measure_saved_tensors(forward, exclude=block.parameters())
            copies = 2 * sum(p.numel() for p in block.parameters() if p.dim() == 2) if autocast else 0
            assert report.total_bytes - copies == block_activation_bytes_parallel(config, 2, 12, autocast, t)


# ---------------------------------------------------------------- GPUs and errors

def test_usable_memory_and_min_gpus():
    h100 = next(g for g in GPUS if g.name == "H100 80GB")
    assert usable_bytes(h100) == int(80 * GiB * 0.9) - 2 * GiB
    layout, estimate = min_gpus(llama_config("7B"), h100, checkpoint=True)
    assert estimate.total <= usable_bytes(h100) and layout.gpus == 2
    # one GPU fewer must not fit in any layout the search allows
    assert estimate_memory(llama_config("7B"), Layout(), checkpoint=True).total > usable_bytes(h100)
    assert min_gpus(llama_config("70B"), GPUS[0], max_gpus=8) is None


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="ZeRO has stages"):
        Layout(zero=4)
    with pytest.raises(ValueError, match="positive integer"):
        Layout(data=0)
    with pytest.raises(TypeError, match="Layout.tensor"):
        Layout(tensor=2.0)
    with pytest.raises(TypeError, match="micro_batch_size"):
        estimate_memory(tiny_config(), micro_batch_size=1.5)
    with pytest.raises(ValueError, match="micro_batches"):
        in_flight_micro_batches(0, 2, micro_batches=0)
    with pytest.raises(ValueError, match="needs tensor > 1"):
        Layout(sequence_parallel=True)
    with pytest.raises(ValueError, match="n_kv_head=4 is not divisible"):
        estimate_memory(llama_config("1B"), Layout(tensor=8))
    with pytest.raises(ValueError, match="data_rank"):
        estimate_memory(tiny_config(), Layout(data=2), data_rank=2)
    with pytest.raises(ValueError, match="schedule"):
        in_flight_micro_batches(0, 2, schedule="zb")
    with pytest.raises(ValueError, match="Unknown size"):
        llama_config("13B")


# ---------------------------------------------------------------- measured on a 2-process job

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    path = tmp_path_factory.mktemp("sizing") / "sizing.json"
    torchrun("llmbook.sizing", 2, args=["--batch-size", 4, "--out", path], timeout=240, echo=False).check()
    return load_result(path)


RUNS = {"DDP": (tiny_config(), Layout(data=2)), "DDP, bucket views": (tiny_config(), Layout(data=2)),
        "FSDP": (tiny_config(), Layout(data=2, zero=3)),
        "FSDP, vocab 257": (tiny_config(vocab_size=257), Layout(data=2, zero=3)),
        "TP (DTensor)": (tiny_config(), Layout(tensor=2, vocab_parallel=False))}


@pytest.mark.parametrize("run", list(RUNS))
def test_measured_bytes_equal_predicted_per_rank(measured, run):
    config, layout = RUNS[run]
    assert measured["world_size"] == 2
    for rank_result in measured["ranks"]:
        got = rank_result[run]["measured"]
        rows = 4 // layout.data
        assert rank_result[run]["rows"] == rows
        predicted = estimate_memory(config, layout, micro_batch_size=rows, seq_len=config.context_length,
                                    precision=FP32, data_rank=rank_result["rank"] if layout.data > 1 else 0)
        # measured and predicted are the same dataclass's fields: the job wrote exactly a MemoryBreakdown
        assert isinstance(predicted, MemoryBreakdown) and set(got) == {f.name for f in fields(MemoryBreakdown)}
        measured_breakdown = MemoryBreakdown(**got)
        for part in fields(MemoryBreakdown):
            assert getattr(measured_breakdown, part.name) == getattr(predicted, part.name), (run, rank_result["rank"], part)
        assert measured_breakdown.total == predicted.total - predicted.transient
    # sanity: the runs really differ (a job that measured nothing sharded could not pass all of these)
    if layout.zero == 3 or layout.tensor > 1:
        assert got["weights"] < 4 * parameter_count(config)


def test_measured_fsdp_padding_and_ddp_buckets(measured):
    rank0, rank1 = sorted(measured["ranks"], key=lambda r: r["rank"])
    uneven0, uneven1 = rank0["FSDP, vocab 257"], rank1["FSDP, vocab 257"]
    assert uneven0["measured"]["weights"] - uneven1["measured"]["weights"] == 2 * 64 * 4
    for r in (uneven0, uneven1):  # every rank allocates ceil(257 / 2) rows; Adam's moments are unpadded
        assert r["stored"]["weights"] == r["padded_weights"] == r["stored"]["gradients"]
        assert r["stored"]["optimizer"] == r["measured"]["optimizer"]
    for r in (rank0, rank1):
        plain, views = r["DDP"], r["DDP, bucket views"]
        assert plain["ddp_bucket_bytes"] == plain["measured"]["gradients"]  # a second, flat copy of the gradients
        assert views["stored"]["gradients"] == views["ddp_bucket_bytes"] == views["measured"]["gradients"]

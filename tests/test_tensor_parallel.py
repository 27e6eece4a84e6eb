"""Tests of llmbook.tensor_parallel: one 2-process job (tensor parallelism by hand, with DTensor,
with sequence parallelism, DDP and the wrong-g pitfall, all against one process), plus in-process
checks of the sharding helpers, the DTensor plan and the error messages."""

import copy
import types

import pytest
import torch
from torch import nn

from llmbook import data_parallel as dp
from llmbook.launch import load_result, torchrun
from llmbook.memory import MemoryBreakdown
from llmbook.model import MLP, CausalSelfAttention
from llmbook.tensor_parallel import (TensorParallelSublayer, apply_dtensor_parallel,
                                     check_tensor_parallel_size, local_nbytes, sequence_parallel_plan,
                                     shard_gpt_, shard_sublayer_, split_linear, sublayer_linears,
                                     tensor_parallel_comm_per_step, tensor_parallel_plan)

STEPS, BATCH = 3, 8
LLAMA = dict(n_head=8, n_kv_head=4, mlp="swiglu", norm="rmsnorm", pos_encoding="rope")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The notebook's job on 2 processes, both models, 3 SGD steps."""
    path = tmp_path_factory.mktemp("tensor_parallel") / "result.json"
    torchrun("llmbook.tensor_parallel", 2, args=["--steps", STEPS, "--batch-size", BATCH, "--out", path],
             timeout=240, echo=False).check()
    return load_result(path)


def checks_of(job, strategy):
    found = [(r["rank"], name, c) for r in job["ranks"] for name, c in r["checks"].items()
             if name.endswith(", " + strategy)]
    assert found, f"no results for {strategy}"
    return found


@pytest.mark.parametrize("strategy", ["by hand", "DTensor", "DTensor + SP"])
def test_tensor_parallel_equals_one_process(job, strategy):
    found = checks_of(job, strategy)
    assert {name for _, name, _ in found} == {f"gpt2-style, {strategy}", f"llama-style, {strategy}"}
    for rank, name, c in found:
        assert c["logits"] < 1e-5, (rank, name, c)
        assert c["grads"] < 1e-6, (rank, name, c)
        assert c["params"] < 1e-6, (rank, name, c)


def test_reference_is_single_process_run(job):
    batches = dp.global_batches(STEPS, BATCH, 32)
    reference = dp.single_process_run(dp.tiny_config(), batches, lr=job["lr"])
    for r in job["ranks"]:
        assert r["reference_losses"]["gpt2-style"] == pytest.approx(reference.losses, rel=1e-5)
        assert r["checks"]["gpt2-style, by hand"]["loss_step0"] == pytest.approx(reference.losses[0], rel=1e-5)


def test_ddp_equals_one_process_and_counts_all_gradients(job):
    for rank, name, c in checks_of(job, "DDP"):
        assert c["grads"] < 1e-6 and c["params"] < 1e-6, (rank, c)
    n_params = job["configs"]["gpt2-style"]["n_params"]
    for r in job["ranks"]:
        assert r["comm"]["gpt2-style, DDP"]["bytes"] == 4 * n_params


def test_comm_counts_match_the_formula(job):
    for label, overrides in (("gpt2-style", {}), ("llama-style", LLAMA)):
        config = dp.tiny_config(**overrides)
        calls, nbytes = tensor_parallel_comm_per_step(config, BATCH, config.context_length)
        assert calls == 4 * config.n_layer and nbytes == calls * BATCH * 32 * 64 * 4
        n_columns = len(sublayer_linears(CausalSelfAttention(config))[0]) + len(sublayer_linears(MLP(config))[0])
        for r in job["ranks"]:
            by_hand = r["comm"][f"{label}, by hand"]
            assert (by_hand["calls"], by_hand["bytes"]) == (calls, nbytes)
            assert by_hand["forward_calls"] == by_hand["backward_calls"] == 2 * config.n_layer
            dtensor = r["comm"][f"{label}, DTensor"]
            assert dtensor["forward"] == {"all_reduce": 2 * config.n_layer}
            assert dtensor["step"] == {"all_reduce": (2 + n_columns) * config.n_layer}
            sequence_parallel = r["comm"][f"{label}, DTensor + SP"]["forward"]
            assert sequence_parallel["reduce_scatter_tensor"] == 2 * config.n_layer
            assert "all_reduce" not in sequence_parallel


def test_wrong_g_multiplies_the_gradient_by_world_size(job):
    pitfall = job["ranks"][0]["pitfall"]
    assert pitfall["grad_ratio"] == pytest.approx(job["world_size"], rel=1e-5)
    assert pitfall["grad_diff"] > 1e-2


def test_memory_per_rank(job):
    config = dp.tiny_config()
    model = dp.build_model(config, seed=0)
    n_full = sum(p.numel() for p in model.parameters())
    layout = shard_gpt_(model, 0, 2)
    n_local = sum(p.numel() for p in model.parameters())
    assert set(layout) == {name for name, _ in model.named_parameters()}
    for r in job["ranks"]:
        memory = {name: MemoryBreakdown(**m) for name, m in r["memory"].items()}  # the job wrote its fields
        assert memory["one process"].weights == memory["DDP"].weights == 4 * n_full
        for name in ("TP by hand", "TP DTensor"):
            assert memory[name].weights == memory[name].gradients == 4 * n_local
            assert memory[name].optimizer == 8 * n_local
        assert memory["TP DTensor"].activations is None
        # DDP halves the rows; TP keeps all rows but splits the inside of every sublayer
        assert memory["DDP"].activations < memory["TP by hand"].activations < memory["one process"].activations
        assert memory["one process"].total == 16 * n_full + memory["one process"].activations


# In-process tests: no process group needed.

@pytest.mark.parametrize("overrides", [{}, LLAMA])
@pytest.mark.parametrize("world_size", [2, 4])
def test_shards_sum_to_the_full_sublayer(overrides, world_size):
    torch.manual_seed(0)
    config = dp.tiny_config(**overrides)
    x, positions = torch.randn(2, 32, 64), torch.arange(32)
    for full in (CausalSelfAttention(config), MLP(config)):
        args = (x, positions) if isinstance(full, CausalSelfAttention) else (x,)
        with torch.no_grad():  # a bias that is not zero, so that adding it W times would show
            getattr(full, sublayer_linears(full)[1]).bias.normal_()
        shards = [copy.deepcopy(full) for _ in range(world_size)]
        biases = [shard_sublayer_(module, rank, world_size) for rank, module in enumerate(shards)]
        assert all(getattr(m, sublayer_linears(m)[1]).bias is None for m in shards)
        with torch.no_grad():
            torch.testing.assert_close(sum(m(*args) for m in shards) + biases[0], full(*args))


def test_split_linear_columns_and_rows():
    torch.manual_seed(0)
    linear, x = nn.Linear(8, 12), torch.randn(3, 8)
    columns = [split_linear(linear, 0, r, 3) for r in range(3)]
    rows = [split_linear(linear, 1, r, 2) for r in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([c(x) for c in columns], dim=-1), linear(x))
        partial = sum(row(part) for row, part in zip(rows, x.chunk(2, dim=-1)))
        torch.testing.assert_close(partial + linear.bias, linear(x))
    with pytest.raises(ValueError, match="do not split evenly"):
        split_linear(linear, 0, 0, 5)
    with pytest.raises(ValueError, match="rank=2"):
        split_linear(linear, 0, 2, 2)


def test_shard_gpt_layout_and_shapes():
    config = dp.tiny_config(**LLAMA)
    full = dict(dp.build_model(config, seed=0).named_parameters())
    model = dp.build_model(config, seed=0)
    layout = shard_gpt_(model, 1, 2)
    assert isinstance(model.blocks["0"].attn, TensorParallelSublayer)
    full_names = {full_name for full_name, _ in layout.values()}
    assert full_names == set(full)
    for name, p in model.named_parameters():
        full_name, dim = layout[name]
        if dim is None:
            assert torch.equal(p, full[full_name])
        else:  # rank 1's slice, the second half along dim
            assert torch.equal(p, full[full_name].chunk(2, dim=dim)[1])
    with pytest.raises(ValueError, match="already sharded"):
        shard_gpt_(model, 1, 2)


def test_tensor_parallel_plan_covers_every_block_linear():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    for overrides in ({}, LLAMA):
        model = dp.build_model(dp.tiny_config(**overrides), seed=0)
        plan = tensor_parallel_plan(model)
        linears = {name for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name.startswith("blocks.")}
        assert set(plan) == linears
        for name, style in plan.items():
            row = name.endswith(("out_proj", ".proj", "down_proj"))
            assert isinstance(style, RowwiseParallel if row else ColwiseParallel), name
    # a pipeline stage without some blocks gets a plan for the blocks it has
    model = dp.build_model(dp.tiny_config(n_layer=3), seed=0)
    del model.blocks["0"]
    assert {name.split(".")[1] for name in tensor_parallel_plan(model)} == {"1", "2"}
    assert "blocks.1" in sequence_parallel_plan(model)  # the split moves to the first block present


def test_apply_dtensor_parallel_rejects_bad_head_counts_before_using_the_mesh():
    model = dp.build_model(dp.tiny_config(), seed=0)  # 4 heads
    before = {name: p.clone() for name, p in model.named_parameters()}
    mesh_of_3 = types.SimpleNamespace(ndim=1, size=lambda: 3)
    with pytest.raises(ValueError, match="n_head=4"):
        apply_dtensor_parallel(model, mesh_of_3)
    with pytest.raises(ValueError, match="mesh\\['tp'\\]"):
        apply_dtensor_parallel(model, types.SimpleNamespace(ndim=2, size=lambda: 4))
    assert all(type(p) is nn.Parameter and torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_check_tensor_parallel_size():
    check_tensor_parallel_size(dp.tiny_config(**LLAMA), 4)
    with pytest.raises(ValueError, match="n_kv_head=2"):
        check_tensor_parallel_size(dp.tiny_config(n_kv_head=2), 4)
    with pytest.raises(ValueError, match="dropout"):
        check_tensor_parallel_size(dp.tiny_config(dropout=0.1), 2)
    with pytest.raises(ValueError, match="positive integer"):
        check_tensor_parallel_size(dp.tiny_config(), 0)
    with pytest.raises(TypeError, match="world_size"):
        check_tensor_parallel_size(dp.tiny_config(), 2.0)
    with pytest.raises(TypeError, match="CausalSelfAttention or an MLP"):
        sublayer_linears(nn.Linear(2, 2))


def test_local_nbytes():
    assert local_nbytes([torch.zeros(3, 4), None, torch.zeros(2, dtype=torch.float64)]) == 48 + 16

"""A pipeline x data x tensor parallel job trains like one process.

The notebook runs the full 2 x 2 x 2 mesh (8 processes, about 30 s of start-up here). This file
launches 4 processes, pp=2 x dp=2 x tp=1, to stay well under its time budget: the pipeline split,
FSDP over two replicas (inside the pipeline stages) and the tensor-parallel wrapping (on a 1-rank
mesh, so parameters still become 2-D DTensors) all run; the tensor-parallel split itself is tested
by tests/test_tensor_parallel.py and, at tp=2, by the notebook."""

import pytest
import torch

from llmbook.launch import load_result, torchrun
from llmbook.mesh3d import mesh_coordinates, mesh_groups

SHAPE = (2, 2, 1)  # pp, dp, tp


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh3d") / "mesh3d.json"
    pp, dp, tp = SHAPE
    torchrun("llmbook.mesh3d", pp * dp * tp, args=["--pp", pp, "--dp", dp, "--tp", tp, "--steps", "3", "--out", out],
             timeout=240, echo=False).check()
    return load_result(out)


def test_every_rank_matches_one_process(job):
    assert [r["rank"] for r in job["ranks"]] == list(range(SHAPE[0] * SHAPE[1] * SHAPE[2]))
    for r in job["ranks"]:
        assert r["grad_diff"] < 1e-6 and r["param_diff"] < 1e-6, r["rank"]
        assert r["full_grad_diff"] < 1e-6 and r["full_param_diff"] < 1e-6, r["rank"]


def test_global_loss_is_the_mean_of_the_replicas(job):
    last_stage = [r for r in job["ranks"] if r["coords"][0] == 1]
    assert all(r["losses"] for r in last_stage) and not any(r["losses"] for r in job["ranks"] if r["coords"][0] == 0)
    replicas = {r["coords"][1]: r["losses"] for r in last_stage if r["coords"][2] == 0}
    assert sorted(replicas) == list(range(SHAPE[1]))
    mean = [sum(values) / len(values) for values in zip(*replicas.values())]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(job["reference_losses"]), rtol=0, atol=1e-5)


def test_what_each_rank_holds(job):
    for r in job["ranks"]:
        pp, dp, tp = r["coords"]
        assert (pp, dp, tp) == mesh_coordinates(r["rank"], *SHAPE)
        assert r["blocks"] == [pp]
        assert r["has"] == (["tok_emb", "pos_emb"] if pp == 0 else ["norm_f", "lm_head"])
        n_dp, n_tp = SHAPE[1], SHAPE[2]
        full, local, _ = r["shards"][f"blocks.{pp}.attn.q_proj.weight"]
        assert full == [64, 64] and local == [64 // (n_tp * n_dp), 64]  # rows split over tp, then over dp
        full, local, _ = r["shards"][f"blocks.{pp}.attn.out_proj.weight"]
        assert full == [64, 64] and local == [64 // n_dp, 64 // n_tp]  # columns over tp, rows over dp
        memory = r["memory"]
        assert memory["gradients"] == memory["weights"] and memory["optimizer"] == 2 * memory["weights"]



def test_ranks_hold_one_copy_plus_what_tp_replicates(job):
    """Summed over the ranks, the weights are one copy of the model, plus tp - 1 more copies of
    what tensor parallelism leaves whole: embeddings, norms, head, row-parallel biases."""
    from torch.distributed.tensor.parallel import RowwiseParallel

    from llmbook.data_parallel import build_model, tiny_config
    from llmbook.tensor_parallel import tensor_parallel_plan

    model = build_model(tiny_config(), 0)
    plan = tensor_parallel_plan(model)
    split = {f"{module}.{kind}" for module, style in plan.items() for kind in ("weight", "bias")
             if not (kind == "bias" and isinstance(style, RowwiseParallel))}
    whole = sum(p.numel() for name, p in model.named_parameters() if name not in split)
    assert 0 < whole < job["n_params"]
    tp = SHAPE[2]
    assert sum(r["memory"]["weights"] for r in job["ranks"]) == 4 * (job["n_params"] + (tp - 1) * whole)


# ---- the layout, in-process ---------------------------------------------------------------------

def test_coordinates_follow_torch_row_major_layout():
    for shape in [(2, 2, 2), (4, 4, 8), (1, 3, 2), (3, 1, 1)]:
        grid = torch.arange(shape[0] * shape[1] * shape[2]).reshape(shape)
        for rank in range(grid.numel()):
            assert grid[mesh_coordinates(rank, *shape)].item() == rank


def test_groups_partition_the_ranks():
    groups = mesh_groups(4, 4, 8)
    for name, size in (("pp", 4), ("dp", 4), ("tp", 8)):
        members = sorted(rank for group in groups[name] for rank in group)
        assert members == list(range(128)) and all(len(g) == size for g in groups[name])
    assert [72, 73, 74, 75, 76, 77, 78, 79] in groups["tp"]
    assert [69, 77, 85, 93] in groups["dp"] and [13, 45, 77, 109] in groups["pp"]


@pytest.mark.parametrize("args, error", [((8, 2, 2, 2), ValueError), ((-1, 2, 2, 2), ValueError),
                                         ((0, 0, 2, 2), ValueError), ((0, 2, 1.5, 2), TypeError)])
def test_bad_layout_is_refused(args, error):
    with pytest.raises(error):
        mesh_coordinates(*args)

"""Tests of llmbook.pipeline: stage splitting, the schedules' bubble and memory, and a real
pipeline job (GPipe and 1F1B, 4 stages and 2-stage sub-groups) against one process."""

import math

import pytest
import torch
import torch.distributed as dist

from llmbook.data_parallel import build_model, global_batches, max_abs_diff, tiny_config
from llmbook.launch import load_result, torchrun
from llmbook.pipeline import (bubble_fraction, busy_seconds, in_flight_peak, make_pipeline, schedule_order,
                              simulate_schedule, split_stage, stage_blocks)

N_STAGES, MICROBATCHES = 4, 4


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One launch: 4 ranks, one block each, GPipe and 1F1B, plus 1F1B pipelines on ranks {0,1} and {2,3}."""
    path = tmp_path_factory.mktemp("pipeline") / "result.json"
    torchrun("llmbook.pipeline", N_STAGES, args=["--steps", "3", "--microbatches", MICROBATCHES,
                                                 "--subgroup-size", "2", "--out", path], echo=False).check()
    return load_result(path)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_pipeline_equals_single_process(job, kind):
    assert [r["stage"] for r in job["stages"]] == list(range(N_STAGES))
    for r in job["stages"]:
        assert r[f"{kind}_grad_diff"] < 1e-6, r
        assert r[f"{kind}_param_diff"] < 1e-6, r
        is_last = r["stage"] == N_STAGES - 1
        assert (r[f"{kind}_loss_diff"] is not None) == is_last
        if is_last:
            assert r[f"{kind}_loss_diff"] < 1e-5


def test_schedules_ran_as_written_and_memory(job):
    for r in job["stages"]:
        assert r["gpipe_order_as_expected"] and r["1f1b_order_as_expected"]
        assert r["gpipe_peak_in_flight"] == MICROBATCHES
        assert r["1f1b_peak_in_flight"] == min(MICROBATCHES, N_STAGES - r["stage"])
        assert r["gpipe_vs_1f1b_param_diff"] == 0.0  # same computations, same accumulation order


def test_stages_partition_the_parameters(job):
    names = [name for r in job["stages"] for name in r["parameters"]]
    assert len(names) == len(set(names)) and sorted(names) == job["full_parameters"]
    assert [r["blocks"] for r in job["stages"]] == [[0], [1], [2], [3]]


def test_pipelines_on_subgroups(job):
    for r in job["stages"]:
        sub = r["subgroup"]
        assert sub["ranks"] == ([0, 1] if r["stage"] < 2 else [2, 3])
        assert sub["stage"] == r["stage"] % 2 and sub["blocks"] == ([0, 1] if sub["stage"] == 0 else [2, 3])
        assert sub["grad_diff"] < 1e-6 and sub["param_diff"] < 1e-6
        assert (sub["loss_diff"] is None) == (sub["stage"] == 0)


@pytest.mark.parametrize("n_layer,n_stages", [(4, 1), (4, 2), (4, 4), (5, 2), (7, 3)])
def test_split_stage_partitions_names_and_chains_to_the_full_model(n_layer, n_stages):
    config = tiny_config(n_layer=n_layer)
    full = build_model(config, seed=0)
    stages = [split_stage(build_model(config, seed=0), s, n_stages) for s in range(n_stages)]
    names = [name for stage in stages for name, _ in stage.named_parameters()]
    assert len(names) == len(set(names))
    assert set(names) == {name for name, _ in full.named_parameters()}
    blocks = [int(b) for stage in stages for b in stage.blocks]
    assert blocks == list(range(n_layer))  # contiguous, in order, each once
    sizes = [len(stage.blocks) for stage in stages]
    assert max(sizes) - min(sizes) <= 1
    assert [s.tok_emb is not None for s in stages] == [s == 0 for s in range(n_stages)]
    assert [s.lm_head is not None for s in stages] == [s == n_stages - 1 for s in range(n_stages)]
    (inputs, _), = global_batches(1, 2, config.context_length)
    with torch.no_grad():
        x = inputs
        for stage in stages:
            x = stage(x)
        assert torch.equal(x, full(inputs))


def test_stage_blocks():
    assert [list(stage_blocks(7, s, 3)) for s in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert list(stage_blocks(2, 1, 2)) == [1]


@pytest.mark.parametrize("args,match", [((0, 5), "cannot fill 5"), ((2, 2), "out of range"),
                                        ((-1, 2), "out of range"), ((0, 0), "positive")])
def test_split_stage_errors(args, match):
    with pytest.raises(ValueError, match=match):
        split_stage(build_model(tiny_config(n_layer=4), seed=0), *args)


def test_split_stage_refuses_tied_and_already_split_models():
    with pytest.raises(ValueError, match="tie_weights"):
        split_stage(build_model(tiny_config(n_layer=4, tie_weights=True), seed=0), 0, 2)
    stage = split_stage(build_model(tiny_config(n_layer=4), seed=0), 0, 2)
    with pytest.raises(ValueError, match="split already"):
        split_stage(stage, 0, 2)


def test_bubble_formula():
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(2, 1) == 0.5
    assert math.isclose(bubble_fraction(4, 8), 3 / 11)
    with pytest.raises(ValueError):
        bubble_fraction(0, 4)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 2), (2, 5), (3, 4), (4, 8), (5, 16)])
def test_simulated_bubble_and_memory_match_the_formulas(kind, p, m):
    stage_events = simulate_schedule(schedule_order(kind, p, m), forward_time=1.0, backward_time=2.0)
    makespan = max(end for events in stage_events for *_, end in events)
    assert makespan == 3 * (m + p - 1)
    for s, events in enumerate(stage_events):
        assert math.isclose(1 - busy_seconds(events) / makespan, bubble_fraction(p, m))
        assert in_flight_peak(events) == (m if kind == "gpipe" else min(m, p - s))


def test_schedule_helpers_errors():
    with pytest.raises(ValueError, match="schedule"):
        schedule_order("zero-bubble", 2, 4)
    with pytest.raises(ValueError, match="deadlock"):
        simulate_schedule([["B0", "F0"], ["F0", "B0"]])
    with pytest.raises(ValueError, match="one per stage"):
        simulate_schedule(schedule_order("gpipe", 2, 2), forward_time=[1, 1, 1])


def test_one_process_pipeline_scales_the_loss():
    """A single-stage pipeline in this process: 4 micro-batch means, gradients divided by 4 by the
    schedule, must equal the gradients of the mean loss over the whole batch."""
    config = tiny_config(n_layer=2)
    (inputs, targets), = global_batches(1, 8, config.context_length)
    reference = build_model(config, seed=0)
    reference(inputs, targets).backward()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        stage = split_stage(build_model(config, seed=0), 0, 1)
        pipe = make_pipeline(stage, 0, 1, n_microbatches=4, schedule="1f1b")
        loss = pipe.step(inputs, targets)
        assert max_abs_diff({n: p.grad for n, p in stage.named_parameters()},
                            {n: p.grad for n, p in reference.named_parameters()}) < 1e-6
        assert abs(loss.item() - reference(inputs, targets).item()) < 1e-5
        assert [f"{k}{mb}" for k, mb, *_ in pipe.events if k != "L"] == schedule_order("1f1b", 1, 4)[0]
        with pytest.raises(ValueError, match="equal micro-batches"):
            pipe.step(inputs[:6], targets[:6])
        with pytest.raises(ValueError, match="schedule"):
            make_pipeline(stage, 0, 1, n_microbatches=4, schedule="interleaved")
        with pytest.raises(ValueError, match="1 ranks but n_stages=2"):
            make_pipeline(stage, 0, 2, n_microbatches=4)
    finally:
        dist.destroy_process_group()

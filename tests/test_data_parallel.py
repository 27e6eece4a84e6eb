"""Data parallelism by hand and with DDP equal one process on the same global batch."""

import pytest
import torch

from llmbook.data_parallel import (build_model, global_batches, max_abs_diff, shard,
                                   single_process_run, sgd_steps, tiny_config)
from llmbook.launch import load_result, torchrun


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "dp.json"
    torchrun("llmbook.data_parallel", 2, args=["--steps", "4", "--out", out], timeout=180, echo=False).check()
    return load_result(out)


def test_by_hand_and_ddp_equal_one_process(job):
    assert [r["rank"] for r in job["ranks"]] == [0, 1]
    for r in job["ranks"]:
        assert r["by_hand_grad_diff"] < 1e-6 and r["ddp_grad_diff"] < 1e-6
        assert r["by_hand_param_diff"] < 1e-5 and r["ddp_param_diff"] < 1e-5
        assert r["ddp_vs_by_hand_param_diff"] == 0.0  # same additions in the same order


def test_reference_in_the_job_is_the_one_computed_here(job):
    config = tiny_config()
    reference = single_process_run(config, global_batches(job["steps"], 8, config.context_length), lr=0.1)
    torch.testing.assert_close(torch.tensor(job["reference_losses"]), torch.tensor(reference.losses))


def test_communication_counts(job):
    for r in job["ranks"]:
        assert r["by_hand_allreduce_calls_per_step"] == 37  # one per parameter tensor
        assert r["ddp_allreduce_calls_per_step"] == 1  # 0.5 MB of gradients fit in one 25 MB bucket
        assert r["allreduce_bytes_per_step"] == 4 * job["n_params"]


def test_mean_of_shard_gradients_is_the_global_gradient():
    """The identity data parallelism rests on, checked in one process with 4 simulated ranks."""
    config = tiny_config()
    batch = global_batches(1, 8, config.context_length)[0]
    full = sgd_steps(build_model(config, 0), [batch], lr=0.0).first_grads
    shards = [sgd_steps(build_model(config, 0), [shard(batch, r, 4)], lr=0.0).first_grads for r in range(4)]
    mean = {name: sum(g[name] for g in shards) / 4 for name in full}
    assert max_abs_diff(mean, full) < 1e-6


def test_a_wrong_mean_is_caught():
    """The comparison can fail: the SUM of shard gradients (a missing division) is far off."""
    config = tiny_config()
    batch = global_batches(1, 8, config.context_length)[0]
    full = sgd_steps(build_model(config, 0), [batch], lr=0.0).first_grads
    shards = [sgd_steps(build_model(config, 0), [shard(batch, r, 2)], lr=0.0).first_grads for r in range(2)]
    summed = {name: shards[0][name] + shards[1][name] for name in full}
    assert max_abs_diff(summed, full) > 1e-3


def test_uneven_batch_is_refused():
    config = tiny_config()
    batch = global_batches(1, 6, config.context_length)[0]
    with pytest.raises(ValueError, match="multiple of the world size"):
        shard(batch, 0, 4)


def test_the_model_loss_is_cross_entropy_of_its_logits():
    config = tiny_config()
    model = build_model(config, 0)
    inputs, targets = global_batches(1, 2, config.context_length)[0]
    reference = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model(inputs, targets), reference)

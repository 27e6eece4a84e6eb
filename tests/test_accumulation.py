"""Gradient accumulation (llmbook.accumulation): in-process equivalences with one big batch, the
bug of naive normalization on padded micro-batches, and one 2-process launch checking DDP
(no_sync), global-token normalization and FSDP2 against the single-process run."""

import pytest
import torch

from llmbook.accumulation import (IGNORE_INDEX, accumulate_gradients, count_tokens,
                                  gradient_sync_control, padded_batches, split_micro_batches)
from llmbook.data_parallel import build_model, global_batches, max_abs_diff, shard, tiny_config
from llmbook.launch import load_result, torchrun

CONFIG = tiny_config()
K = 4


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _big_batch_grads(batch):
    model = build_model(CONFIG, seed=0)
    model(*batch).backward()
    return _grads(model)


def _accumulated_grads(batch, normalization):
    model = build_model(CONFIG, seed=0)
    accumulate_gradients(model, split_micro_batches(batch, K), normalization)
    return _grads(model)


# ----------------------------------------------------------------------------- in-process
def test_accumulated_equals_big_batch():
    (batch,) = global_batches(1, 8, CONFIG.context_length, seed=0)
    reference = _big_batch_grads(batch)
    for normalization in ("global_tokens", "mean"):  # equal lengths: both recipes are right
        assert max_abs_diff(_accumulated_grads(batch, normalization), reference) < 1e-6


def test_global_tokens_exact_and_naive_wrong_on_padded_micro_batches():
    (batch,) = padded_batches(1, 8, CONFIG.context_length, seed=3)
    micro_tokens = [count_tokens(t) for _, t in split_micro_batches(batch, K)]
    assert len(set(micro_tokens)) > 1  # uneven micro-batches, or the test proves nothing
    reference = _big_batch_grads(batch)  # the model's loss: mean over the valid tokens of the whole batch
    assert max_abs_diff(_accumulated_grads(batch, "global_tokens"), reference) < 1e-6
    assert max_abs_diff(_accumulated_grads(batch, "mean"), reference) > 1e-2  # the bug exists


def test_padded_batches_and_trimming():
    a, b = padded_batches(2, 6, 16, min_len=3, seed=5), padded_batches(2, 6, 16, min_len=3, seed=5)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    inputs, targets = a[0]
    lengths = (targets != IGNORE_INDEX).sum(dim=1)
    assert lengths.min() >= 3 and lengths.max() <= 16
    for row, length in enumerate(lengths.tolist()):  # valid prefix, then padding only
        assert (targets[row, :length] != IGNORE_INDEX).all() and (targets[row, length:] == IGNORE_INDEX).all()
        assert torch.equal(inputs[row, 1:length], targets[row, :length - 1])  # next-token targets
    micro = split_micro_batches(a[0], 3)
    for x, y in micro:
        assert y.shape[1] == int((y != IGNORE_INDEX).sum(dim=1).max())  # trimmed to its longest row
    assert sum(count_tokens(y) for _, y in micro) == count_tokens(targets)


def test_bad_inputs_raise_clear_errors():
    (batch,) = global_batches(1, 6, 8, seed=0)
    with pytest.raises(ValueError, match="equal micro-batches"):
        split_micro_batches(batch, 4)
    with pytest.raises(ValueError, match="positive integer"):
        split_micro_batches(batch, 0)
    model = build_model(CONFIG, seed=0)
    with pytest.raises(ValueError, match="normalization"):
        accumulate_gradients(model, split_micro_batches(batch, 2), "sum")
    with pytest.raises(ValueError, match="not initialized"):
        accumulate_gradients(model, split_micro_batches(batch, 2), world_size=2)
    with pytest.raises(ValueError, match="no_sync"):
        gradient_sync_control(model)


# ----------------------------------------------------------------------------- one launch
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    path = tmp_path_factory.mktemp("accumulation") / "result.json"
    torchrun("llmbook.accumulation", 2, args=["--steps", "2", "--out", path], echo=False, timeout=240).check()
    result = load_result(path)
    return result, sorted(result["ranks"], key=lambda r: r["rank"])


EXACT = ("ddp_every_micro_batch", "ddp_no_sync", "ddp_global_tokens", "fsdp2_every_micro_batch",
         "fsdp2_sync_last")


def test_exact_variants_equal_single_process_run(job):
    _, ranks = job
    for r in ranks:
        for name in EXACT:
            v = r["variants"][name]
            assert v["grad_diff"] < 1e-6 and v["param_diff"] < 1e-5 and v["loss_diff"] < 1e-5, (name, v)


def test_local_and_naive_normalization_are_wrong(job):
    _, ranks = job
    for r in ranks:
        assert r["variants"]["ddp_local_tokens"]["grad_diff"] > 1e-3
        assert r["variants"]["ddp_naive_mean"]["grad_diff"] > 1e-3
    assert ranks[0]["rank_tokens"] != ranks[1]["rank_tokens"]  # the ranks really are uneven


def test_allreduce_and_reduce_scatter_counts(job):
    result, ranks = job
    k = result["micro_batches"]
    for r in ranks:
        v = r["variants"]
        assert v["ddp_every_micro_batch"]["allreduce_calls_per_step"] == k  # one bucket per backward
        assert v["ddp_no_sync"]["allreduce_calls_per_step"] == 1
        assert v["ddp_global_tokens"]["allreduce_calls_per_step"] == 1
        units = CONFIG.n_layer + 1  # one FSDP unit per block, plus the root
        assert v["fsdp2_every_micro_batch"]["reduce_scatter_calls_per_step"] == k * units
        assert v["fsdp2_sync_last"]["reduce_scatter_calls_per_step"] == units
        assert v["fsdp2_sync_last"]["all_reduce_calls_per_step"] == 1  # the global token count


def test_token_counts_match_in_process_split(job):
    result, ranks = job
    (first,) = padded_batches(1, result["global_batch"], CONFIG.context_length, seed=3)
    for r in ranks:
        micro = split_micro_batches(shard(first, r["rank"], result["world_size"]), result["micro_batches"])
        assert r["padded_micro_tokens"] == [count_tokens(y) for _, y in micro]
        assert r["padded_micro_lengths"] == [y.shape[1] for _, y in micro]
    assert sum(r["rank_tokens"] for r in ranks) == ranks[0]["global_tokens"] == count_tokens(first[1])

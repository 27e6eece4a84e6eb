"""Tests for llmbook.memory: the activation formula against autograd's saved tensors, the measuring
helpers, the KV-cache and Korthikanti et al. formulas."""

import pytest
import torch

from llmbook.memory import (
    MemoryBreakdown,
    TensorMemoryTracker,
    activation_memory,
    block_activation_bytes,
    korthikanti_layer_bytes,
    kv_cache_bytes,
    measure_peak_memory,
    measure_saved_tensors,
    training_state_bytes,
)
from llmbook.model import GPT, Block, GPTConfig, KVCache

TINY = dict(vocab_size=256, context_length=32, n_layer=2, n_head=4, d_model=32)
B, T = 2, 12


def batch(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=generator)
    targets = torch.randint(0, config.vocab_size, (B, T), generator=generator)
    return ids, targets


def saved_bytes(config, autocast=False, checkpoint=False, chunk_size=None):
    torch.manual_seed(0)
    model = GPT(config).train()
    model.checkpoint_blocks = checkpoint
    ids, targets = batch(config)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(ids, targets, chunk_size=chunk_size)

    loss, report = measure_saved_tensors(forward, exclude=model.parameters())
    return report.total_bytes, loss


ARCHITECTURES = [
    {},
    dict(attention="naive"),
    dict(mlp="swiglu"),
    dict(norm="rmsnorm"),
    dict(pos_encoding="rope"),
    dict(n_kv_head=2),
    dict(n_kv_head=1, attention="naive"),
    dict(norm="rmsnorm", mlp="swiglu", pos_encoding="rope", n_kv_head=2),
    dict(norm="rmsnorm", mlp="swiglu", pos_encoding="rope", n_kv_head=2, attention="naive"),
    dict(dropout=0.1),
    dict(dropout=0.1, attention="naive", pos_encoding="rope", n_kv_head=2),
]
OPTIONS = [
    {},
    dict(autocast=True),
    dict(checkpoint=True),
    dict(chunk_size=8),
    dict(autocast=True, checkpoint=True, chunk_size=5),
]


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()) or "gpt2")
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_formula_equals_saved_tensor_measurement(arch, options):
    config = GPTConfig(**TINY, **arch)
    measured, _ = saved_bytes(config, **options)
    assert activation_memory(config, B, T, **options).total == measured


@pytest.mark.parametrize("arch", ARCHITECTURES[:8])
def test_block_formula_equals_one_block(arch):
    config = GPTConfig(**TINY, **arch)
    torch.manual_seed(0)
    block = Block(config).train()
    x = torch.randn(B, T, config.d_model, requires_grad=True)
    _, report = measure_saved_tensors(lambda: block(x, torch.arange(T)), exclude=block.parameters())
    assert report.total_bytes == block_activation_bytes(config, B, T)


def test_attention_scores_make_naive_quadratic():
    sdpa, naive = GPTConfig(**TINY), GPTConfig(**TINY, attention="naive")
    growth = [block_activation_bytes(c, 1, 2 * T) - 2 * block_activation_bytes(c, 1, T) for c in (sdpa, naive)]
    assert growth[0] == 0             # SDPA: exactly linear in T (learned positions, no RoPE tables)
    assert growth[1] > 0              # naive: the T x T softmax output


def test_checkpointing_saves_strictly_less():
    for arch in ({}, dict(norm="rmsnorm", mlp="swiglu", pos_encoding="rope")):
        config = GPTConfig(**TINY, **arch)
        plain, loss_plain = saved_bytes(config)
        checkpointed, loss_checkpointed = saved_bytes(config, checkpoint=True)
        assert checkpointed < plain
        torch.testing.assert_close(loss_checkpointed, loss_plain)
        estimate = activation_memory(config, B, T, checkpoint=True)
        assert estimate.recompute == block_activation_bytes(config, B, T) > 0


def test_chunked_cross_entropy_saves_less_and_gives_the_same_loss():
    config = GPTConfig(**{**TINY, "vocab_size": 4096})
    full, loss_full = saved_bytes(config)
    for chunk_size in (1, 7, B * T):
        chunked, loss_chunked = saved_bytes(config, chunk_size=chunk_size)
        assert chunked < full
        # the (B*T, vocab) fp32 log-probabilities, less the 4-byte weight total of the full loss
        # (the chunked loss keeps an 8-byte token count instead)
        assert full - chunked == B * T * config.vocab_size * 4 - 4
        torch.testing.assert_close(loss_chunked, loss_full, rtol=1e-5, atol=1e-6)


def test_measurement_excludes_parameters_and_deduplicates():
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    _, report = measure_saved_tensors(lambda: linear(x), exclude=linear.parameters())
    assert report.total_bytes == x.numel() * 4 and report.count == 1
    x_grad = torch.randn(4, 16, requires_grad=True)  # now the weight is needed for x's gradient
    _, excluded = measure_saved_tensors(lambda: linear(x_grad), exclude=linear.parameters())
    _, unexcluded = measure_saved_tensors(lambda: linear(x_grad))
    assert excluded.total_bytes == x_grad.numel() * 4
    assert unexcluded.total_bytes == excluded.total_bytes + linear.weight.numel() * 4

    y = torch.randn(4, 16, requires_grad=True)
    _, report = measure_saved_tensors(lambda: (y * y) * y)  # y saved three times, y*y once
    assert report.count == 2 and report.total_bytes == 2 * y.numel() * 4

    big = torch.randn(100, 16)
    weight = torch.nn.Parameter(torch.randn(16))
    _, report = measure_saved_tensors(lambda: big[:3] * weight, exclude=[weight])
    assert report.total_bytes == big.numel() * 4  # a saved view keeps its whole storage
    assert report.by_dtype == {"float32": big.numel() * 4}


def test_autocast_keeps_weight_copies_and_fp32_statistics():
    config = GPTConfig(**TINY)
    estimate = activation_memory(config, B, T, autocast=True)
    matrices = sum(p.numel() for name, p in GPT(config).named_parameters()
                   if p.dim() == 2 and name.startswith("blocks."))
    assert estimate.weight_copies == 2 * (matrices + config.vocab_size * config.d_model)
    assert activation_memory(config, B, T, autocast=True, checkpoint=True, chunk_size=4).weight_copies == 0


def test_kv_cache_formula():
    for n_kv_head in (4, 2, 1):
        config = GPTConfig(**TINY, n_kv_head=n_kv_head)
        for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
            cache = KVCache(config, 3, 20, dtype=dtype)
            assert cache.nbytes() == kv_cache_bytes(config, 3, 20, dtype_bytes=size)
            assert kv_cache_bytes(config, 3, 20, size) == 2 * config.n_layer * 3 * n_kv_head * 20 * config.head_dim * size


def test_korthikanti_formula_and_our_reconciliation():
    assert korthikanti_layer_bytes(4, 1, 8, 2) == 4 * 1 * 8 * 34 + 5 * 2 * 4 * 4 * 1
    s, b = 24, 2
    config = GPTConfig(**TINY, attention="naive", dropout=0.1)
    h, a = config.d_model, config.n_head
    assert block_activation_bytes(config, b, s, autocast=True) == 44 * s * b * h + 16 * s * b + 8 * a * s * s * b + s * s


def test_training_state_bytes():
    state = training_state_bytes(1000)
    assert state == MemoryBreakdown(weights=4000, gradients=4000, optimizer=8000, activations=0)
    assert state.total == 16000
    assert training_state_bytes(1000, weight_bytes=2, gradient_bytes=2, optimizer_bytes=12).total == 16000
    with pytest.raises(ValueError, match="n_params"):
        training_state_bytes(-1)
    with pytest.raises(TypeError, match="n_params"):
        training_state_bytes(1.5)


def test_memory_breakdown_total_counts_the_activations():
    assert MemoryBreakdown(1, 2, 3, 4).total == 10 and MemoryBreakdown(1, 2, 3).total == 6


def test_tracker_counts_allocations_views_and_frees():
    with TensorMemoryTracker(record=True) as tracker:
        a = torch.ones(250, 100)          # 100,000 bytes
        b = a + 1                         # another 100,000
        _ = b.view(-1)
        a.add_(1)
        del b, _
        middle = tracker.current
        del a
    assert (tracker.peak, middle, tracker.current) == (200_000, 100_000, 0)
    assert max(tracker.timeline) == tracker.peak


def test_peak_of_a_training_step_exceeds_what_is_saved():
    config = GPTConfig(**TINY)
    torch.manual_seed(0)
    model = GPT(config).train()
    ids, targets = batch(config)
    _, peak = measure_peak_memory(lambda: model(ids, targets).backward())
    estimate = activation_memory(config, B, T)
    # the log-probabilities' and logits' gradients exist on top of everything saved
    assert peak >= estimate.total + B * T * config.vocab_size * 4
    assert all(p.grad is not None for p in model.parameters())


def test_bad_inputs_raise_clear_errors():
    config = GPTConfig(**TINY)
    with pytest.raises(ValueError, match="batch_size"):
        activation_memory(config, 0, T)
    with pytest.raises(TypeError, match="seq_len"):
        activation_memory(config, B, float(T))
    with pytest.raises(ValueError, match="chunk_size"):
        activation_memory(config, B, T, chunk_size=0)
    with pytest.raises(ValueError, match="context_length"):
        activation_memory(config, B, config.context_length + 1)
    with pytest.raises(TypeError, match="function"):
        measure_saved_tensors(torch.ones(3))
    with pytest.raises(TypeError, match="function"):
        measure_peak_memory(3)

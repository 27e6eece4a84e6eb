"""Tests for llmbook.interpret (ch03_model/06_inside_the_model.ipynb): attention probabilities
against attention computed by hand from a tiny model's weights, the logit lens against the model's
own logits, induction scores against their definition and on a model that has learned to copy."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from llmbook.interpret import (attention_entropy, attention_patterns, attention_to_keys,
                               attention_to_offset, induction_scores, logit_lens,
                               repeated_random_tokens)
from llmbook.model import GPT, GPTConfig
from llmbook.train import TrainConfig, train


def tiny_model(**overrides):
    settings = dict(vocab_size=50, context_length=32, n_layer=2, n_head=2, d_model=16)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**settings, **overrides}))
    with torch.no_grad():  # larger weights than the initialisation's, so that the maps are not flat
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(10)
    return model.eval()


def hand_computed_attention(model, idx):
    """Layer by layer with plain tensor algebra, for the GPT-2 configuration (learned positions,
    LayerNorm with biases, GELU): every head's softmax(q k^T / sqrt(d_h) + causal mask)."""
    T, H = idx.size(1), model.config.n_head
    d_h = model.config.d_model // H
    x = model.tok_emb.weight[idx[0]] + model.pos_emb.weight[:T]
    maps = []
    for block in model.blocks.values():
        h = F.layer_norm(x, (x.size(-1),), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        attn = block.attn
        q = (h @ attn.q_proj.weight.T + attn.q_proj.bias).view(T, H, d_h).transpose(0, 1)
        k = (h @ attn.k_proj.weight.T + attn.k_proj.bias).view(T, H, d_h).transpose(0, 1)
        v = (h @ attn.v_proj.weight.T + attn.v_proj.bias).view(T, H, d_h).transpose(0, 1)
        scores = q @ k.transpose(1, 2) / math.sqrt(d_h)
        future = torch.arange(T)[None, :] > torch.arange(T)[:, None]
        weights = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
        maps.append(weights)
        y = (weights @ v).transpose(0, 1).reshape(T, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
        x = x + y
        x = x + block.mlp(block.norm2(x))
    return torch.stack(maps)


@torch.no_grad()
def test_attention_patterns_equal_attention_computed_by_hand():
    model = tiny_model()
    idx = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1))
    patterns = attention_patterns(model, idx)
    expected = hand_computed_attention(model, idx)
    assert patterns.shape == (2, 2, 12, 12)
    torch.testing.assert_close(patterns, expected, atol=1e-5, rtol=1e-4)
    assert expected.max() > 0.5                    # the maps are not flat: the comparison means something


@pytest.mark.parametrize("overrides", [{}, dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False),
                                       dict(pos_encoding="rope", n_head=4, n_kv_head=2)])
def test_patterns_are_causal_distributions_and_the_same_under_sdpa_and_naive_attention(overrides):
    sdpa = tiny_model(**overrides)
    naive = GPT(replace(sdpa.config, attention="naive")).eval()
    naive.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(2))
    patterns = attention_patterns(sdpa, idx)
    assert torch.allclose(patterns.sum(-1), torch.ones(patterns.shape[:-1]), atol=1e-5)
    assert (patterns.triu(diagonal=1) == 0).all()
    torch.testing.assert_close(patterns, attention_patterns(naive, idx), atol=1e-5, rtol=1e-4)


def test_patterns_are_read_in_eval_mode_and_leave_the_model_as_it_was():
    model = tiny_model(dropout=0.5).train()
    idx = torch.randint(0, 50, (1, 10))
    first = attention_patterns(model, idx)
    assert torch.equal(first, attention_patterns(model, idx))   # no dropout: the same maps twice
    assert model.training
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


def test_a_layer_that_attends_differently_is_detected(monkeypatch):
    """Attention with another temperature still gives causal rows that sum to 1; only the check
    against the layer's output shows that they are not the weights the forward pass used."""
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kwargs: sdpa(q, k, v, scale=3 / math.sqrt(q.size(-1)), **kwargs))
    with pytest.raises(RuntimeError, match="does not reproduce the layer's output"):
        attention_patterns(tiny_model(pos_encoding="rope"), torch.randint(0, 50, (1, 10)))


@torch.no_grad()
def test_logit_lens_ends_with_the_model_logits_and_starts_with_the_read_out_embedding():
    model = tiny_model(pos_encoding="rope", norm="rmsnorm", bias=False)
    idx = torch.randint(0, 50, (1, 16))
    lens = logit_lens(model, idx)
    assert lens.shape == (3, 16, 50)
    assert torch.equal(lens[-1], model(idx)[0])
    torch.testing.assert_close(lens[0], model.lm_head(model.norm_f(model.tok_emb(idx)))[0])


def test_induction_scores_follow_their_definition():
    model = tiny_model(context_length=64)
    scores = induction_scores(model, seq_len=10, batch=3, seed=4)
    sequences = repeated_random_tokens(50, 10, batch=3, seed=4)
    assert torch.equal(sequences[:, :10], sequences[:, 10:])
    by_hand = torch.zeros(2, 2)
    for sequence in sequences:
        patterns = attention_patterns(model, sequence[None])
        by_hand += torch.stack([patterns[..., 10 + i, i + 1] for i in range(10)], -1).mean(-1) / 3
    torch.testing.assert_close(scores, by_hand, atol=1e-6, rtol=1e-5)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_a_model_trained_to_copy_has_an_induction_head_and_an_untrained_one_has_none():
    config = GPTConfig(vocab_size=32, context_length=32, n_layer=2, n_head=2, d_model=32,
                       pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    torch.manual_seed(0)
    model = GPT(config)
    assert induction_scores(model, seq_len=16).max() < 0.2
    stream = repeated_random_tokens(32, 16, batch=2000, seed=7).reshape(-1)
    train(model, stream, stream[:2048], TrainConfig(max_steps=300, batch_size=16, seq_len=32, lr=3e-3,
          min_lr=3e-4, warmup_steps=20, eval_interval=300, eval_batches=1), progress=False)
    assert induction_scores(model, seq_len=16, seed=1).max() > 0.5


def test_statistics_of_hand_made_patterns():
    T = 4
    previous = torch.zeros(T, T)
    previous[0, 0] = 1
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    patterns = torch.stack([previous, uniform])
    torch.testing.assert_close(attention_to_offset(patterns, 1), torch.tensor([1.0, (1 / 2 + 1 / 3 + 1 / 4) / 3]))
    torch.testing.assert_close(attention_to_keys(patterns, torch.tensor([True, False, False, False])),
                               torch.tensor([0.5, (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4]))
    torch.testing.assert_close(attention_entropy(patterns), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("idx, error, match", [
    (torch.zeros(1, 5), TypeError, "token ids"),
    (torch.zeros(5, dtype=torch.long), ValueError, r"shape \(1, T\)"),
    (torch.zeros(2, 5, dtype=torch.long), ValueError, r"shape \(1, T\)"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "shape"),
    (torch.full((1, 5), 50), ValueError, r"lie in \[0, 50\)"),
    (torch.zeros(1, 33, dtype=torch.long), ValueError, "context length 32"),
])
def test_bad_tokens_are_refused_with_a_clear_error(idx, error, match):
    model = tiny_model()
    for function in (attention_patterns, logit_lens):
        with pytest.raises(error, match=match):
            function(model, idx)


def test_models_without_attention_blocks_are_refused():
    with pytest.raises(TypeError, match="no attention blocks"):
        attention_patterns(torch.nn.Linear(4, 4), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_len <= 16"):
        induction_scores(tiny_model(), seq_len=17)

"""llmbook.generate and llmbook.model.KVCache: the cache changes no output (greedy and seeded sampling,
learned and rotary positions, grouped-query attention, batches, chunked prefill, runs past the context
length), the sampler draws from the intended distribution, eos stopping, and the errors on bad input."""

import pytest
import torch

from llmbook.generate import generate, sample_next, stream_tokens
from llmbook.model import GPT, GPTConfig, KVCache

LLAMA_STYLE = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
CONFIGS = {
    "learned": dict(),
    "rope": dict(LLAMA_STYLE),
    "rope_gqa": dict(n_kv_head=2, **LLAMA_STYLE),
    "rope_gqa_naive": dict(n_kv_head=2, attention="naive", **LLAMA_STYLE),
    "learned_mqa": dict(n_kv_head=1),
}


def tiny_model(**changes):
    # An untrained model with a tied head mostly repeats its last input token; an untied head gives
    # varied greedy output, so that a wrong cache would change the tokens and not only the logits.
    config = dict(vocab_size=97, context_length=24, n_layer=2, n_head=4, d_model=32, tie_weights=False)
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**config, **changes})).eval()


def prompts(batch=2, length=6, vocab=97, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_reference(model, idx, new_tokens):
    """The loop without any cache, written independently of llmbook.generate."""
    context = model.config.context_length
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(idx[:, -context:])[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_id], dim=1)
    return idx


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("batch,prompt_len,new_tokens", [(1, 1, 10), (3, 6, 12), (2, 6, 40), (2, 24, 5)])
def test_greedy_with_cache_equals_without(name, batch, prompt_len, new_tokens):
    # (2, 6, 40) runs 22 tokens past context_length=24; (2, 24, 5) starts with a full context.
    model = tiny_model(**CONFIGS[name])
    idx = prompts(batch, prompt_len)
    expected = greedy_reference(model, idx, new_tokens)
    with_cache = generate(model, idx, new_tokens, temperature=0, use_cache=True)
    without = generate(model, idx, new_tokens, temperature=0, use_cache=False)
    assert with_cache.shape == (batch, prompt_len + new_tokens)
    assert torch.equal(without, expected)
    assert torch.equal(with_cache, expected)
    assert len(set(expected[:, prompt_len:].flatten().tolist())) >= 2  # the test sees varied tokens


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_logits_match_full_pass(name):
    model = tiny_model(**CONFIGS[name])
    idx = prompts(2, 20)
    cache = KVCache(model.config, 2, 20)
    with torch.no_grad():
        full = model(idx)
        pieces = [model(idx[:, :7], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)
    assert cache.length == 20


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("chunk", [1, 3, 8, 24])
def test_chunked_prefill_equals_one_pass(name, chunk):
    model = tiny_model(**CONFIGS[name])
    idx = prompts(2, 24)
    cache = KVCache(model.config, 2, 24)
    with torch.no_grad():
        full = model(idx)
        chunked = torch.cat([model(idx[:, s:s + chunk], kv_cache=cache) for s in range(0, 24, chunk)], dim=1)
    torch.testing.assert_close(chunked, full)


@pytest.mark.parametrize("name", ["learned", "rope_gqa"])
@pytest.mark.parametrize("new_tokens", [10, 40])
def test_seeded_sampling_with_cache_equals_without(name, new_tokens):
    model = tiny_model(**CONFIGS[name])
    idx = prompts(3, 5)
    runs = [generate(model, idx, new_tokens, temperature=0.9, top_k=40, top_p=0.95, use_cache=use_cache,
                     generator=torch.Generator().manual_seed(3)) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])
    other_seed = generate(model, idx, new_tokens, temperature=0.9, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(runs[0], other_seed)  # the seed matters: the equality above is not trivial


def test_stream_tokens_yields_what_generate_returns():
    model = tiny_model(**CONFIGS["rope"])
    idx = prompts(2, 4)
    steps = list(stream_tokens(model, idx, 9, temperature=0))
    assert len(steps) == 9 and all(step.shape == (2, 1) for step in steps)
    assert torch.equal(torch.cat([idx, *steps], dim=1), generate(model, idx, 9, temperature=0))


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny_model(**CONFIGS["rope_gqa"])
    idx = prompts(2, 5)
    greedy = generate(model, idx, 15, temperature=0)
    for knobs in (dict(top_k=1), dict(top_p=1e-9), dict(top_k=1, temperature=5.0)):
        sampled = generate(model, idx, 15, generator=torch.Generator().manual_seed(0), **knobs)
        assert torch.equal(sampled, greedy), knobs


def test_temperature_zero_and_top_k_one_are_argmax():
    logits = torch.randn(500, 30, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(dim=-1, keepdim=True)
    assert torch.equal(sample_next(logits, temperature=0), argmax)
    assert torch.equal(sample_next(logits, top_k=1, generator=torch.Generator().manual_seed(1)), argmax)
    assert torch.equal(sample_next(logits, top_p=1e-7, generator=torch.Generator().manual_seed(1)), argmax)
    assert sample_next(logits, temperature=0).shape == (500, 1)


def frequencies(logits, draws=200_000, seed=0, **knobs):
    tokens = sample_next(logits.expand(draws, -1), generator=torch.Generator().manual_seed(seed), **knobs)
    assert tokens.shape == (draws, 1)
    return torch.bincount(tokens[:, 0], minlength=logits.numel()).double() / draws


def nucleus(probs, p):
    """Reference top-p: the most likely tokens until their total reaches p, renormalised."""
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept, total = [], 0.0
    for token in order:
        kept.append(token)
        total += float(probs[token])
        if total >= p:
            break
    out = torch.zeros_like(probs)
    out[kept] = probs[kept] / probs[kept].sum()
    return out


LOGITS = torch.tensor([2.0, 1.2, 0.9, 0.3, 0.0, -0.4, -1.0, -2.5], dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.8])
def test_sampling_frequencies_match_softmax(temperature):
    observed = frequencies(LOGITS.float(), temperature=temperature)
    expected = torch.softmax(LOGITS / temperature, dim=-1)
    # standard error <= sqrt(0.25 / 200000) ~ 0.0011: 0.008 is ~7 standard errors
    torch.testing.assert_close(observed, expected, atol=0.008, rtol=0)


def test_sampling_frequencies_with_top_k():
    observed = frequencies(LOGITS.float(), temperature=1.3, top_k=3)
    expected = torch.zeros(8, dtype=torch.float64)
    expected[:3] = torch.softmax(LOGITS[:3] / 1.3, dim=-1)  # LOGITS is sorted: the top 3 come first
    torch.testing.assert_close(observed, expected, atol=0.008, rtol=0)
    assert observed[3:].sum() == 0


@pytest.mark.parametrize("top_p,temperature", [(0.5, 1.0), (0.8, 1.0), (0.9, 2.0), (0.999, 0.7)])
def test_sampling_frequencies_with_top_p(top_p, temperature):
    probs = torch.softmax(LOGITS / temperature, dim=-1)
    observed = frequencies(LOGITS.float(), temperature=temperature, top_p=top_p)
    expected = nucleus(probs, top_p)
    torch.testing.assert_close(observed, expected, atol=0.008, rtol=0)
    assert observed[expected == 0].sum() == 0


def test_top_k_never_draws_outside_the_top_k():
    logits = torch.randn(2000, 64, generator=torch.Generator().manual_seed(5))
    for k in (1, 4, 17):
        drawn = sample_next(logits, temperature=2.0, top_k=k, generator=torch.Generator().manual_seed(k))
        allowed = logits.topk(k, dim=-1).indices
        assert (drawn == allowed).any(dim=-1).all(), k


def test_top_k_larger_than_vocabulary_is_plain_sampling():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(6))
    plain = sample_next(logits, generator=torch.Generator().manual_seed(7))
    capped = sample_next(logits, top_k=1000, generator=torch.Generator().manual_seed(7))
    assert torch.equal(plain, capped)


@pytest.mark.parametrize("knobs,message", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-3), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
])
def test_bad_sampling_arguments_raise(knobs, message):
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=message):
        sample_next(logits, **knobs)
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        generate(model, prompts(1, 3), 2, **knobs)


@pytest.mark.parametrize("idx", [torch.tensor([1, 2, 3]), torch.zeros(2, 0, dtype=torch.long),
                                 torch.zeros(1, 2, 3, dtype=torch.long)])
def test_bad_prompt_shape_raises(idx):
    model = tiny_model()
    with pytest.raises(ValueError, match="shape"):
        generate(model, idx, 3)


def eos_candidate(tokens, prompt_len, avoid=None):
    """(step, token): the first step >= 1 at which row 0 produces a token it has not produced
    before (and that `avoid` never contains)."""
    new = tokens[0, prompt_len:].tolist()
    for step in range(1, len(new)):
        if new[step] not in new[:step] and (avoid is None or new[step] not in avoid.tolist()):
            return step, new[step]
    raise AssertionError(f"the test model repeats itself too much to pick an eos token: {new}")


def test_eos_pads_finished_rows_and_leaves_others_alone():
    model = tiny_model(**CONFIGS["rope"])
    idx = prompts(2, 4, seed=11)
    plain = generate(model, idx, 12, temperature=0)
    step, eos = eos_candidate(plain, 4, avoid=plain[1, 4:])
    stopped = generate(model, idx, 12, temperature=0, eos_id=eos)
    assert stopped.shape == plain.shape  # row 1 never finishes: all 12 steps run
    assert torch.equal(stopped[1], plain[1])
    assert torch.equal(stopped[0, :4 + step + 1], plain[0, :4 + step + 1])
    assert (stopped[0, 4 + step:] == eos).all()


def test_generation_stops_when_every_row_is_done():
    model = tiny_model(**CONFIGS["learned"])
    idx = prompts(1, 4, seed=12)
    plain = generate(model, idx, 12, temperature=0)
    step, eos = eos_candidate(plain, 4)
    for use_cache in (True, False):
        stopped = generate(model, idx, 12, temperature=0, eos_id=eos, use_cache=use_cache)
        assert torch.equal(stopped, plain[:, :4 + step + 1])
    # both rows of a batch finishing at different steps: the call ends with the later one
    batch = torch.cat([idx, idx])
    assert generate(model, batch, 12, temperature=0, eos_id=eos).shape == (2, 4 + step + 1)
    steps = list(stream_tokens(model, idx, 12, temperature=0, eos_id=eos))
    assert len(steps) == step + 1 and int(steps[-1]) == eos


@pytest.mark.parametrize("training", [True, False])
def test_generate_restores_the_training_flag(training):
    model = tiny_model(dropout=0.3)
    model.train(training)
    idx = prompts(2, 5)
    first = generate(model, idx, 8, temperature=0)
    assert model.training is training
    assert all(module.training is training for module in model.modules())
    # dropout is off while generating, even for a model in training mode
    assert torch.equal(first, generate(model, idx, 8, temperature=0, use_cache=False))
    # also when the stream is abandoned half way
    stream = stream_tokens(model, idx, 8)
    next(stream)
    assert model.training is False
    stream.close()
    assert model.training is training


def test_kv_cache_overflow_raises():
    model = tiny_model(**CONFIGS["rope"])
    cache = KVCache(model.config, 1, 5)
    with torch.no_grad():
        model(prompts(1, 4), kv_cache=cache)
        model(prompts(1, 1), kv_cache=cache)
        assert cache.length == 5
        with pytest.raises(ValueError, match="max_len"):
            model(prompts(1, 1), kv_cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model(prompts(1, 6), kv_cache=KVCache(model.config, 1, 5))


def test_kv_cache_longer_than_learned_positions_raises():
    learned = tiny_model().config
    with pytest.raises(ValueError, match="context length"):
        KVCache(learned, 1, learned.context_length + 1)
    KVCache(learned, 1, learned.context_length)  # exactly the context is fine
    rope = tiny_model(**CONFIGS["rope"]).config
    assert KVCache(rope, 1, 2 * rope.context_length).max_len == 2 * rope.context_length


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_size_formula(name):
    config = tiny_model(**CONFIGS[name]).config
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = KVCache(config, 3, 11, dtype=dtype)
        assert cache.nbytes() == 2 * config.n_layer * 3 * config.n_kv_head * 11 * config.head_dim * size
        assert cache.keys[0].shape == (3, config.n_kv_head, 11, config.head_dim)

"""Tests for llmbook.metrics: perplexity and bits-per-byte arithmetic, token NLL, sliding windows."""
import math

import pytest
import torch
import torch.nn.functional as F

from llmbook.metrics import bits_per_byte, perplexity, sliding_window_nll, token_nll
from llmbook.model import GPT, GPTConfig


def tiny_model(vocab_size=50, context_length=16, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, context_length=context_length, n_layer=2, n_head=2,
                       d_model=32, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    return GPT(config).eval()


def test_perplexity_hand_values():
    # probabilities 1/2, 1/4, 1/4, 1/8: product 2^-8, perplexity 4
    nll = [-math.log(p) for p in (0.5, 0.25, 0.25, 0.125)]
    assert math.isclose(perplexity(sum(nll) / 4), 4.0)
    assert perplexity(0.0) == 1.0
    assert math.isclose(perplexity(math.log(4096)), 4096.0)


def test_perplexity_matches_cross_entropy():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 7, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 7, (10,), generator=generator)
    probabilities = logits.softmax(dim=-1)[torch.arange(10), targets]
    expected = torch.prod(probabilities) ** (-1 / 10)  # inverse geometric mean
    assert math.isclose(perplexity(F.cross_entropy(logits, targets).item()), expected.item(), rel_tol=1e-9)


def test_bits_per_byte_hand_values():
    assert math.isclose(bits_per_byte(8 * math.log(2), 8), 1.0)
    assert math.isclose(bits_per_byte(math.log(256) * 100, 100), 8.0)
    assert bits_per_byte(0.0, 5) == 0.0


@pytest.mark.parametrize("call", [
    lambda: perplexity(-0.1), lambda: perplexity(float("nan")), lambda: perplexity(float("inf")),
    lambda: bits_per_byte(1.0, 0), lambda: bits_per_byte(-1.0, 3),
])
def test_arithmetic_errors(call):
    with pytest.raises(ValueError):
        call()


def test_a_fractional_byte_count_is_a_type_error():
    with pytest.raises(TypeError, match="n_bytes"):
        bits_per_byte(1.0, 2.5)


def test_token_nll_matches_manual_cross_entropy():
    model = tiny_model()
    ids = torch.randint(0, 50, (17,), generator=torch.Generator().manual_seed(2))
    nll = token_nll(model, ids)
    with torch.no_grad():
        log_probs = model(ids[None, :-1])[0].log_softmax(dim=-1)
    expected = -log_probs[torch.arange(16), ids[1:]]
    assert nll.shape == (16,)
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)


def test_token_nll_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="context_length"):
        token_nll(model, torch.zeros(18, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2"):
        token_nll(model, [3])
    with pytest.raises(ValueError, match="1-D"):
        token_nll(model, torch.zeros(2, 5, dtype=torch.long))


def test_stride_equal_context_is_chunked_evaluation():
    model = tiny_model()
    n_chunks, context = 5, 16
    ids = torch.randint(0, 50, (n_chunks * context + 1,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        direct = model(ids[:-1].view(n_chunks, context), ids[1:].view(n_chunks, context), reduction="sum")
    for batch_size in (1, 2, 32):
        total, count = sliding_window_nll(model, ids, context, context, batch_size=batch_size)
        assert count == n_chunks * context
        assert math.isclose(total, direct.item(), rel_tol=1e-5)


def test_short_document_all_strides_agree():
    model = tiny_model()
    ids = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(4))
    reference = token_nll(model, ids).sum().item()
    for stride in (1, 3, 8, 16):
        total, count = sliding_window_nll(model, ids, 16, stride)
        assert count == 11 and math.isclose(total, reference, rel_tol=1e-5)


def test_every_token_scored_once_with_expected_context():
    # Recompute the sliding window target by target: same total, each target exactly once.
    model = tiny_model()
    ids = torch.randint(0, 50, (70,), generator=torch.Generator().manual_seed(5))
    for context, stride in ((16, 5), (16, 1), (8, 3), (16, 16)):
        total, count = sliding_window_nll(model, ids, context, stride, batch_size=4)
        expected, scored_up_to, start = 0.0, 0, 0
        while scored_up_to < len(ids) - 1:
            end = min(start + context, len(ids) - 1)
            expected += token_nll(model, ids[start:end + 1])[scored_up_to - start:].sum().item()
            scored_up_to, start = end, start + stride
        assert count == len(ids) - 1
        assert math.isclose(total, expected, rel_tol=1e-5)


def test_smaller_stride_differs_from_chunks_on_long_input():
    # Overlapping windows give tokens different context, so the answer must change (not a no-op).
    model = tiny_model()
    ids = torch.randint(0, 50, (60,), generator=torch.Generator().manual_seed(6))
    chunked, _ = sliding_window_nll(model, ids, 16, 16)
    overlapped, _ = sliding_window_nll(model, ids, 16, 4)
    assert not math.isclose(chunked, overlapped, rel_tol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(stride=0), dict(stride=17), dict(context=0), dict(context=17),
                                    dict(stride=2, batch_size=0)])
def test_sliding_window_errors(kwargs):
    model = tiny_model()
    kwargs = {"context": 16, **kwargs}
    with pytest.raises(ValueError):
        sliding_window_nll(model, torch.arange(30) % 50, **kwargs)


def test_sliding_window_empty_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="at least 2"):
        sliding_window_nll(model, [], 16, 4)
    with pytest.raises(ValueError, match="at least 2"):
        sliding_window_nll(model, [7], 16, 4)


def test_segmentation_invariance_of_total_nll():
    # A byte-level model scores a text; grouping its byte NLLs into any segmentation (here: words
    # and runs of spaces) changes the per-unit perplexity but not the total NLL or bits per byte.
    model = tiny_model(vocab_size=256, context_length=64, seed=7)
    text = "the cat sat on the mat and the dog sat on the log"
    data = list(text.encode("utf-8"))
    byte_nll = token_nll(model, [ord("\n")] + data)
    pieces = [piece for part in text.split(" ") for piece in (part, " ")][:-1]
    lengths = [len(piece.encode("utf-8")) for piece in pieces]
    assert sum(lengths) == len(data)
    per_piece = torch.stack([chunk.sum() for chunk in byte_nll.split(lengths)])
    total_bytes, total_pieces = byte_nll.sum().item(), per_piece.sum().item()
    assert math.isclose(total_bytes, total_pieces, rel_tol=1e-5)
    assert math.isclose(bits_per_byte(total_bytes, len(data)), bits_per_byte(total_pieces, len(data)), rel_tol=1e-5)
    byte_ppl, piece_ppl = perplexity(total_bytes / len(data)), perplexity(total_pieces / len(pieces))
    assert piece_ppl > byte_ppl
    assert math.isclose(piece_ppl, byte_ppl ** (len(data) / len(pieces)), rel_tol=1e-4)
    # the sliding-window total over the same bytes agrees, whatever the stride
    total, count = sliding_window_nll(model, [ord("\n")] + data, 64, 7)
    assert count == len(data) and math.isclose(total, total_bytes, rel_tol=1e-5)

"""llmbook.positional: RoPE against an independent complex-number formulation, its relative-position
property and norm preservation, the absolute encodings, and the errors on bad input."""

import math

import pytest
import torch

from llmbook.positional import (LearnedPositionalEmbedding, apply_rope, rope_frequencies,
                                 sinusoidal_encoding)


def rope_by_complex_numbers(x, positions, base=10000.0):
    """Reference: pair (x_i, x_{i+d/2}) as a complex number, multiplied by e^{i p theta_i}."""
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.exp(1j * positions.double()[:, None] * theta)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def test_rope_matches_complex_reference(generator):
    x = torch.randn(2, 4, 33, 64, generator=generator)
    torch.testing.assert_close(apply_rope(x), rope_by_complex_numbers(x, torch.arange(33)),
                               atol=1e-5, rtol=1e-5)


def test_rope_preserves_norms_and_shape(generator):
    x = torch.randn(3, 5, 17, 32, generator=generator)
    out = apply_rope(x, torch.arange(100, 117))
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("m,n,shift", [(0, 0, 5), (3, 11, 1), (40, 2, 1000), (7, 7, 4096)])
def test_rope_score_depends_only_on_offset(generator, m, n, shift):
    q, k = torch.randn(2, 1, 128, generator=generator)
    score = apply_rope(q, torch.tensor([m])) @ apply_rope(k, torch.tensor([n])).T
    shifted = apply_rope(q, torch.tensor([m + shift])) @ apply_rope(k, torch.tensor([n + shift])).T
    torch.testing.assert_close(shifted, score, atol=1e-3, rtol=1e-4)


def test_rope_is_a_real_rotation_not_identity(generator):
    x = torch.randn(1, 8, 16, generator=generator)
    assert not torch.allclose(apply_rope(x)[0, 1:], x[0, 1:])
    torch.testing.assert_close(apply_rope(x)[0, 0], x[0, 0])  # position 0: angle 0


def test_rope_positions_default_and_broadcast(generator):
    x = torch.randn(2, 3, 6, 8, generator=generator)
    torch.testing.assert_close(apply_rope(x), apply_rope(x, torch.arange(6)))
    per_sequence = torch.stack([torch.arange(6), torch.arange(10, 16)])[:, None, :]  # (B, 1, T)
    out = apply_rope(x, per_sequence)
    torch.testing.assert_close(out[1], apply_rope(x[1], torch.arange(10, 16)))


def test_rope_keeps_low_precision_dtype(generator):
    x = torch.randn(4, 16, generator=generator).to(torch.bfloat16)
    out = apply_rope(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), apply_rope(x.float()), atol=2e-2, rtol=2e-2)


def test_rope_odd_head_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope(torch.randn(2, 5, 7))


def test_rope_bad_positions_and_shapes():
    with pytest.raises(ValueError, match="broadcast"):
        apply_rope(torch.randn(5, 8), torch.arange(4))
    with pytest.raises(ValueError, match="seq_len, head_dim"):
        apply_rope(torch.randn(8))


def test_rope_frequencies():
    theta = rope_frequencies(8, base=100.0)
    torch.testing.assert_close(theta, torch.tensor([1.0, 100 ** -0.25, 100 ** -0.5, 100 ** -0.75]))


def test_sinusoidal_encoding_values_and_relative_dot_product():
    pe = sinusoidal_encoding(50, 16)
    assert pe.shape == (50, 16)
    torch.testing.assert_close(pe[0, 0::2], torch.zeros(8))
    torch.testing.assert_close(pe[0, 1::2], torch.ones(8))
    assert math.isclose(pe[3, 2].item(), math.sin(3 * 10000 ** (-2 / 16)), rel_tol=1e-5)
    gram = pe @ pe.T
    torch.testing.assert_close(torch.diagonal(gram, 4), torch.diagonal(gram, 4)[:1].expand(46), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="even d_model"):
        sinusoidal_encoding(10, 5)


def test_learned_positions_have_no_row_past_the_context():
    table = LearnedPositionalEmbedding(context_length=8, d_model=4)
    assert table(torch.arange(8)).shape == (8, 4)
    with pytest.raises(IndexError, match="context length"):
        table(torch.arange(9))

"""Tests for llmbook.embeddings (exported from ch01_foundations/02_embeddings.ipynb)."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from llmbook.embeddings import embedding_parameter_count, one_hot_embedding


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def test_forward_equals_f_embedding_on_random_ids(generator):
    vocab_size, d_model = 97, 16
    weight = torch.randn(vocab_size, d_model, generator=generator)
    ids = torch.randint(0, vocab_size, (4, 11), generator=generator)
    out = one_hot_embedding(ids, weight)
    assert out.shape == (4, 11, d_model)
    assert out.dtype == weight.dtype
    # Multiplying by 0 and 1 is exact, so the two agree bit for bit.
    assert torch.equal(out, F.embedding(ids, weight))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_accepts_any_integer_dtype(dtype):
    weight = torch.arange(12.0).reshape(6, 2)
    ids = torch.tensor([5, 0, 3], dtype=dtype)
    assert torch.equal(one_hot_embedding(ids, weight), weight[ids.long()])


def test_gradients_equal_with_repeated_ids_and_untouched_rows_zero(generator):
    vocab_size, d_model = 20, 6
    ids = torch.tensor([[3, 7, 3, 12], [7, 7, 0, 3]])  # 3 and 7 repeat; most rows unused
    upstream = torch.randn(*ids.shape, d_model, generator=generator)
    initial = torch.randn(vocab_size, d_model, generator=generator)

    w_one_hot = initial.clone().requires_grad_()
    w_lookup = initial.clone().requires_grad_()
    (one_hot_embedding(ids, w_one_hot) * upstream).sum().backward()
    (F.embedding(ids, w_lookup) * upstream).sum().backward()

    assert_close(w_one_hot.grad, w_lookup.grad)

    used = torch.zeros(vocab_size, dtype=torch.bool)
    used[ids.flatten()] = True
    assert (w_one_hot.grad[~used] == 0).all()
    assert (w_one_hot.grad[used] != 0).any(dim=1).all()

    # A repeated id accumulates: its row is the sum of the upstream rows at its positions.
    assert_close(w_one_hot.grad[7], upstream[0, 1] + upstream[1, 0] + upstream[1, 1])
    assert_close(w_one_hot.grad[3], upstream[0, 0] + upstream[0, 2] + upstream[1, 3])


def test_gradient_is_scatter_add(generator):
    vocab_size, d_model = 9, 3
    ids = torch.tensor([1, 1, 4, 8, 1])
    upstream = torch.randn(len(ids), d_model, generator=generator)
    weight = torch.randn(vocab_size, d_model, generator=generator, requires_grad=True)
    (one_hot_embedding(ids, weight) * upstream).sum().backward()
    expected = torch.zeros(vocab_size, d_model).index_add_(0, ids, upstream)
    assert_close(weight.grad, expected)


@pytest.mark.parametrize("bad_id", [6, 100, -1])
def test_out_of_range_id_raises_with_id_and_vocab_size(bad_id):
    weight = torch.zeros(6, 3)
    ids = torch.tensor([[0, 1], [2, bad_id]])
    with pytest.raises(ValueError, match=rf"token id {bad_id} at index \(1, 1\).*\[0, 6\).*V=6"):
        one_hot_embedding(ids, weight)


def test_float_ids_raise():
    with pytest.raises(ValueError, match="integer tensor.*torch.float32"):
        one_hot_embedding(torch.tensor([1.0, 2.0]), torch.zeros(6, 3))


def test_bool_ids_and_non_tensor_ids_raise():
    with pytest.raises(ValueError, match="integer tensor"):
        one_hot_embedding(torch.tensor([True, False]), torch.zeros(6, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        one_hot_embedding([1, 2], torch.zeros(6, 3))


def test_weight_must_be_2d():
    with pytest.raises(ValueError, match="2-D"):
        one_hot_embedding(torch.tensor([0]), torch.zeros(6))
    with pytest.raises(ValueError, match="2-D"):
        one_hot_embedding(torch.tensor([0]), torch.zeros(2, 6, 3))


def test_embedding_parameter_count_gpt2_small():
    assert embedding_parameter_count(50257, 768) == 50257 * 768 == 38_597_376
    assert embedding_parameter_count(50257, 768, tied=True) == 50257 * 768
    assert embedding_parameter_count(50257, 768, tied=False) == 2 * 50257 * 768


@pytest.mark.parametrize("vocab_size, d_model, error", [(0, 768, ValueError), (50257, -1, ValueError),
                                                        (50257.0, 768, TypeError), (True, 768, TypeError)])
def test_embedding_parameter_count_rejects_bad_sizes(vocab_size, d_model, error):
    with pytest.raises(error, match="positive integer"):
        embedding_parameter_count(vocab_size, d_model)

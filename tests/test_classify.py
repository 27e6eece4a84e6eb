"""Tests for llmbook.classify (ch05_evaluation/06_classifier_and_lora.ipynb): page encoding and the
stratified split, pooling against a hand computation, the classifier's shapes, its indifference to
padding and to a cached frozen prefix, its errors, the detection counts, and a classifier that must
learn a separable toy task."""

import pytest
import torch
from torch import nn

from llmbook.classify import (Detection, GPTClassifier, encode_pages, is_junk, optimizer_state_bytes, page_text,
                              pool, predict_proba, prefix_states, set_trainable, stratified_split,
                              train_classifier, trainable_parameters)
from llmbook.cleaning import RawDocument
from llmbook.mmlu import binomial_ci
from llmbook.model import GPT, GPTConfig


class ByteTokenizer:
    """A stand-in tokenizer: one token per byte, <|endoftext|> = 256."""
    eot_token = 256

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))


def tiny_gpt(**overrides) -> GPT:
    settings = dict(vocab_size=50, context_length=16, n_layer=2, n_head=2, d_model=16,
                    pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**settings, **overrides})).eval()


def padded_batch():
    ids = torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([10, 3, 7, 1])
    for row, length in enumerate(lengths):
        ids[row, length:] = 0
    return ids, lengths


def test_encode_pages_puts_eot_first_truncates_and_pads():
    ids, lengths = encode_pages(ByteTokenizer(), ["abc", "", "abcdefghij"], max_tokens=5)
    assert ids.shape == (3, 5) and ids.dtype == torch.long
    assert lengths.tolist() == [4, 1, 5]
    assert ids[0].tolist() == [256, 97, 98, 99, 256]        # padded with <|endoftext|>
    assert ids[1].tolist() == [256] * 5
    assert ids[2].tolist() == [256, 97, 98, 99, 100]        # the first max_tokens - 1 tokens
    ids, lengths = encode_pages(ByteTokenizer(), ["abcdefghij"], max_tokens=8, max_chars=2)
    assert lengths.tolist() == [3] and ids[0, :3].tolist() == [256, 97, 98]
    with pytest.raises(ValueError, match="max_tokens"):
        encode_pages(ByteTokenizer(), ["abc"], max_tokens=0)


def test_page_text_decodes_as_the_cleaning_pipeline_and_is_junk_reads_the_kind():
    payload = "Caf\u00e9  au   lait.\r\n".encode() + b"\xff" + b" fini"
    assert page_text(payload) == "Caf\u00e9 au lait.\nfini"
    assert not is_junk(RawDocument("a", "text", "clean+boilerplate"))
    assert is_junk(RawDocument("b", "text", "keyword_spam"))


def test_stratified_split_holds_out_the_same_share_of_every_group():
    groups = ["good"] * 40 + ["spam"] * 10 + ["rare"] * 1 + ["good"] * 10
    train, held_out = stratified_split(groups, 0.5, seed=0)
    assert sorted(train + held_out) == list(range(len(groups))) and not set(train) & set(held_out)
    assert train == sorted(train) and held_out == sorted(held_out)
    count = lambda indices, group: sum(groups[i] == group for i in indices)  # noqa: E731
    assert count(held_out, "good") == 25 and count(held_out, "spam") == 5
    assert stratified_split(groups, 0.5, seed=0) == (train, held_out)
    assert stratified_split(groups, 0.5, seed=1) != (train, held_out)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="held_out_fraction"):
            stratified_split(groups, bad)


def test_pooling_reads_only_the_real_positions():
    hidden = torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 2, 1])
    torch.testing.assert_close(pool(hidden, lengths, "last"), torch.stack([hidden[0, 4], hidden[1, 1], hidden[2, 0]]))
    expected = torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0), hidden[2, 0]])
    torch.testing.assert_close(pool(hidden, lengths, "mean"), expected)
    changed = hidden.clone()
    changed[1, 2:] = 1e6                                     # padding may hold anything
    torch.testing.assert_close(pool(changed, lengths, "mean"), expected)
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, lengths, "max")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_logits_have_one_row_per_page_and_ignore_the_padding(pooling):
    classifier = GPTClassifier(tiny_gpt(), n_classes=3, pooling=pooling)
    ids, lengths = padded_batch()
    with torch.no_grad():
        logits = classifier(ids, lengths)
        alone = torch.cat([classifier(ids[i:i + 1, :lengths[i]], lengths[i:i + 1]) for i in range(4)])
        other_padding = ids.clone()
        other_padding[1, 3:] = 7
        repadded = classifier(other_padding, lengths)
    assert logits.shape == (4, 3)
    torch.testing.assert_close(alone, logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(repadded, logits, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True)])
def test_a_cached_prefix_gives_the_logits_of_the_full_forward_pass(overrides):
    model = tiny_gpt(n_layer=3, **overrides)
    classifier = GPTClassifier(model)
    ids, lengths = padded_batch()
    with torch.no_grad():
        expected = classifier(ids, lengths)
        for first in range(1, 4):                           # 3: only the final norm and the head run
            stream = prefix_states(model, ids, first, batch_size=3)
            assert stream.shape == (4, 10, 16)
            torch.testing.assert_close(classifier(stream, lengths, first_block=first), expected)
        # in two pieces: blocks 0..1, then block 2 from their output
        stream = prefix_states(model, prefix_states(model, ids, 2), 3, first_block=2)
        torch.testing.assert_close(classifier(stream, lengths, first_block=3), expected)
        torch.testing.assert_close(model.hidden_states(ids), model.norm_f(prefix_states(model, ids, 3)))


def test_the_classifier_rejects_bad_inputs():
    with pytest.raises(TypeError, match="GPT"):
        GPTClassifier(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="pooling"):
        GPTClassifier(tiny_gpt(), pooling="max")
    with pytest.raises(ValueError, match="n_classes"):
        GPTClassifier(tiny_gpt(), n_classes=0)
    classifier = GPTClassifier(tiny_gpt())
    ids, lengths = padded_batch()
    with pytest.raises(ValueError, match="lengths"):
        classifier(ids, torch.tensor([10, 3, 0, 1]))        # a page with no token
    with pytest.raises(ValueError, match="lengths"):
        classifier(ids, torch.tensor([11, 3, 7, 1]))        # longer than the row
    with pytest.raises(ValueError, match="lengths"):
        classifier(ids, lengths[:3])
    with pytest.raises(ValueError, match="residual stream"):
        classifier(ids, lengths, first_block=1)             # ids where a stream is expected
    with pytest.raises(ValueError, match="first_block"):
        classifier(ids, lengths, first_block=3)
    with pytest.raises(ValueError, match="first_block"):
        prefix_states(tiny_gpt(), ids, 3)


def test_set_trainable_freezes_all_but_the_chosen_part():
    classifier = GPTClassifier(tiny_gpt())
    head = 16 * 2 + 2
    assert set_trainable(classifier, "head") == head
    last = sum(p.numel() for p in classifier.gpt.blocks["1"].parameters()) + 16   # + the final norm
    assert set_trainable(classifier, "last_block") == head + last
    total = sum(p.numel() for p in classifier.parameters())
    assert set_trainable(classifier, "all") == total == trainable_parameters(classifier)
    assert trainable_parameters(classifier.gpt) == sum(p.numel() for p in tiny_gpt().parameters())
    with pytest.raises(ValueError, match="part"):
        set_trainable(classifier, "first_block")


def toy_task(n: int, seed: int):
    """Class 1: sequences of tokens 10..19; class 0: tokens 20..29; lengths 3..8, padded with 0."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    lengths = torch.randint(3, 9, (n,), generator=generator)
    ids = torch.randint(0, 10, (n, 8), generator=generator) + torch.where(labels == 1, 10, 20)[:, None]
    ids[torch.arange(8)[None, :] >= lengths[:, None]] = 0
    return ids, lengths, labels


def test_the_classifier_learns_a_separable_toy_task():
    ids, lengths, labels = toy_task(64, seed=0)
    test_ids, test_lengths, test_labels = toy_task(64, seed=1)
    torch.manual_seed(0)
    classifier = GPTClassifier(tiny_gpt())
    set_trainable(classifier, "all")
    before = (predict_proba(classifier, test_ids, test_lengths).argmax(-1) == test_labels).float().mean()
    log = train_classifier(classifier, ids, lengths, labels, steps=40, batch_size=8, lr=1e-2, seed=0)
    probabilities = predict_proba(classifier, test_ids, test_lengths, batch_size=16)
    after = (probabilities.argmax(-1) == test_labels).float().mean()
    assert probabilities.shape == (64, 2) and torch.allclose(probabilities.sum(-1), torch.ones(64))
    assert before < 0.8 and after == 1.0
    assert len(log.losses) == 40 and sum(log.losses[-5:]) < 0.2 * sum(log.losses[:5])
    assert log.seconds_per_step > 0 and not classifier.training
    # AdamW keeps two fp32 tensors the size of every trained parameter
    assert optimizer_state_bytes(log.optimizer) == 8 * trainable_parameters(classifier)


def test_training_only_the_head_leaves_the_body_unchanged():
    ids, lengths, labels = toy_task(16, seed=0)
    classifier = GPTClassifier(tiny_gpt())
    set_trainable(classifier, "head")
    body = {name: tensor.clone() for name, tensor in classifier.gpt.state_dict().items()}
    head = classifier.head.weight.clone()
    train_classifier(classifier, ids, lengths, labels, steps=3, batch_size=4, lr=1e-2)
    assert all(torch.equal(classifier.gpt.state_dict()[name], tensor) for name, tensor in body.items())
    assert not torch.equal(classifier.head.weight, head)


def test_train_classifier_rejects_nothing_to_train_and_mismatched_data():
    ids, lengths, labels = toy_task(8, seed=0)
    classifier = GPTClassifier(tiny_gpt())
    classifier.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter"):
        train_classifier(classifier, ids, lengths, labels, steps=1, batch_size=4, lr=1e-3)
    set_trainable(classifier, "head")
    with pytest.raises(ValueError, match="one of each"):
        train_classifier(classifier, ids, lengths, labels[:5], steps=1, batch_size=4, lr=1e-3)
    with pytest.raises(ValueError, match="steps"):
        train_classifier(classifier, ids, lengths, labels, steps=0, batch_size=4, lr=1e-3)


def test_detection_counts_rates_and_intervals():
    flagged = [True, True, False, False, True, False]
    actual = [True, False, True, False, True, False]
    d = Detection.of(flagged, actual)
    assert (d.tp, d.fp, d.fn, d.tn) == (2, 1, 1, 2)
    assert d.accuracy == 4 / 6 and d.precision == 2 / 3 and d.recall == 2 / 3
    assert d.precision_interval() == binomial_ci(2, 3) and d.recall_interval() == binomial_ci(2, 3)
    nothing = Detection.of([False] * 4, [True, False, False, True])
    assert nothing.precision != nothing.precision and nothing.recall == 0        # nan: nothing flagged
    assert all(x != x for x in nothing.precision_interval())
    with pytest.raises(ValueError, match="one verdict per page"):
        Detection.of([True, False], [True])

"""Tests for llmbook.preference (ch05_evaluation/07_preference_tuning.ipynb): the DPO loss against
the paper's formula and numbers worked out by hand, log-probabilities of replies against a direct
per-token computation, the pair builder, batched sampling and one DPO step."""

import copy
import math

import pytest
import torch

from llmbook.chat import Example, add_chat_tokens, encode_chat, reply
from llmbook.model import GPT, GPTConfig
from llmbook.preference import (PreferencePair, dpo_loss, dpo_train, implicit_rewards, pad_batch,
                                preference_pairs, reply_logprobs, sample_replies, sampled_kl,
                                sequence_logprobs, token_logprobs, wrong_answers)
from llmbook.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level tokenizer (256 bytes + 2 merges + <|endoftext|>) with the chat tokens."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b" w"] = 256
    ranks[b"he"] = 257
    return add_chat_tokens(BPETokenizer(ranks, special_tokens={"<|endoftext|>": 258}))


def tiny_model(vocab_size=262, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, context_length=64, n_layer=1, n_head=2, d_model=16,
                         pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)).eval()


def paper_formula(pc, pr, rc, rr, beta):
    """Eq. 7 of Rafailov et al. (2023), written out: -E[log sigma(beta log(pi_c/ref_c) - beta log(pi_r/ref_r))]."""
    return -torch.log(torch.sigmoid(beta * (pc - rc) - beta * (pr - rr))).mean()


def test_dpo_loss_by_hand():
    # the policy equals the reference: every margin is 0 and the loss is -log(1/2)
    zeros = torch.zeros(3)
    assert dpo_loss(zeros - 5, zeros - 7, zeros - 5, zeros - 7, beta=0.1).item() == pytest.approx(math.log(2))
    # beta = 0.5; log-ratios +1 (chosen: -1 vs -2) and -1 (rejected: -3 vs -2): beta * margin = 1
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)   # 0.3133
    # beta * margin = ln 3: sigma = 3/4, loss = ln(4/3)
    loss = dpo_loss(torch.tensor([math.log(3)]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)
    assert loss.item() == pytest.approx(math.log(4 / 3), abs=1e-6)


def test_dpo_loss_matches_the_paper_formula_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_(True)
    for beta in (0.01, 0.1, 1.0):
        ours = dpo_loss(pc, pr, rc, rr, beta)
        torch.testing.assert_close(ours, paper_formula(pc, pr, rc, rr, beta))
        (grad,) = torch.autograd.grad(ours, pc)
        # d/d pi_c of -log sigma(beta m) is -beta sigma(-beta m), averaged over the 64 pairs
        margin = (pc - rc) - (pr - rr)
        torch.testing.assert_close(grad, -beta * torch.sigmoid(-beta * margin.detach()) / 64)


def test_dpo_loss_stays_finite_where_the_naive_formula_does_not():
    pc, pr, ref = torch.tensor([-500.0]), torch.tensor([0.0]), torch.tensor([0.0])
    assert torch.isinf(paper_formula(pc, pr, ref, ref, 1.0))
    assert dpo_loss(pc, pr, ref, ref, beta=1.0).item() == pytest.approx(500.0)


def test_dpo_loss_checks_its_arguments():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(x, x, x, torch.zeros(3))


def test_implicit_rewards():
    rewards = implicit_rewards(torch.tensor([-1.0, -4.0], requires_grad=True), torch.tensor([-2.0, -2.0]), beta=0.5)
    assert rewards.tolist() == [0.5, -1.0] and not rewards.requires_grad


def direct_logprob(model, ids, mask):
    """log p(reply | prompt) for one unpadded sequence, token by token from the full logits."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])


def test_sequence_logprobs_equal_a_direct_per_token_computation(tokenizer):
    model = tiny_model()
    conversations = [
        [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "he he"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bcdefgh"}],
        [{"role": "user", "content": "a much longer question"}, {"role": "assistant", "content": "w"}],
    ]
    encoded = [encode_chat(tokenizer, messages) for messages in conversations]
    ids, mask = pad_batch(encoded, pad_id=tokenizer.special_tokens["<|end|>"])
    assert ids.shape == (3, max(len(i) for i, _ in encoded)) and mask.sum() == sum(sum(m) for _, m in encoded)
    with torch.no_grad():
        batched = sequence_logprobs(model, ids, mask)
        per_token = token_logprobs(model, ids, mask)
    expected = torch.tensor([direct_logprob(model, i, m) for i, m in encoded])
    torch.testing.assert_close(batched, expected, atol=1e-4, rtol=1e-5)
    assert (per_token[mask == 0] == 0).all() and (per_token[mask == 1] < 0).all()
    # gradients flow to the model
    sequence_logprobs(model, ids, mask).sum().backward()
    assert model.tok_emb.weight.grad is not None and model.tok_emb.weight.grad.abs().sum() > 0


def test_token_logprobs_rejects_a_scored_first_token_and_bad_shapes(tokenizer):
    model = tiny_model()
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="first token"):
        token_logprobs(model, ids, torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(model, ids, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one"):
        pad_batch([], 0)


def test_wrong_answers_by_form():
    assert wrong_answers(Example("compare", "Is 15 greater than 1?", "yes")) == ["no"]
    assert wrong_answers(Example("compare", "Is 1 greater than 15?", "No")) == ["Yes"]
    assert wrong_answers(Example("larger", "Which number is larger, 12 or 40?", "40")) == ["12", "41", "39"]
    assert wrong_answers(Example("add", "What is 0 + 0?", "0")) == ["1"]
    assert wrong_answers(Example("count", "How many words are in: a b c", "3")) == ["4", "2"]
    assert wrong_answers(Example("first", "First word of: cat dog cat", "cat")) == ["dog"]
    assert wrong_answers(Example("repeat", "Repeat the word: cat", "cat")) == ["Repeat", "the", "word"]
    assert wrong_answers(Example("refuse", "Write a poem", "I cannot do that.")) == []


def test_preference_pairs_are_deterministic_and_never_prefer_an_answer_to_itself():
    examples = [Example("larger", f"Which number is larger, {a} or {a + 3}?", str(a + 3)) for a in range(20)]
    examples += [Example("refuse", "Write a poem", "I cannot do that."), Example("compare", "Is 2 greater than 1?", "yes")]
    pairs = preference_pairs(examples, seed=3)
    assert pairs == preference_pairs(examples, seed=3)
    assert len(pairs) == len(examples) and all(isinstance(p, PreferencePair) for p in pairs)
    for example, pair in zip(examples, pairs):
        assert (pair.prompt, pair.chosen, pair.family) == (example.prompt, example.answer, example.family)
        assert pair.rejected != pair.chosen
    assert pairs[-1].rejected == "no"
    assert pairs[-2].rejected in {e.answer for e in examples}     # no rule: another example's answer
    assert pairs[0].messages("rejected") == [{"role": "user", "content": pairs[0].prompt},
                                             {"role": "assistant", "content": pairs[0].rejected}]
    with pytest.raises(ValueError, match="chosen"):
        pairs[0].messages("preferred")


def test_reply_logprobs_equal_token_logprobs_on_the_whole_sequences(tokenizer):
    model = tiny_model()
    prompts = [[{"role": "user", "content": text}] for text in ("hi", "hello there", "ho", "a longer one")]
    answers = [["he", "w", "xyz"], ["a", "bb", "he he he"], ["q", "r", "s"], ["hello", "w", "."]]
    prompt_ids = [encode_chat(tokenizer, p, add_generation_prompt=True)[0] for p in prompts]
    replies, sequences = [], []
    for prompt, ids, group in zip(prompts, prompt_ids, answers):
        for answer in group:
            full, mask = encode_chat(tokenizer, prompt + [{"role": "assistant", "content": answer}])
            assert full[:len(ids)] == ids
            replies.append(full[len(ids):])
            sequences.append((full, mask))
    logps, mask = reply_logprobs(model, prompt_ids, replies)
    assert logps.shape == mask.shape == (12, max(len(r) for r in replies))
    assert mask.sum(1).tolist() == [len(r) for r in replies]
    with torch.no_grad():
        expected = sequence_logprobs(model, *pad_batch(sequences, pad_id=0))
    torch.testing.assert_close(logps.sum(1), expected, atol=1e-4, rtol=1e-5)
    assert (logps[mask == 0] == 0).all()
    # at a temperature, and with gradients reaching the weights
    hot, _ = reply_logprobs(model, prompt_ids, replies, temperature=2.0)
    ids, full_mask = pad_batch(sequences, pad_id=0)
    torch.testing.assert_close(hot.sum(1), token_logprobs(model, ids, full_mask, temperature=2.0).sum(1), atol=1e-4, rtol=1e-5)
    hot.sum().backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same number"):
        reply_logprobs(model, prompt_ids, replies[:-1])


def test_sample_replies_keeps_prompt_order_and_greedy_equals_reply(tokenizer):
    model = tiny_model()
    prompts = [[{"role": "user", "content": text}] for text in ("hi", "hello there", "ho", "a longer one")]
    samples = sample_replies(model, tokenizer, prompts, n=1, max_new_tokens=6, temperature=0)
    assert samples.replies == [reply(model, tokenizer, messages, 6) for messages in prompts]
    sampled = sample_replies(model, tokenizer, prompts, n=3, max_new_tokens=5,
                             generator=torch.Generator().manual_seed(0))
    assert len(sampled.reply_ids) == len(sampled.replies) == 12 and sampled.n == 3
    for index, messages in enumerate(prompts):
        assert sampled.prompt_ids[index] == encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
    special = set(tokenizer.special_tokens.values())
    for ids, text in zip(sampled.reply_ids, sampled.replies):
        assert 1 <= len(ids) <= 5 and not special & set(ids[:-1])     # special tokens only at the end
        assert text == tokenizer.decode([t for t in ids if t not in special]).removeprefix(" ")
    again = sample_replies(model, tokenizer, prompts, n=3, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert again.replies == sampled.replies and again.reply_ids == sampled.reply_ids


def test_sampled_kl_is_zero_for_one_model_and_positive_between_two(tokenizer):
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    with torch.no_grad():               # sharper distributions than the initialisation's nearly uniform ones
        other.tok_emb.weight.mul_(20)
    prompts = [[{"role": "user", "content": text}] for text in ("hi", "ho")]
    same, _ = sampled_kl(model, model, tokenizer, prompts, n=4, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert same == 0.0
    kl, stderr = sampled_kl(model, other, tokenizer, prompts, n=64, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert kl > 2 * stderr > 0


def test_temperature_scales_the_logits(tokenizer):
    model = tiny_model()
    ids, mask = pad_batch([encode_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}])], 0)
    with torch.no_grad():
        logits = model(ids)[0, :-1] / 2.0
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0] * mask[0, 1:]
        torch.testing.assert_close(token_logprobs(model, ids, mask, temperature=2.0)[0, 1:], expected)


def test_one_dpo_step_moves_the_policy_and_not_the_reference(tokenizer):
    reference = tiny_model()
    policy = copy.deepcopy(reference)
    before = copy.deepcopy(reference.state_dict())
    pairs = [PreferencePair("t", f"q{i}", "he", "w") for i in range(4)]
    history = dpo_train(policy, reference, tokenizer, pairs, steps=3, batch_size=4, beta=0.1, lr=1e-2)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)   # policy == reference at step 0
    assert history[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["margin"] > 0 and history[-1]["accuracy"] == 1.0
    assert history[0]["weight"] == pytest.approx(0.5) and history[-1]["weight"] < 0.5
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    with pytest.raises(ValueError, match="copy"):
        dpo_train(reference, reference, tokenizer, pairs, steps=1)

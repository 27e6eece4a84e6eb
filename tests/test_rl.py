"""Tests for llmbook.rl (ch05_evaluation/08_rl_verifiable_rewards.ipynb): group-relative advantages
(the all-equal group included), the verifiers on hand-made replies, the clipped loss and the k3
estimator on numbers worked out by hand, and GRPO steps that change only what they should."""

import copy
import math

import pytest
import torch

from llmbook.chat import Example, add_chat_tokens
from llmbook.model import GPT, GPTConfig
from llmbook.rl import (clipped_policy_loss, exact_reward, group_relative_advantages, grpo_step, grpo_train,
                        k3_kl, weak_reward)
from llmbook.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def tokenizer():
    ranks = {bytes([b]): b for b in range(256)}
    return add_chat_tokens(BPETokenizer(ranks, special_tokens={"<|endoftext|>": 256}))


def tiny_model(vocab_size=260, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, context_length=64, n_layer=1, n_head=2, d_model=16,
                         pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)).eval()


def test_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    advantages = group_relative_advantages(rewards)
    torch.testing.assert_close(advantages[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    third = 1 / math.sqrt(3)                       # mean 1/4, standard deviation sqrt(3)/4
    torch.testing.assert_close(advantages[1], torch.tensor([-third, -third, 3 * third, -third]))
    assert torch.equal(advantages[2:], torch.zeros(2, 4))          # all equal: 0, never NaN


def test_advantages_are_standardised_per_group_and_ignore_a_shift():
    rewards = torch.rand(16, 8, generator=torch.Generator().manual_seed(0))
    advantages = group_relative_advantages(rewards)
    torch.testing.assert_close(advantages.mean(1), torch.zeros(16), atol=1e-6, rtol=0)
    torch.testing.assert_close(advantages.var(1, unbiased=False), torch.ones(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(group_relative_advantages(3 * rewards + 7), advantages, atol=1e-5, rtol=1e-5)
    # equal rewards that are not exact binary fractions are still equal: 0, not rounding noise / noise
    assert torch.equal(group_relative_advantages(torch.full((2, 3), 0.1)), torch.zeros(2, 3))


@pytest.mark.parametrize("bad", [torch.zeros(8), torch.zeros(2, 3, 4), torch.zeros(4, 1),
                                 torch.tensor([[0.0, float("nan")]]), [[0.0, 1.0]]])
def test_advantages_reject_bad_shapes_and_values(bad):
    with pytest.raises(ValueError):
        group_relative_advantages(bad)


def test_verifiers_on_hand_made_replies():
    assert exact_reward("85", "85") == exact_reward(" 85 ", "85") == 1.0
    assert exact_reward("85.", "85") == exact_reward("The answer is 85", "85") == 0.0
    assert weak_reward("The answer is 85", "85") == weak_reward("84 85 86", "85") == 1.0
    assert weak_reward("yes no", "yes") == weak_reward("Yes.", "yes") == 1.0
    assert weak_reward("185", "85") == weak_reward("yesno", "yes") == weak_reward("84", "85") == 0.0
    assert weak_reward("x (a+b) y", "(a+b)") == 1.0               # the answer is matched as text, not a pattern


def one_token(ratio, advantage):
    """Loss of one reply of one token with the given probability ratio and advantage."""
    logps = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss = clipped_policy_loss(logps, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1), clip=0.2)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.item(), grad.item()


def test_clipped_loss_by_hand():
    # A > 0: the gain stops at ratio 1.2; A < 0: the loss stops improving at ratio 0.8
    assert one_token(1.5, 1.0) == pytest.approx((-1.2, 0.0))           # clipped: no gradient
    assert one_token(0.5, 1.0) == pytest.approx((-0.5, -0.5))          # below the range: pulled up
    assert one_token(0.5, -1.0) == pytest.approx((0.8, 0.0))           # clipped: no gradient
    assert one_token(1.5, -1.0) == pytest.approx((1.5, 1.5))           # above the range: pushed down
    assert one_token(1.0, 2.0) == pytest.approx((-2.0, -2.0))          # ratio 1: REINFORCE, -A grad log p


def test_clipped_loss_averages_tokens_per_reply_then_replies():
    logps = torch.zeros(2, 4)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])
    loss = clipped_policy_loss(logps, logps, torch.tensor([1.0, 3.0]), mask)
    assert loss.item() == pytest.approx(-(1.0 + 3.0) / 2)              # not -(3 * 1 + 3) / 4
    with pytest.raises(ValueError, match="shapes"):
        clipped_policy_loss(logps, logps, torch.tensor([1.0]), mask)


def test_k3_is_zero_at_equality_never_negative_and_unbiased():
    assert torch.equal(k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])), torch.zeros(1))
    x = torch.linspace(-5, 5, 101)
    assert (k3_kl(x, x.flip(0)) >= 0).all()
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    draws = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = k3_kl(p.log()[draws], q.log()[draws]).mean().item()
    assert estimate == pytest.approx((p * (p / q).log()).sum().item(), abs=0.01)


def examples():
    return [Example("t", f"say {c}", "a") for c in "bcdefgh"]


def test_flat_rewards_and_no_kl_leave_the_policy_unchanged(tokenizer):
    reference = tiny_model()
    policy = copy.deepcopy(reference)
    before = copy.deepcopy(policy.state_dict())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
    stats = grpo_step(policy, reference, optimizer, tokenizer, examples()[:3], lambda reply, answer: 1.0,
                      group_size=4, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert stats["flat_groups"] == 1.0 and stats["reward"] == 1.0 and stats["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_grpo_moves_the_policy_towards_the_reward_and_leaves_the_reference(tokenizer):
    reference = tiny_model()
    policy = copy.deepcopy(reference)
    frozen = copy.deepcopy(reference.state_dict())
    # reward: the reply contains the letter "a" (the tiny model says it now and then)
    def verifier(reply, answer):
        return float("a" in reply)

    def rate(model):
        samples = grpo_step(model, reference, torch.optim.SGD(model.parameters(), lr=0.0), tokenizer,
                            examples(), verifier, group_size=32, max_new_tokens=3,
                            generator=torch.Generator().manual_seed(123))
        return samples["reward"]

    history = grpo_train(policy, reference, tokenizer, examples(), verifier, steps=15, prompts_per_step=4,
                         group_size=8, lr=3e-2, seed=0, max_new_tokens=3, inner_steps=2, kl_coef=0.01)
    assert len(history) == 15 and set(history[0]) >= {"reward", "exact", "reply_tokens", "kl", "flat_groups"}
    assert all(torch.equal(frozen[k], v) for k, v in reference.state_dict().items())
    assert rate(policy) > rate(reference) + 0.2
    assert history[-1]["kl"] > 0
    with pytest.raises(ValueError, match="copy"):
        grpo_train(reference, reference, tokenizer, examples(), verifier, steps=1)

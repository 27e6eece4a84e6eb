"""Tests for llmbook.lora (ch05_evaluation/06_classifier_and_lora.ipynb): a fresh adapter changes
nothing, bit for bit; the layer computes x (W + alpha/r B A)^T + b; merging keeps the outputs;
training moves the adapters and nothing else; bad arguments get clear errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmbook.lora import LoRALinear, add_lora, lora_parameters, merge_lora
from llmbook.model import GPT, GPTConfig


def tiny_gpt(**overrides) -> GPT:
    settings = dict(vocab_size=50, context_length=16, n_layer=2, n_head=2, d_model=16)
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**settings, **overrides})).eval()


def some_tokens(batch: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(1))


def perturb_adapters(model: nn.Module) -> None:
    """Give every B a non-zero value, as training would."""
    with torch.no_grad():
        for name, parameter in lora_parameters(model).items():
            if name.endswith("lora_B"):
                parameter.normal_(std=0.3)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_fresh_adapter_computes_exactly_the_base_layer(bias, dtype):
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=bias, dtype=dtype)
    x = torch.randn(5, 3, 12, dtype=dtype)
    expected = base(x)
    lora = LoRALinear(base, rank=4, alpha=8)
    assert torch.equal(lora(x), expected)
    assert lora.lora_A.shape == (4, 12) and lora.lora_B.shape == (7, 4)
    assert lora.lora_A.dtype == dtype and not torch.equal(lora.lora_A, torch.zeros_like(lora.lora_A))


def test_the_layer_is_the_base_weight_plus_the_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(10, 6, dtype=torch.float64)
    lora = LoRALinear(base, rank=3, alpha=5.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 10, dtype=torch.float64)
    explicit = x @ (base.weight + (5.0 / 3) * lora.lora_B @ lora.lora_A).T + base.bias
    torch.testing.assert_close(lora(x), explicit, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lora.delta_weight(), (5.0 / 3) * lora.lora_B @ lora.lora_A)
    assert lora.scale == 5.0 / 3


def test_only_the_adapter_of_a_lora_linear_is_trainable():
    lora = LoRALinear(nn.Linear(8, 8), rank=2, alpha=2)
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert "rank=2" in repr(lora)


@pytest.mark.parametrize("overrides", [{}, dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)])
def test_fresh_adapters_leave_a_gpts_logits_bitwise_unchanged(overrides):
    model = tiny_gpt(**overrides)
    idx = some_tokens()
    with torch.no_grad():
        expected = model(idx)
        add_lora(model, rank=4, alpha=8)
        assert torch.equal(model(idx), expected)


def test_add_lora_wraps_the_targets_and_freezes_everything_else():
    model = add_lora(tiny_gpt(), rank=2, alpha=4, targets=("q_proj", "v_proj"))
    wrapped = sorted(name for name, module in model.named_modules() if isinstance(module, LoRALinear))
    assert wrapped == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model)) and len(trainable) == 8
    # a single target may be given as a string; a suffix must match a whole name component
    model = add_lora(tiny_gpt(), rank=2, alpha=4, targets="out_proj")
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2
    assert isinstance(add_lora(tiny_gpt(), 2, 4, targets="proj").blocks["0"].mlp.proj, LoRALinear)
    assert not isinstance(add_lora(tiny_gpt(), 2, 4, targets="proj").blocks["0"].attn.q_proj, LoRALinear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merging_keeps_the_outputs_and_leaves_plain_trainable_linears(dtype):
    model = tiny_gpt(bias=True).to(dtype)
    add_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "fc"))
    perturb_adapters(model)
    idx = some_tokens()
    with torch.no_grad():
        unmerged = model(idx)
        merged_model = merge_lora(model)
        merged = merged_model(idx)
    assert merged_model is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.blocks["0"].attn.q_proj) is nn.Linear and model.blocks["0"].attn.q_proj.weight.dtype == dtype
    assert all(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_gpt(bias=True).parameters())
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(merged, unmerged, rtol=tolerance, atol=tolerance)
    assert not torch.allclose(unmerged, tiny_gpt(bias=True).to(dtype)(idx))  # the adapters did change it


def test_training_moves_the_adapters_and_nothing_else():
    model = tiny_gpt()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    add_lora(model, rank=2, alpha=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = some_tokens(4, 13)
    model.train()
    for _ in range(5):
        loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    for name, tensor in after.items():
        if name.endswith(("lora_A", "lora_B")):
            continue
        assert torch.equal(tensor, before[name.replace(".base.", ".")]), name
    for name, parameter in lora_parameters(model).items():
        assert not torch.equal(parameter, torch.zeros_like(parameter)), name
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora_parameters(model))


def test_training_lowers_the_loss_through_the_adapters_alone():
    model = add_lora(tiny_gpt(), rank=4, alpha=8, targets=("q_proj", "v_proj", "fc", "proj"))
    idx = some_tokens(4, 13)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # The frozen tied head keeps the logits of this tiny random model small, so the fall is modest;
    # with no gradient reaching the adapters the loss would not move at all.
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("base, rank, alpha, error, message", [
    (nn.Conv1d(4, 4, 1), 2, 4, TypeError, "nn.Linear"),
    (nn.Linear(8, 6), 0, 4, ValueError, "rank must be a positive integer"),
    (nn.Linear(8, 6), 2.0, 4, TypeError, "rank must be a positive integer"),
    (nn.Linear(8, 6), True, 4, TypeError, "rank must be a positive integer"),
    (nn.Linear(8, 6), 7, 4, ValueError, "larger than min"),
    (nn.Linear(8, 6), 2, 0, ValueError, "alpha must be a positive"),
    (nn.Linear(8, 6), 2, -1.5, ValueError, "alpha must be a positive"),
    (nn.Linear(8, 6), 2, float("nan"), ValueError, "alpha must be a positive"),
    (nn.Linear(8, 6), 2, float("inf"), ValueError, "alpha must be a positive"),
    (nn.Linear(8, 6), 2, "16", TypeError, "alpha must be a positive"),
])
def test_lora_linear_rejects_bad_arguments(base, rank, alpha, error, message):
    with pytest.raises(error, match=message):
        LoRALinear(base, rank, alpha)


def test_add_lora_names_the_linear_layers_when_nothing_matches():
    with pytest.raises(ValueError) as info:
        add_lora(tiny_gpt(), rank=2, alpha=4, targets=("query", "value"))
    for name in ("q_proj", "k_proj", "v_proj", "out_proj", "fc", "proj", "lm_head"):
        assert repr(name) in str(info.value)


def test_add_lora_refuses_a_head_tied_to_the_embedding_but_adapts_an_untied_one():
    with pytest.raises(ValueError, match="tied"):
        add_lora(tiny_gpt(), rank=2, alpha=4, targets=("lm_head",))
    untied = add_lora(tiny_gpt(tie_weights=False), rank=2, alpha=4, targets=("lm_head",))
    assert isinstance(untied.lm_head, LoRALinear)
    assert not untied.tok_emb.weight.requires_grad


def test_add_lora_twice_and_merge_without_adapters_are_errors():
    model = add_lora(tiny_gpt(), rank=2, alpha=4)
    with pytest.raises(ValueError, match="already"):
        add_lora(model, rank=2, alpha=4, targets=("k_proj",))
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(tiny_gpt())
    merged = merge_lora(model)
    add_lora(merged, rank=2, alpha=4)  # after merging, a new round of adapters is fine

"""llmbook.model: causality of every configuration, the attention kernels against each other and
against nn.MultiheadAttention, the GPT-2 loader against transformers, the parameter and FLOP
formulas against the modules and FlopCounterMode, the chunked loss, activation checkpointing,
the safetensors reader, and the errors on bad input."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from llmbook.model import (GPT, GPT2_SIZES, CausalSelfAttention, GPTConfig, RMSNorm, causal_mask,
                           chunked_cross_entropy, gpt2_pretrained, load_gpt2_state_dict, matmul_flops,
                           naive_attention, parameter_count, read_safetensors)

SWITCHES = dict(pos_encoding=("learned", "rope"), norm=("layernorm", "rmsnorm"), mlp=("gelu", "swiglu"),
                attention=("sdpa", "naive"), n_kv_head=(4, 2), bias=(True, False), tie_weights=(True, False))
ALL_CONFIGS = [dict(zip(SWITCHES, values)) for values in itertools.product(*SWITCHES.values())]


def tiny(**overrides):
    base = dict(vocab_size=50, context_length=16, n_layer=2, n_head=4, d_model=32)
    return GPTConfig(**{**base, **overrides})


def test_every_configuration_is_causal():
    assert len(ALL_CONFIGS) == 128
    T, vocab = 12, 50
    for seed, switches in enumerate(ALL_CONFIGS):
        torch.manual_seed(seed)
        model = GPT(tiny(**switches)).eval()
        idx = torch.randint(0, vocab, (1, T)).repeat(T + 1, 1)
        for t in range(T):                       # row t + 1 differs from row 0 at position t only
            idx[t + 1, t] = (idx[t + 1, t] + 1) % vocab
        with torch.no_grad():
            logits = model(idx)
        for t in range(T):
            assert torch.allclose(logits[t + 1, :t], logits[0, :t], atol=1e-6, rtol=0), (switches, t)
            # and the change does reach every later position, so the check above can fail
            assert (logits[t + 1, t:] - logits[0, t:]).abs().amax(dim=-1).min() > 1e-5, (switches, t)


@pytest.mark.parametrize("switches", [dict(), dict(n_kv_head=2, pos_encoding="rope"),
                                      dict(n_kv_head=1, mlp="swiglu", norm="rmsnorm", bias=False)])
def test_sdpa_model_equals_naive_model(switches):
    torch.manual_seed(0)
    fused = GPT(tiny(**switches)).eval()
    naive = GPT(tiny(**switches, attention="naive")).eval()
    naive.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 50, (3, 14))
    with torch.no_grad():
        torch.testing.assert_close(fused(idx), naive(idx), atol=1e-5, rtol=1e-5)


def test_naive_attention_equals_sdpa_with_and_without_offset():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(naive_attention(q, k, v, causal_mask(9, 9)),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    full = naive_attention(q, k, v, causal_mask(9, 9))
    torch.testing.assert_close(naive_attention(q[:, :, -4:], k, v, causal_mask(4, 9)), full[:, :, -4:])
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_gqa_sdpa_equals_repeated_naive():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 10, 16, generator=g)
    k, v = (torch.randn(2, 2, 10, 16, generator=g) for _ in range(2))
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    naive = naive_attention(q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), causal_mask(10, 10))
    torch.testing.assert_close(fused, naive)


def test_attention_with_n_kv_head_equal_n_head_is_multi_head_attention():
    torch.manual_seed(0)
    config = tiny()
    ours = CausalSelfAttention(config).eval()
    reference = nn.MultiheadAttention(config.d_model, config.n_head, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        reference.out_proj.load_state_dict(ours.out_proj.state_dict())
        x = torch.randn(2, 7, config.d_model)
        expected, _ = reference(x, x, x, attn_mask=~causal_mask(7, 7), need_weights=False)
        torch.testing.assert_close(ours(x, torch.arange(7)), expected)


def test_gqa_equals_mha_with_repeated_key_value_heads():
    torch.manual_seed(0)
    gqa_config = tiny(n_kv_head=2)
    gqa = CausalSelfAttention(gqa_config).eval()
    mha = CausalSelfAttention(dataclasses.replace(gqa_config, n_kv_head=4)).eval()
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            weight = getattr(gqa, name).weight.view(2, gqa_config.head_dim, -1)
            bias = getattr(gqa, name).bias.view(2, gqa_config.head_dim)
            getattr(mha, name).weight.copy_(weight.repeat_interleave(2, dim=0).flatten(0, 1))
            getattr(mha, name).bias.copy_(bias.repeat_interleave(2, dim=0).flatten())
        x = torch.randn(2, 6, gqa_config.d_model)
        torch.testing.assert_close(gqa(x, torch.arange(6)), mha(x, torch.arange(6)))


def test_rmsnorm_equals_torch():
    ours = RMSNorm(24)
    with torch.no_grad():
        ours.weight.normal_()
    reference = nn.RMSNorm(24, eps=1e-5)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 24) * 4
    torch.testing.assert_close(ours(x), reference(x))


def test_gpt2_loader_matches_transformers():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    hf_config = transformers.GPT2Config(vocab_size=97, n_positions=24, n_embd=48, n_layer=2, n_head=4,
                                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # randomise biases and norm gains too, so a misplaced one shows
        for name, param in hf_model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if ".ln_" in name and name.endswith("weight") else 0.0))
    ours = load_gpt2_state_dict(hf_model.state_dict(), n_head=4).eval()
    assert ours.lm_head.weight is ours.tok_emb.weight
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf_model(idx).logits, atol=1e-4, rtol=1e-4)


def test_gpt2_loader_rejects_other_state_dicts():
    with pytest.raises(KeyError, match="not a GPT-2 state dict"):
        load_gpt2_state_dict(GPT(tiny()).state_dict(), n_head=4)


def test_gpt2_pretrained_rejects_unknown_size():
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        gpt2_pretrained("gpt2-huge")


PARAMETER_CONFIGS = [
    dict(),                                                                     # GPT-2 small
    dict(n_layer=3, n_kv_head=4, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_weights=False),
    dict(n_layer=2, n_kv_head=1, bias=False),                                   # MQA, LayerNorm without bias
    dict(n_layer=2, d_ff=1000, tie_weights=False),
    dict(vocab_size=300, context_length=32, n_layer=2, n_head=4, d_model=64, pos_encoding="rope", mlp="swiglu"),
    *GPT2_SIZES.values(),
]


@pytest.mark.parametrize("overrides", PARAMETER_CONFIGS)
def test_parameter_count_matches_modules(overrides):
    config = GPTConfig(**overrides)
    with torch.device("meta"):
        model = GPT(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    embeddings = {id(model.tok_emb.weight)} | ({id(model.pos_emb.weight)} if model.pos_emb is not None else set())
    without = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    assert parameter_count(config, include_embeddings=False) == without


def test_gpt2_small_has_124_439_808_parameters():
    assert parameter_count(GPTConfig()) == 124_439_808


@pytest.mark.parametrize("switches", [dict(), dict(n_kv_head=2, mlp="swiglu", bias=False, tie_weights=False)])
def test_matmul_flops_matches_flop_counter(switches):
    config = tiny(**switches, attention="naive", vocab_size=200)
    model = GPT(config)
    idx = torch.randint(0, 200, (3, 11))
    with FlopCounterMode(display=False) as forward:
        model(idx)
    assert forward.get_total_flops() == matmul_flops(config, 3, 11)
    with FlopCounterMode(display=False) as training:
        model(idx, idx).backward()
    assert training.get_total_flops() == 3 * matmul_flops(config, 3, 11)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_cross_entropy_equals_full(reduction):
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=120))
    idx, targets = torch.randint(0, 120, (3, 13)), torch.randint(0, 120, (3, 13))
    targets[0, :4] = -100
    targets[2, -2:] = -100

    def loss_and_grads(chunk_size):
        model.zero_grad()
        loss = model(idx, targets, reduction=reduction, chunk_size=chunk_size)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full_loss, full_grads = loss_and_grads(None)
    for chunk_size in (1, 7, 39, 100):
        loss, grads = loss_and_grads(chunk_size)
        torch.testing.assert_close(loss, full_loss)
        for name in full_grads:
            torch.testing.assert_close(grads[name], full_grads[name])
    reference = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), reduction=reduction)
    torch.testing.assert_close(full_loss, reference.detach())
    h = torch.randn(2, 5, 8)
    weight = torch.randn(30, 8)
    t = torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(chunked_cross_entropy(h, weight, t, 3, reduction=reduction),
                               F.cross_entropy((h @ weight.T).flatten(0, 1), t.flatten(), reduction=reduction))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpoint_blocks_gives_the_same_gradients(dropout):
    torch.manual_seed(0)
    model = GPT(tiny(dropout=dropout, vocab_size=80)).train()
    idx, targets = torch.randint(0, 80, (2, 12)), torch.randint(0, 80, (2, 12))

    def grads(checkpoint):
        model.checkpoint_blocks = checkpoint
        model.zero_grad()
        torch.manual_seed(123)  # the same dropout masks; checkpointing replays the RNG state
        loss = model(idx, targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain = grads(False)
    checkpointed_loss, checkpointed = grads(True)
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])


def test_read_safetensors_matches_library(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.randn(4, 3), "h": torch.randn(6).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(5), "i32": torch.arange(4, dtype=torch.int32), "d": torch.randn(3).double(),
               "u": torch.tensor([0, 7, 255], dtype=torch.uint8), "empty": torch.zeros(0, 2)}
    path = tmp_path / "t.safetensors"
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    ours = read_safetensors(path)
    theirs = safetensors_torch.load_file(path)
    assert ours.keys() == theirs.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape
        assert torch.equal(ours[name], theirs[name]) and torch.equal(ours[name], tensor)


def test_read_safetensors_rejects_truncated_and_foreign_files(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "t.safetensors"
    safetensors_torch.save_file({"a": torch.randn(100, 10), "b": torch.arange(7)}, path)
    data = path.read_bytes()
    for length in (len(data) - 1, len(data) - 300, len(data) // 2, 20, 3):
        path.write_bytes(data[:length])
        with pytest.raises(ValueError, match="truncated|not a safetensors file"):
            read_safetensors(path)


@pytest.mark.parametrize("bad, message", [
    (dict(norm="batchnorm"), "GPTConfig.norm"),
    (dict(pos_encoding="alibi"), "GPTConfig.pos_encoding"),
    (dict(mlp="relu"), "GPTConfig.mlp"),
    (dict(attention="flash"), "GPTConfig.attention"),
    (dict(d_model=100), "not divisible by n_head"),
    (dict(n_kv_head=5), "not a multiple of n_kv_head"),
    (dict(d_model=36, n_head=12, pos_encoding="rope"), "even head_dim"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**bad)


def test_config_defaults():
    config = GPTConfig()
    assert (config.n_kv_head, config.head_dim, config.d_ff) == (12, 64, 3072)
    assert GPTConfig(mlp="swiglu").d_ff == 2048


def test_output_shape_and_hidden_states():
    model = GPT(tiny(vocab_size=70)).eval()
    idx = torch.randint(0, 70, (3, 9))
    assert model(idx).shape == (3, 9, 70)
    assert model.hidden_states(idx).shape == (3, 9, 32)


def test_learned_positions_past_context_length_raise():
    model = GPT(tiny(context_length=8))
    model(torch.zeros(1, 8, dtype=torch.long))  # exactly the context length is fine
    with pytest.raises(ValueError, match="context length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    rope = GPT(tiny(context_length=8, pos_encoding="rope"))
    assert rope(torch.zeros(1, 9, dtype=torch.long)).shape == (1, 9, 50)


def test_initialisation_scales_residual_projections():
    model = GPT(GPTConfig(vocab_size=100, context_length=16, n_layer=8, n_head=4, d_model=256))
    model.reset_parameters(generator=torch.Generator().manual_seed(0))
    block = model.blocks["3"]
    assert abs(block.attn.q_proj.weight.std().item() - 0.02) < 0.001
    assert abs(block.attn.out_proj.weight.std().item() - 0.02 / 4) < 0.0003   # 1 / sqrt(2 * 8) = 1/4
    assert abs(block.mlp.proj.weight.std().item() - 0.02 / 4) < 0.0003
    assert torch.all(block.attn.q_proj.bias == 0) and torch.all(block.norm1.weight == 1)

"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The models in these tests are tiny: one thread is faster than two, and far faster on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def register_tiny_preset(monkeypatch):
    """register(name, corpus, val_fraction): a 1-layer preset called name, trained for 6 steps on
    the documents that the function `corpus` returns (it replaces load_corpus in llmbook.train)."""
    import llmbook.train as T
    from llmbook.model import GPTConfig

    def register(name, corpus, val_fraction):
        preset = T.Preset(
            corpus=name, vocab_size=300, val_fraction=val_fraction,
            model=GPTConfig(vocab_size=300, context_length=16, n_layer=1, n_head=2, d_model=16,
                            pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False),
            train=T.TrainConfig(max_steps=6, batch_size=4, seq_len=16, warmup_steps=2,
                                eval_interval=3, eval_batches=2))
        monkeypatch.setitem(T.PRESETS, name, preset)
        monkeypatch.setattr(T, "load_corpus", corpus)
        return preset

    return register

"""Tests for llmbook.train (ch03_model/04_pretraining.ipynb): schedule, optimizer groups,
precision choice, batches, checkpoints (atomic, verified, exact resume), the training loop and
the pretrained-model cache. Tiny models and temporary folders only; no network."""

import hashlib
import math
import os

import numpy as np
import pytest
import torch

import llmbook.train as T
from llmbook import LLMBookError
from llmbook.corpus import Document
from llmbook.model import GPT, GPTConfig, parameter_count

TINY = GPTConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, d_model=16,
                 pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, dropout=0.1)


def tiny_model(config=TINY, seed=0):
    torch.manual_seed(seed)
    return GPT(config)


def stream(n=4000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (n,), generator=generator)


def short_run(**overrides):
    settings = dict(max_steps=12, batch_size=4, seq_len=16, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                    eval_interval=4, eval_batches=2)
    settings.update(overrides)
    return T.TrainConfig(**settings)


def same_parameters(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- learning-rate schedule -------------------------------------------------------------------

def test_learning_rate_warmup_then_cosine():
    cfg = T.TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [T.learning_rate(step, cfg) for step in range(121)]
    assert math.isclose(lrs[0], 0.1)                      # (0 + 1) / 10 of the peak
    assert math.isclose(lrs[9], 1.0) and math.isclose(lrs[10], 1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # warmup strictly rises
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))
    assert math.isclose(lrs[55], 0.1 + 0.5 * 0.9)          # halfway through the cosine: the mean
    assert math.isclose(lrs[100], 0.1)
    assert all(math.isclose(lr, 0.1) for lr in lrs[100:])  # stays at min_lr after max_steps


def test_learning_rate_without_warmup_starts_at_peak():
    cfg = T.TrainConfig(max_steps=50, warmup_steps=0, lr=2.0, min_lr=0.0)
    assert math.isclose(T.learning_rate(0, cfg), 2.0)
    assert math.isclose(T.learning_rate(25, cfg), 1.0)
    assert math.isclose(T.learning_rate(50, cfg), 0.0, abs_tol=1e-12)


# ---- optimizer and precision ------------------------------------------------------------------

def test_make_optimizer_decays_only_matrices():
    config = GPTConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, d_model=16, bias=True)
    model = tiny_model(config)
    cfg = T.TrainConfig(weight_decay=0.1, betas=(0.9, 0.95), lr=1e-3)
    optimizer = T.make_optimizer(model, cfg)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    named = dict(model.named_parameters())   # the tied embedding/head appears once
    expected_decay = {n for n, p in named.items() if p.dim() >= 2}
    assert {id(p) for p in decay["params"]} == {id(named[n]) for n in expected_decay}
    assert any(n.endswith("bias") for n, p in named.items() if p.dim() < 2)
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)
    total = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert total == parameter_count(config) == sum(p.numel() for p in model.parameters())
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_make_optimizer_counts_for_cpu_preset():
    model = GPT(T.PRESETS["cpu"].model)
    decay, no_decay = T.make_optimizer(model, T.PRESETS["cpu"].train).param_groups
    assert (len(decay["params"]), sum(p.numel() for p in decay["params"])) == (29, 1_376_256)
    assert (len(no_decay["params"]), sum(p.numel() for p in no_decay["params"])) == (9, 1_152)


def test_make_optimizer_skips_frozen_parameters():
    model = tiny_model()
    model.norm_f.weight.requires_grad_(False)
    groups = T.make_optimizer(model, T.TrainConfig()).param_groups
    assert all(p is not model.norm_f.weight for g in groups for p in g["params"])


def test_autocast_dtype_choices(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert T.autocast_dtype("auto", cpu) is None
    assert T.autocast_dtype("fp32", cpu) is None
    assert T.autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert T.autocast_dtype("auto", cuda) is torch.bfloat16
    assert T.autocast_dtype("fp32", cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert T.autocast_dtype("auto", cuda) is None      # no fp16 fallback: the loop has no loss scaler
    for bad in ("fp16", "BF16", "float32", ""):
        with pytest.raises(ValueError, match="choose 'auto', 'bf16' or 'fp32'"):
            T.autocast_dtype(bad, cpu)


def test_bf16_autocast_loss_close_to_fp32():
    model = tiny_model().eval()
    x, y = T.random_batch(stream(), 4, 16, torch.Generator().manual_seed(0))
    fp32 = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(x, y)
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) < 0.05


# ---- batches and evaluation -------------------------------------------------------------------

def test_random_batch_targets_are_shifted_inputs():
    tokens = torch.arange(100)
    x, y = T.random_batch(tokens, 5, 7, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 7)
    assert torch.equal(y, x + 1)                           # arange: next token = token + 1
    x2, _ = T.random_batch(tokens, 5, 7, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)                              # the generator decides everything
    with pytest.raises(ValueError, match="too few"):
        T.random_batch(torch.arange(9), 2, 8, torch.Generator())


def test_evenly_spaced_batches_cover_the_stream():
    tokens = torch.arange(1000)
    batches = T.evenly_spaced_batches(tokens, 3, 4, 10)
    assert len(batches) == 3 and all(x.shape == (4, 10) for x, _ in batches)
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts[0] == 0 and starts[-1] == 1000 - 10 - 1   # first and last possible windows
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, T.evenly_spaced_batches(tokens, 3, 4, 10)))


def test_validation_loss_restores_training_mode_and_matches_loss():
    model = tiny_model().train()
    batches = T.evenly_spaced_batches(stream(), 2, 3, 16)
    value = T.validation_loss(model, batches, torch.device("cpu"))
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = sum(model(x, y).item() for x, y in batches) / len(batches)
    assert math.isclose(value, expected, rel_tol=1e-6)


# ---- checkpoints ------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_no_temporary_files(tmp_path):
    path = tmp_path / "sub" / "run.ckpt"                   # the folder is created
    payload = {"step": 7, "weights": torch.randn(10), "log": {"loss": [1.0, 0.5]}}
    T.save_checkpoint(path, payload)
    loaded = T.load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["weights"], payload["weights"])
    assert loaded["log"] == payload["log"]
    assert os.listdir(path.parent) == ["run.ckpt"]
    raw = path.read_bytes()
    assert raw.startswith(T.CHECKPOINT_MAGIC)
    T.save_checkpoint(path, {"step": 8})                   # overwriting works and leaves no temp file
    assert T.load_checkpoint(path)["step"] == 8 and os.listdir(path.parent) == ["run.ckpt"]


def test_failed_save_leaves_old_checkpoint_intact(tmp_path):
    path = tmp_path / "run.ckpt"
    T.save_checkpoint(path, {"step": 1})
    before = path.read_bytes()
    with pytest.raises(Exception) as raised:
        T.save_checkpoint(path, {"step": 2, "schedule": lambda step: step})
    assert not isinstance(raised.value, T.CheckpointError)
    assert path.read_bytes() == before and T.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["run.ckpt"]


@pytest.fixture
def saved_checkpoint(tmp_path):
    path = tmp_path / "run.ckpt"
    T.save_checkpoint(path, {"step": 3, "weights": torch.arange(256, dtype=torch.float32)})
    return path


def test_truncated_checkpoint_is_rejected(saved_checkpoint):
    raw = saved_checkpoint.read_bytes()
    saved_checkpoint.write_bytes(raw[:len(raw) - 100])
    with pytest.raises(T.CheckpointError, match="truncated or corrupt") as raised:
        T.load_checkpoint(saved_checkpoint)
    assert str(saved_checkpoint) in str(raised.value) and "retrain" in str(raised.value)
    saved_checkpoint.write_bytes(raw[:10])                 # cut inside the header
    with pytest.raises(T.CheckpointError, match="not an llmbook checkpoint"):
        T.load_checkpoint(saved_checkpoint)


def test_flipped_byte_is_rejected(saved_checkpoint):
    raw = bytearray(saved_checkpoint.read_bytes())
    where = bytes(raw).find(torch.arange(256, dtype=torch.float32).numpy().tobytes())
    assert where > 0
    raw[where + 401] ^= 0x01                               # one bit of one weight
    saved_checkpoint.write_bytes(bytes(raw))
    with pytest.raises(T.CheckpointError, match="truncated or corrupt"):
        T.load_checkpoint(saved_checkpoint)


def test_wrong_magic_and_missing_file(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"step": 3}, plain)                         # a valid torch file, but not ours
    with pytest.raises(T.CheckpointError, match="not an llmbook checkpoint"):
        T.load_checkpoint(plain)
    with pytest.raises(T.CheckpointError, match="no checkpoint at .*train first"):
        T.load_checkpoint(tmp_path / "missing.ckpt")


class _RunsCode:
    """A crafted object: unpickling it runs code (here: it creates the file `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.marker!r}).touch()",))


def test_crafted_checkpoint_is_refused_without_running_its_code(tmp_path):
    import io
    buffer = io.BytesIO()
    torch.save({"step": 3, "weights": _RunsCode(tmp_path / "ran-unsafe")}, buffer)
    data = buffer.getvalue()
    torch.load(io.BytesIO(data), weights_only=False)      # the exploit is real: plain unpickling runs it
    assert (tmp_path / "ran-unsafe").exists()

    buffer = io.BytesIO()
    torch.save({"step": 3, "weights": _RunsCode(tmp_path / "ran")}, buffer)
    data = buffer.getvalue()
    crafted = tmp_path / "downloaded.ckpt"                 # correct magic line and digest
    crafted.write_bytes(T.CHECKPOINT_MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
    with pytest.raises(T.CheckpointError, match="refuses to unpickle") as raised:
        T.load_checkpoint(crafted)
    assert str(crafted) in str(raised.value) and isinstance(raised.value, LLMBookError)
    assert not (tmp_path / "ran").exists()


def test_checkpoint_payload_must_be_plain_data(tmp_path):
    path = tmp_path / "run.ckpt"
    for bad, where in [({"schedule": lambda step: step}, r"payload\['schedule'\] is a function"),
                       ({"log": [1.0, np.float64(2.0)]}, r"payload\['log'\]\[1\] is a float64"),
                       ({"config": {b"key": 1}}, r"a key of payload\['config'\] is a bytes")]:
        with pytest.raises(TypeError, match=where):
            T.save_checkpoint(path, bad)
    assert not path.exists() and os.listdir(tmp_path) == []


# ---- the training loop ------------------------------------------------------------------------

def test_exact_resume_after_stop(tmp_path):
    cfg = short_run()
    tokens, val = stream(), stream(600, seed=1)
    straight_model = tiny_model()
    straight = T.train(straight_model, tokens, val, cfg, progress=False)
    path = tmp_path / "run.ckpt"
    first = T.train(tiny_model(), tokens, val, cfg, checkpoint_path=path, stop_after=5, progress=False)
    assert len(first.train_loss) == 5 and T.load_checkpoint(path)["step"] == 5
    resumed_model = tiny_model(seed=1)                     # other weights and RNG state
    torch.manual_seed(999)
    resumed = T.train(resumed_model, tokens, val, cfg, checkpoint_path=path, resume=True, progress=False)
    assert resumed.train_loss == straight.train_loss       # bitwise equal floats
    assert resumed.val_loss == straight.val_loss and resumed.lr == straight.lr
    assert resumed.steps == list(range(1, cfg.max_steps + 1))
    assert same_parameters(resumed_model, straight_model)


def test_resume_after_crash_from_interval_checkpoint(tmp_path, monkeypatch):
    cfg = short_run(checkpoint_interval=4)
    tokens, val = stream(), stream(600, seed=1)
    straight_model = tiny_model()
    straight = T.train(straight_model, tokens, val, cfg, progress=False)

    real_train_step, calls = T.train_step, []

    def crashing_train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("simulated crash")
        return real_train_step(*args, **kwargs)

    path = tmp_path / "run.ckpt"
    monkeypatch.setattr(T, "train_step", crashing_train_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        T.train(tiny_model(), tokens, val, cfg, checkpoint_path=path, progress=False)
    monkeypatch.setattr(T, "train_step", real_train_step)
    assert T.load_checkpoint(path)["step"] == 4            # the last interval checkpoint
    resumed_model = tiny_model(seed=2)
    resumed = T.train(resumed_model, tokens, val, cfg, checkpoint_path=path, resume=True, progress=False)
    assert resumed.train_loss == straight.train_loss and resumed.val_loss == straight.val_loss
    assert same_parameters(resumed_model, straight_model)


def test_resume_from_corrupt_checkpoint_raises(tmp_path):
    path = tmp_path / "run.ckpt"
    T.train(tiny_model(), stream(), stream(600, 1), short_run(), checkpoint_path=path, stop_after=2, progress=False)
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with pytest.raises(T.CheckpointError):
        T.train(tiny_model(), stream(), stream(600, 1), short_run(), checkpoint_path=path, resume=True, progress=False)


def test_train_loss_decreases_on_repetitive_text():
    pattern = torch.arange(TINY.vocab_size).repeat(40)     # 0 1 2 ... 31 0 1 2 ...: fully predictable
    config = GPTConfig(**{**TINY.__dict__, "dropout": 0.0})
    # seq_len 15 against a period of 32: the non-overlapping training windows start at every phase
    cfg = short_run(max_steps=60, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=20, batch_size=8,
                    seq_len=15)
    log = T.train(tiny_model(config), pattern, pattern[:400], cfg, progress=False)
    assert len(log.train_loss) == 60 and log.val_steps == [20, 40, 60]
    assert abs(log.train_loss[0] - math.log(TINY.vocab_size)) < 0.3
    assert log.val_loss[-1] < 0.5 < log.train_loss[0]
    assert log.val_loss[0] > log.val_loss[-1]


def test_seq_len_longer_than_context_is_rejected():
    with pytest.raises(ValueError, match="exceeds the model's context_length=16"):
        T.train(tiny_model(), stream(), stream(600), short_run(seq_len=17), progress=False)


# ---- presets and the pretrained-model cache ---------------------------------------------------

WORDS = ("the cat sat on a mat while the dog ran to the park and a bird sang in the tree "
         "because the sun was warm and the day was long").split()


def small_corpus(name=None, **kwargs):
    rng = np.random.default_rng(0)
    return tuple(Document(f"toy:{i}", " ".join(rng.choice(WORDS, size=120)), "toy") for i in range(40))


@pytest.fixture
def tiny_preset(register_tiny_preset):
    return register_tiny_preset("tiny", small_corpus, val_fraction=0.2)


def test_load_pretrained_trains_once_then_uses_the_cache(tmp_path, monkeypatch, tiny_preset):
    real_train, runs = T.train, []

    def counting_train(*args, **kwargs):
        runs.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(T, "train", counting_train)
    first = T.load_pretrained("tiny", cache=tmp_path, progress=False)
    assert len(runs) == 1 and len(first.log.train_loss) == 6
    folder = tmp_path / "models" / f"tiny-{T.preset_key(tiny_preset)}"
    assert sorted(os.listdir(folder)) == ["model.ckpt", "shards", "tokenizer.json"]

    def no_training(*args, **kwargs):
        raise AssertionError("load_pretrained trained although the cache holds the model")

    monkeypatch.setattr(T, "train", no_training)
    second = T.load_pretrained("tiny", cache=tmp_path, progress=False)
    assert same_parameters(first.model, second.model) and not second.model.training
    assert second.tokenizer.mergeable_ranks == first.tokenizer.mergeable_ranks
    assert second.log == first.log and second.checkpoint == first.checkpoint


def test_load_pretrained_retrains_an_interrupted_run(tmp_path, monkeypatch, tiny_preset):
    first = T.load_pretrained("tiny", cache=tmp_path, progress=False)
    state = T.load_checkpoint(first.checkpoint)
    state["step"] = 3                                      # as if the run had stopped half-way
    T.save_checkpoint(first.checkpoint, state)
    runs = []
    real_train = T.train
    monkeypatch.setattr(T, "train", lambda *a, **k: (runs.append(1), real_train(*a, **k))[1])
    again = T.load_pretrained("tiny", cache=tmp_path, progress=False)
    assert runs == [1] and T.load_checkpoint(again.checkpoint)["step"] == 6
    assert same_parameters(first.model, again.model)       # deterministic retraining


def test_concurrent_loads_train_once_and_never_see_a_partial_model(tmp_path, monkeypatch, tiny_preset):
    """Two notebooks asking for the same model at once: one trains, the other waits for the lock
    and loads the finished files (the lock is per open file, so threads exercise it too)."""
    import threading
    real_train, runs, seen_partial = T.train, [], []
    folder = tmp_path / "models" / f"tiny-{T.preset_key(tiny_preset)}"

    def slow_counting_train(*args, **kwargs):
        runs.append(1)
        log = real_train(*args, **kwargs)
        seen_partial.append((folder / "model.ckpt").exists())   # nothing final before the rename
        return log

    monkeypatch.setattr(T, "train", slow_counting_train)
    results = [None, None]

    def load(i):
        results[i] = T.load_pretrained("tiny", cache=tmp_path, progress=False)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runs == [1] and seen_partial == [False]
    assert same_parameters(results[0].model, results[1].model)
    assert sorted(os.listdir(folder)) == ["model.ckpt", "shards", "tokenizer.json"]


def test_preset_key_changes_with_any_setting(tiny_preset):
    import dataclasses
    key = T.preset_key(tiny_preset)
    assert len(key) == 12 and key == T.preset_key(dataclasses.replace(tiny_preset))
    assert T.preset_key(dataclasses.replace(tiny_preset, val_fraction=0.3)) != key
    changed_run = dataclasses.replace(tiny_preset.train, max_steps=7)
    assert T.preset_key(dataclasses.replace(tiny_preset, train=changed_run)) != key


def test_unknown_preset_is_rejected(tmp_path):
    for function in (T.pretrain, T.load_pretrained):
        with pytest.raises(ValueError, match="unknown preset 'huge'.*'cpu'"):
            function("huge", cache=tmp_path)


def test_token_shards_put_an_end_of_text_before_each_document(tmp_path):
    from llmbook.tokenizer import BPETokenizer
    documents = small_corpus()[:3]
    tokenizer = BPETokenizer.train([d.text for d in documents], 280)
    shards = T.token_shards(tokenizer, documents, tmp_path / "shards")
    ids = np.asarray(shards)
    starts = np.flatnonzero(ids == tokenizer.eot_token)
    assert starts.tolist() == [0, *starts[1:]] and len(starts) == 3
    assert tokenizer.decode(ids[1:starts[1]].tolist()) == documents[0].text
    assert np.array_equal(ids, T.tokenize_documents(tokenizer, documents))

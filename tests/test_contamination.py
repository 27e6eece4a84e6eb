"""The n-gram contamination check: normalisation, planted copies found, no false matches
(against a plain substring search), and the error for a bad n."""

import random

import pytest

from llmbook.contamination import NgramIndex, contamination_report, normalized_words, word_ngrams

WORDS = ("the model reads every token of a document and predicts what comes next with a "
         "probability that depends on context length data and training time").split()


def random_text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def test_normalisation_ignores_case_punctuation_and_layout():
    assert normalized_words("Return X+1;\n\tELSE  return None.") == ["return", "x", "1", "else", "return", "none"]
    assert word_ngrams("A b. C, d", 2) == {"a b", "b c", "c d"}
    assert word_ngrams("only three words", 4) == set()


@pytest.mark.parametrize("n, error", [(0, ValueError), (-1, ValueError), (2.0, TypeError)])
def test_bad_n_is_rejected(n, error):
    with pytest.raises(error, match="positive int"):
        word_ngrams("some text", n)


def test_planted_copies_are_found_and_nothing_else():
    rng = random.Random(0)
    corpus = [random_text(rng, 300) for _ in range(20)]
    # test items made of words the corpus never uses, so only planted copies can match
    items = [" ".join(f"word{rng.randrange(10**6)}" for _ in range(30)) for _ in range(50)]
    planted = [3, 17, 41]
    leaked = corpus + ["prefix " + items[i].upper().replace(" ", " , ") + " suffix" for i in planted]
    report = contamination_report("toy", items, NgramIndex(leaked, n=13))
    assert sorted(report.flagged) == planted
    assert report.total == 50 and report.fraction == pytest.approx(3 / 50)
    assert contamination_report("toy", items, NgramIndex(corpus, n=13)).flagged == {}


def test_a_copy_shorter_than_n_words_is_not_flagged():
    item = "one two three four five six seven eight nine ten eleven twelve"  # 12 words
    assert contamination_report("short", [item], NgramIndex(["x " + item + " y"], n=13)).flagged == {}
    assert contamination_report("short", [item], NgramIndex(["x " + item + " y"], n=12)).flagged == {0: {item}}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_matches_equal_a_plain_substring_search(n):
    """A small vocabulary makes accidental overlaps common: every one must be real and none missed."""
    rng = random.Random(n)
    corpus = [random_text(rng, 2000) for _ in range(5)]
    items = [random_text(rng, 12) for _ in range(40)]
    index = NgramIndex(corpus, n=n)
    normalized = [" " + " ".join(normalized_words(t)) + " " for t in corpus]
    for item in items:
        expected = {g for g in word_ngrams(item, n) if any(f" {g} " in d for d in normalized)}
        assert index.matches(item) == expected
    assert 0 < contamination_report("random", items, index).fraction <= 1

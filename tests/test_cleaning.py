"""Tests for llmbook.cleaning (exported from ch02_data/02_cleaning.ipynb): normalization, every
Gopher and C4 rule on both sides of its threshold, the n-gram fractions against a brute-force
reference, bad input that must be counted (never raised), and the pipeline's bookkeeping."""

import random
import time
import unicodedata
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmbook.cleaning import (C4_LINE_RULES, INPUT_RULES, RULES, LineRule, PageView, RawDocument, Rule, apply_line_rules,
                              clean_corpus, clean_document, count_sentences, decode_utf8, duplicate_fractions,
                              ngram_character_fractions, normalize_keeping_layout, normalize_text,
                              normalize_whitespace,
                              remove_control_characters, to_nfc)
from llmbook.corpus import Document

RULE = {rule.name: rule for rule in RULES}
LINE_RULE = {rule.name: rule for rule in C4_LINE_RULES}


def fires(rule_name: str, text: str) -> bool:
    rule = RULE[rule_name]
    return rule.fires(PageView(text).value(rule.statistic))


def words(n: int, word: str = "word") -> str:
    return " ".join([word] * n)


# A page that passes every rule: 6 distinct sentences, 70+ words, no repetition.
GOOD_PAGE = (
    "The river rises in the northern hills and flows south for three hundred kilometres.\n"
    "Farmers along its banks have grown rice and wheat there for many centuries.\n\n"
    "In spring the melting snow raises the water level, and the valley floods almost every year.\n"
    "Engineers built a dam in the last century to control that seasonal flooding.\n\n"
    "The reservoir behind it now supplies drinking water to two large cities with its power.\n"
    "Fishermen say that the fish have changed since the dam was finished, though nobody has proved it."
)


# ---------------------------------------------------------------------------------------------
# Normalization


def test_nfc_composes_decomposed_accent():
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed and composed.encode() != decomposed.encode()
    assert to_nfc(decomposed) == composed and normalize_text(decomposed) == composed


def test_nfc_keeps_compatibility_characters():
    # NFC, unlike NFKC, leaves ligatures and superscripts alone.
    assert to_nfc("\ufb01 x\u00b2") == "\ufb01 x\u00b2"


def test_every_control_character_is_removed_except_tab_and_newline():
    for code_point in range(0x00, 0xA0):
        char = chr(code_point)
        if unicodedata.category(char) != "Cc":
            continue
        result = remove_control_characters(f"a{char}b")
        if char in "\t\n":
            assert result == f"a{char}b"
        elif char == "\r":
            assert result == "a\nb"
        else:
            assert result == "ab", hex(code_point)
    assert remove_control_characters("\ufeffa\r\nb\rc") == "a\nb\nc"


def test_whitespace_normalization():
    assert normalize_whitespace("  a   b\u00a0\u2003c  \n\n\n\n d \t\n") == "a b c\n\nd"
    assert normalize_whitespace("one\n\ntwo") == "one\n\ntwo"  # a paragraph break survives
    assert normalize_whitespace(" \n \t ") == ""


def test_control_character_between_letter_and_accent_is_composed():
    assert normalize_text("cafe\x00\u0301") == "caf\u00e9"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_normalize_text_is_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once


def test_decode_utf8_counts_only_introduced_replacements():
    assert decode_utf8("caf\u00e9".encode("cp1252")) == ("caf\ufffd", 1)
    assert decode_utf8("ok \ufffd".encode()) == ("ok \ufffd", 0)  # a valid U+FFFD is text
    assert decode_utf8(b"\xff\xfe")[1] == 2
    with pytest.raises(TypeError, match="expects bytes"):
        decode_utf8("already text")
    with pytest.raises(TypeError, match="expects str"):
        normalize_text(b"bytes")


# ---------------------------------------------------------------------------------------------
# Every page rule is strict: the threshold value itself passes


def test_all_rules_pass_at_their_threshold_and_fire_beyond():
    for rule in RULES:
        step = 1 if float(rule.threshold).is_integer() else 1e-9
        beyond = rule.threshold - step if rule.op == "<" else rule.threshold + step
        assert not rule.fires(rule.threshold), rule.name
        assert rule.fires(beyond), rule.name


def test_rule_rejects_unknown_comparison():
    with pytest.raises(ValueError, match="op must be"):
        Rule("bad", "x", "word_count", ">=", 1, "test")


# ---------------------------------------------------------------------------------------------
# Gopher quality rules on crafted text, at the edges


def test_word_count_limits():
    assert fires("gopher_too_few_words", words(49)) and not fires("gopher_too_few_words", words(50))
    assert not fires("gopher_too_many_words", words(100_000)) and fires("gopher_too_many_words", words(100_001))
    # punctuation-only tokens are not words
    assert PageView(words(3) + " -- | ...").value("word_count") == 3


def test_mean_word_length_limits():
    assert not fires("gopher_short_words", "ab abcd " * 30)  # mean exactly 3
    assert fires("gopher_short_words", "ab abc " * 30)  # mean 2.5
    assert not fires("gopher_long_words", words(60, "a" * 10))
    assert fires("gopher_long_words", words(60, "a" * 11))
    assert PageView("(word), word.").value("mean_word_length") == 4  # punctuation stripped


def test_hash_and_ellipsis_ratios():
    nine = words(9)
    assert not fires("gopher_hash_symbols", "#tag " + nine)  # 1 per 10 words
    assert fires("gopher_hash_symbols", "#tag #tag " + words(8))
    assert not fires("gopher_ellipsis_symbols", "wait... " + nine)
    assert fires("gopher_ellipsis_symbols", "wait\u2026 wait... " + words(8))


def test_bullet_and_ellipsis_lines():
    bullets = ["- item"] * 9 + ["plain line"]
    assert not fires("gopher_bullet_lines", "\n".join(bullets))  # exactly 90%
    assert fires("gopher_bullet_lines", "\n".join(["\u2022 item"] * 19 + ["plain line"]))  # 95%
    teasers = ["more to come..."] * 3 + ["a full line."] * 7
    assert not fires("gopher_ellipsis_lines", "\n".join(teasers))  # exactly 30%
    assert fires("gopher_ellipsis_lines", "\n".join(["more\u2026"] * 4 + ["a full line."] * 6))


def test_alphabetic_word_fraction():
    assert not fires("gopher_non_alphabetic_words", "a b c d e f g h 1 2")  # 8 of 10
    assert fires("gopher_non_alphabetic_words", "a b c d e f g 1 2 3")  # 7 of 10
    assert fires("gopher_non_alphabetic_words", "x = 1 + 2 ; y = { 3 }")


def test_stop_words_are_counted_distinct_and_case_insensitive():
    assert not fires("gopher_stop_words", "The cat AND the dog")
    assert fires("gopher_stop_words", "the the the cat")
    assert fires("gopher_stop_words", "lorem ipsum dolor sit amet")


# ---------------------------------------------------------------------------------------------
# Gopher repetition rules


def test_duplicate_line_and_paragraph_fractions():
    three = "\n".join([f"line {i}" for i in range(7)] + ["line 0"] * 3)
    four = "\n".join([f"line {i}" for i in range(6)] + ["line 0"] * 4)
    assert not fires("gopher_duplicate_lines", three) and fires("gopher_duplicate_lines", four)
    assert not fires("gopher_duplicate_paragraphs", three.replace("\n", "\n\n"))
    assert fires("gopher_duplicate_paragraphs", four.replace("\n", "\n\n"))
    # only repeats count, by their characters
    assert duplicate_fractions(["ab", "cde", "ab", "ab"], 20) == (0.5, 0.2)


def reference_fractions(words_, n):
    """Brute force: mark every word inside a qualifying n-gram occurrence, then sum the marked lengths."""
    grams = [tuple(words_[i:i + n]) for i in range(len(words_) - n + 1)]
    total = sum(map(len, words_))
    counts = Counter(grams)
    if not grams or max(counts.values()) < 2:
        return 0.0, 0.0
    top_count = max(counts.values())
    top = sorted((g for g in counts if counts[g] == top_count), key=lambda g: (-sum(map(len, g)), g))[0]

    def covered(selected):
        marked = [False] * len(words_)
        for i, gram in enumerate(grams):
            if selected(gram):
                marked[i:i + n] = [True] * n
        return sum(len(w) for w, m in zip(words_, marked) if m) / total

    return covered(lambda g: g == top), covered(lambda g: counts[g] > 1)


def test_ngram_fractions_match_brute_force():
    rng = random.Random(0)
    vocabulary = ["a", "be", "cat", "door", "eagle", "forest"]
    for _ in range(300):
        words_ = [rng.choice(vocabulary[:rng.randint(2, 6)]) for _ in range(rng.randint(0, 40))]
        for n in range(2, 11):
            got = ngram_character_fractions(words_, n)
            want = reference_fractions(words_, n)
            assert got == pytest.approx(want), (words_, n)


def test_ngram_fractions_worked_example():
    example = "buy cheap pills online now buy cheap pills online now today".split()
    assert ngram_character_fractions(example, 2) == (22 / 49, 44 / 49)
    assert ngram_character_fractions(example, 5)[1] == 44 / 49
    assert ngram_character_fractions(example, 6) == (0.0, 0.0)
    assert ngram_character_fractions(["ha"] * 8, 2) == (1.0, 1.0)


def test_repetition_rules_fire_on_spam_and_not_on_prose():
    spam = "\n".join(f"Best cheap flights {place}. Cheap flights deals." for place in
                     ["London", "Paris", "Rome", "Oslo", "Madrid", "Vienna", "Prague", "Dublin"])
    assert fires("gopher_top_2gram", spam)
    repeated = GOOD_PAGE + "\n\n" + GOOD_PAGE.split("\n\n")[0]
    assert fires("gopher_duplicate_10gram", repeated)
    assert not any(fires(rule.name, GOOD_PAGE) for rule in RULES if rule.stage == "gopher_repetition")


# ---------------------------------------------------------------------------------------------
# C4 rules


def test_c4_line_rules_each():
    drops = {name: rule.drops for name, rule in LINE_RULE.items()}
    assert drops["c4_javascript"]("Please enable JavaScript to continue.")
    assert drops["c4_policy"]("This site uses cookies to improve your experience.")
    assert not drops["c4_policy"]("We baked cookies for the party.")
    assert drops["c4_no_terminal_punctuation"]("Home | About | Contact")
    assert drops["c4_no_terminal_punctuation"]("And then it happened...")
    for ending in (".", "!", "?", '"', "\u201d"):
        assert not drops["c4_no_terminal_punctuation"]("It ends here" + ending)
    assert drops["c4_too_few_words"]("Two words.") and not drops["c4_too_few_words"]("Three words here.")
    assert drops["c4_long_word"]("a" * 1001 + " b.") and not drops["c4_long_word"]("a" * 1000 + " b.")


def test_apply_line_rules_counts_and_removes_citations():
    page = ("Menu\nThe city was founded in 1820.[1] It grew quickly.[citation needed]\n"
            "Enable javascript now please.\nOK.")
    edited, dropped = apply_line_rules(page)
    assert edited == "The city was founded in 1820. It grew quickly."
    assert dropped == Counter({"c4_no_terminal_punctuation": 1, "c4_javascript": 1, "c4_too_few_words": 1})


def test_c4_page_rules():
    assert count_sentences("One. Two! Three? \"Four.\" Five") == 4
    five = " ".join(f"This is sentence number {i}." for i in range(5))
    four = " ".join(f"This is sentence number {i}." for i in range(4))
    assert not fires("c4_too_few_sentences", five) and fires("c4_too_few_sentences", four)
    # sentences are counted after the line rules: an unterminated line does not count
    assert fires("c4_too_few_sentences", four + "\nA fifth sentence. Without an end")
    assert fires("c4_lorem_ipsum", GOOD_PAGE + "\nLorem Ipsum dolor sit amet.")
    assert fires("c4_curly_bracket", GOOD_PAGE + "\nvar x = {a: 1};")
    assert not fires("c4_lorem_ipsum", GOOD_PAGE) and not fires("c4_curly_bracket", GOOD_PAGE)


# ---------------------------------------------------------------------------------------------
# Bad input: counted with a reason, never raised


def test_bad_inputs_are_counted_with_reasons():
    bad = {
        "binary": b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)) * 4,
        "empty-bytes": b"",
        "empty-text": " \n\t\u00a0\r\n ",
        "huge-line": b"x" * 10_000_000,
        "long-line": b"y" * 200_000,
        "invalid-utf8": ("\u00e9t\u00e9 \u00e0 l'\u00e9cole " * 30).encode("latin-1"),
        "utf16": "hello world ".encode("utf-16-le") * 20,
        "none": None,
        "number": 42,
        "list": ["not", "text"],
    }
    expected = {"binary": "binary", "empty-bytes": "empty", "empty-text": "empty",
                "huge-line": "document_too_large", "long-line": "line_too_long", "invalid-utf8": "invalid_utf8",
                "utf16": "binary", "none": "not_text", "number": "not_text", "list": "not_text"}
    start = time.perf_counter()
    kept, report = clean_corpus(RawDocument(name, payload) for name, payload in bad.items())
    assert time.perf_counter() - start < 2, "bad input must be rejected cheaply"
    assert kept == [] and report.n_input == len(bad)
    assert {r.doc_id: r.rule for r in report.rejections} == expected
    assert all(r.detail for r in report.rejections)


def test_lone_surrogate_and_few_stray_bytes_are_repaired():
    text, page, reason = clean_document(GOOD_PAGE.replace("rice", "ri\udc80ce"))
    assert reason == "" and "rice" in text and "\ufffd" not in text
    payload = GOOD_PAGE.encode()
    kept, report = clean_corpus([payload[:100] + b"\xff" + payload[100:]])
    assert len(kept) == 1 and report.replacement_characters == 1


# ---------------------------------------------------------------------------------------------
# The pipeline's bookkeeping


def test_good_page_is_kept_and_report_adds_up():
    docs = [Document("good", GOOD_PAGE, "test"), Document("dup", "\n".join(["Same line here."] * 10), "test"),
            RawDocument("short", b"Hello there."), "Home | About\n\n" + GOOD_PAGE, b"", None]
    kept, report = clean_corpus(docs)
    assert [doc.id for doc in kept] == ["good", "doc-3"]
    assert kept[0] == Document("good", GOOD_PAGE, "test")
    assert kept[1].text == GOOD_PAGE and report.lines_dropped["c4_no_terminal_punctuation"] == 1
    assert report.n_input == 6 and report.n_kept == 2
    assert report.n_kept + sum(report.removed_by_rule.values()) == report.n_input
    assert list(report.removed_by_rule)[:len(RULES)] == [rule.name for rule in RULES]
    assert {r.doc_id: r.rule for r in report.rejections} == {
        "dup": "gopher_duplicate_lines", "short": "gopher_too_few_words", "doc-4": "empty", "doc-5": "not_text"}
    table = report.table()
    assert "gopher_duplicate_lines" in table and "kept 2" in table


def test_first_rule_in_the_given_order_is_blamed():
    text = "\n".join(["buy now."] * 10)  # too short and repetitive
    assert clean_document(text)[2].startswith("gopher_duplicate_lines:")
    quality_first = [r for r in RULES if r.stage != "gopher_repetition"] + \
                    [r for r in RULES if r.stage == "gopher_repetition"]
    assert clean_document(text, quality_first)[2].startswith("gopher_too_few_words:")


def test_custom_rules_and_line_rules():
    shout = LineRule("shouting", lambda line: line.isupper(), "test", "only capitals")
    kept, report = clean_corpus([GOOD_PAGE + "\nBUY NOW, IT IS GREAT."], RULES, C4_LINE_RULES + (shout,))
    assert kept[0].text == GOOD_PAGE and report.lines_dropped["shouting"] == 1
    # without the sentence rule, a page whose lines all go is still rejected, as empty
    no_sentences = [r for r in RULES if r.name != "c4_too_few_sentences"]
    kept, report = clean_corpus([GOOD_PAGE.replace(".", "")], no_sentences)
    assert kept == [] and report.rejections[0].rule == "empty"
    assert report.n_kept + sum(report.removed_by_rule.values()) == report.n_input


def test_invalid_rule_lists_raise_clear_errors():
    with pytest.raises(ValueError, match="unique"):
        clean_corpus([GOOD_PAGE], RULES + (RULES[0],))
    with pytest.raises(ValueError, match="unknown statistics"):
        clean_corpus([GOOD_PAGE], (Rule("odd", "x", "no_such_statistic", ">", 0, "test"),))
    with pytest.raises(KeyError, match="Unknown statistic"):
        PageView("text").value("no_such_statistic")


# ---- curated text: the input checks and a normalization that keeps the layout -------------------

CODE = ("class Stack:\n    \"\"\"A stack.  See [1] and [edit].\"\"\"\n\n\n    def push(self, item):\n"
        "\tself.items.append(item)   \n        return item\r\n")


def test_curated_cleaning_keeps_code_exactly_as_written():
    kept, report = clean_corpus([Document("m#source", CODE, "code")], INPUT_RULES, (), normalize_keeping_layout)
    assert report.n_kept == 1
    # only the Windows line end and the trailing spaces go; indentation, tabs, blank lines, double
    # spaces and bracketed text (a citation marker to C4's line rules) stay
    assert kept[0].text == CODE.replace("   \n", "\n").replace("\r\n", "\n").rstrip("\n")
    assert "\n    def push" in kept[0].text and "[1] and [edit]" in kept[0].text
    # the web pipeline's normalization strips every line, which is why it is not used for code
    assert "\n    def" not in normalize_text(CODE)


def test_input_rules_are_the_input_stage_of_rules():
    assert INPUT_RULES == tuple(rule for rule in RULES if rule.stage == "input") and INPUT_RULES
    _, report = clean_corpus([b"\x00\x01\x02" * 100, "", CODE], INPUT_RULES, (), normalize_keeping_layout)
    assert [r.rule for r in report.rejections] == ["binary", "empty"] and report.n_kept == 1

"""llmbook.dedup: MinHash signatures against the definition and against datasketch, LSH against its
S-curve, near-duplicate clustering against injected edits with known true Jaccard, exact and
line-level deduplication, and the suffix-array repeat finder against brute force."""

import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH
from hypothesis import given, settings
from hypothesis import strategies as st

from llmbook import dedup
from llmbook.dedup import (EMPTY_SIGNATURE_VALUE, MINHASH_PRIME, MinHashDeduplicator, deduplicate_exact,
                           exact_duplicates, find_repeated_substrings, jaccard, lcp_array,
                           lsh_candidate_probability, minhash_jaccard, comparison_key,
                           remove_repeated_lines, remove_repeated_substrings, shingles, suffix_array,
                           union_find_clusters)


def pair_with_jaccard(rng, pair_index, size, jaccard_value):
    """Two documents of distinct words (ngram=1) whose word sets have exactly the given Jaccard:
    |A| = |B| = size and |A & B| = shared with shared / (2 size - shared) = jaccard_value."""
    shared = round(2 * size * jaccard_value / (1 + jaccard_value))
    words = [f"w{pair_index}x{i}" for i in range(2 * size - shared)]
    rng.shuffle(words)
    a = words[:size]
    b = words[:shared] + words[size:size + size - shared]
    return " ".join(a), " ".join(b), shared / (2 * size - shared)


@pytest.fixture(scope="module")
def generated_pairs():
    rng = np.random.default_rng(0)
    docs, truth = [], []
    for index, value in enumerate(np.linspace(0.0, 1.0, 201)):
        a, b, exact = pair_with_jaccard(rng, index, 150, float(value))
        docs += [a, b]
        truth.append(exact)
    return docs, np.array(truth)


def slow_signature(text, a, b, ngram):
    """MinHash straight from the definition, with Python integers."""
    values = []
    for shingle in shingles(text, ngram):
        window = 0
        for word in shingle.split(" "):
            window = (window * 0x9E3779B97F4A7C15 + dedup._word_hash(word)) % 2**64
        values.append(window >> 32)
    if not values:
        return [int(EMPTY_SIGNATURE_VALUE)] * len(a)
    return [min((int(ak) * x + int(bk)) % MINHASH_PRIME for x in values) for ak, bk in zip(a, b)]


# --- signatures -------------------------------------------------------------------------------

def test_signatures_shape_dtype_and_determinism():
    docs = ["the cat sat on the mat today", "a dog ran in the park all day long", "", "short one"]
    sig = MinHashDeduplicator(num_bands=4, rows_per_band=3, ngram=2, seed=7).signatures(docs)
    assert sig.shape == (4, 12) and sig.dtype == np.uint64
    again = MinHashDeduplicator(num_bands=4, rows_per_band=3, ngram=2, seed=7).signatures(docs)
    assert np.array_equal(sig, again)
    other = MinHashDeduplicator(num_bands=4, rows_per_band=3, ngram=2, seed=8).signatures(docs)
    assert not np.array_equal(sig[[0, 1, 3]], other[[0, 1, 3]])
    assert (sig[[0, 1, 3]] < MINHASH_PRIME).all() and (sig[2] == EMPTY_SIGNATURE_VALUE).all()
    assert MinHashDeduplicator().signatures(docs).shape == (4, 112)
    assert MinHashDeduplicator().signatures([]).shape == (0, 112)


def test_signatures_do_not_depend_on_python_hash_seed():
    code = ("from llmbook.dedup import MinHashDeduplicator;"
            "print(MinHashDeduplicator(seed=3).signatures(['one two three four five six seven'])[0, :8].tolist())")
    outputs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        outputs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    here = MinHashDeduplicator(seed=3).signatures(["one two three four five six seven"])[0, :8].tolist()
    assert outputs == {f"{here}\n"}


def test_vectorized_signatures_match_the_definition(monkeypatch):
    rng = np.random.default_rng(1)
    vocabulary = [f"word{i}" for i in range(40)] + ["Café", "cafe\u0301", "ÉTÉ"]
    docs = [" ".join(rng.choice(vocabulary, size=int(rng.integers(0, 60)))) for _ in range(30)]
    docs += ["", "   ", "one", "two words", "exactly five words are here", "The  CAT\tsat"]
    monkeypatch.setattr(dedup, "_SHINGLES_PER_CHUNK", 7)  # many chunks, documents larger than a chunk
    for ngram in (1, 3, 5):
        deduplicator = MinHashDeduplicator(num_bands=5, rows_per_band=4, ngram=ngram, seed=ngram)
        sig = deduplicator.signatures(docs)
        for i, text in enumerate(docs):
            assert sig[i].tolist() == slow_signature(text, deduplicator.a, deduplicator.b, ngram), (ngram, text)


def test_shingle_hashes_are_the_shingle_sets():
    rng = np.random.default_rng(2)
    vocabulary = [f"v{i}" for i in range(15)]
    docs = [" ".join(rng.choice(vocabulary, size=int(rng.integers(0, 80)))) for _ in range(50)]
    hashes, offsets = dedup.shingle_hashes(docs, ngram=3)
    for i, text in enumerate(docs):
        assert len(np.unique(hashes[offsets[i]:offsets[i + 1]])) == len(shingles(text, 3))


def test_short_and_empty_documents():
    assert shingles("", 5) == set() and shingles(" \n\t", 5) == set()
    assert shingles("Only Three words", 5) == {"only three words"}
    docs = ["", "Only three words", "only  THREE words", "only three other", "", "\n"]
    deduplicator = MinHashDeduplicator()
    sig = deduplicator.signatures(docs)
    assert (sig[[0, 4, 5]] == EMPTY_SIGNATURE_VALUE).all()
    # Identical short documents are one shingle each and cluster; empty documents never do.
    assert deduplicator.clusters(docs) == [[1, 2]]
    assert deduplicator.deduplicate(docs) == [0, 1, 3, 4, 5]
    assert deduplicator.clusters(["", ""]) == [] and deduplicator.deduplicate([]) == []


# --- estimates ----------------------------------------------------------------------------------

def test_estimates_close_to_true_jaccard(generated_pairs):
    docs, truth = generated_pairs
    biases = []
    for seed in range(4):
        sig = MinHashDeduplicator(num_bands=16, rows_per_band=8, ngram=1, seed=seed).signatures(docs)
        estimate = minhash_jaccard(sig[0::2], sig[1::2])
        error = estimate - truth
        assert np.abs(error).mean() < 0.05
        # Binomial theory: E[(estimate - J)^2] = J (1 - J) / K.
        ratio = np.mean(error**2) / np.mean(truth * (1 - truth) / 128)
        assert 0.6 < ratio < 1.6, ratio
        biases.append(error.mean())
    assert abs(np.mean(biases)) < 0.005
    assert np.all(estimate[truth == 1.0] == 1.0) and np.all(estimate[truth == 0.0] == 0.0)


def test_estimates_agree_with_datasketch(generated_pairs):
    docs, truth = generated_pairs
    ours = MinHashDeduplicator(num_bands=16, rows_per_band=8, ngram=1, seed=0).signatures(docs)
    reference = []
    for text in docs:
        minhash = MinHash(num_perm=128, seed=1)
        minhash.update_batch([s.encode("utf-8") for s in shingles(text, 1)])
        reference.append(minhash.hashvalues)
    reference = np.array(reference)
    ours_estimate = minhash_jaccard(ours[0::2], ours[1::2])
    reference_estimate = minhash_jaccard(reference[0::2], reference[1::2])
    assert np.abs(ours_estimate - truth).mean() < 0.05
    assert np.abs(reference_estimate - truth).mean() < 0.05
    # Different hash functions: not equal value by value, but the same statistics.
    assert not np.array_equal(ours_estimate, reference_estimate)
    assert abs(np.mean(ours_estimate - reference_estimate)) < 0.01
    ours_mse, reference_mse = np.mean((ours_estimate - truth) ** 2), np.mean((reference_estimate - truth) ** 2)
    assert 0.5 < ours_mse / reference_mse < 2.0


# --- LSH ---------------------------------------------------------------------------------------

def test_s_curve_and_datasketch_parameters():
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    assert (lsh.b, lsh.r) == (9, 13)
    assert lsh_candidate_probability(0.8, lsh.b, lsh.r) == pytest.approx(0.3992, abs=1e-3)
    assert lsh_candidate_probability(0.8, 14, 8) == pytest.approx(0.9236, abs=1e-3)
    s = np.linspace(0, 1, 11)
    assert np.allclose(lsh_candidate_probability(s, 14, 8), 1 - (1 - s**8) ** 14)
    assert lsh_candidate_probability(0.0, 3, 2) == 0.0 and lsh_candidate_probability(1.0, 3, 2) == 1.0
    with pytest.raises(ValueError, match="similarity"):
        lsh_candidate_probability(1.5, 14, 8)


def test_candidate_rate_follows_the_s_curve():
    rng = np.random.default_rng(3)
    for value in (0.5, 0.7, 0.8):
        docs = []
        for index in range(300):
            a, b, _ = pair_with_jaccard(rng, index, 100, value)
            docs += [a, b]
        deduplicator = MinHashDeduplicator(num_bands=14, rows_per_band=8, ngram=1, seed=11)
        pairs = {tuple(p) for p in deduplicator.candidate_pairs(deduplicator.signatures(docs)).tolist()}
        found = np.mean([(2 * i, 2 * i + 1) in pairs for i in range(300)])
        expected = lsh_candidate_probability(value, 14, 8)
        assert abs(found - expected) < 4 * np.sqrt(expected * (1 - expected) / 300) + 0.01, (value, found, expected)
        # Documents of different pairs share no word: never candidates.
        assert all(i // 2 == j // 2 for i, j in pairs)


def test_union_find_matches_breadth_first_search():
    rng = np.random.default_rng(4)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        edges = [tuple(int(v) for v in rng.integers(0, n, size=2)) for _ in range(int(rng.integers(0, 30)))]
        neighbours = defaultdict(set)
        for i, j in edges:
            neighbours[i].add(j)
            neighbours[j].add(i)
        seen, components = set(), []
        for start in range(n):
            if start in seen:
                continue
            stack, component = [start], set()
            while stack:
                node = stack.pop()
                if node not in component:
                    component.add(node)
                    stack.extend(neighbours[node] - component)
            seen |= component
            if len(component) > 1:
                components.append(sorted(component))
        assert union_find_clusters(n, edges) == sorted(components)
    with pytest.raises(ValueError, match="outside"):
        union_find_clusters(3, [(0, 3)])


# --- near-duplicate deduplication against injected edits -------------------------------------

def edited_copy(words, rate, rng, vocabulary):
    result = []
    for word in words:
        if rng.random() >= rate:
            result.append(word)
        elif (operation := rng.integers(3)) == 0:
            result.append(vocabulary[rng.integers(len(vocabulary))])
        elif operation == 2:
            result += [word, vocabulary[rng.integers(len(vocabulary))]]
    return " ".join(result)


@pytest.fixture(scope="module")
def injected_corpus():
    from pydoc_data.topics import topics  # the reference manual's topics: real prose, loads instantly
    texts = [text for _, text in sorted(topics.items()) if len(text.split()) >= 100]
    vocabulary = sorted({w for text in texts for w in text.split()})
    rng = np.random.default_rng(5)
    docs, family, rates = list(texts), list(range(len(texts))), [None] * len(texts)
    for source, text in enumerate(texts):
        for rate in (0.005, 0.01, 0.02, 0.3):
            docs.append(edited_copy(text.split(), rate, rng, vocabulary))
            family.append(source)
            rates.append(rate)
    return docs, family, rates


def test_deduplicate_injected_near_duplicates(injected_corpus):
    docs, family, rates = injected_corpus
    deduplicator = MinHashDeduplicator()
    signatures = deduplicator.signatures(docs)
    pairs = deduplicator.candidate_pairs(signatures)
    clusters = deduplicator.clusters_from_signatures(signatures)
    sets = [shingles(text, 5) for text in docs]

    # Recall on injected pairs with true Jaccard >= 0.85.
    candidates = set(map(tuple, pairs.tolist()))
    injected = [(family[i], i) for i in range(len(docs)) if rates[i] is not None]
    strong = [pair for pair in injected if jaccard(sets[pair[0]], sets[pair[1]]) >= 0.85]
    assert len(strong) > 100
    assert sum(pair in candidates for pair in strong) / len(strong) >= 0.9

    # No unrelated documents become candidates: every candidate has true Jaccard >= 0.3.
    assert all(jaccard(sets[i], sets[j]) >= 0.3 for i, j in pairs.tolist())
    # Heavily edited copies (30%, true Jaccard ~ 0.1) are not merged with anything.
    heavy = {i for i in range(len(docs)) if rates[i] == 0.3}
    assert not any(heavy & set(cluster) for cluster in clusters)

    # Clusters: >= 2 members, sorted, disjoint, list sorted; deduplicate keeps the smallest index.
    members = [i for cluster in clusters for i in cluster]
    assert len(members) == len(set(members))
    assert all(len(c) >= 2 and c == sorted(c) for c in clusters) and clusters == sorted(clusters)
    keep = deduplicator.deduplicate(docs)
    assert keep == sorted(set(range(len(docs))) - {i for c in clusters for i in c[1:]})
    assert clusters == deduplicator.clusters(docs)


# --- exact and line-level deduplication --------------------------------------------------------

def test_exact_duplicates_with_normalization():
    docs = ["Hello   World", "hello world", "HELLO\nWORLD\t", "Hello, world", "Cafe\u0301", "Caf\u00e9", "", "  "]
    assert comparison_key("  A\u00a0b\n\nC ") == "a b c"  # non-breaking space is whitespace too
    assert exact_duplicates(docs) == [[0, 1, 2], [4, 5], [6, 7]]
    assert deduplicate_exact(docs) == [0, 3, 4, 6]
    assert exact_duplicates(["a", "b"]) == [] and deduplicate_exact([]) == []


def test_remove_repeated_lines():
    footer = "Copyright 2024 Example Corp, all rights reserved"
    pages = [f"Unique content number {i}\nContact\n\n{footer}" for i in range(4)]
    pages.append("Another page\nThis line is on two pages only, fine")
    pages.append("This line is on two pages only, fine")
    new_docs, removed = remove_repeated_lines(pages, min_pages=3)
    assert removed == {comparison_key(footer): 4}
    assert new_docs[0] == "Unique content number 0\nContact\n"  # short line and blank line stay
    assert new_docs[4] == pages[4] and new_docs[5] == pages[5]
    # A line counts once per page, however often it repeats on that page.
    _, removed = remove_repeated_lines(["x" * 30 + "\n" + "x" * 30, "x" * 30, "y"], min_pages=3)
    assert removed == {}
    # Paragraph mode.
    paragraph = "Subscribe to our newsletter\nfor weekly updates"
    docs = [f"Story {i}.\n\n{paragraph}" for i in range(3)]
    new_docs, removed = remove_repeated_lines(docs, min_pages=3, separator="\n\n")
    assert new_docs == [f"Story {i}." for i in range(3)] and list(removed.values()) == [3]


# --- suffix array ----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60))
def test_suffix_array_and_lcp_against_sorting(data):
    sa = suffix_array(data)
    assert sa.tolist() == sorted(range(len(data)), key=lambda i: data[i:])
    lcp = lcp_array(data, sa)
    expected = [0]
    for r in range(1, len(data)):
        x, y = data[sa[r - 1]:], data[sa[r]:]
        length = 0
        while length < min(len(x), len(y)) and x[length] == y[length]:
            length += 1
        expected.append(length)
    assert lcp.tolist() == expected[:len(data)]


def brute_force_spans(docs, k):
    seen, result = set(), []
    for text in docs:
        data = text.encode("utf-8")
        covered = np.zeros(len(data), dtype=bool)
        for p in range(len(data) - k + 1):
            if data[p:p + k] in seen:
                covered[p:p + k] = True
            seen.add(data[p:p + k])
        edges = np.flatnonzero(np.diff(np.r_[0, covered.astype(np.int8), 0]))
        result.append([(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])])
    return result


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab é\n", max_size=40), min_size=1, max_size=5), st.integers(1, 8))
def test_repeated_substrings_against_brute_force(docs, k):
    assert find_repeated_substrings(docs, k) == brute_force_spans(docs, k)
    cleaned = remove_repeated_substrings(docs, k)  # always valid text
    assert len(cleaned) == len(docs) and all(isinstance(text, str) for text in cleaned)


def test_remove_repeated_substrings_keeps_first_occurrence():
    passage = "This licence text is pasted into many different pages of the site. "
    docs = ["Intro one. " + passage + "Outro one.", "Start two. " + passage + "End two.", "Nothing shared here."]
    cleaned = remove_repeated_substrings(docs, min_length=30)
    assert cleaned[0] == docs[0] and cleaned[2] == docs[2]
    # The shared region is ". " + passage ("one. " and "two. " agree from the full stop on).
    assert cleaned[1] == "Start twoEnd two."
    # Multi-byte characters are never cut in half: the repeat ends inside "ア" (its first byte equals
    # the first byte of "す"), so the span is widened to the whole character.
    text = "日本語のテキストで"
    assert find_repeated_substrings(["x" + text + "す", "y" + text + "アz"], min_length=8) == [[], [(1, 29)]]
    assert remove_repeated_substrings(["x" + text + "す", "y" + text + "アz"], min_length=8) == ["x" + text + "す", "yz"]


# --- errors ------------------------------------------------------------------------------------

def test_clear_errors_on_bad_input():
    deduplicator = MinHashDeduplicator()
    with pytest.raises(TypeError, match="single string"):
        deduplicator.signatures("one document")
    with pytest.raises(TypeError, match=r"docs\[1\]"):
        deduplicator.clusters(["ok", 3])
    from llmbook.corpus import Document
    with pytest.raises(TypeError, match="d.text"):
        exact_duplicates([Document("x", "text", "test")])
    with pytest.raises(ValueError, match="num_bands"):
        MinHashDeduplicator(num_bands=0)
    with pytest.raises(TypeError, match="ngram"):
        MinHashDeduplicator(ngram=2.5)
    with pytest.raises(ValueError, match="shape"):
        deduplicator.candidate_pairs(np.zeros((3, 5), dtype=np.uint64))
    with pytest.raises(ValueError, match="min_pages"):
        remove_repeated_lines(["a"], min_pages=1)
    with pytest.raises(TypeError, match="bytes"):
        suffix_array("text")
    with pytest.raises(ValueError, match="min_length"):
        find_repeated_substrings(["abc"], min_length=0)

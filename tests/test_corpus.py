"""llmbook.corpus: the offline corpus, local and remote loading (file:// URLs stand in for the
network; the download itself is tested in test_files.py), token shards in both dtypes with their
validation errors, the splits, and the sliding-window dataset against a direct slice of the stream."""

import json

import numpy as np
import pytest
import torch

from llmbook import corpus
from llmbook.corpus import (Document, RemoteSource, SlidingWindowDataset, TokenShards, fetch_source,
                            load_corpus, load_source, make_dataloader, offline_corpus, read_local_files,
                            read_token_shards, split_documents, split_tokens, token_dtype,
                            write_token_shards)
from llmbook.files import FileFormatError, file_sha256


# ----------------------------------------------------------------------------- offline corpus

def test_offline_corpus_is_large_unique_and_deterministic():
    documents = offline_corpus()
    assert len(documents) >= 500
    assert sum(len(d.text.encode("utf-8")) for d in documents) >= 1_500_000
    ids = [d.id for d in documents]
    assert len(set(ids)) == len(ids)
    assert {d.source for d in documents} == {"pydoc_topics", "stdlib_docstrings"}
    assert all(isinstance(d, Document) and d.text.strip() for d in documents)
    assert offline_corpus.__wrapped__() == documents  # rebuilt from scratch: identical


def test_load_corpus_defaults_to_offline(monkeypatch):
    monkeypatch.delenv("LLMBOOK_CORPUS", raising=False)
    assert load_corpus() == offline_corpus()
    assert load_corpus("offline", limit=3) == offline_corpus()[:3]
    monkeypatch.setenv("LLMBOOK_CORPUS", "no-such-corpus")
    with pytest.raises(ValueError, match="Unknown corpus 'no-such-corpus'"):
        load_corpus()


# ----------------------------------------------------------------------------- local files

def test_local_folder_txt_and_jsonl(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Text file body.\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "meta": 1}\n', encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    expected = (Document("a.jsonl:1", "one", "local"), Document("a.jsonl:3", "two", "local"),
                Document("sub/b.txt", "Text file body.", "local"))
    assert read_local_files(tmp_path) == expected
    monkeypatch.setenv("LLMBOOK_CORPUS", str(tmp_path))
    assert load_corpus() == expected
    assert load_corpus(str(tmp_path / "a.jsonl")) == expected[:2]


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "unclosed"', "not valid JSON"),
    ('["a list"]', 'string "text" field'),
    ('{"content": "no text field"}', 'string "text" field'),
    ('{"text": 42}', 'string "text" field'),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "good"}\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        read_local_files(tmp_path)
    assert "data.jsonl, line 2" in str(error.value)


def test_local_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        read_local_files(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        read_local_files(tmp_path)
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        read_local_files(tmp_path / "missing")


# ----------------------------------------------------------------------------- remote sources

def test_registry_pins_urls_and_digests():
    for source in corpus.SOURCES.values():
        assert source.url.startswith("https://")
        assert source.sha256 is None or len(source.sha256) == 64
    assert corpus.SOURCES["tinyshakespeare"].sha256 and corpus.SOURCES["tinystories"].sha256
    with pytest.raises(ValueError, match="Unknown source"):
        fetch_source("no-such-source")


def test_eot_separated_source_through_file_url(tmp_path):
    remote = tmp_path / "stories.txt"
    remote.write_text("One.\n<|endoftext|>\nTwo.\n<|endoftext|>\n\n<|endoftext|>\nThree.", encoding="utf-8")
    source = RemoteSource("mini", remote.as_uri(), file_sha256(remote), "mini.txt",
                          "eot_separated", None, "test")
    documents = load_source(source, tmp_path / "cache")
    assert [d.text for d in documents] == ["One.", "Two.", "Three."]
    assert [d.id for d in documents] == ["mini:0", "mini:1", "mini:2"]
    assert load_source(source, tmp_path / "cache", limit=2) == documents[:2]


def test_parquet_source_without_pyarrow_fails_before_downloading(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_corpus("fineweb-edu", cache=tmp_path)
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- token shards

def test_token_dtype_boundaries():
    assert token_dtype(257) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(100_277) == np.uint32
    for bad in (0, -1, 2**32 + 1):
        with pytest.raises(ValueError):
            token_dtype(bad)
    for bad in (3.0, True):
        with pytest.raises(TypeError):
            token_dtype(bad)


@pytest.mark.parametrize("vocab_size, dtype", [(300, np.uint16), (65_536, np.uint16), (100_277, np.uint32)])
@pytest.mark.parametrize("shard_tokens", [7, 64, 10_000])
def test_shards_round_trip(tmp_path, vocab_size, dtype, shard_tokens):
    rng = np.random.default_rng(vocab_size + shard_tokens)
    eot = vocab_size - 1
    documents = [rng.integers(0, vocab_size - 1, size=n).tolist() for n in (0, 5, 13, 40, 1, 29)]
    metadata = write_token_shards(documents, tmp_path, vocab_size, eot_id=eot, shard_tokens=shard_tokens)
    expected = np.concatenate([[eot] + d for d in documents]).astype(dtype)
    tokens = read_token_shards(tmp_path, verify=True)
    assert metadata["dtype"] == np.dtype(dtype).name and tokens.dtype == dtype
    assert metadata["documents"] == len(documents) and len(tokens) == metadata["total_tokens"] == len(expected)
    assert all(s["tokens"] == shard_tokens for s in metadata["shards"][:-1])
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    for start, stop in [(0, 3), (5, 20), (len(expected) - 9, len(expected)), (6, 6)]:
        np.testing.assert_array_equal(tokens[start:stop], expected[start:stop])
    assert tokens[-1] == expected[-1] and tokens[11] == expected[11]
    with pytest.raises(IndexError):
        tokens[len(expected)]
    for shard in metadata["shards"]:  # raw little-endian arrays, readable without our code
        assert (tmp_path / shard["file"]).stat().st_size == shard["tokens"] * np.dtype(dtype).itemsize


def test_uint16_files_are_half_of_uint32(tmp_path):
    documents = [list(range(256)), list(b"hello world")]
    small = write_token_shards(documents, tmp_path / "a", 257, eot_id=256)
    large = write_token_shards(documents, tmp_path / "b", 70_000, eot_id=256)
    size = lambda folder, meta: sum((folder / s["file"]).stat().st_size for s in meta["shards"])
    assert 2 * size(tmp_path / "a", small) == size(tmp_path / "b", large)


def test_write_token_shards_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        write_token_shards([[1, 2, 10]], tmp_path / "a", 10, eot_id=9)
    with pytest.raises(ValueError, match="end-of-text id 9 at position 1"):
        write_token_shards([[1, 9, 2]], tmp_path / "b", 10, eot_id=9)
    with pytest.raises(ValueError, match="eot_id"):
        write_token_shards([[1]], tmp_path / "c", 10, eot_id=10)
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        write_token_shards([[0.5, 1.5]], tmp_path / "d", 10, eot_id=9)
    with pytest.raises(ValueError, match="no documents"):
        write_token_shards([], tmp_path / "e", 10, eot_id=9)
    write_token_shards([[1, 2]], tmp_path / "f", 10, eot_id=9)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_token_shards([[3]], tmp_path / "f", 10, eot_id=9)
    write_token_shards([[3]], tmp_path / "f", 10, eot_id=9, overwrite=True)
    assert np.asarray(read_token_shards(tmp_path / "f")).tolist() == [9, 3]


@pytest.fixture
def shard_dir(tmp_path):
    folder = tmp_path / "shards"
    write_token_shards([list(range(50)), list(range(30))], folder, 1000, eot_id=999, shard_tokens=32)
    return folder


def _edit_metadata(folder, **changes):
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata.update(changes)
    (folder / "metadata.json").write_text(json.dumps(metadata))


def test_read_shards_detects_truncation_and_missing_files(shard_dir):
    with open(shard_dir / "shard_00001.bin", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(ValueError, match="shard_00001.bin has 10 bytes but the metadata expects 64"):
        read_token_shards(shard_dir)
    (shard_dir / "shard_00001.bin").unlink()
    with pytest.raises(FileNotFoundError, match="shard_00001.bin .* missing"):
        read_token_shards(shard_dir)


def test_read_shards_detects_inconsistent_metadata(shard_dir):
    _edit_metadata(shard_dir, dtype="uint32")
    with pytest.raises(ValueError, match="dtype 'uint32'.*stored as uint16"):
        read_token_shards(shard_dir)
    _edit_metadata(shard_dir, dtype="uint16", total_tokens=5)
    with pytest.raises(ValueError, match="do not add up"):
        read_token_shards(shard_dir)
    _edit_metadata(shard_dir, version=2)
    with pytest.raises(FileFormatError, match="version 2 is not supported"):
        read_token_shards(shard_dir)
    _edit_metadata(shard_dir, format="something-else")
    with pytest.raises(FileFormatError, match="not llmbook token-shard metadata"):
        read_token_shards(shard_dir)
    (shard_dir / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_token_shards(shard_dir)
    (shard_dir / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished token-shard folder"):
        read_token_shards(shard_dir)


def test_verify_detects_changed_contents(shard_dir):
    data = bytearray((shard_dir / "shard_00000.bin").read_bytes())
    data[0] ^= 1  # same size, different bytes: only the digest can tell
    (shard_dir / "shard_00000.bin").write_bytes(bytes(data))
    read_token_shards(shard_dir)
    with pytest.raises(ValueError, match="does not match the sha256"):
        read_token_shards(shard_dir, verify=True)


def test_token_shards_pickle_reopens_files(shard_dir):
    import pickle
    tokens = read_token_shards(shard_dir).subrange(10, 60)
    clone = pickle.loads(pickle.dumps(tokens))
    assert len(pickle.dumps(tokens)) < 500  # paths, not data
    np.testing.assert_array_equal(np.asarray(clone), np.asarray(tokens))


# ----------------------------------------------------------------------------- windows and splits

@pytest.mark.parametrize("n, context_length, stride", [
    (9, 8, None), (100, 8, None), (100, 8, 3), (101, 10, 10), (1000, 16, 1), (57, 7, 50)])
def test_sliding_windows_match_the_stream(n, context_length, stride):
    stream = np.arange(n, dtype=np.uint32) * 7 % 1000
    dataset = SlidingWindowDataset(stream, context_length, stride)
    step = stride or context_length
    assert len(dataset) == (n - context_length - 1) // step + 1
    for index in range(len(dataset)):
        x, y = dataset[index]
        start = index * step
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (context_length,)
        assert x.tolist() == stream[start:start + context_length].tolist()
        assert y.tolist() == stream[start + 1:start + context_length + 1].tolist()
    last_start = (len(dataset) - 1) * step
    assert last_start + context_length + 1 <= n < last_start + step + context_length + 1
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    assert torch.equal(dataset[-1][0], dataset[len(dataset) - 1][0])


def test_sliding_windows_overlap_with_small_stride():
    dataset = SlidingWindowDataset(torch.arange(100), context_length=10, stride=4)
    (x0, _), (x1, _) = dataset[0], dataset[1]
    assert torch.equal(x1[:6], x0[4:])


def test_sliding_windows_accept_shards_and_lists(shard_dir):
    tokens = read_token_shards(shard_dir)
    reference = np.asarray(tokens).tolist()
    for container in (tokens, reference, torch.tensor(reference)):
        dataset = SlidingWindowDataset(container, 12, 5)
        x, y = dataset[6]  # crosses the shard boundary at 32
        assert x.tolist() == reference[30:42] and y.tolist() == reference[31:43]


def test_sliding_window_errors():
    with pytest.raises(ValueError, match="too few for one window"):
        SlidingWindowDataset(np.arange(8), context_length=8)
    with pytest.raises(ValueError, match="context_length"):
        SlidingWindowDataset(np.arange(8), context_length=0)
    with pytest.raises(ValueError, match="stride"):
        SlidingWindowDataset(np.arange(80), context_length=8, stride=0)


def test_dataloader_batches_are_seeded():
    stream = np.arange(5000) % 97
    first = [x for x, _ in make_dataloader(stream, 16, batch_size=4, seed=3)]
    second = [x for x, _ in make_dataloader(stream, 16, batch_size=4, seed=3)]
    other = [x for x, _ in make_dataloader(stream, 16, batch_size=4, seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert first[0].shape == (4, 16) and len(first) == len(SlidingWindowDataset(stream, 16)) // 4
    ordered = make_dataloader(stream, 16, batch_size=4, shuffle=False, drop_last=False)
    assert torch.equal(next(iter(ordered))[0][0], torch.as_tensor(stream[:16]))
    with pytest.raises(ValueError, match="no batch would be produced"):
        make_dataloader(np.arange(40), 16, batch_size=4)


def test_split_tokens_takes_the_tail(shard_dir):
    stream = np.arange(100)
    train, val = split_tokens(stream, 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    tokens = read_token_shards(shard_dir)
    head, tail = split_tokens(tokens, 0.25)
    assert isinstance(tail, TokenShards) and len(head) + len(tail) == len(tokens)
    np.testing.assert_array_equal(np.concatenate([np.asarray(head), np.asarray(tail)]), np.asarray(tokens))
    with pytest.raises(ValueError):
        split_tokens(stream, 0.0)


def test_split_documents_is_deterministic_and_stable():
    documents = [Document(f"doc{i}", f"text {i}", "test") for i in range(2000)]
    train, val = split_documents(documents, 0.1)
    assert 150 < len(val) < 250 and len(train) + len(val) == 2000
    assert not {d.id for d in train} & {d.id for d in val}
    assert split_documents(documents[::-1], 0.1)[1] == val[::-1]  # order-independent
    grown = documents + [Document(f"new{i}", "x", "test") for i in range(500)]
    assert {d.id for d in split_documents(grown, 0.1)[1]} >= {d.id for d in val}  # old docs stay put
    assert split_documents(documents, 0.1, salt="other")[1] != val
    with pytest.raises(ValueError, match="split_tokens"):
        split_documents([Document("only", "one", "test")], 0.1)

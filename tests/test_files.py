"""llmbook.files: atomic writes that leave nothing behind on failure, digests, the verified download
(file:// URLs stand in for the network), the lock between processes, data files of installed
packages and versioned JSON formats."""

import hashlib
import importlib.metadata
import threading
import time

import pytest

from llmbook import LLMBookError, files
from llmbook.files import (FileFormatError, SourceUnavailableError, atomic_path, atomic_write, data_sha256,
                           download, file_lock, file_sha256, package_data_file, parse_versioned_json,
                           read_versioned_json)


# ----------------------------------------------------------------------------- atomic writes, digests

def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"  # the folder is created
    assert atomic_write(path, "first") == path and path.read_text() == "first"
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second" and [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write(path, "old")
    with pytest.raises(TypeError):
        atomic_write(path, 42)  # not bytes: fails inside the write
    with pytest.raises(KeyError), atomic_path(path) as temporary:
        temporary.write_text("half of the new contents")
        raise KeyError("interrupted")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_digests():
    assert data_sha256(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_file_sha256_reads_in_blocks(tmp_path):
    data = bytes(range(256)) * 10_000  # 2.5 MB: more than one block
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest() == data_sha256(data)


# ----------------------------------------------------------------------------- downloads

@pytest.fixture
def served(tmp_path):
    """A 'remote' file reachable through a file:// URL, and an empty cache folder."""
    remote = tmp_path / "server" / "data.txt"
    remote.parent.mkdir()
    remote.write_bytes(b"line one\nline two\n")
    return remote, hashlib.sha256(remote.read_bytes()).hexdigest(), tmp_path / "cache"


def test_download_verifies_and_caches(served, monkeypatch):
    remote, digest, cache = served
    path = download(remote.as_uri(), "data.txt", digest, cache)
    assert path == cache / "data.txt" and path.read_bytes() == remote.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["data.txt"]  # no temporary file left

    opened = []
    real_urlopen = files.urllib.request.urlopen
    monkeypatch.setattr(files.urllib.request, "urlopen", lambda *a, **k: opened.append(a) or real_urlopen(*a, **k))
    remote.unlink()  # the second call must not need the URL at all
    assert download(remote.as_uri(), "data.txt", digest, cache) == path
    assert opened == []


def test_download_uses_llmbook_cache_env(served, monkeypatch):
    remote, digest, cache = served
    monkeypatch.setenv("LLMBOOK_CACHE", str(cache / "from_env"))
    assert files.cache_dir() == cache / "from_env"
    assert download(remote.as_uri(), "data.txt", digest) == cache / "from_env" / "data.txt"


def test_download_checksum_mismatch_keeps_nothing(served):
    remote, digest, cache = served
    with pytest.raises(ValueError, match="has sha256 .* expected 0{64}.*not kept"):
        download(remote.as_uri(), "data.txt", "0" * 64, cache)
    assert not (cache / "data.txt").exists()
    assert list(cache.iterdir()) == []


def test_cached_file_with_wrong_digest_is_reported(served):
    remote, digest, cache = served
    cache.mkdir()
    (cache / "data.txt").write_bytes(b"placed by hand, but wrong\n")
    with pytest.raises(ValueError, match="cached file .* delete it"):
        download(remote.as_uri(), "data.txt", digest, cache)


def test_unpinned_download_prints_digest(served, capsys):
    remote, digest, cache = served
    download(remote.as_uri(), "data.txt", None, cache)
    assert digest in capsys.readouterr().out


@pytest.mark.parametrize("url", ["file:///definitely/not/here.txt", "http://127.0.0.1:9/corpus.txt"])
def test_unreachable_source_says_how_to_go_offline(tmp_path, url):
    with pytest.raises(SourceUnavailableError, match="needs the network") as error:
        download(url, "corpus.txt", None, tmp_path / "cache", timeout=5)
    message = str(error.value)
    assert "load_corpus('offline')" in message and "place it by hand" in message
    assert not (tmp_path / "cache" / "corpus.txt").exists()
    assert not any((tmp_path / "cache").iterdir())


def test_download_rejects_bad_arguments(served):
    remote, digest, cache = served
    with pytest.raises(ValueError, match="SHA-256 hex digest"):
        download(remote.as_uri(), "data.txt", "abc", cache)
    with pytest.raises(ValueError, match="plain file name"):
        download(remote.as_uri(), "../escape.txt", digest, cache)
    with pytest.raises(ValueError, match="cannot be opened by urllib"):
        download("nonsense-url", "x.txt", None, cache)


def test_file_errors_derive_from_the_book_base_and_their_builtin():
    from llmbook.humaneval import HumanEvalDataError
    from llmbook.mmlu import MMLUDataError
    from llmbook.tokenizer import TokenizerFileError
    from llmbook.train import CheckpointError
    for error, builtin in [(SourceUnavailableError, ConnectionError), (FileFormatError, ValueError),
                           (TokenizerFileError, ValueError), (CheckpointError, RuntimeError),
                           (MMLUDataError, ValueError), (HumanEvalDataError, RuntimeError)]:
        assert issubclass(error, LLMBookError) and issubclass(error, builtin), error


# ----------------------------------------------------------------------------- lock

def test_file_lock_makes_a_second_holder_wait(tmp_path):
    lock = tmp_path / "models" / "cpu.lock"  # the folder is created
    order = []

    def second():
        with file_lock(lock):
            order.append("second")

    with file_lock(lock):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)  # the other thread now waits for the lock (each open file is its own holder)
        order.append("first")
    thread.join()
    assert order == ["first", "second"]


# ----------------------------------------------------------------------------- package data

def test_package_data_file_finds_a_file_and_explains_what_is_missing():
    class DataError(LLMBookError, RuntimeError):
        pass

    path = package_data_file("pytest", "pytest/__init__.py", install="pip install pytest", error=DataError)
    assert path.is_file() and path.name == "__init__.py"
    with pytest.raises(DataError, match="not installed; install it with `pip install no-such-thing`"):
        package_data_file("no-such-thing", "x/data.txt", install="pip install no-such-thing", error=DataError)
    with pytest.raises(DataError, match="pytest .* is installed, but pytest/__init__.py is pinned to version 0.0.1"):
        package_data_file("pytest", "pytest/__init__.py", version="0.0.1", install="pip install pytest==0.0.1",
                          error=DataError)
    installed = importlib.metadata.version("pytest")
    with pytest.raises(DataError, match=f"pytest {installed} is installed but has no pytest/missing.txt; "
                                        "reinstall it with `pip install pytest --force-reinstall`"):
        package_data_file("pytest", "pytest/missing.txt", install="pip install pytest", error=DataError)


# ----------------------------------------------------------------------------- versioned JSON

@pytest.mark.parametrize("raw, message", [
    (b"", "the file is empty"),
    (b'{"format": "demo", "vers', "not valid JSON .* truncated or corrupted, or it is not a demo file"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[1, 2]", 'not a demo file: JSON without "format": \'demo\''),
    (b'{"format": "other", "version": 1}', "not a demo file"),
    (b'{"format": "demo", "version": 2}', r"file format version 2 is not supported \(this code reads version 1\)"),
])
def test_versioned_json_errors(raw, message):
    with pytest.raises(FileFormatError, match=message) as caught:
        parse_versioned_json(raw, "demo", 1, name="demo.json", what="a demo file")
    assert str(caught.value).startswith("demo.json: ") and isinstance(caught.value, ValueError)


def test_read_versioned_json(tmp_path):
    path = tmp_path / "demo.json"
    atomic_write(path, '{"format": "demo", "version": 1, "x": [1, 2]}')
    assert read_versioned_json(path, "demo", 1, what="a demo file")["x"] == [1, 2]

    class DemoError(FileFormatError):
        pass

    with pytest.raises(DemoError, match=f"{path}: file format version 1 is not supported"):
        read_versioned_json(path, "demo", 3, what="a demo file", error=DemoError)
    with pytest.raises(FileNotFoundError):
        read_versioned_json(tmp_path / "missing.json", "demo", 1, what="a demo file")

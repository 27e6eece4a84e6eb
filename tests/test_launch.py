"""llmbook.launch: a job that works, a rank that crashes, a rank that hangs -- and nothing left behind."""

import os

import pytest

from llmbook.launch import LaunchTimeout, _alive, load_result, process_tree, torchrun


def test_two_ranks_all_reduce(tmp_path):
    out = tmp_path / "hello.json"
    result = torchrun("llmbook.launch", 2, args=["--out", out], timeout=120, echo=False).check()
    summary = load_result(out)
    assert summary["world_size"] == 2 and summary["sum_of_ranks"] == 1.0
    assert len(set(summary["pids"])) == 2  # two processes, not two threads
    assert "[rank 0] hello" in result.output and "[rank 1] hello" in result.output
    assert not any(_alive(pid) for pid in summary["pids"])


def test_crashing_rank_gives_nonzero_exit_and_its_traceback():
    result = torchrun("llmbook.launch", 2, args=["--crash-rank", "1"], timeout=120, echo=False)
    assert result.returncode != 0
    assert "RuntimeError: rank 1 crashes on purpose" in result.output
    with pytest.raises(RuntimeError, match="exited with code"):
        result.check()


def test_hanging_rank_times_out_and_leaves_no_process():
    with pytest.raises(TimeoutError, match="did not finish within") as caught:
        torchrun("llmbook.launch", 2, args=["--hang-rank", "1"], timeout=25, echo=False)
    error = caught.value
    assert isinstance(error, LaunchTimeout)
    assert len(error.pids) >= 3  # torchrun and its two workers were found...
    assert not any(_alive(pid) for pid in error.pids)  # ...and are all gone
    assert process_tree(os.getpid()) == [os.getpid()]  # no child of ours is left either


@pytest.mark.parametrize("module, nproc, timeout, message", [
    ("llmbook/launch.py", 2, 10, "dotted module name"),
    ("llmbook.launch", 0, 10, "positive integer"),
    ("llmbook.launch", 2, 0, "positive number of seconds"),
])
def test_bad_arguments_are_refused_before_starting(module, nproc, timeout, message):
    with pytest.raises(ValueError, match=message):
        torchrun(module, nproc, timeout=timeout, echo=False)


def test_worker_outside_torchrun_says_how_to_start_it(monkeypatch):
    from llmbook.launch import init_worker

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_worker()


def test_process_tree_finds_this_process():
    assert process_tree(os.getpid())[0] == os.getpid()

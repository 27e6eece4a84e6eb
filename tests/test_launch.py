"""llmbook.launch: a job that works, a rank that crashes, a rank that hangs -- and nothing left behind."""

import importlib
import inspect
import os

import pytest

from llmbook.launch import LaunchTimeout, _alive, job_arguments, load_result, process_tree, torchrun

# Every module that torchrun runs as a job.
JOB_MODULES = ["launch", "data_parallel", "tensor_parallel", "accumulation", "pipeline", "fsdp", "mesh3d", "sizing"]


def test_two_ranks_all_reduce(tmp_path):
    out = tmp_path / "hello.json"
    result = torchrun("llmbook.launch", 2, args=["--out", out], timeout=120, echo=False).check()
    summary = load_result(out)
    assert summary["world_size"] == 2 and summary["sum_of_ranks"] == 1.0
    assert len(set(summary["pids"])) == 2  # two processes, not two threads
    assert "[rank 0] hello" in result.output and "[rank 1] hello" in result.output
    # the last lines before the os._exit that ends each rank: nothing printed is lost
    assert "[rank 0] all_reduce(rank) = 1" in result.output and "[rank 1] all_reduce(rank) = 1" in result.output
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


def test_job_arguments_share_the_common_options():
    parser = job_arguments("a job", steps=3, lr=0.5)
    args = parser.parse_args([])
    assert (args.steps, args.lr, args.out) == (3, 0.5, None)
    assert not hasattr(args, "batch_size")  # a default of None leaves the option out
    args = parser.parse_args(["--steps", "7", "--out", "result.json"])
    assert (args.steps, args.out) == (7, "result.json")
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-size", "8"])


@pytest.mark.parametrize("name", JOB_MODULES)
def test_every_job_runs_inside_run_job(name):
    """One frame for every job: no job parses its own common options, joins or leaves the process
    group, or writes its result itself (where the shutdown abort used to come from)."""
    module = importlib.import_module(f"llmbook.{name}")
    assert "run_job(" in inspect.getsource(module.main)
    job = module._hello if name == "launch" else module._job
    job_code = inspect.getsource(job) + inspect.getsource(module.main)
    for skeleton in ("init_worker(", "init_process_group(", "destroy_process_group(", "ArgumentParser(",
                     "json.dump(", "all_gather_object("):
        assert skeleton not in job_code, (name, skeleton)

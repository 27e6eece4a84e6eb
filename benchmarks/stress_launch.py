"""Launch every Chapter 4 torchrun job many times, several at a time, and report every failure.

A job that fails one launch in a hundred fails a good share of test runs, since the suite starts
about thirty of them. This script makes such rare failures common enough to count: it starts each
job `--repeats` times, `--parallel` at once (so that the machine is loaded, as it is under
`pytest -n 2`), and reports for every failed launch its exit code, the ranks' exit codes and signals
as torchrun summarised them, and the lines that explain it. After the last launch it looks for any
process of these jobs that is still alive.

    .venv/bin/python benchmarks/stress_launch.py                  # 20 launches of each of the 10 jobs, 3 at a time
    .venv/bin/python benchmarks/stress_launch.py --jobs accumulation sizing --repeats 40
    .venv/bin/python benchmarks/stress_launch.py --load 6 --starve-gloo --backtrace   # provoke, and explain

Two options help to find the cause of a rare failure. --starve-gloo runs every worker's gloo threads
at the lowest CPU priority, so that on a busy machine (--load) they are descheduled for long stretches,
as heavy load does by chance. --backtrace compiles (with gcc) and preloads a small library that prints
the C++ stack of any thread that calls abort(), the way std::terminate ends a process.

Not part of the test command: it takes several minutes on a 2-core machine.
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from llmbook.launch import LaunchTimeout, torchrun

# name: (module, processes, arguments[, torchrun options]): the smallest runs the tests and notebooks make.
# "{dir}" in the arguments becomes a fresh folder for each launch.
JOBS = {
    "launch": ("llmbook.launch", 2, []),
    "data_parallel": ("llmbook.data_parallel", 2, ["--steps", "2"]),
    "tensor_parallel": ("llmbook.tensor_parallel", 2, ["--steps", "2", "--models", "gpt2-style"]),
    "accumulation": ("llmbook.accumulation", 2, ["--steps", "2"]),
    "pipeline": ("llmbook.pipeline", 2, ["--steps", "2"]),
    "fsdp": ("llmbook.fsdp", 2, ["--steps", "2"]),
    "mesh3d": ("llmbook.mesh3d", 4, ["--pp", "2", "--dp", "2", "--tp", "1", "--steps", "2"]),
    "sizing": ("llmbook.sizing", 2, []),
    "comms": ("llmbook.comms", 2, ["--steps-only", "--steps", "2"]),
    "elastic": ("llmbook.elastic", 2, ["--steps", "6", "--checkpoint-every", "2", "--checkpoint-dir", "{dir}",
                                       "--crash-rank", "1", "--crash-step", "3"], {"max_restarts": 1}),
}
# Lines of a failed launch worth showing: aborts, signals, Python errors and torchrun's summary.
EXPLAINS = re.compile(r"terminate called|=== abort|Signal \d+|exitcode|Traceback|Error|error:|SIGABRT|SIGSEGV|Aborted")


# Preloaded into the workers by --backtrace: abort() prints the calling thread's name and stack first.
ABORT_BACKTRACE_C = r"""
#define _GNU_SOURCE
#include <execinfo.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
void abort(void) {
    void *frames[64];
    char name[32] = "?", line[128];
    pthread_getname_np(pthread_self(), name, sizeof name);
    int n = snprintf(line, sizeof line, "=== abort() in thread '%s' of pid %d:\n", name, getpid());
    write(2, line, n);
    backtrace_symbols_fd(frames, backtrace(frames, 64), 2);
    signal(SIGABRT, SIG_DFL);
    raise(SIGABRT);
    _exit(134);
}
"""

# A busy process for --load. It spins until this script is gone, however this script ends.
BUSY_PY = "import os, sys\nwhile os.getppid() == int(sys.argv[1]): pass"

# Imported by every worker (as sitecustomize) under --starve-gloo.
STARVE_GLOO_PY = """
import os, threading, time

def _starve():
    me, done = os.getpid(), set()
    while True:
        try:
            for tid in os.listdir(f"/proc/{me}/task"):
                if tid not in done:
                    with open(f"/proc/{me}/task/{tid}/comm") as f:
                        if f.read().startswith("pt_gloo"):
                            os.setpriority(os.PRIO_PROCESS, int(tid), 19)
                            done.add(tid)
        except OSError:
            pass
        time.sleep(0.02)

if "LOCAL_RANK" in os.environ:
    threading.Thread(target=_starve, daemon=True).start()
"""


def diagnostic_env(folder: str, starve_gloo: bool, backtrace: bool) -> dict:
    env = {}
    if starve_gloo:
        with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
            f.write(STARVE_GLOO_PY)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
    if backtrace:
        source, library = os.path.join(folder, "abort_backtrace.c"), os.path.join(folder, "abort_backtrace.so")
        with open(source, "w") as f:
            f.write(ABORT_BACKTRACE_C)
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", library, source], check=True)
        env["LD_PRELOAD"] = library
    return env


def launch_once(name: str, out_dir: str, timeout: float, env: dict) -> dict:
    module, nproc, args, *options = JOBS[name]
    out = os.path.join(out_dir, f"{name}-{time.monotonic_ns()}.json")
    args = [arg.replace("{dir}", out[:-len(".json")]) for arg in args]
    try:
        result = torchrun(module, nproc, args=[*args, "--out", out], timeout=timeout, echo=False, env=env,
                          **(options[0] if options else {}))
    except LaunchTimeout as stop:
        return {"job": name, "ok": False, "returncode": "timeout", "output": stop.output, "seconds": timeout}
    if result.returncode == 0 and not os.path.exists(out):
        return {"job": name, "ok": False, "returncode": "0 but no result file", "output": result.output,
                "seconds": result.seconds}
    return {"job": name, "ok": result.returncode == 0, "returncode": result.returncode, "output": result.output,
            "seconds": result.seconds}


def report_failure(r: dict, i: int, folder) -> None:
    """Print the lines that explain a failed launch; keep its whole output in `folder` if given."""
    for line in r["output"].splitlines():
        if EXPLAINS.search(line):
            print(f"        | {line[:200]}")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i:04d}-{r['job']}.log"), "w") as f:
            f.write(r["output"])


def leftover_processes(exclude: int) -> list:
    """(pid, command line) of every process still running one of the jobs' modules."""
    modules = {job[0] for job in JOBS.values()}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg in modules for arg in argv):
            found.append((int(entry), " ".join(argv)[:160]))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--repeats", type=int, default=20, help="launches of each job")
    parser.add_argument("--parallel", type=int, default=3, help="launches running at the same time")
    parser.add_argument("--load", type=int, default=0,
                        help="busy processes to run meanwhile, as other work (notebooks, tests) loads a CI machine")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a launch counts as hung")
    parser.add_argument("--starve-gloo", action="store_true", help="lowest CPU priority for gloo's threads")
    parser.add_argument("--backtrace", action="store_true", help="print the C++ stack of an aborting thread")
    parser.add_argument("--save-failures", default=None, metavar="DIR",
                        help="write the whole output of every failed launch into this folder")
    args = parser.parse_args(argv)
    order = [name for _ in range(args.repeats) for name in args.jobs]  # interleaved: every mix of jobs
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_PY, str(os.getpid())]) for _ in range(args.load)]
    results, start = [], time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(args.parallel) as pool:
            env = diagnostic_env(out_dir, args.starve_gloo, args.backtrace)
            futures = [pool.submit(launch_once, name, out_dir, args.timeout, env) for name in order]
            for i, future in enumerate(as_completed(futures), 1):
                r = future.result()
                results.append(r)
                mark = "ok" if r["ok"] else f"FAILED ({r['returncode']})"
                print(f"[{i:4d}/{len(order)}] {r['job']:16s} {r['seconds']:6.1f} s  {mark}", flush=True)
                if not r["ok"]:
                    report_failure(r, i, args.save_failures)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    time.sleep(2)  # let the last workers' exits be reaped before looking for survivors
    leftovers = leftover_processes(exclude=os.getpid())

    extras = "".join(f", {flag}" for flag, on in (("--starve-gloo", args.starve_gloo),
                                                   ("--backtrace", args.backtrace)) if on)
    print(f"\n{len(results)} launches, {args.parallel} at a time, {args.load} busy processes beside them"
          f"{extras}, in {time.monotonic() - start:.0f} s")
    failures = collections.Counter(r["job"] for r in results if not r["ok"])
    for name in args.jobs:
        print(f"  {name:16s} {failures[name]:3d} failed of {args.repeats}")
    aborts = sum("terminate called" in r["output"] for r in results)
    print(f"failures: {sum(failures.values())}; with 'terminate called': {aborts}; "
          f"processes left behind: {len(leftovers)}")
    for pid, command in leftovers:
        print(f"  left behind: {pid} {command}")
    return 1 if failures or leftovers else 0


if __name__ == "__main__":
    sys.exit(main())

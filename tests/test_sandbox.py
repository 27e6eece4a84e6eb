"""Attack samples against llmbook.sandbox: each one must be contained, and each check can fail."""

import json
import math
import os
import shutil
import socket
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmbook.sandbox import (PLAIN_DATA_SOURCE, Outcome, isolation_report, namespaces_available, run_checked,
                             run_untrusted)

REPORT = isolation_report() if os.name == "posix" else {}
LINUX = sys.platform.startswith("linux")
needs_namespaces = pytest.mark.skipif(not REPORT.get("unshare_namespaces"),
                                      reason="user/mount/net/pid namespaces unavailable (unshare missing or disabled)")
needs_seccomp = pytest.mark.skipif(not REPORT.get("seccomp"), reason="seccomp unavailable on this platform")
# Modes to run the portable attacks in: the full sandbox, and (on Linux) without namespaces,
# as on a machine where user namespaces are disabled.
MODES = [None] + ([False] if LINUX and REPORT.get("unshare_namespaces") else [])


def run(source: str, **kwargs) -> Outcome:
    return run_untrusted(textwrap.dedent(source), **kwargs)


def processes_with(marker: str) -> list[int]:
    """PIDs whose command line contains marker (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if marker.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_isolation_report_on_this_machine():
    assert REPORT["probe_passed"] is True
    if LINUX and namespaces_available():
        for layer in ("private_root", "seccomp", "rlimits", "pid_namespace", "net_namespace"):
            assert REPORT[layer] is True, layer


@pytest.mark.parametrize("namespaces", MODES)
def test_correct_program_passes_and_wrong_one_fails(namespaces):
    good = run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')", namespaces=namespaces)
    bad = run("def add(a, b):\n    return a - b\nassert add(2, 3) == 5, 'wrong sum'", namespaces=namespaces)
    assert good.passed and good.status == "passed" and good.output == "ok\n"
    assert not bad.passed and bad.status == "failed: AssertionError: wrong sum"


@pytest.mark.parametrize("namespaces", MODES)
def test_forged_exits_do_not_pass(namespaces):
    forgeries = {
        "os._exit(0)": "import os\nos._exit(0)\nassert False",
        "sys.exit(0)": "import sys\nsys.exit(0)",
        "raise SystemExit(0)": "raise SystemExit(0)",
        "atexit prints passed": "import atexit\natexit.register(lambda: print('passed'))\nassert False",
        "prints passed": "print('passed')\nassert 1 == 2",
        "fake line on the result fd": """
            import os
            for fd in map(int, os.listdir('/proc/self/fd') if os.path.isdir('/proc/self/fd') else range(3, 20)):
                try:
                    os.write(fd, b'passed\\n' + b'0' * 32 + b' passed\\n')
                except OSError:
                    pass
            os._exit(0)""",
        "KeyboardInterrupt": "raise KeyboardInterrupt",
    }
    with ThreadPoolExecutor(4) as pool:
        outcomes = dict(zip(forgeries, pool.map(lambda s: run(s, namespaces=namespaces), forgeries.values())))
    for name, outcome in outcomes.items():
        assert not outcome.passed, (name, outcome)
    assert outcomes["os._exit(0)"].status == "failed: exited with status 0 before the tests finished"
    assert outcomes["sys.exit(0)"].status == "failed: SystemExit: 0"
    assert outcomes["raise SystemExit(0)"].status == "failed: SystemExit: 0"
    assert outcomes["atexit prints passed"].status == "failed: AssertionError"
    assert "passed" not in outcomes["atexit prints passed"].output      # the handler never ran
    assert outcomes["KeyboardInterrupt"].status == "failed: KeyboardInterrupt"


@pytest.mark.parametrize("namespaces", MODES)
def test_environment_is_scrubbed(monkeypatch, namespaces):
    monkeypatch.setenv("LLMBOOK_TEST_SECRET", "hunter2-" + uuid.uuid4().hex)
    outcome = run("""
        import os
        print(sorted(os.environ))
        print(open('/proc/self/environ', 'rb').read() if os.path.exists('/proc/self/environ') else b'')
        """, namespaces=namespaces)
    assert outcome.passed, outcome
    assert outcome.output.splitlines()[0] == "['HOME', 'LANG', 'PATH', 'TMPDIR']"
    assert "hunter2" not in outcome.output and os.environ["LLMBOOK_TEST_SECRET"] not in outcome.output


@needs_namespaces
def test_files_outside_the_directory_are_untouchable(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("original")
    escape = f"/tmp/llmbook-escape-{uuid.uuid4().hex}"
    outcome = run(f"""
        import os
        results = []
        for attempt in (lambda: os.remove({str(sentinel)!r}),
                        lambda: open({str(sentinel)!r}, 'w').write('pwned'),
                        lambda: open({escape!r}, 'w').write('escaped')):
            try:
                attempt()
                results.append('done')
            except OSError as error:
                results.append(type(error).__name__ + ' ' + str(error.errno))
        open('inside.txt', 'w').write('the sandbox directory itself is writable')
        print(results)
        """)
    assert outcome.passed, outcome
    assert sentinel.read_text() == "original"
    assert not os.path.exists(escape)
    assert "done" not in outcome.output


@pytest.mark.parametrize("seccomp", [True, False] if LINUX else [True])
@needs_namespaces
def test_network_is_unreachable(seccomp):
    # seccomp alone (no AF_INET sockets) and the network namespace alone (no route) must both block it.
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.05)
    port = server.getsockname()[1]
    connections, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connections.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    outcome = run(f"""
        import socket
        s = socket.create_connection(('127.0.0.1', {port}), timeout=1)
        s.sendall(b'exfiltrated')
        """, seccomp=seccomp)
    stop.set()
    thread.join()
    server.close()
    assert not outcome.passed, outcome
    assert connections == []
    assert outcome.status.startswith(("failed: PermissionError", "failed: ConnectionRefusedError", "failed: OSError"))


@pytest.mark.parametrize("namespaces", MODES)
@needs_seccomp
def test_fork_bomb_and_subprocess_are_contained(namespaces):
    marker = uuid.uuid4().hex
    started = time.perf_counter()
    outcomes = [
        run("import os\nwhile True:\n    os.fork()", namespaces=namespaces, timeout=5),
        run(f"import subprocess\nsubprocess.Popen(['sleep', '30', '{marker}'])", namespaces=namespaces),
        run(f"import os\nos.posix_spawn('/bin/sleep', ['sleep', '30', '{marker}'], {{}})", namespaces=namespaces),
    ]
    assert time.perf_counter() - started < 5
    for outcome in outcomes:
        assert not outcome.passed and outcome.status.startswith("failed: PermissionError"), outcome
    assert processes_with(marker) == []


@needs_namespaces
def test_daemon_dies_with_the_pid_namespace():
    # Even with seccomp off (so the double fork works), nothing outlives the run: when the
    # supervisor (PID 1 of the namespace) exits, the kernel kills every process left in it.
    # The private root has no programs to exec, so the daemon is the runner itself, forked twice;
    # its command line names the run's own directory, which the program prints.
    outcome = run("""
        import os, time
        print('directory', os.getcwd(), flush=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        os.wait()
        print('daemon started')
        """, seccomp=False)
    assert outcome.passed and "daemon started" in outcome.output, outcome
    directory = outcome.output.split("directory ")[1].split()[0]
    time.sleep(0.2)
    assert processes_with(directory) == []


@pytest.mark.parametrize("namespaces", MODES)
def test_memory_bomb_fails_cleanly(namespaces):
    outcome = run("x = bytearray(10 * 2**30)", namespaces=namespaces)
    growing = run("chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 2**20))", namespaces=namespaces,
                  memory_mb=256)
    assert outcome.status == "failed: MemoryError", outcome
    assert not growing.passed and ("MemoryError" in growing.status or "killed" in growing.status), growing


@pytest.mark.parametrize("namespaces", MODES)
def test_loops_and_sleep_time_out(namespaces):
    sources = {"busy loop": "while True:\n    pass",
               "ignores SIGTERM": "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass",
               "sleeps": "import time\ntime.sleep(100)"}
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(lambda s: run(s, timeout=1.0, namespaces=namespaces), sources.values()))
    for outcome in outcomes:
        assert not outcome.passed and not outcome.finished and outcome.status == "timed out after 1 s", outcome
        assert outcome.elapsed < 2.0


def test_cpu_limit_kills_a_busy_loop_before_the_timeout():
    outcome = run("while True:\n    pass", timeout=10.0, cpu_seconds=1)
    assert outcome.finished and outcome.signal_name == "SIGXCPU", outcome
    assert outcome.status == "killed by SIGXCPU (CPU time limit)"
    assert outcome.elapsed < 5


@pytest.mark.parametrize("namespaces", MODES)
@needs_seccomp   # without it, kill(-1, 9) would really kill every process of this user
def test_killing_the_parent_leaves_the_harness_alive(namespaces):
    import signal
    outcomes = [run("import os\nos.kill(os.getppid(), 9)\nimport time\ntime.sleep(0.2)", namespaces=namespaces),
                run("import os\nos.kill(0, 9)", namespaces=namespaces),
                run("import os\nos.kill(-1, 9)", namespaces=namespaces)]
    for outcome in outcomes:
        assert not outcome.passed, outcome
    assert outcomes[1].status == f"killed by {signal.Signals(9).name} (killed)"
    assert run("print('still here')", namespaces=namespaces).passed


@pytest.mark.parametrize("namespaces", MODES)
def test_output_flood_is_bounded(namespaces):
    lines = run("while True:\n    print('x' * 100)", namespaces=namespaces, max_output=2000)
    one_line = run("import sys\nwhile True:\n    sys.stdout.write('y' * 10**6)", namespaces=namespaces)
    for outcome in (lines, one_line):
        assert not outcome.passed, outcome
        assert "File too large" in outcome.status or "SIGXFSZ" in outcome.status, outcome
        assert outcome.elapsed < 3
    assert 1000 < len(lines.output) <= 2000 and set(lines.output) == {"x", "\n"}
    assert len(one_line.output) <= 4096


def test_bad_arguments_raise_clear_errors():
    for kwargs in ({"timeout": 0}, {"memory_mb": -1}):
        with pytest.raises(ValueError):
            run_untrusted("pass", **kwargs)
    with pytest.raises(TypeError, match="max_file_mb"):
        run_untrusted("pass", max_file_mb=1.5)
    with pytest.raises(TypeError, match="program's text"):
        run_untrusted(b"print(1)")


# ---- plain data and trusted checks (run_checked)
def plain_data():
    namespace = {}
    exec(compile(PLAIN_DATA_SOURCE, "plain_data.py", "exec"), namespace)
    return namespace


def same(a, b) -> bool:
    """Equal, with the same types all the way down (nan equal to nan)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def test_plain_data_round_trips_with_exact_types():
    codec = plain_data()
    values = [None, True, False, 0, -7, 10**40, 1.5, -0.0, float("inf"), float("nan"), "", "héllo\n", b"\x00\xff",
              [], (), [1, (2, [3.0, None])], {1: "a", (1, 2): [None], "k": {True: b""}}, {1, 2, 3}, frozenset({"a"}),
              (True, 1, 1.0)]
    for value in values:
        decoded = codec["from_plain"](json.loads(json.dumps(codec["to_plain"](value))))
        assert same(decoded, value), (value, decoded)


def test_plain_data_refuses_everything_else():
    codec = plain_data()
    not_plain = codec["NotPlainData"]

    class Yes(int):
        def __eq__(self, other):
            return True

    deep = []
    for _ in range(200):
        deep = [deep]
    for value in (Yes(1), type("S", (str,), {})("x"), object(), len, 1j, range(3), [1, Yes(2)], {"k": object()}, deep):
        with pytest.raises(not_plain):
            codec["to_plain"](value)
    for data in (["int", 5], ["evil", "x"], ["set", [["list", []]]], ["dict", [[["list", []], ["none"]]]], "str",
                 ["float", "1e"], ["bytes", "zz"], ["list"], ["none", 1]):
        with pytest.raises(not_plain):
            codec["from_plain"](data)


def checked(program: str, checks: str, **kwargs) -> Outcome:
    return run_checked(textwrap.dedent(program), "f", textwrap.dedent(checks), **kwargs)


def test_checked_calls_report_exceptions_crashes_and_timeouts():
    assert checked("def f(x):\n    return [x, {x: (x,)}]\n", "assert f(2) == [2, {2: (2,)}]\nassert f('a')[0] == 'a'").passed
    outcome = checked("def f(x):\n    raise ValueError('bad ' + str(x))\n", "f(3)")
    assert outcome.status == "failed: the candidate raised ValueError: bad 3", outcome
    # the candidate's exceptions are not the checks' exceptions: `except Exception` cannot hide them
    outcome = checked("def f(x):\n    raise ValueError\n", "try:\n    f(1)\nexcept Exception:\n    pass\n")
    assert outcome.status == "failed: the candidate raised ValueError", outcome
    outcome = checked("import os\ndef f(x):\n    os._exit(0)\n", "f(1)")
    assert outcome.status == "failed: the program's process ended", outcome
    outcome = checked("import ctypes\ndef f(x):\n    return ctypes.string_at(0)\n", "f(1)")
    assert outcome.status == "failed: the program's process ended (killed by SIGSEGV, crashed)", outcome
    outcome = checked("def f(x):\n    while True:\n        pass\n", "f(1)", timeout=1.0)
    assert outcome.status == "timed out after 1 s" and not outcome.finished, outcome
    outcome = checked("def f(x):\n    return lambda: x\n", "f(1)")
    assert outcome.status == "failed: the candidate returned an object of type function", outcome
    outcome = checked("def g(x):\n    return x\n", "f(1)")
    assert outcome.status == "failed: the candidate raised NameError: the program defines no function f", outcome
    assert checked("def f(x):\n    return x\n", "assert helper(f(2)) == 3", setup="def helper(y):\n    return y + 1\n").passed


def test_checked_message_size_is_bounded():
    outcome = checked("def f(n):\n    return 'x' * n\n", "f(3 * 2**20)", max_message_mb=1)
    assert outcome.status == "failed: the sandbox sent a message longer than 1048576 bytes", outcome


@needs_namespaces
def test_private_root_shows_the_interpreter_and_nothing_else(tmp_path):
    import llmbook
    from llmbook.humaneval import humaneval_data_file

    secret_dir = tempfile.mkdtemp(prefix=".llmbook-secret-", dir=os.path.expanduser("~"))
    try:
        secret = os.path.join(secret_dir, "id_rsa")
        with open(secret, "w") as handle:
            handle.write("PRIVATE KEY")
        targets = [secret, str(humaneval_data_file()), llmbook.__file__, sys.executable, "/etc/passwd", "/proc/self/environ",
                   str(tmp_path), os.path.expanduser("~/.bashrc")]
        outcome = run(f"""
            import os, sys
            for path in {targets!r}:
                try:
                    open(path, "rb").read(1)
                    print("READABLE", path)
                except OSError as error:
                    print("hidden", type(error).__name__)
            site_packages = [p for p in os.listdir(os.path.dirname(os.__file__)) if p.endswith("-packages")]
            print("packages", [os.listdir(os.path.join(os.path.dirname(os.__file__), p)) for p in site_packages])
            open("scratch.txt", "w").write("the working directory is writable")
            import json, decimal, sqlite3, ssl, zlib   # the standard library works
            """)
        assert outcome.passed, outcome
        assert "READABLE" not in outcome.output and outcome.output.count("hidden FileNotFoundError") == len(targets), outcome.output
        assert "packages [[]]" in outcome.output or "packages []" in outcome.output, outcome.output
    finally:
        shutil.rmtree(secret_dir)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count open files")
def test_the_harness_leaks_no_file_descriptors():
    # Thousands of samples run in one process: every pipe and file the harness opens must be closed.
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        run_untrusted("pass")
        checked("def f(x):\n    return x\n", "assert f(1) == 1")
        checked("def f(x):\n    while True:\n        pass\n", "f(1)", timeout=0.3)
    assert len(os.listdir("/proc/self/fd")) == before

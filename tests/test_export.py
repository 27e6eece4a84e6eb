"""tools/export.py: notebook cells marked `# export: llmbook.<module>` become generated modules; the
check mode catches drift; broken markers and backward-chapter imports are clear errors."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import export  # noqa: E402


def write_notebook(path: Path, *sources: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook")] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)


@pytest.fixture
def book(tmp_path):
    write_notebook(tmp_path / "ch01_first" / "01_a.ipynb",
                   "# export: llmbook.alpha\nimport math\n\ndef area(r):\n    return math.pi * r * r",
                   "print(area(1.0))  # a demo cell, not exported",
                   "# export: llmbook.alpha\ndef main():\n    print('alpha main ran')")
    write_notebook(tmp_path / "ch02_second" / "01_b.ipynb",
                   "# export: llmbook.beta\nfrom llmbook.alpha import area\n\nDOUBLE = 2 * area(1.0)")
    return tmp_path


def run(book, *args):
    return export.main(["--root", str(book), *args])


def test_export_writes_modules_with_header(book):
    assert run(book) == 0
    alpha = (book / "shared/llmbook/alpha.py").read_text()
    assert alpha.startswith(export.HEADER_FIRST_LINE)
    assert "# Source: ch01_first/01_a.ipynb" in alpha
    assert "def area(r)" in alpha and "a demo cell" not in alpha and "# export:" not in alpha
    assert alpha.rstrip().endswith('if __name__ == "__main__":\n    main()')
    beta = (book / "shared/llmbook/beta.py").read_text()
    assert "__main__" not in beta  # no main(), no footer


def test_exported_main_runs_as_a_module(book):
    run(book)
    # -S: no site-packages, so the editable install of the real llmbook does not shadow this one
    result = subprocess.run([sys.executable, "-S", "-m", "llmbook.alpha"], cwd=book / "shared",
                            capture_output=True, text=True, check=True)
    assert result.stdout == "alpha main ran\n"


def test_check_detects_drift_and_stale_modules(book, capsys):
    run(book)
    assert run(book, "--check") == 0
    (book / "shared/llmbook/alpha.py").write_text(
        (book / "shared/llmbook/alpha.py").read_text().replace("math.pi", "3.14"))
    assert run(book, "--check") == 1
    assert "out of date" in capsys.readouterr().err
    run(book)
    assert run(book, "--check") == 0
    (book / "ch02_second/01_b.ipynb").unlink()
    assert run(book, "--check") == 1
    assert "no notebook exports" in capsys.readouterr().err
    run(book)
    assert not (book / "shared/llmbook/beta.py").exists()


def test_hand_written_modules_are_left_alone(book):
    (book / "shared/llmbook").mkdir(parents=True)
    (book / "shared/llmbook/__init__.py").write_text('"""hand-written"""\n')
    run(book)
    assert run(book, "--check") == 0
    assert (book / "shared/llmbook/__init__.py").read_text() == '"""hand-written"""\n'


@pytest.mark.parametrize("marker", ["# export llmbook.alpha", "#| export", "# export: numpy.alpha",
                                    "# export: llmbook.Alpha", "# export: llmbook.a.b", "# Export: llmbook.x"])
def test_unknown_marker_is_a_clear_error(tmp_path, marker, capsys):
    write_notebook(tmp_path / "ch01_x" / "01_x.ipynb", f"{marker}\nx = 1")
    with pytest.raises(export.ExportError, match=r"01_x.ipynb, cell 1: unknown export marker"):
        export.export(tmp_path)
    assert run(tmp_path) == 2
    assert "# export: llmbook.<module>" in capsys.readouterr().err


def test_a_module_may_not_import_a_later_chapter(tmp_path):
    write_notebook(tmp_path / "ch01_x" / "01_x.ipynb", "# export: llmbook.early\nfrom llmbook import late")
    write_notebook(tmp_path / "ch03_y" / "01_y.ipynb", "# export: llmbook.late\nX = 1")
    with pytest.raises(export.ExportError, match="imports llmbook.late, which chapter 3 defines"):
        export.export(tmp_path)


def test_exported_code_must_compile(tmp_path):
    write_notebook(tmp_path / "ch01_x" / "01_x.ipynb", "# export: llmbook.broken\ndef f(:\n    pass")
    with pytest.raises(export.ExportError, match="does not compile"):
        export.export(tmp_path)


def test_the_committed_package_is_up_to_date():
    assert export.main(["--check"]) == 0


def test_imports_are_hoisted_once_and_each_notebook_is_marked(tmp_path):
    write_notebook(tmp_path / "ch01_x" / "01_x.ipynb",
                   '# export: llmbook.gamma\n"""Gamma."""\n\nimport math  # why\n\ndef one():\n    return math.pi',
                   "# export: llmbook.gamma\nimport math\nimport os\nfrom pathlib import Path\n\n"
                   "def two():\n    import json  # lazy: stays here\n    return Path(os.sep), json")
    write_notebook(tmp_path / "ch01_x" / "02_y.ipynb",
                   "# export: llmbook.gamma\nfrom pathlib import PurePath\nimport numpy as np\n\n_HIDDEN = 1\nSHOWN = 2")
    text = export.export(tmp_path)[tmp_path / "shared/llmbook/gamma.py"]
    head, _, body = text.partition("__all__")
    assert head.index('"""Gamma."""') < head.index("import math  # why")
    assert "import math  # why\nimport os\nfrom pathlib import Path, PurePath\n\nimport numpy as np\n" in head
    assert "import" not in body.replace("import json  # lazy", "")
    assert '__all__ = ["one", "two", "SHOWN"]' in "__all__" + body
    assert body.index("# --- from ch01_x/01_x.ipynb ---") < body.index("def one")
    assert body.index("def two") < body.index("# --- from ch01_x/02_y.ipynb ---") < body.index("SHOWN = 2")


def test_one_name_imported_from_two_places_is_an_error(tmp_path):
    write_notebook(tmp_path / "ch01_x" / "01_x.ipynb", "# export: llmbook.delta\nfrom os import path",
                   "# export: llmbook.delta\nfrom sys import path")
    with pytest.raises(export.ExportError, match="'path' is imported both from os.path and from sys.path"):
        export.export(tmp_path)


def _top_level(module_path):
    import ast
    return ast.parse(module_path.read_text(encoding="utf-8")).body


GENERATED = sorted(p for p in (ROOT / "shared/llmbook").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", GENERATED, ids=lambda p: p.stem)
def test_generated_module_imports_come_first_once_and_all_lists_its_api(path):
    import ast
    body = _top_level(path)
    kinds = [isinstance(node, (ast.Import, ast.ImportFrom)) for node in body]
    first_import = kinds.index(True) if True in kinds else 0
    last_import = len(kinds) - 1 - kinds[::-1].index(True) if True in kinds else 0
    assert all(kinds[first_import:last_import + 1]), f"{path.name}: an import below a definition"
    bound = [alias.asname or alias.name for node in body if isinstance(node, (ast.Import, ast.ImportFrom))
             for alias in node.names]
    assert len(bound) == len(set(bound)), f"{path.name} imports a name twice"
    exported = [node for node in body if isinstance(node, ast.Assign) and node.targets[0].id == "__all__"]
    assert exported, f"{path.name} has no __all__"


def test_no_two_modules_export_the_same_name():
    import importlib
    owners = {}
    for path in GENERATED:
        for name in importlib.import_module(f"llmbook.{path.stem}").__all__:
            owners.setdefault(name, []).append(path.stem)
    assert {name: mods for name, mods in owners.items() if len(mods) > 1} == {}


def test_the_package_docstring_maps_every_module_to_its_notebook_and_command():
    import ast

    import llmbook
    for path in GENERATED:
        notebooks = [line.removeprefix("# Source: ") for line in path.read_text().splitlines()
                     if line.startswith("# Source: ")]
        row = next((line for line in llmbook.__doc__.splitlines() if line.split()[:1] == [path.stem]), None)
        assert row is not None, f"llmbook/__init__.py's module map has no row for {path.stem}"
        assert all(Path(nb).stem in row for nb in notebooks), f"{path.stem}'s row does not name {notebooks}"
        has_main = any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in _top_level(path))
        assert (f"-m llmbook.{path.stem}" in row) == has_main, row


def test_package_conventions():
    import torch
    from llmbook import LLMBookError, eval_mode, positive_int
    assert positive_int(3, "n") == 3
    for bad, error in [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)]:
        with pytest.raises(error, match="n.* must be a positive integer"):
            positive_int(bad, "n")
    model = torch.nn.Dropout(0.5).train()
    with pytest.raises(KeyError), eval_mode(model):
        assert not model.training
        raise KeyError("the block fails")
    assert model.training
    assert issubclass(LLMBookError, Exception)

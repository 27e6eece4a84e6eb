"""Execute the book's notebooks, chapter by chapter.

    python tools/run_notebooks.py                  execute every notebook into build/book/
    python tools/run_notebooks.py --inplace NB...  execute notebooks and store their outputs in place
                                                   (what an author does before committing)

Each notebook runs in a fresh kernel with its own folder as the working directory, so relative
paths behave as they do in JupyterLab. The committed notebooks are untouched unless --inplace.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import ROOT, notebook_paths  # noqa: E402

BUILD = ROOT / "build" / "book"


def execute(path: Path, timeout: int) -> None:
    """Run one notebook top to bottom in a fresh kernel and store its outputs in the file."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no wall-clock timestamps in the committed JSON
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        # The kernel process's own log (not cell output) only says it talks over local TCP.
        client.execute(stderr=subprocess.DEVNULL)
    finally:
        nbformat.write(nb, path)  # keep partial outputs: they show where it failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook of the book")
    parser.add_argument("--inplace", action="store_true", help="store outputs in the given notebooks")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    sources = [p.resolve() for p in args.notebooks] or notebook_paths()
    if args.inplace:
        targets = sources
    else:
        # Mirror the book into build/book so the committed notebooks stay as they are.
        if BUILD.exists():
            shutil.rmtree(BUILD)
        targets = []
        for src in sources:
            dst = BUILD / src.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            targets.append(dst)

    for i, path in enumerate(targets, 1):
        name = path.relative_to(BUILD if not args.inplace else ROOT)
        print(f"[{i}/{len(targets)}] {name} ...", end=" ", flush=True)
        start = time.perf_counter()
        try:
            execute(path, args.timeout)
        except CellExecutionError as err:
            print("FAILED")
            print(str(err)[-3000:], file=sys.stderr)
            print(f"\nThe partly executed notebook is at {path}.", file=sys.stderr)
            return 1
        print(f"{time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""JupyterLab, used as a reader uses it: a real headless Chromium opens the first notebook of each chapter,
runs it with Run > Run All Cells, and checks what the reader sees: every output the committed notebook
has, rendered math, the figures, the collapsible exercise solutions, and a browser console without errors.
It then saves the notebook from the UI and compares its outputs with the committed ones as nbval does
(same sanitizers, same ignored cells), so that these five notebooks are executed once, here, instead of
twice: the root conftest.py leaves them out of nbval whenever this test runs.

It needs Debian's `chromium` and `chromium-driver` packages and the `selenium` package (`.ci/run`
installs them). Without them the test is skipped, the skip says what to install, and nbval checks the
five notebooks as it checks every other.
"""
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import re
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbval.plugin import coalesce_streams, get_sanitize_patterns, transform_streams_for_comparison

REPO = Path(__file__).resolve().parents[1]
FIRST_SECTIONS = sorted(str(path.relative_to(REPO)) for path in REPO.glob("ch0*_*/01_*.ipynb"))
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
NOTEBOOK_SECONDS = 600      # the slowest of these notebooks runs in about three minutes under nbval

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:
    webdriver = None

missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                                    ("selenium", webdriver)) if not found]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"JupyterLab browser test skipped: {', '.join(missing)} not found. Install "
                          "Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) "
                          "and selenium (pip install selenium); .ci/run does both.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of the five notebooks with their outputs cleared (so that whatever
    the browser shows was produced by this run), with its own settings, workspaces and runtime folders."""
    root = tmp_path_factory.mktemp("book")
    for name in FIRST_SECTIONS:
        notebook = nbformat.read(REPO / name, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        (root / name).parent.mkdir(exist_ok=True)
        nbformat.write(notebook, root / name)
    home = tmp_path_factory.mktemp("lab-home")
    # Render every cell into the page: JupyterLab's default windowing leaves cells out of view unrendered.
    tracker = home / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    news = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))        # no "get notified about Jupyter news?" toast
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTER_CONFIG_DIR": str(home / "config"), "OMP_NUM_THREADS": "1"}
    port, token = free_port(), os.urandom(16).hex()
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
         # nothing that would reach for the network: no news, no update check, no PyPI extension manager
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (home / "server.log").read_text()
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within a minute:\n" + (home / "server.log").read_text())
        yield url, token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The machine has no network beyond localhost: without these, Chromium keeps trying Google's services.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def click_menu(driver, menu, item):
    driver.find_element(By.XPATH, f"//li[contains(@class, 'lm-MenuBar-item')]"
                                  f"[.//div[normalize-space()='{menu}']]").click()
    entry = wait_for(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-item")
                              if e.text.split("\n")[0].strip() == item], 10, f"menu item {item}")
    entry[0].click()


# Reads the state of the open notebook from its rendered page: one record per code cell, plus the page.
STATE_SCRIPT = """
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
if (!panel) return null;
const cells = [...panel.querySelectorAll('.jp-CodeCell')].map(cell => ({
    prompt: (cell.querySelector('.jp-InputArea-prompt') || {}).textContent || '',
    outputs: cell.querySelectorAll('.jp-OutputArea-output').length,
    text: ((cell.querySelector('.jp-OutputArea') || {}).innerText || '').slice(-800),
    images: [...cell.querySelectorAll('.jp-OutputArea-output img')].map(img => img.naturalWidth),
}));
const status = panel.querySelector('.jp-Notebook-ExecutionIndicator');
return {cells, math: panel.querySelectorAll('.jp-MarkdownCell mjx-container').length,
        mathErrors: panel.querySelectorAll('mjx-merror').length,
        details: panel.querySelectorAll('.jp-MarkdownCell details').length,
        idle: !status || status.getAttribute('data-status') === 'idle'};
"""


def execution_count(prompt: str) -> int | None:
    """The number in a cell's prompt: "[7]:" -> 7; None while it is queued ("[*]:") or has not run ("[ ]:")."""
    inside = prompt.strip().strip(":").strip("[]")
    return int(inside) if inside.isdigit() else None


def committed_expectations(name):
    notebook = nbformat.read(REPO / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    images = [sum("image/png" in output.get("data", {}) for output in cell.outputs) for cell in code]
    has_math = any("$" in cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    details = sum(cell.source.count("<details") for cell in notebook.cells if cell.cell_type == "markdown")
    return code, images, has_math, details


# What nbval leaves out of a comparison (its defaults, images included), and the book's sanitizers.
SKIP_COMPARE = {"metadata", "traceback", "prompt_number", "output_type", "name", "execution_count",
                "application/vnd.jupyter.widget-view+json", "image/png", "image/jpeg"}
SANITIZERS = get_sanitize_patterns((REPO / "tools" / "nbval_sanitize.cfg").read_text())


def comparable(outputs):
    """A cell's outputs as nbval compares them: streams merged per name (carriage returns applied),
    every other key flattened, the sanitizers applied; one list of values per key."""
    flat = {}
    for output in transform_streams_for_comparison(coalesce_streams(copy.deepcopy(outputs))):
        for key, value in output.items():
            for inner, text in (value.items() if key == "data" else [(key, value)]):
                if key in SKIP_COMPARE or inner in SKIP_COMPARE:
                    continue
                for regex, replace in SANITIZERS:
                    text = re.sub(regex, replace, text) if isinstance(text, str) else text
                flat.setdefault(inner, []).append(text)
    return flat


def compare_with_committed(name, saved):
    committed = [cell for cell in nbformat.read(REPO / name, as_version=4).cells if cell.cell_type == "code"]
    ran = [cell for cell in saved.cells if cell.cell_type == "code"]
    assert len(ran) == len(committed)
    for i, (new, old) in enumerate(zip(ran, committed)):
        if {"nbval-ignore-output", "nbval-skip"} & set(old.metadata.get("tags", [])):
            continue
        ran_here, committed_here = comparable(new.outputs), comparable(old.outputs)
        assert ran_here == committed_here, (f"{name}: code cell {i} printed something else in JupyterLab than "
                                            f"in the committed notebook:\n{ran_here}\nagainst\n{committed_here}")


@pytest.mark.parametrize("name", FIRST_SECTIONS)
def test_run_all_in_jupyterlab(lab, browser, name):
    url, token, root = lab
    code, images, has_math, details = committed_expectations(name)
    browser.get_log("browser")                                     # start this notebook with an empty console
    browser.get(f"{url}/lab/tree/{name}?token={token}&reset")
    wait_for(lambda: (state := browser.execute_script(STATE_SCRIPT)) and len(state["cells"]) == len(code),
             120, f"{name} to open with its {len(code)} code cells")
    wait_for(lambda: browser.execute_script("return document.querySelector("
                                            "'.jp-Notebook-ExecutionIndicator[data-status=\"idle\"]')"),
             120, "the kernel to start")

    click_menu(browser, "Run", "Run All Cells")

    def finished():
        state = browser.execute_script(STATE_SCRIPT)
        ran = [execution_count(cell["prompt"]) is not None for cell in state["cells"]]
        queued = any("*" in cell["prompt"] for cell in state["cells"])
        # Run All queues every cell ([*]); after an error JupyterLab drops the rest of the queue ([ ]).
        if any(ran) and not all(ran) and not queued:
            last = max(i for i, done in enumerate(ran) if done)
            raise AssertionError(f"{name}: Run All stopped at code cell {last}, which shows:\n"
                                 + state["cells"][last]["text"])
        return state if all(ran) and state["idle"] else None

    state = wait_for(finished, NOTEBOOK_SECONDS, f"Run All Cells to finish {name}")
    counts = [execution_count(cell["prompt"]) for cell in state["cells"]]
    assert counts == list(range(1, len(code) + 1)), f"cells ran out of order: {counts}"
    for i, (cell, expected) in enumerate(zip(state["cells"], code)):
        if expected.outputs:
            assert cell["outputs"], f"{name}: code cell {i} shows no output; the committed notebook has one"
    shown = [sum(1 for width in cell["images"] if width > 0) for cell in state["cells"]]
    assert shown == images, f"{name}: figures shown per cell {shown}, committed {images}"
    if has_math:
        assert state["math"] > 0 and state["mathErrors"] == 0, \
            f"{name}: {state['math']} formulas rendered by MathJax, {state['mathErrors']} errors"

    # The exercise solutions are collapsed until the reader opens them.
    assert state["details"] == details > 0
    solutions = browser.find_elements(By.CSS_SELECTOR, ".jp-MarkdownCell details")
    for solution in solutions:
        assert not solution.get_property("open")
        browser.execute_script("arguments[0].scrollIntoView()", solution)
        solution.find_element(By.TAG_NAME, "summary").click()
        assert solution.get_property("open")
        body = [e for e in solution.find_elements(By.XPATH, "./*[not(self::summary)]") if e.is_displayed()]
        assert body, f"{name}: an opened solution shows nothing"

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, f"{name}: the browser console shows errors: {errors}"

    # Save from the UI (Ctrl+S), read the file JupyterLab wrote, and hold its outputs to nbval's standard.
    browser.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook").click()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, "s")
    path = root / name

    def saved():
        try:
            notebook = nbformat.read(path, as_version=4)
        except ValueError:              # caught halfway through the write
            return None
        counts = [cell.execution_count for cell in notebook.cells if cell.cell_type == "code"]
        return notebook if all(counts) else None

    compare_with_committed(name, wait_for(saved, 60, f"JupyterLab to save {name}"))

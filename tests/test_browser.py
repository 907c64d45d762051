"""The learner's path, for real: the kit's JupyterLab in headless Chromium runs every lesson's solution.

For each lesson the test copies the solution notebook into a folder that a fresh JupyterLab (from this
Python, on a free local port, with a token) serves, injects the CI parameters the way papermill does (so a
heavy lesson runs in seconds), opens it in Chromium driven by Playwright, clicks Run > Run All Cells, waits
for the kernel, saves with Ctrl+S, and asserts what a learner would see:

- no cell shows an error (read from the notebook JupyterLab saved, so the message names the cell);
- every widget the kernel displayed is rendered as a widget, not as its plain-text repr, and a lesson whose
  code uses ipywidgets / `lorakit.viz.explore` shows at least one;
- every figure is rendered as an image, and a lesson that plots shows at least one.

A screenshot of each executed notebook goes to build/screenshots/NN_topic.png (a CI artifact).

Every lesson runs, in course order, on every run: the same commit gives the same run. The executed notebook
JupyterLab saved is also the solution run that tests/test_notebooks.py reads (the `solution_runs` fixture of
tests/conftest.py), so a lesson run here is not run again with papermill; this file runs first.

Chromium: Debian's `chromium` package (tests/install_chromium.sh installs it; Playwright's own browser
download is not used). Without it, or without Playwright, the test skips and says why; in CI it fails.

Knobs (environment variables):
    LORAKIT_CHROMIUM         the browser binary (default /usr/bin/chromium)
    LORAKIT_BROWSER_LESSONS  which lessons: "all" (default), or names/numbers separated by commas or spaces
    LORAKIT_BROWSER_PARAMS   a YAML parameters file applied on top of .ci/params.yml (its runs are then
                             not shared with tests/test_notebooks.py)
    LORAKIT_BROWSER_TIMEOUT  seconds one lesson may take to run all cells (default 300)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

from lorakit import course

pytestmark = [pytest.mark.browser, pytest.mark.installed_by("install_chromium")]

ROOT = course.course_root()
CHROMIUM = os.environ.get("LORAKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "build" / "screenshots"
RUN_TIMEOUT = float(os.environ.get("LORAKIT_BROWSER_TIMEOUT", "300"))
EXTRA_PARAMS = os.environ.get("LORAKIT_BROWSER_PARAMS")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# Code that puts a widget on screen, or draws a figure (the lesson must then show at least one of each).
USES_WIDGETS = re.compile(r"\bexplore\(|\bipywidgets\b|\binteract(ive)?\(|\bwidgets\.\w+\(")
# What a widget looks like when the page cannot render it: its repr, or the manager's error text.
WIDGET_AS_TEXT = re.compile(r"\b(interactive|[A-Z]\w*(Slider|Dropdown|Box|Button|Checkbox|Progress|HTML|Output|Text|"
                            r"Select|Toggle\w*))\((children|value|description|options)=|Error displaying widget|"
                            r"Loading widget\.\.\.|Failed to load model class")
USES_PLOTS = re.compile(r"\bplt\.(show|subplots|figure|plot|bar|barh|imshow)\(|\bexplore\(")


def _chosen_lessons() -> list[str]:
    wanted = os.environ.get("LORAKIT_BROWSER_LESSONS", "all").strip()
    if wanted not in ("", "all"):
        return course.select([w for w in re.split(r"[,\s]+", wanted) if w])
    return course.lessons()


def _skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python package is not installed (pip install -e '.[dev]')"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return (f"Chromium not found at {CHROMIUM}: run tests/install_chromium.sh (Debian: apt-get install "
                f"chromium) or set LORAKIT_CHROMIUM to a Chromium binary")
    return None


# ------------------------------------------------------------------------------------------- fixtures

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server of the kit's Python, isolated from the user's Jupyter configuration."""

    def __init__(self, home: Path):
        self.home = home
        self.notebooks = home / "notebooks"
        self.notebooks.mkdir(parents=True)
        self.port, self.token = _free_port(), uuid.uuid4().hex
        settings = home / "lab-settings"
        # Every cell in the DOM (no virtual scrolling), no news or update checks, no dialogs.
        for name, value in {
            "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
            "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        }.items():
            path = settings / f"{name}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "LORAKIT_STATIC", "JUPYTER_PATH")}
        env.update(
            HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
            IPYTHONDIR=str(home / "ipython"),
        )
        self.log = open(home / "jupyterlab.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
             "--port-retries=0", "--allow-root", f"--ServerApp.token={self.token}", f"--ServerApp.root_dir={self.notebooks}",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.notebooks)
        self._wait_ready()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def _wait_ready(self, timeout: float = 90) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("api/status")
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer on port {self.port} within {timeout:.0f} s:\n{self.log_tail()}")

    def shutdown_kernels(self) -> None:
        for session in self.api("api/sessions") or []:
            self.api(f"api/sessions/{session['id']}", method="DELETE")

    def log_tail(self, n: int = 40) -> str:
        if not self.log.closed:
            self.log.flush()
        return "\n".join((self.home / "jupyterlab.log").read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    server = Lab(tmp_path_factory.mktemp("lab"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(lab, tmp_path_factory):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        yield context
        context.close()


# -------------------------------------------------------------------------------------------- helpers

def _prepare(lesson: str, folder: Path) -> tuple[Path, nbformat.NotebookNode]:
    """Copy the solution notebook with the CI parameters injected after its `parameters` cell."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    params = course.params_for(lesson, course.load_params(ROOT / ".ci" / "params.yml"))
    if EXTRA_PARAMS:
        params.update(course.params_for(lesson, course.load_params(EXTRA_PARAMS)))
    nb = load_notebook_node(str(course.solution_path(lesson)))  # papermill's reader (it normalises tags)
    if params:
        nb = parameterize_notebook(nb, params, kernel_name="python3")
        nb.metadata.pop("papermill", None)
    path = folder / f"{lesson}.ipynb"
    nbformat.write(nb, path)
    # The lesson's own folder may hold files it reads (notebooks run with their folder as the working dir).
    for extra_file in course.solution_path(lesson).parent.iterdir():
        if extra_file.suffix != ".ipynb" and not extra_file.name.startswith("."):
            (shutil.copytree if extra_file.is_dir() else shutil.copy)(extra_file, folder / extra_file.name)
    return path, nb


NB = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook"  # the notebook on screen (not a hidden tab)
PROMPTS_JS = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell')]
    .map(c => c.classList.contains('jp-CodeCell') ? (c.querySelector('.jp-InputPrompt')?.textContent || '').trim() : null)"""

OUTPUTS_JS = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell')].map(c => {
    // the cell's own outputs, not the output areas nested inside widgets (interact's figure)
    const outs = [...c.querySelectorAll('.jp-OutputArea-output')].filter(o => !o.parentElement.closest('.jupyter-widgets'));
    return {
      widgets: outs.filter(o => o.matches('.jupyter-widgets') || o.querySelector('.jupyter-widgets')).length,
      images: c.querySelectorAll('.jp-OutputArea-output img').length,
      text: outs.map(o => o.innerText).join('\\n').slice(0, 2000),
    };
})"""


def _run_all(page, lab, lesson: str, n_cells: int) -> None:
    """Run > Run All Cells through the menus, then wait until no cell is queued or running."""
    page.wait_for_function(f"() => document.querySelectorAll('{NB} .jp-Cell').length >= {n_cells}",
                           timeout=90_000)
    # Wait for the kernel to be up on the server and idle on the page, then make the notebook current.
    deadline = time.monotonic() + 120
    while not any(k.get("execution_state") == "idle" for k in lab.api("api/kernels") or []):
        if time.monotonic() > deadline:
            pytest.fail(f"{lesson}: the kernel did not start within 120 s:\n{lab.log_tail()}")
        time.sleep(0.5)
    page.wait_for_function("() => document.querySelector('.jp-Notebook-ExecutionIndicator')"
                           "?.getAttribute('data-status') === 'idle'", timeout=60_000)
    for attempt in range(3):
        page.locator(f"{NB} .jp-Cell").first.click()
        page.keyboard.press("Escape")
        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-item:not(.lm-mod-disabled)", has_text="Run All Cells").first.click()
        try:  # the run has started when some prompt shows [*] or a number
            page.wait_for_function(f"() => ({PROMPTS_JS})().some(p => p && /\\[(\\*|\\d+)\\]/.test(p))",
                                   timeout=15_000)
            break
        except Exception:
            page.keyboard.press("Escape")
    else:
        pytest.fail(f"{lesson}: Run > Run All Cells did not start the cells (3 tries)")
    t0, stable_since = time.monotonic(), None
    while True:
        prompts = [p for p in page.evaluate(PROMPTS_JS) if p is not None]
        busy = any("*" in p for p in prompts)
        done = prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts)
        if done:
            return
        # Run All stops at the first error: the rest stay "[ ]". Idle and unchanged for 3 s means stopped.
        if not busy and any(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
            stable_since = stable_since or (time.monotonic(), prompts)
            if stable_since[1] != prompts:
                stable_since = (time.monotonic(), prompts)
            elif time.monotonic() - stable_since[0] > 3:
                return
        else:
            stable_since = None
        if time.monotonic() - t0 > RUN_TIMEOUT:
            pytest.fail(f"{lesson}: cells still running after {RUN_TIMEOUT:.0f} s in the browser "
                        f"(prompts: {prompts}); raise LORAKIT_BROWSER_TIMEOUT or shrink its CI parameters")
        time.sleep(0.5)


def _save(page, path: Path) -> nbformat.NotebookNode:
    """Ctrl+S, as a learner saves; returns the notebook JupyterLab wrote."""
    before = path.stat().st_mtime_ns
    page.locator(NB).first.click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 30
    while path.stat().st_mtime_ns == before:
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name}: JupyterLab did not save the notebook within 30 s of Ctrl+S")
        time.sleep(0.2)
    time.sleep(0.3)  # let the write finish
    return nbformat.read(path, as_version=4)


def _screenshot(page, lesson: str) -> Path:
    """The whole executed notebook: grow the viewport to the notebook's height, then shoot."""
    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").first.click()  # hide the file browser
    height = page.evaluate("() => { const n = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) "
                           ".jp-WindowedPanel-outer'); return n ? n.scrollHeight : 900; }")
    page.set_viewport_size({"width": 1280, "height": int(min(max(height + 200, 900), 16000))})
    page.evaluate("() => document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer')"
                  ".scrollTop = 0")
    page.wait_for_timeout(500)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    out = SCREENSHOTS / f"{lesson}.png"
    page.screenshot(path=str(out))
    return out


def _label(nb, i: int) -> str:
    cell = nb.cells[i]
    gid = cell.metadata.get("nbgrader", {}).get("grade_id")
    first = cell.source.strip().split("\n", 1)[0][:60]
    return f"cell {i}" + (f" ({gid})" if gid else f" ({first!r})")


# ----------------------------------------------------------------------------------------------- test

@pytest.mark.timeout(RUN_TIMEOUT + 240)
@pytest.mark.parametrize("lesson", _chosen_lessons())
def test_lesson_runs_in_jupyterlab(lesson, lab, browser, solution_runs):
    folder = lab.notebooks / lesson
    folder.mkdir()
    path, nb = _prepare(lesson, folder)
    page = browser.new_page()
    page.set_default_timeout(30_000)
    t0 = time.perf_counter()
    try:
        page.goto(lab.url(f"lab/workspaces/{lesson}/tree/{lesson}/{path.name}") + "&reset", wait_until="domcontentloaded", timeout=90_000)
        _run_all(page, lab, lesson, len(nb.cells))
        page.wait_for_timeout(1000)  # late display messages (widgets render after their cell finishes)
        saved = _save(page, path)
        seconds = time.perf_counter() - t0
        dom = page.evaluate(OUTPUTS_JS)
        shot = _screenshot(page, lesson)
    finally:
        page.close()
        lab.shutdown_kernels()

    where = f"{lesson} (screenshot: {shot.relative_to(ROOT)})"
    # 1. no error output, and every code cell ran
    errors = [f"{_label(saved, i)}: {o.get('ename')}: {o.get('evalue')}"
              for i, c in enumerate(saved.cells) if c.cell_type == "code"
              for o in c.outputs if o.get("output_type") == "error"]
    not_run = [_label(saved, i) for i, c in enumerate(saved.cells)
               if c.cell_type == "code" and c.source.strip() and c.execution_count is None]
    if not EXTRA_PARAMS:  # the solution run with the CI parameters: tests/test_notebooks.py reads it too
        problem = "; ".join(errors) or (f"these cells never ran: {not_run}" if not_run else "")
        solution_runs.put(course.RunResult(lesson, "failed" if problem else "ok", seconds, path,
                                           f"{lesson} in JupyterLab: {problem}" if problem else "",
                                           course.graded_cells(saved)), "JupyterLab in Chromium (tests/test_browser.py)")
    assert len(dom) == len(saved.cells), f"{where}: the page shows {len(dom)} cells, the notebook has {len(saved.cells)}"
    assert not errors, f"{where}: cells failed in JupyterLab:\n  " + "\n  ".join(errors)
    assert not not_run, f"{where}: these cells never ran: {not_run}"

    # 2. widgets are widgets
    shown_widgets = 0
    for i, (cell, view) in enumerate(zip(saved.cells, dom)):
        kernel_widgets = sum(1 for o in cell.get("outputs", []) if WIDGET_MIME in o.get("data", {}))
        assert view["widgets"] >= kernel_widgets, (
            f"{where}: {_label(saved, i)} displayed {kernel_widgets} widget(s) but the page renders "
            f"{view['widgets']} as widgets (found instead: {view['text'][:300]!r}); is the "
            f"@jupyter-widgets/jupyterlab-manager extension installed and enabled?")
        shown_widgets += view["widgets"]
        plain = WIDGET_AS_TEXT.search(view["text"])
        assert not plain, f"{where}: {_label(saved, i)} shows a widget as text: {plain.group(0)!r}"
    code_cells = "\n".join(c.source for c in saved.cells if c.cell_type == "code")
    if USES_WIDGETS.search(code_cells):
        assert shown_widgets, f"{where}: the lesson's code uses widgets but none rendered on the page"

    # 3. plots are images
    shown_images = 0
    for i, (cell, view) in enumerate(zip(saved.cells, dom)):
        kernel_images = sum(1 for o in cell.get("outputs", []) if "image/png" in o.get("data", {})
                            or "image/svg+xml" in o.get("data", {}))
        figure_text = [o for o in cell.get("outputs", []) if set(o.get("data", {})) == {"text/plain"}
                       and str(o["data"]["text/plain"]).startswith("<Figure size")]
        assert not figure_text, (f"{where}: {_label(saved, i)} shows a figure as text ({figure_text[0]['data']['text/plain']!r}): "
                                 "matplotlib is not using the inline backend (is MPLBACKEND set?)")
        assert view["images"] >= kernel_images, (
            f"{where}: {_label(saved, i)} produced {kernel_images} image(s), the page shows {view['images']}")
        shown_images += view["images"]
    if USES_PLOTS.search(code_cells):
        assert shown_images, f"{where}: the lesson plots but no image rendered on the page"

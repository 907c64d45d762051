"""How the kit installs (lib/lorakit/install.py and bootstrap.py, the Makefile, pyproject.toml, environment.yml):
the learner's install is light, a machine without a GPU gets the CPU build of torch, the lock is what runs here,
bad input gets one line naming the fix, and offline is set only where it belongs (tests and CI)."""

from __future__ import annotations

import ast
import functools
import http.server
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement

import lorakit
from lorakit import cli, course, env, install, runner, sweep
from lorakit.tooling import bootstrap

ROOT = course.course_root()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# What must never reach a learner's (or Colab's) runtime: a second Jupyter stack and the grader's tools.
INSTRUCTOR_ONLY = {"nbgrader", "jupyterlab", "notebook", "jupyter-server", "jupyterlab-server", "nbconvert",
                   "notebook-shim", "jupyter-lsp", "alembic", "sqlalchemy"}


def _names(reqs) -> set[str]:
    return {install.normalize(Requirement(r).name) for r in reqs}


# --------------------------------------------------------------------------------- the project file

def test_one_version_string_a_license_and_the_python_the_code_needs():
    assert "version" in PROJECT.get("dynamic", []) and "version" not in PROJECT, \
        "the version is written once, in lorakit/__init__.py (pyproject reads it: dynamic = ['version'])"
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lorakit.__version__"}
    assert md.version("lorakit") == lorakit.__version__
    assert PROJECT["license"] == "MIT" and "MIT License" in (ROOT / "LICENSE").read_text()
    need = bootstrap.requires_python()
    assert PROJECT["requires-python"] == f">={need[0]}.{need[1]}"
    # Every locked package must install on the lowest Python the kit claims (numpy 2.3+ and pandas 3 need
    # 3.11), and the tests use tomllib (3.11).
    too_new = bootstrap.too_new_for(need)
    assert not too_new, (f"these installed (locked) packages cannot install on Python {need[0]}.{need[1]}.0, "
                         f"which requires-python admits: {too_new}: add them to HOLD in the Makefile, `make lock`")


def test_extras_build_on_each_other():
    extras = PROJECT["optional-dependencies"]
    assert set(extras) == {"lab", "instructor", "dev"}
    assert "lorakit[lab]" in extras["instructor"] and "lorakit[instructor]" in extras["dev"]
    assert not _names(PROJECT["dependencies"]) & INSTRUCTOR_ONLY, "the learner's install lists an instructor tool"


def _imports(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


@functools.cache
def _provides() -> dict:
    return md.packages_distributions()  # scans every installed distribution: once


def _distribution(module: str) -> str | None:
    if module in sys.stdlib_module_names or module in ("lorakit", "__future__"):
        return None
    dists = _provides().get(module)
    assert dists, f"{module!r} is imported but no installed distribution provides it"
    return install.normalize(dists[0])


def test_every_import_is_declared_where_it_is_used():
    """The lessons, the experiment notebook and the library outside grading/ import only what the learner's
    install declares; grading/ may also use the instructor's extra. (Transitive presence is not enough:
    a declared package is one a later release of a dependency cannot take away.)"""
    base = _names(PROJECT["dependencies"])
    instructor = base | _names(PROJECT["optional-dependencies"]["instructor"])
    undeclared = []
    sources = [(p, p.read_text(), base if "grading" not in p.parts else instructor)
               for p in (ROOT / "lib" / "lorakit").rglob("*.py")]
    for nb_path in [*ROOT.glob("solutions/*/*.ipynb"), ROOT / "lib/lorakit/experiments/finetune_experiment.ipynb"]:
        nb = nbformat.read(nb_path, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code" and not c.source.lstrip().startswith(("%", "!")))
        sources.append((nb_path, code, base))
    for path, source, allowed in sources:
        # a script's import of a file beside it (none today: tooling/bootstrap.py loads install.py by its path)
        for module in _imports(source) - {p.stem for p in path.parent.glob("*.py")}:
            dist = _distribution(module)
            if dist and dist not in allowed:
                undeclared.append(f"{path.relative_to(ROOT)}: {module} ({dist})")
    assert not undeclared, "imports that pyproject.toml does not declare for that place:\n  " + "\n  ".join(sorted(set(undeclared)))


# ------------------------------------------------------------------------------------ the lock

def test_this_environment_runs_the_lock():
    """`make` installed exactly the locked versions, and nothing the lock leaves out: a package installed by
    hand, or a dependency added to pyproject.toml without `make lock`, shows up here."""
    lock_path = install.LOCK
    lock = install.read_lock(lock_path)
    running = {install.normalize(d.metadata["Name"]): d.version for d in install.installed()
               if install.normalize(d.metadata["Name"]) not in bootstrap.NOT_LOCKED}
    assert len(running) > 100, "the environment's site-packages were not found"
    unlocked = sorted(set(running) - set(lock))
    assert not unlocked, f"installed but not in {lock_path.name}: {unlocked}: run `make lock` (or remove them)"
    wrong = {n: (v, lock[n]) for n, v in running.items() if install.base_version(v) != lock[n]}
    assert not wrong, f"installed versions differ from {lock_path.name} (installed, locked): {wrong}"
    assert "+" not in lock["torch"], "torch is locked without a build label, so GPU machines get the CUDA build"
    for text in PROJECT["dependencies"]:
        req = Requirement(text)
        assert req.specifier.contains(lock[install.normalize(req.name)], prereleases=True), \
            f"the lock pins {req.name} {lock[install.normalize(req.name)]}, outside pyproject's {req.specifier}"


def test_lock_files_are_read_strictly_and_upgrades_free_named_pins(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("# comment\ntorch>=2.4\n")
    with pytest.raises(install.InstallError, match="not a 'name==version' line"):
        install.read_lock(bad)
    good = tmp_path / "lock.txt"
    good.write_text("torch==2.13.0\nTransformers==5.24.0\npeft==0.21.2  # a comment\n")
    assert install.read_lock(good) == {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"}
    assert bootstrap.pins_to_keep("peft", good) == "torch==2.13.0\ntransformers==5.24.0\n"
    assert bootstrap.pins_to_keep("all", good) == "torch==2.13.0\n", "UPGRADE=all keeps torch unless named"
    assert bootstrap.pins_to_keep("all torch", good) == ""
    assert bootstrap.pins_to_keep("all", good, hold="soupsieve<3  bar>1") == "torch==2.13.0\nsoupsieve<3\nbar>1\n"
    with pytest.raises(install.InstallError, match="does not pin"):
        bootstrap.pins_to_keep("nosuch", good)


def test_environment_yml_is_generated_from_pyproject():
    committed = (ROOT / "environment.yml").read_text()
    assert committed == bootstrap.environment_yml(), \
        "environment.yml differs from what pyproject.toml gives: run `make lock` (or lib/lorakit/tooling/bootstrap.py environment)"
    import yaml
    spec = yaml.safe_load(committed)
    conda = {d.split()[0] for d in spec["dependencies"] if isinstance(d, str)}
    declared = _names(PROJECT["dependencies"] + PROJECT["optional-dependencies"]["lab"])
    assert {bootstrap.CONDA_NAMES.get(n, n) for n in declared if n not in bootstrap.PIP_ONLY} <= conda
    assert not set(bootstrap.PIP_ONLY) & conda, "bitsandbytes: conda-forge has linux-64 builds only; pip installs it"
    assert spec["dependencies"][-1] == {"pip": ["-e .[lab]"]} and "conda-forge" in spec["channels"]


# ---------------------------------------------------------------------------- what pip resolves

def _resolve(tmp_path, requirement: str) -> dict[str, str]:
    """pip's resolution of `requirement` from scratch, with exactly the arguments `make` uses."""
    args, why = bootstrap.pip_args(install.LOCK)
    report = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          "--report", str(report), *args, requirement],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"pip could not resolve {requirement} ({why}):\n{res.stderr[-3000:]}"
    items = json.loads(report.read_text())["install"]
    return {install.normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


@pytest.mark.slow
@pytest.mark.hardware  # its last part is about a machine without an NVIDIA GPU
def test_learner_install_is_light_and_gets_cpu_torch_without_a_gpu(tmp_path):
    """What `pip install lorakit` (and Colab) resolves: the lessons' stack, no second Jupyter stack and none of
    the grader's tools; and on a machine without an NVIDIA GPU, with make's arguments, a CPU build of torch."""
    resolved = _resolve(tmp_path, str(ROOT))
    print(f"the learner install resolves {len(resolved)} packages: {', '.join(sorted(resolved))}")
    assert not set(resolved) & INSTRUCTOR_ONLY, f"instructor tools in the learner install: {set(resolved) & INSTRUCTOR_ONLY}"
    assert _names(PROJECT["dependencies"]) <= set(resolved)
    lab = _resolve(tmp_path, f"{ROOT}[lab]")
    assert "jupyterlab" in lab and "nbgrader" not in lab
    if install.has_nvidia_gpu():
        pytest.skip("this machine has an NVIDIA GPU: the CUDA build is the right one here")
    assert resolved["torch"].endswith("+cpu"), f"without a GPU make resolves torch {resolved['torch']}, not a CPU build"
    assert not [n for n in resolved if n.startswith("nvidia-")], "CUDA libraries in a CPU install"


# ------------------------------------------------------------------------------- torch's index

class _Server:
    """A local HTTP server whose handler answers, or hangs."""

    def __init__(self, hang: float = 0.0):
        hang_for = hang

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                time.sleep(hang_for)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"<a href='torch-2.13.0+cpu.whl'>torch</a>")

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_cpu_index_is_added_when_it_answers_and_skipped_quickly_when_not(monkeypatch):
    monkeypatch.setattr(install, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(sys, "platform", "linux")
    up, hung = _Server(), _Server(hang=10)
    try:
        monkeypatch.setattr(install, "CPU_INDEX", up.url)
        args, why = bootstrap.pip_args("L.txt")
        assert args == ["-c", "L.txt", "--extra-index-url", up.url] and "CPU build" in why
        # the hung index would answer after 10 s: "did not answer" means the 1 s probe gave up without it
        monkeypatch.setattr(install, "CPU_INDEX", hung.url)
        args, why = bootstrap.pip_args("L.txt", timeout=1.0)
        assert args == ["-c", "L.txt"] and "did not answer" in why and "rm -rf .venv" in why
        monkeypatch.setattr(install, "CPU_INDEX", "http://nonexistent.invalid/whl/cpu")
        args, why = bootstrap.pip_args("L.txt", timeout=1.0)
        assert args == ["-c", "L.txt"] and "did not answer" in why
    finally:
        up.close()
        hung.close()
    # a GPU machine, macOS, or the user's own indexes: no probe, no CPU index
    monkeypatch.setattr(bootstrap, "answers", lambda *a: pytest.fail("probed although it should not"))
    assert bootstrap.pip_args("L.txt", ["--index-url", "https://mirror/simple"])[0] == ["-c", "L.txt", "--index-url", "https://mirror/simple"]
    monkeypatch.setattr(sys, "platform", "darwin")
    assert bootstrap.pip_args("L.txt")[0] == ["-c", "L.txt"]
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(install, "has_nvidia_gpu", lambda: True)
    assert bootstrap.torch_index() == (None, "an NVIDIA GPU is present: pip's default torch (the CUDA build)")


def test_gpu_is_detected_with_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-x)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert install.has_nvidia_gpu()
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\nexit 9\n")
    assert not install.has_nvidia_gpu()


# ------------------------------------------------------------------------------------- bad input

def _installer(*args, python=sys.executable, env=None) -> subprocess.CompletedProcess:
    """bootstrap.py as make runs it: a script, and with -S (no site-packages) as on a system Python before .venv
    exists, so that nothing but the standard library and install.py beside it can be imported."""
    return subprocess.run([python, "-S", str(ROOT / "lib/lorakit/tooling/bootstrap.py"), *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_bad_input_gets_one_line_naming_the_fix_and_no_venv(tmp_path):
    venv = tmp_path / "venv"
    res = _installer("venv", "--venv", str(venv), "--extra", "instuctor")
    assert res.returncode == 2 and not venv.exists()
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert "unknown extra 'instuctor': choose one of lab, instructor, dev" in res.stderr
    res = _installer("venv", "--venv", str(venv), "--lock", str(tmp_path / "missing.txt"))
    assert res.returncode == 2 and "the lock" in res.stderr and "git checkout" in res.stderr and not venv.exists()


def test_a_too_old_python_is_told_which_to_use():
    with pytest.raises(install.InstallError, match=r"needs Python 3\.11 or newer, and python3 is 3\.10\.13: .*PYTHON=python3\.11"):
        bootstrap.check_python((3, 10, 13))
    bootstrap.check_python((3, 11, 0))
    old = shutil.which("python3.10") and subprocess.run(["python3.10", "-c", "pass"], capture_output=True).returncode == 0
    if old:  # the real thing, where an older Python is at hand: the installer itself runs on it to say so
        res = _installer("venv", "--venv", "/nonexistent/venv", "--python-name", "python3.10", python="python3.10")
        assert res.returncode == 2 and "needs Python 3.11 or newer" in res.stderr


def test_the_running_kit_does_not_import_the_make_only_tooling():
    """install.py answers what a running kit needs; bootstrap.py (the venv, `make lock`) builds on it, never the
    other way round, and the two share no code: bootstrap imports install's lock reader and error type."""
    tree = ast.parse(Path(install.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if "bootstrap" in m or m.startswith("lorakit")}, imported
    defined = {n.name for n in ast.parse(Path(bootstrap.__file__).read_text()).body if isinstance(n, ast.FunctionDef)}
    assert not defined & set(install.__all__) - {"main"}, f"defined in both: {defined & set(install.__all__)}"


def test_verify_after_an_install(capsys):
    """`python -m lorakit.install verify` (what make runs in a new .venv; `check` is its earlier name)."""
    assert install.main(["verify"]) == 0
    assert "every locked package at its tested version" in capsys.readouterr().err
    assert install.main(["check"]) == 0


def test_half_built_venv_is_not_trusted(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    assert not bootstrap.usable(venv)  # no python at all
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (venv / "bin" / "python").chmod(0o755)
    assert not bootstrap.usable(venv)  # a python that cannot import pip (interrupted `python -m venv`)
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(sys.executable)
    assert bootstrap.usable(venv)


def test_pip_failures_are_explained():
    assert "make lock" in bootstrap._hint("ERROR: ResolutionImpossible: ... conflict is caused by")
    assert "torch" in bootstrap._hint("ERROR: No matching distribution found for torch==9.9")
    assert "network" in bootstrap._hint("Connection to pypi.org timed out")


def test_missing_extra_names_the_extra(monkeypatch, capsys):
    real = md.version

    def version(name):
        if install.normalize(name) == "nbgrader":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "version", version)
    assert cli.main(["lessons"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lorakit lessons: needs nbgrader, which comes with lorakit[instructor]: "
                   "pip install 'lorakit[instructor]' (in a checkout, make test installs it)")
    assert install.missing_for("dev") == ["nbgrader"]  # dev includes instructor includes lab
    monkeypatch.setattr(md, "version", real)
    assert install.missing_for("dev") == []


HIDE_INSTRUCTOR_TOOLS = """
import sys
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nbgrader", "nbconvert", "jupyterlab", "notebook", "jupyter_server"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: a learner's install)", name=name)
sys.meta_path.insert(0, _Hide())
"""


@pytest.mark.slow
def test_lorakit_check_works_from_a_learners_install(tmp_path):
    """`lorakit check` is for learners (the README's Colab steps use it): it must run without the
    instructor's extra. Every Python process of the run gets the instructor tools hidden."""
    (tmp_path / "sitecustomize.py").write_text(HIDE_INSTRUCTOR_TOOLS)
    environ = {**os.environ, "PYTHONPATH": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "lorakit.cli", "check", str(course.lesson_path("00_setup"))],
                         capture_output=True, text=True, timeout=600, env=environ, cwd=tmp_path)
    assert "hidden: a learner's install" not in res.stdout + res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
    assert "visible checks:" in res.stdout and res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]


# ------------------------------------------------------------------------- tested vs running

def test_env_prints_tested_beside_running_and_warns_when_they_differ(monkeypatch, capsys):
    lines = {l.item: l for l in env.version_lines()}
    assert lines["torch"].status == "OK" and f"(tested {install.tested()['torch']})" in lines["torch"].value
    tested = dict(install.tested(), transformers="4.99.0")
    monkeypatch.setattr(install, "tested", lambda path=None: tested)
    lines = {l.item: l for l in env.version_lines()}
    assert lines["transformers"].status == "warning" and "tested 4.99.0" in lines["transformers"].value
    env.print_versions()
    assert f"transformers {md.version('transformers')} (tested 4.99.0)" in capsys.readouterr().out


def test_a_package_outside_the_supported_range_is_missing_with_its_fix(monkeypatch):
    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "2.99.0" if name == "torch" else real(name))
    assert ("torch", "2.99.0", "<2.15,>=2.4") in install.out_of_range()
    line = next(l for l in env.version_lines() if l.item == "torch")
    assert line.status == "missing"
    assert line.value == f"2.99.0 is outside the range lorakit supports (<2.15,>=2.4): pip install 'torch=={install.tested()['torch']}'"


def test_instructor_tools_are_optional_for_learners(monkeypatch):
    real = md.version

    def version(name):
        if name in env.INSTRUCTOR_TOOLS:
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "version", version)
    line = next(l for l in env.version_lines() if l.item == "nbgrader")
    assert line.status == "OK" and "lorakit[instructor]" in line.value


# ------------------------------------------------------------------------------------------ Colab

def test_colab_keeps_its_torch_in_range_and_pins_the_course_stack():
    lock = install.tested()
    pins, why = install.colab_constraints("2.8.0+cu126")
    assert "torch" not in pins and "keeping Colab's torch 2.8.0+cu126" in why
    assert pins == {n: lock[n] for n in install.COURSE_STACK if n != "torch"}
    pins, why = install.colab_constraints("2.99.0+cu130")
    assert pins["torch"] == lock["torch"] and "outside lorakit's range" in why and "restart" in why
    assert install.requirements() and all("extra" not in r for r in install.requirements())
    assert _names(install.requirements()) == _names(PROJECT["dependencies"])


def test_colab_install_runs_pip_with_the_pins(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, *a, **k):
        constraints = Path(cmd[cmd.index("-c") + 1]).read_text()
        calls.append((cmd, constraints))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(install.subprocess, "run", fake_run)
    assert install.colab() == 0
    [(cmd, constraints)] = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert cmd[cmd.index("-c") + 2:] == install.requirements()
    assert f"transformers=={install.tested()['transformers']}" in constraints
    assert "torch==" not in constraints  # this machine's torch is in range: kept


# ------------------------------------------------------------------------------------------ offline

NOTEBOOK_ENV = """
import json, os, pathlib
pathlib.Path(RESULT_JSON).write_text(json.dumps({"offline": os.environ.get("HF_HUB_OFFLINE")}))
"""


def _env_notebook(tmp_path) -> Path:
    params = "\n".join(f"{name} = None" for name in sweep.NOTEBOOK_NAMES.values()) + "\nRESULT_JSON = ''"
    path = tmp_path / "env.ipynb"
    course.write_clean(course.notebook([course.parameters(params), course.code(NOTEBOOK_ENV)]), path)
    return path


@pytest.mark.slow  # starts notebook kernels (the first one ~5 s)
@pytest.mark.parametrize("offline", [None, "1"])
def test_kernels_inherit_the_callers_environment_and_nothing_sets_it(offline, tmp_path, monkeypatch):
    """lorakit run / sweep no longer set HF_HUB_OFFLINE process-wide: a kernel sees what its caller has
    (tests and CI: offline; a learner with --set MODEL_ID=<hub id>: free to download)."""
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    before = dict(os.environ)
    nb = _env_notebook(tmp_path)
    cfg = sweep.load_grid({"studies": {"one": {"r": 2}}}).configs[0]
    row = sweep.run_config(cfg, tmp_path / "sweep", {}, notebook=nb)
    assert row["status"] == "ok", row["error"]
    assert row["offline"] == offline
    result = tmp_path / "lesson.json"
    runner.execute(nb, tmp_path / "out.ipynb", {"RESULT_JSON": str(result)})
    assert json.loads(result.read_text())["offline"] == offline
    assert dict(os.environ) == before, "running notebooks changed this process's environment"


BLOCKED = """
import socket, sys
attempts = []
def refuse(self, address, *a, **k):
    attempts.append(address)
    raise OSError("network blocked by the test")
socket.socket.connect = refuse
from lorakit.data import load_task
from lorakit.models import load_base
model, tokenizer = load_base()
q4, _ = load_base(quantization="nf4", device="cpu")
task = load_task("who_found")
print("loaded", type(model).__name__, len(task["train"]), "ATTEMPTS", attempts)
sys.exit(1 if attempts else 0)
"""


@pytest.mark.slow
def test_embedded_model_loads_without_the_hub_and_without_offline_set():
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    res = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=300, env=environ)
    assert res.returncode == 0, f"loading the embedded model tried the network or failed:\n{res.stdout}\n{res.stderr[-3000:]}"
    assert "loaded LlamaForCausalLM" in res.stdout


# ---------------------------------------------------------------------------------- the Makefile

def _fake_venv(tmp_path) -> Path:
    """A venv whose stamps are fresh and whose programs print the environment they were started with."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    dump = "#!/bin/sh\necho HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-unset} TQDM_MININTERVAL=${TQDM_MININTERVAL:-unset} ARGS=\"$*\"\n"
    for prog in ("python", "jupyter", "lorakit"):
        (venv / "bin" / prog).write_text(dump)
        (venv / "bin" / prog).chmod(0o755)
    for extra in ("lab", "dev"):
        (venv / f".installed-{extra}").touch()
    return venv


def _make(target, venv, **env_extra) -> str:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("HF_HUB_OFFLINE", "TQDM_MININTERVAL", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    environ.update(env_extra)
    res = subprocess.run(["make", "--no-print-directory", "-s", target, f"VENV={venv}"], cwd=ROOT, env=environ,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.skipif(not shutil.which("make"), reason="no make on this machine")
def test_offline_only_for_tests_and_quiet_progress_bars_in_logs(tmp_path):
    venv = _fake_venv(tmp_path)
    lab = _make("lab", venv)
    assert "HF_HUB_OFFLINE=unset" in lab, "make lab must let a learner download the hub model they ask for"
    assert "HF_HUB_OFFLINE=1" in _make("test", venv) and "HF_HUB_OFFLINE=1" in _make("test-fast", venv)
    # stderr is a pipe here, as in CI and benchmark logs: tqdm redraws every 30 s, not every step
    assert "TQDM_MININTERVAL=30" in _make("test", venv)
    fast = _make("test-fast", venv)
    assert 'ARGS=-m pytest -m not notebooks and not browser and not slow --slow-after=' in fast
    assert "--slow-after" not in _make("test", venv), "CI must not fail on a wall-clock time (noisy machines)"
    assert "TQDM_MININTERVAL=5" in _make("test", venv, TQDM_MININTERVAL="5"), "a user's own setting wins"


def test_ci_runs_the_full_suite_through_make():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M) and "HF_HUB_OFFLINE=1" in ci
    assert re.search(r"^export CI=true$", ci, re.M), "in CI a skipped test fails (tests/conftest.py): .ci/run says it is CI"
    makefile = (ROOT / "Makefile").read_text()
    assert not re.search(r"^export HF_HUB_OFFLINE", makefile, re.M)


# ------------------------------------------------------------------------------------ what ships

def test_no_path_of_the_build_machine_ships_in_the_package():
    """Shipped text files (model card, training arguments, grids, data) carry no absolute path of the machine
    they were made on."""
    pkg = ROOT / "lib" / "lorakit"
    pattern = re.compile(r"""["'\s(=:](/(?:work|home|root|tmp|Users|mnt|var|opt)/[^\s"')]+)""")
    found = []
    for p in pkg.rglob("*"):
        if not p.is_file() or p.suffix in (".py", ".pyc", ".safetensors") or "__pycache__" in p.parts:
            continue
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{p.relative_to(ROOT)}: {m.group(1)}" for m in pattern.finditer(text)]
        if str(ROOT) in text:
            found.append(f"{p.relative_to(ROOT)}: {ROOT}")
    assert not found, "absolute paths in shipped files:\n  " + "\n  ".join(found)

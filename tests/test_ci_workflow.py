"""The repository's GitHub Actions workflow runs the same path as every other CI run, `bash .ci/run`, so the two
cannot drift apart: nothing in the workflow runs the tests another way, .ci/run installs Chromium and
PostgreSQL and runs `make test`, the job's Python is one the kit supports (the lock's minor version), and
pip's downloads are cached on a key that changes with the lock."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lorakit import course, install
from lorakit.tooling import bootstrap

ROOT = course.course_root()
WORKFLOWS = ROOT / ".github" / "workflows"


def _workflows() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(WORKFLOWS.glob("*.yml"))}


@pytest.fixture(scope="module")
def ci() -> dict:
    flows = _workflows()
    assert "ci.yml" in flows, f"no .github/workflows/ci.yml (found {sorted(flows)})"
    return flows["ci.yml"]


def _steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def test_the_workflow_runs_on_pushes_and_pull_requests(ci):
    triggers = ci.get("on", ci.get(True))   # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers), triggers


def test_every_job_tests_through_ci_run_and_nothing_else(ci):
    runs = [(name, step["run"].strip()) for name, job in ci["jobs"].items() for step in _steps(job) if "run" in step]
    assert runs and all(cmd == "bash .ci/run" for _, cmd in runs), runs
    for name, job in ci["jobs"].items():
        assert str(job["runs-on"]).startswith("ubuntu-"), f"{name}: a Linux runner (its container is Debian)"


def test_ci_run_installs_chromium_and_postgresql_and_runs_make_test():
    text = (ROOT / ".ci" / "run").read_text()
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert "bash tests/install_chromium.sh" in lines and "bash tests/install_postgresql.sh" in lines, lines
    assert lines[-1] == "make test", lines


def test_the_job_runs_a_python_the_lock_was_tested_with(ci):
    [job] = [j for j in ci["jobs"].values() if any(s.get("run", "").strip() == "bash .ci/run" for s in _steps(j))]
    image = job["container"]["image"]
    m = re.fullmatch(r"python:(\d+)\.(\d+)-(bookworm|trixie)", image)
    assert m, f"{image}: a Debian image of the python Docker library (.ci/run's install scripts use apt and Debian's packages)"
    locked = re.search(r"with Python (\d+)\.(\d+)", install.LOCK.read_text())
    assert (m.group(1), m.group(2)) == locked.groups(), (image, locked.group(0))
    assert tuple(map(int, m.groups()[:2])) >= bootstrap.requires_python(ROOT)
    assert "--privileged" in job["container"].get("options", ""), "the sandbox needs namespaces and cgroups"


def test_pip_downloads_are_cached_on_the_lock(ci):
    [job] = [j for j in ci["jobs"].values() if any(s.get("run", "").strip() == "bash .ci/run" for s in _steps(j))]
    caches = [s for s in _steps(job) if str(s.get("uses", "")).startswith("actions/cache@")]
    assert len(caches) == 1, _steps(job)
    cache = caches[0]["with"]
    assert cache["path"] == job["env"]["PIP_CACHE_DIR"], (cache, job.get("env"))
    assert "lib/lorakit/tested.txt" in cache["key"] and "pyproject.toml" in cache["key"], cache["key"]
    names = [s.get("uses", s.get("run", "")) for s in _steps(job)]
    assert names.index(caches[0]["uses"]) < names.index("bash .ci/run"), "the cache is restored before the install"

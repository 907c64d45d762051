"""Rules every test file follows.

- In CI (the `CI` environment variable set, as `.ci/run` does), a skipped test is a failure, unless it is
  marked `gpu` or `hardware` (it needs a machine CI is not). A test of a real component that could not be
  installed (Chromium, PostgreSQL: marked `installed_by("install_chromium")`) then fails with the last lines
  of its install log. On a contributor's machine the same tests skip and say why.
- `--slow-after SECONDS` (`make test-fast` passes it): a test whose setup and run take longer than that
  without the `slow`, `notebooks` or `browser` mark fails, saying which mark to add, so that a new or renamed
  long test cannot slip into `make test-fast`. CI's `make test` does not pass it: a wall-clock limit on a
  loaded or slower machine would fail work that is right. Slow tests carry their mark where they are defined.
- Each solution notebook is executed once per session with the CI parameters (`solution_runs`): the browser
  test's JupyterLab run is the run tests/test_notebooks.py reads; a lesson not run there runs with papermill.
"""

import os
from pathlib import Path

import pytest

# Tests never reach a model hub: everything the course loads is embedded in the kit.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
INSTALL_LOGS = ROOT / "build" / "install"  # tests/apt_install.sh writes one log per install script here
MAY_SKIP_IN_CI = ("gpu", "hardware")
LONG_MARKS = ("slow", "notebooks", "browser")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_addoption(parser):
    parser.addoption("--slow-after", type=float, default=None, metavar="SECONDS",
                     help="fail a test that takes longer than SECONDS (setup and run) without the slow, notebooks "
                          "or browser mark")


def _install_log_tail(item, lines: int = 15) -> str:
    marker = item.get_closest_marker("installed_by")
    if marker is None:
        return ""
    name = marker.args[0]
    log = INSTALL_LOGS / f"{name}.log"
    if not log.is_file():
        return f"\nNo install log at {log.relative_to(ROOT)}: did .ci/run call tests/{name}.sh?"
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\nThe last lines of {log.relative_to(ROOT)}:\n  " + "\n  ".join(tail)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "setup":
        item._setup_seconds = call.duration
    if report.skipped and not hasattr(report, "wasxfail") and in_ci() \
            and not any(item.get_closest_marker(m) for m in MAY_SKIP_IN_CI):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI, which counts as a failure there (only tests marked "
                           f"{' or '.join(MAY_SKIP_IN_CI)} may skip in CI): {reason}{_install_log_tail(item)}")
        return
    limit = item.config.getoption("slow_after")
    if report.when == "call" and report.passed and limit is not None \
            and not any(item.get_closest_marker(m) for m in LONG_MARKS):
        setup = getattr(item, "_setup_seconds", 0.0)
        if setup + call.duration > limit:
            report.outcome = "failed"
            report.longrepr = (f"this test took {setup + call.duration:.1f} s (setup {setup:.1f} s) without a long-test "
                               f"mark, and `make test-fast` runs every unmarked test, which may take at most {limit:g} s: "
                               f"mark it @pytest.mark.slow where it is defined (or make it faster)")


class SolutionRuns:
    """Executed solution notebooks (`lorakit.course.RunResult`), one execution per lesson and session, shared
    by the tests that read them; `how` says what ran each one."""

    def __init__(self, folder: Path):
        self.folder, self.results, self.how = folder, {}, {}

    def put(self, result, how: str) -> None:
        self.results[result.lesson], self.how[result.lesson] = result, how

    def get(self, lesson: str):
        if lesson not in self.results:
            from lorakit import course
            [result] = course.run_lessons([lesson], str(ROOT / ".ci" / "params.yml"), self.folder, echo=None)
            self.put(result, "papermill (lorakit.course.run_lessons)")
        return self.results[lesson]


@pytest.fixture(scope="session")
def solution_runs(tmp_path_factory) -> SolutionRuns:
    return SolutionRuns(tmp_path_factory.mktemp("solution-runs"))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import (`pytest.importorskip`, `allow_module_level=True`) counts too."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"{collector.nodeid}: a module skipped in CI, which counts as a failure there: {reason}"

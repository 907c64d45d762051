"""The suite's own rules (tests/conftest.py), run on small test files: in CI a skip fails unless the test needs
hardware CI lacks, quoting the install log of a real component; a long test without its mark fails when a
limit is given; on a contributor's machine a skip stays a skip."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py").read_text()
MARKERS = """[pytest]
markers =
    gpu: a
    hardware: b
    slow: c
    installed_by(script): d
"""
TESTS = """
import time
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("no frobnicator here")

@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.hardware
@pytest.mark.skipif(True, reason="only on an AVX512-BF16 CPU")
def test_needs_a_cpu_feature():
    pass

@pytest.mark.installed_by("install_frob")
def test_a_real_component():
    pytest.skip("the frobnicator is not installed")

@pytest.mark.xfail(reason="known")
def test_expected_to_fail():
    assert False

def test_long():
    time.sleep(0.25)

@pytest.mark.slow
def test_long_and_marked():
    time.sleep(0.25)
"""


@pytest.fixture
def suite(pytester):
    pytester.makefile(".ini", pytest=MARKERS)
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "conftest.py").write_text(CONFTEST)
    (pytester.path / "tests" / "test_x.py").write_text(TESTS)
    log = pytester.path / "build" / "install" / "install_frob.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(30)) + "E: Unable to locate package frob\n")
    return pytester


def test_on_a_laptop_skips_stay_skips(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest("tests", "-rs")
    result.assert_outcomes(passed=3, skipped=4, xfailed=1)
    result.stdout.fnmatch_lines(["*no frobnicator here*"])


def test_in_ci_a_skip_fails_unless_it_needs_hardware(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest("tests")
    result.assert_outcomes(passed=3, skipped=2, failed=2, xfailed=1)
    out = result.stdout.str()
    failed = sorted(line.split("::")[1].split(" ")[0] for line in out.splitlines() if line.startswith("FAILED"))
    assert failed == ["test_a_real_component", "test_skips"], out
    result.stdout.fnmatch_lines(["*skipped in CI*no frobnicator here*"])
    # the real component's failure quotes the end of its install log
    result.stdout.fnmatch_lines(["*the frobnicator is not installed*", "*build/install/install_frob.log*",
                                 "*E: Unable to locate package frob*"])
    assert "line 3\n" not in out, "only the log's last lines"


def test_ci_false_is_not_ci(suite, monkeypatch):
    monkeypatch.setenv("CI", "false")
    suite.runpytest("tests").assert_outcomes(passed=3, skipped=4, xfailed=1)


def test_a_long_test_without_its_mark_fails_when_a_limit_is_given(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest("tests", "--slow-after=0.1")
    result.assert_outcomes(passed=2, failed=1, skipped=4, xfailed=1)
    result.stdout.fnmatch_lines(["*took * s*without a long-test mark*@pytest.mark.slow*", "FAILED *::test_long - *"])
    assert "test_long_and_marked - " not in result.stdout.str()


def test_a_module_skipped_at_import_fails_in_ci(suite, monkeypatch):
    (suite.path / "tests" / "test_gone.py").write_text("import pytest\npytest.importorskip('no_such_module_x')\n")
    monkeypatch.setenv("CI", "1")
    result = suite.runpytest("tests/test_gone.py")
    result.stdout.fnmatch_lines(["*a module skipped in CI*no_such_module_x*"])
    assert result.ret != 0

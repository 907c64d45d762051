"""Every solution notebook runs top to bottom with the CI parameters and passes its own tests; every
graded test cell fails on the untouched student version (no test passes on `raise NotImplementedError()`),
and Run All on that student version raises nowhere but in those test cells: a cell that shows a learner's
function at work uses the kit's reference while the exercise is open (`lorakit.checks.yours_or_kit`).

A solution is executed once per session (tests/conftest.py's `solution_runs`): the run tests/test_browser.py
made in JupyterLab when it ran, otherwise papermill's. Checks on a run go in the test that reads it."""

import nbformat
import pytest

from lorakit import course

LESSONS = course.lessons()
CI_PARAMS = str(course.course_root() / ".ci" / "params.yml")
pytestmark = pytest.mark.notebooks


@pytest.mark.parametrize("lesson", LESSONS)
def test_solution_runs_and_passes_its_tests(lesson, solution_runs):
    result = solution_runs.get(lesson)
    how = f"(run by {solution_runs.how[lesson]}, executed copy: {result.output})"
    assert result.status == "ok", f"{result.error} {how}"
    failed = [(gid, err) for gid, ok, err in result.graded if not ok]
    assert result.graded and not failed, f"{lesson}: graded cells failed on the solution: {failed} {how}"


@pytest.mark.parametrize("lesson", LESSONS)
def test_every_graded_cell_fails_on_the_student_version(lesson, tmp_path):
    [result] = course.run_lessons([lesson], CI_PARAMS, tmp_path, student=True, echo=None)
    assert result.status == "ok", result.error
    solution = nbformat.read(course.solution_path(lesson), as_version=4)
    expected = [c.metadata["nbgrader"]["grade_id"] for c in solution.cells
                if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade")]
    assert [gid for gid, _, _ in result.graded] == expected, f"{lesson}: the student version lost graded cells"
    vacuous = [gid for gid, ok, _ in result.graded if ok]
    assert not vacuous, f"{lesson}: these tests pass on the untouched student version (vacuous): {vacuous}"
    stopped = course.stopped_cells(nbformat.read(result.output, as_version=4))
    assert not stopped, (f"{lesson}: Run All on the student version stops before its end, in cells that are not "
                         f"its tests: {stopped}")

"""The lesson pipeline's rules: lessons/ is generated from solutions/, committed notebooks are clean,
every exercise is identifiable. (Executing the notebooks is tests/test_notebooks.py.)"""

import nbformat
import pytest

from lorakit import course

LESSONS = course.lessons()


def test_there_are_lessons():
    assert LESSONS and LESSONS[0] == "00_setup"


@pytest.mark.slow  # one nbgrader run per lesson
@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_is_what_the_pipeline_generates(lesson, tmp_path):
    course.generate_lessons([lesson], release_dir=tmp_path, stamp_sources=False)
    expected = (tmp_path / lesson / f"{lesson}.ipynb").read_text()
    committed = course.lesson_path(lesson)
    assert committed.is_file(), f"lessons/{lesson}/{lesson}.ipynb is missing: run `make lessons`"
    assert committed.read_text() == expected, f"lessons/{lesson} is stale (it differs from what solutions/ generates): run `make lessons`"


@pytest.mark.parametrize("lesson", LESSONS)
def test_header_is_stamped(lesson):
    nb = nbformat.read(course.solution_path(lesson), as_version=4)
    assert not course.stamp(nb, lesson), f"{lesson}: the Colab badge or setup cell is out of date: run `make lessons`"
    assert nb.cells[0].source.startswith(f"# Lesson {lesson[:2]}"), f"{lesson}: the first cell must start with '# Lesson {lesson[:2]} — ...'"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{lesson}: exactly one cell must be tagged 'parameters' (found {len(params)})"


def _notebooks():
    root = course.course_root()
    return sorted([*root.glob("solutions/*/*.ipynb"), *root.glob("lessons/*/*.ipynb")])


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts: clear them (write_clean or `make lessons`)"


@pytest.mark.parametrize("lesson", LESSONS)
def test_every_exercise_has_a_grade_id_in_its_first_line(lesson):
    nb = nbformat.read(course.solution_path(lesson), as_version=4)
    ids = []
    for i, cell in enumerate(nb.cells):
        meta = cell.metadata.get("nbgrader")
        src = cell.source
        if "### BEGIN SOLUTION" in src or "### BEGIN HIDDEN TESTS" in src:
            assert meta, f"{lesson} cell {i}: has nbgrader markers but no nbgrader metadata"
        if not meta or not (meta.get("solution") or meta.get("grade")):
            continue
        gid = meta.get("grade_id")
        assert gid, f"{lesson} cell {i}: an exercise or test cell without a grade_id"
        assert gid.startswith(f"ex{lesson[:2]}_"), f"{lesson} cell {i}: grade_id {gid!r} should start with ex{lesson[:2]}_"
        if cell.cell_type == "code":
            assert src.split("\n", 1)[0].strip() == f"# {gid}", f"{lesson} cell {i}: the first line must be the comment '# {gid}'"
        if meta.get("grade") and cell.cell_type == "code":
            assert meta.get("points", 0) > 0, f"{lesson} cell {i} ({gid}): a test cell needs points"
        ids.append(gid)
    assert ids, f"{lesson}: no graded exercise"
    assert len(ids) == len(set(ids)), f"{lesson}: duplicate grade_ids {sorted(i for i in ids if ids.count(i) > 1)}"

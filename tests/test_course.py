"""lorakit.course and the `lorakit` command on bad input: unknown lessons, missing parameter files, a
notebook that fails names the lesson and the cell."""

import shutil

import pytest

from lorakit import cli, course


def test_unknown_lesson_lists_the_valid_ones(capsys):
    assert cli.main(["run", "99_nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown lesson '99_nope'" in err and "00_setup" in err


def test_missing_parameters_file_says_which(capsys):
    assert cli.main(["run", "00_setup", "--params", "no/such.yml"]) == 2
    assert "'no/such.yml' not found" in capsys.readouterr().err


def test_parameters_file_with_unknown_lesson(tmp_path):
    p = tmp_path / "p.yml"
    p.write_text("99_nope: {MAX_STEPS: 1}\n")
    with pytest.raises(course.CourseError, match="unknown lesson"):
        course.load_params(p)


def test_lesson_selection_accepts_numbers_and_topics():
    assert course.select(["0"]) == ["00_setup"]
    assert course.select(["setup"]) == ["00_setup"]
    assert course.select(["lessons/00_setup/00_setup.ipynb"]) == ["00_setup"]


@pytest.fixture
def tiny_course(tmp_path, monkeypatch):
    """A course folder with one lesson whose second exercise is broken."""
    root = course.course_root()
    (tmp_path / "nbgrader_course").mkdir()
    shutil.copy(root / "nbgrader_course" / "nbgrader_config.py", tmp_path / "nbgrader_course")
    nb = course.notebook([
        course.markdown("# Lesson 98 — broken"),
        course.code("", tags=["setup"]),
        course.parameters("X = 1"),
        course.exercise("ex98_one", "### BEGIN SOLUTION\none = X\n### END SOLUTION"),
        course.test("ex98_one_test", "assert one == 2, 'one should be 2'"),
    ])
    course.stamp(nb, "98_broken")
    course.write_clean(nb, tmp_path / "solutions" / "98_broken" / "98_broken.ipynb")
    monkeypatch.setenv("LORAKIT_COURSE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.slow
def test_failing_notebook_names_lesson_and_cell(tiny_course, capsys):
    assert cli.main(["run", "98"]) == 1
    out = capsys.readouterr().out
    assert "98_broken: cell" in out and "(ex98_one_test)" in out and "AssertionError: one should be 2" in out
    assert "failed" in out.splitlines()[-1]


def test_parameters_are_injected(tiny_course, tmp_path):
    p = tmp_path / "p.yml"
    p.write_text("98_broken: {X: 2}\n")
    [r] = course.run_lessons(["98"], str(p), tmp_path / "out", echo=None)
    assert r.status == "ok" and r.graded == [("ex98_one_test", True, "")]


@pytest.mark.slow
def test_generated_student_version_stubs_the_solution(tiny_course):
    [path] = course.generate_lessons(["98"])
    text = path.read_text()
    assert "raise NotImplementedError()" in text and "one = X" not in text


def test_stamp_inserts_badge_and_setup():
    nb = course.notebook([course.markdown("# Lesson 42 — x"), course.code("print(1)", tags=["setup"])])
    assert course.stamp(nb, "42_x")
    assert course.colab_url("42_x") in nb.cells[0].source
    assert nb.cells[1].source == course.setup_source()
    assert not course.stamp(nb, "42_x")


def test_setup_cell_is_a_no_op_off_colab_and_installs_on_colab(tmp_path, monkeypatch):
    calls = []
    import subprocess
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    exec(course.setup_source(), {})
    assert calls == []  # not on Colab: nothing installed
    fake = tmp_path / "google" / "colab"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (tmp_path / "google" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys
    for m in [m for m in sys.modules if m == "google" or m.startswith("google.")]:
        monkeypatch.delitem(sys.modules, m)
    exec(course.setup_source(), {})
    assert calls == course.colab_install_commands()
    assert calls[0][-1].startswith("lorakit @ git+" + course.REPOSITORY)
    assert calls[1][-2:] == ["lorakit.install", "colab"]


def _executed(cells):
    """A notebook as nbclient leaves it: (cell, error name or None) pairs become cells with an error output."""
    import nbformat
    nb = course.notebook([c for c, _ in cells])
    for cell, error in cells:
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("error", ename=error, evalue="", traceback=[])] if error else []
    return nb


def _stubbed(grade_id, source):
    """An exercise cell as the student version holds it: nbgrader's stub in place of the solution."""
    cell = course.exercise(grade_id, "### BEGIN SOLUTION\n### END SOLUTION")
    cell.source = source
    return cell


def test_stopped_cells_are_the_errors_outside_test_cells_and_value_stubs():
    """Run All on a student version may raise in a graded test cell, and in an exercise whose stub itself raises at
    the top level (an answer that is a value); anywhere else a raise stops the lesson before its end and is reported."""
    nb = _executed([
        (course.markdown("# a lesson"), None),
        (_stubbed("ex_table", "# ex_table\n# YOUR CODE HERE\nraise NotImplementedError()"), "NotImplementedError"),
        (_stubbed("ex_fn", "# ex_fn\ndef f():\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\n\nf()"),
         "NotImplementedError"),
        (course.test("ex_fn_test", "check.f(f)"), "CheckFailed"),
        (course.code("print(f())"), "NotImplementedError"),
        (course.code("print('fine')"), None),
    ])
    stopped = course.stopped_cells(nb)
    assert len(stopped) == 2, stopped
    assert stopped[0].startswith("cell 2 (ex_fn): NotImplementedError")   # the demo call inside the exercise cell
    assert stopped[1].startswith("cell 4 (print(f())): NotImplementedError")
    assert course.stopped_cells(_executed([(course.code("x = 1"), None)])) == []

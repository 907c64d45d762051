# nbgrader configuration for the lorakit course.
# solutions/ is nbgrader's source directory and lessons/ its release directory, so
# `nbgrader generate_assignment` (run by `make lessons`) writes the student versions into lessons/.
# Everything nbgrader writes while grading lives in nbgrader_course/work/ (ignored by git).
import os

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_work = os.path.join("nbgrader_course", "work")

c = get_config()  # noqa: F821  (provided by traitlets when nbgrader loads this file)

c.CourseDirectory.course_id = "lorakit"
c.CourseDirectory.root = _root
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "lessons"
c.CourseDirectory.submitted_directory = os.path.join(_work, "submitted")
c.CourseDirectory.autograded_directory = os.path.join(_work, "autograded")
c.CourseDirectory.feedback_directory = os.path.join(_work, "feedback")
c.CourseDirectory.solution_directory = os.path.join(_work, "solution")
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(_root, _work, "gradebook.db")

# Student versions: outputs cleared, solutions replaced by a stub, hidden tests removed.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
c.ClearOutput.enabled = True
# Grading: a deleted or edited test cell is restored from the gradebook.
c.OverwriteCells.add_missing_cells = True
c.Execute.raise_on_iopub_timeout = False

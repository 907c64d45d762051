"""The course pipeline (instructors and CI, never a lesson): solutions/ -> lessons/ with nbgrader, solution
notebooks run with papermill. `lorakit lessons` and `lorakit run` (and `make lessons`, `make course`) are
thin layers over it; the grader reads the course through `layout`.

- `layout`    where the course is and which lessons it holds (`course_root`, `select`, `solution_path`, ...)
- `notebooks` building a lesson's cells, stamping its header, generating its student version with nbgrader
- `runs`      running the lessons with CI's parameters and reading the executed notebooks back

Every public name is re-exported here, so `from lorakit import course; course.select(...)` reads the same
wherever it is used.
"""

from lorakit.course.layout import (NBGRADER_DIR, CourseError, course_root, lesson_path, lessons, select,
                                   solution_path, work_dir)
from lorakit.course.notebooks import (BADGE_IMAGE, BRANCH, KERNEL, REPOSITORY, code, colab_badge,
                                      colab_install_commands, colab_requirement, colab_url, exercise,
                                      generate_assignment, generate_lessons, markdown, notebook, parameters,
                                      run_nbgrader, setup_source, stamp, test, tools_env, write_clean)
from lorakit.course.runs import (RunResult, graded_cells, load_params, params_for, run_lessons, stopped_cells,
                                 table)

__all__ = ["REPOSITORY", "BRANCH", "BADGE_IMAGE", "KERNEL", "NBGRADER_DIR", "CourseError", "course_root", "work_dir",
           "lessons", "select", "solution_path", "lesson_path", "markdown", "code", "parameters", "exercise", "test",
           "notebook", "colab_url", "colab_badge", "colab_requirement", "colab_install_commands", "setup_source",
           "stamp", "tools_env", "run_nbgrader", "generate_assignment", "generate_lessons", "write_clean",
           "load_params", "params_for", "RunResult", "graded_cells", "stopped_cells", "run_lessons", "table"]

"""The `lorakit` command: a thin layer over lorakit.course, lorakit.grading and lorakit.env."""

from __future__ import annotations

import argparse
import sys


# Commands that need more than the learner's install: nbgrader generates the student versions and grades.
NEEDS_EXTRA = {"lessons": "instructor", "grade": "instructor"}


def _lessons(args) -> int:
    from . import course
    for p in course.generate_lessons(args.lesson or None):
        print(f"wrote {p.relative_to(course.course_root())}")
    return 0


def _run(args) -> int:
    from . import course
    results = course.run_lessons(args.lesson or None, args.params, args.out, student=args.student)
    print()
    print(course.table(results))
    return 0 if all(r.status == "ok" for r in results) else 1


def _env(args) -> int:
    from . import env
    lines = env.report(args.device)
    return 1 if any(l.status == "missing" for l in lines) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA, built by hand: the course kit.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="print the environment check (device, dtype, 4-bit support, versions)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_env)

    p = sub.add_parser("lessons", help="regenerate the student versions in lessons/ from solutions/")
    p.add_argument("lesson", nargs="*", help="lesson names (default: all)")
    p.set_defaults(func=_lessons)

    p = sub.add_parser("run", help="execute solution notebooks headless with papermill and print a table")
    p.add_argument("lesson", nargs="*", help="lesson names (default: all)")
    p.add_argument("--params", help="parameters file (YAML: lesson or 'all' -> NAME: value), e.g. grading/ci_params.yml")
    p.add_argument("--out", help="folder for executed copies (default build/solutions)")
    p.add_argument("--student", action="store_true", help="run the student versions from lessons/ instead, past errors")
    p.set_defaults(func=_run)

    from . import sweep
    from .grading import cli as grading_cli
    grading_cli.add_commands(sub)  # `grade` and `check`
    sweep.add_command(sub)         # `sweep`

    args = parser.parse_args(argv)
    from .course import CourseError
    from .install import InstallError, require_extra
    try:
        if args.command in NEEDS_EXTRA:
            require_extra(NEEDS_EXTRA[args.command])
        return args.func(args)
    except (CourseError, InstallError) as e:
        print(f"lorakit {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

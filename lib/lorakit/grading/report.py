"""What grading leaves behind: the nbgrader gradebook, grades.csv, feedback HTML, Gradescope results.json.

- The gradebook (gradebook.py) is nbgrader's own; only the grader writes to it, never a sandbox.
- grades.csv has one row per submission with a `status` (graded / failed / grader error) and a `reason`, so a
  timeout is never mistaken for a real zero, nor a judge's bug for the learner's mistake.
- Feedback HTML shows the learner their notebook with their own outputs and, under every test cell, each
  check's name and the judge's message. Everything in it that came from the submission is inert: markdown
  and HTML pass through an HTML sanitiser (`clean_html`), so a page opened by the instructor, even from a
  Jupyter server, runs none of the learner's script and shows the grader's lines as written. Hidden tests are never in it: only the visible part of a test cell
  is rendered, the sandbox never had the hidden part, and every text that came from the sandbox or a judge
  is cleaned of any line of a hidden part before it is written (`redact`).
- A flagged submission (reference_use.py) is graded as usual; the flags are listed in grades.csv, at the top
  of the feedback and in results.json, and the notebook is flagged in the gradebook.
- results.json follows Gradescope's autograder format.
"""

from __future__ import annotations

import csv
import functools
import html
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import nbformat


@dataclass
class Graded:
    """One submission's result, as reported."""
    student: str
    lesson: str
    source: str              # the submitted file
    outcome: object          # session.Outcome
    max_score: float
    hidden: frozenset = frozenset()   # lines of the key's hidden tests, removed from anything shown

    @property
    def score(self) -> float:
        return self.outcome.score

    @property
    def status(self) -> str:
        return self.outcome.status


def write_csv(results: list[Graded], path: Path, test_ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "lesson", "score", "max_score", "status", "reason", "detail", "flags", "seconds",
                    *test_ids, "source"])
        for g in sorted(results, key=lambda r: r.student):
            o = g.outcome
            w.writerow([g.student, g.lesson, f"{g.score:g}", f"{g.max_score:g}", o.status, o.reason, o.detail,
                        "; ".join(o.flags), f"{o.seconds:.1f}",
                        *[("" if gid not in o.tests else f"{o.tests[gid].points:g}") for gid in test_ids],
                        g.source])


def redact(text: str, hidden) -> str:
    """`text` without any line of a hidden test (the learner's own code could have printed one it found)."""
    for line in sorted(hidden, key=len, reverse=True):
        if line in text:
            text = text.replace(line, "[a line of a hidden test, removed]")
    return text


def _redacted_outputs(outputs: list[dict], hidden) -> list[dict]:
    out = []
    for o in outputs:
        o = dict(o)
        for k in ("text", "evalue"):
            if isinstance(o.get(k), str):
                o[k] = redact(o[k], hidden)
        if isinstance(o.get("traceback"), list):
            o["traceback"] = [redact(t, hidden) for t in o["traceback"]]
        if isinstance(o.get("data"), dict):
            o["data"] = {m: v if m == "image/png" else redact(v, hidden) for m, v in o["data"].items()}
        out.append(o)
    return out


def summary(o) -> str:
    return "graded" if o.status == "graded" else f"failed: {o.reason}" + (f" ({o.detail})" if o.detail else "")


# Who may see a Gradescope test (its `visibility`): Gradescope's four settings.
VISIBILITIES = ("hidden", "after_due_date", "after_published", "visible")


def results_json(g: Graded, hidden_names: str = "hidden", notes: list[str] = ()) -> dict:
    """Gradescope's autograder results format (gradescope-autograders.readthedocs.io, "Autograder
    Specifications"): the score, then one test per test cell, visible, with its points and the messages of
    its visible checks (hidden checks are only counted there), then one test per check on inputs drawn when
    graded (a hidden call), with no points, whose name and message students see as `hidden_names` says:
    "hidden" (the instructor only), "after_due_date", "after_published" or "visible". No line of a hidden
    test's source is in it (`redact`). `notes` go to the top-level output (e.g. which sandbox protections
    were off)."""
    if hidden_names not in VISIBILITIES:
        raise ValueError(f"hidden_names={hidden_names!r}: one of {', '.join(VISIBILITIES)}")
    o = g.outcome
    tests = []
    for n, (gid, t) in enumerate(o.tests.items(), 1):
        calls = list(t.calls)
        judged = "\n".join(c.line for c in calls)
        rest = t.message[len(judged):].lstrip("\n") if t.message.startswith(judged) else t.message
        lines = [c.line for c in calls if not c.hidden]
        secret = [c for c in calls if c.hidden]
        if secret:
            failed = sum(not c.passed for c in secret)
            lines.append(f"{len(secret)} check(s) on inputs drawn when graded: "
                         + (f"{failed} failed" if failed else "passed"))
        lines += [rest] if rest else []
        tests.append({"name": gid, "number": str(n), "score": t.points, "max_score": t.max_points,
                      "status": "passed" if t.passed else "failed", "output": redact("\n".join(lines), g.hidden),
                      "visibility": "visible"})
        for j, c in enumerate(secret, 1):
            tests.append({"name": f"{gid}: {c.check} (inputs drawn when graded)", "number": f"{n}.{j}",
                          "status": "passed" if c.passed else "failed", "output": redact(c.message, g.hidden),
                          "visibility": hidden_names})
    lines = [summary(o), *o.notes, *(f"flagged: {f}" for f in o.flags), *notes]
    return {"score": g.score, "max_score": g.max_score, "execution_time": round(o.seconds, 2),
            "output": redact("\n".join(lines), g.hidden), "stdout_visibility": "hidden", "tests": tests,
            "extra_data": {"status": o.status, "reason": o.reason, "flags": o.flags, "student": g.student,
                           "lesson": g.lesson}}


def feedback_notebook(g: Graded, merged: nbformat.NotebookNode | None) -> nbformat.NotebookNode:
    """The learner's notebook with outputs and a verdict under each test cell; hidden tests left out."""
    o = g.outcome
    head = [f"# Feedback: {g.lesson}", "", f"**{g.student}** — score **{g.score:g} / {g.max_score:g}**"]
    if o.status == "grader error":
        head.append(f"\n**The grader could not judge every check (a bug of the course kit, not yours; your "
                    f"instructor is told).** {html.escape(redact(o.detail, g.hidden))}")
    elif o.status != "graded":
        head.append(f"\n**Grading failed: {o.reason}.** {html.escape(redact(o.detail, g.hidden))}")
    for note in o.notes:
        head.append(f"\n- {html.escape(note)}")
    for flag in o.flags:
        head.append(f"\n- flagged for the instructor: {html.escape(flag)}")
    cells = [nbformat.v4.new_markdown_cell("\n".join(head))]
    for i, cell in enumerate(merged.cells if merged is not None else []):
        meta = cell.metadata.get("lorakit", {})
        if cell.cell_type == "markdown":
            cells.append(nbformat.v4.new_markdown_cell(cell.source))
            continue
        new = nbformat.v4.new_code_cell(cell.source)   # test cells hold only their visible part (submission.merge)
        new.outputs = [nbformat.from_dict(x) for x in _redacted_outputs(o.outputs.get(i, []), g.hidden)]
        gid = meta.get("grade_id")
        if meta.get("kind") == "test" and gid in o.tests:
            t = o.tests[gid]
            mark = "\u2705" if t.passed else "\u274c"
            new.outputs.append(nbformat.v4.new_output(
                "stream", name="stdout", text=f"\n{mark} {gid}: {t.points:g} / {t.max_points:g} points\n"
                                              f"{redact(t.message, g.hidden)}\n"))
        cells.append(new)
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = (merged.metadata.get("kernelspec") if merged is not None else None) or {}
    return nb


# What learner HTML may keep in a feedback page: Ammonia's default tags (text, lists, tables, headings, images)
# with no scripts, styles, classes, ids, event handlers, forms, iframes, SVG or MathML; links only to the web.
IMAGE_PREFIXES = ("data:image/png;base64,", "data:image/jpeg;base64,", "data:image/gif;base64,")
LINK_SCHEMES = ("http://", "https://", "mailto:")


def _allowed_url(tag: str, attribute: str, value: str) -> str | None:
    v = value.strip().lower()
    if tag == "img" and attribute == "src":
        return value if v.startswith(IMAGE_PREFIXES) else None   # an image from elsewhere would tell who looked
    if attribute in ("href", "cite", "src"):
        return value if v.startswith(LINK_SCHEMES) else None
    return value


def clean_html(text) -> str:
    """HTML from a submission (markdown cells once rendered, `text/html` outputs) made inert with nh3, the
    maintained binding of the Ammonia sanitiser: nothing that runs (scripts, event handlers, `javascript:`
    links), nothing that loads (iframes, objects, images from other sites: only embedded PNG/JPEG/GIF) and
    nothing that restyles the page (style, class and id attributes, <style>), so learner content cannot hide
    or cover the lines the grader writes. nbconvert calls it where its own `sanitize_html` option would call
    bleach's stricter and unmaintained cleaner."""
    import nh3
    text = text.decode() if isinstance(text, bytes) else str(text)
    return nh3.clean(text, url_schemes={"http", "https", "mailto", "data"}, attribute_filter=_allowed_url,
                     url_relative="deny", strip_comments=True)


@functools.lru_cache(maxsize=1)
def _html_exporter():
    """One exporter for the batch (a new one compiles its Jinja templates again, about 0.15 s a notebook), with
    nbconvert's own `sanitize_html`: markdown and HTML outputs go through `clean_html`, JavaScript outputs and
    widget state are left out. PNG plots are rendered by the template itself and still show."""
    from nbconvert import HTMLExporter
    return HTMLExporter(template_name="classic", sanitize_html=True, filters={"clean_html": clean_html})


def feedback_html(nb: nbformat.NotebookNode) -> str:
    with _EXPORTING:
        body, _ = _html_exporter().from_notebook_node(nb)
    return body


_EXPORTING = threading.Lock()


def write_submission_reports(g: Graded, merged, out: Path) -> None:
    """results/STUDENT.json and feedback/STUDENT.html under `out`."""
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "feedback").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{g.student}.json").write_text(json.dumps(results_json(g), indent=1))
    nb = feedback_notebook(g, merged)
    try:
        text = feedback_html(nb)
    except Exception as e:  # a report problem must not lose the grade
        text = (f"<html><body><pre>{html.escape(json.dumps(results_json(g), indent=1))}\n\n"
                f"(HTML rendering failed: {html.escape(str(e))})</pre></body></html>")
    (out / "feedback" / f"{g.student}.html").write_text(text)


def table(results: list[Graded]) -> str:
    rows = [("student", "score", "status", "reason")] + [
        (g.student, f"{g.score:g}/{g.max_score:g}", g.status, (g.outcome.reason + (f": {g.outcome.detail}" if g.outcome.detail else ""))[:90])
        for g in sorted(results, key=lambda r: r.student)]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows)

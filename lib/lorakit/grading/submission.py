"""What is graded: the lesson's answer key (from nbgrader's gradebook) and the learners' notebooks.

- `build_key()` registers the lesson in the gradebook with nbgrader's own `generate_assignment` and reads
  the graded cells back from it: the test cells with their hidden part, their points, and the release
  order of every cell, so a deleted or edited test cell can be put back exactly as the instructor wrote it.
  Each test cell is read as calls of judged checks (`testcells.calls`, with the aliases bound
  by the instructor's earlier cells); a test cell that is anything else makes the lesson ungradable, and
  the error says which cell and line.
- `collect()` finds submissions in a folder, a single notebook, or an LMS zip download, and names the
  student of each one. nbgrader's submitted/ folder (`nbgrader collect`: STUDENT/LESSON/LESSON.ipynb) is
  such a folder: another lesson's notebooks in it are left out.
- `merge()` lays a submission over the key: test cells are replaced by the key's (visible part only; the
  sandbox gets none of it, see session.py), stripped nbgrader metadata is restored from the cell's first
  comment line, and missing graded cells are put back in place.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from lorakit import course
from lorakit.checks import judged
from lorakit.grading import testcells

HIDDEN_BEGIN = "### BEGIN HIDDEN TESTS"
HIDDEN_END = "### END HIDDEN TESTS"
MAX_NOTEBOOK_BYTES = 50 * 1024 * 1024
_ID_LINE = re.compile(r"^#\s*(ex\d\d_[A-Za-z0-9_]+)\s*$")
_LESSON_DIR = re.compile(r"\d\d_[A-Za-z0-9_]+")   # NN_topic


@dataclass
class KeyCell:
    grade_id: str
    kind: str            # "test" (autograded), "solution" (the learner's answer), "written" (manual), "locked"
    source: str          # the instructor's source, hidden tests included
    points: float = 0.0
    cell_type: str = "code"
    calls: list = field(default_factory=list)   # test cells: their judged-check calls (testcells.Call)
    names: dict = field(default_factory=dict)   # test cells: alias -> lorakit.checks module their imports bind

    @property
    def visible(self) -> str:
        return visible_source(self.source)

    @property
    def hidden_line(self) -> int | None:
        """1-based line of `### BEGIN HIDDEN TESTS` in `source`, or None."""
        for i, line in enumerate(self.source.split("\n"), 1):
            if line.strip() == HIDDEN_BEGIN:
                return i
        return None


@dataclass
class Key:
    lesson: str
    order: list                          # grade_id (or None) of every cell of the lesson, in order
    cells: dict[str, KeyCell]            # grade_id -> key cell
    instructor: set = field(default_factory=set)   # sources of the lesson's code cells as released
    # the release's code cells in order: an ungraded cell as its stripped source, a graded one as ANCHOR + id
    instructor_order: list = field(default_factory=list)

    @property
    def tests(self) -> list[KeyCell]:
        return [c for c in self.cells.values() if c.kind == "test"]

    def tests_by_exercise(self):
        """(grade_id of the exercise cell before it, or None, grade_id, cell) for every test cell in order: the
        exercise a test cell checks is the last solution cell above it."""
        exercise = None
        for gid in self.order:
            kc = self.cells.get(gid)
            if kc is None:
                continue
            if kc.kind == "solution":
                exercise = gid
            elif kc.kind == "test":
                yield exercise, gid, kc

    @property
    def max_score(self) -> float:
        return float(sum(c.points for c in self.tests))

    @property
    def hidden_lines(self) -> set[str]:
        """The lines of the test cells' hidden parts (never to be shown to a learner)."""
        out = set()
        for c in self.tests:
            visible = {line.strip() for line in c.visible.split("\n")}
            out |= {line.strip() for line in c.source.split("\n")
                    if line.strip() and line.strip() not in visible and line.strip() not in (HIDDEN_BEGIN, HIDDEN_END)}
        return out


def read_calls(lesson: str, cells: list[tuple[str | None, str]], key_cells: dict) -> None:
    """Fill in `calls` and `names` of every test cell in `key_cells`: `cells` are (grade_id, source) of the
    lesson's code cells in order (the instructor's), whose imports of lorakit.checks carry over to later
    cells. Raises CourseError naming the cell and line when a test cell is not judged checks only."""
    known: dict[str, str] = {}
    for gid, source in cells:
        kc = key_cells.get(gid) if gid else None
        if kc is not None and kc.kind == "test":
            try:
                kc.calls = testcells.calls(kc.source, known)
                for c in kc.calls:
                    judged.find(c.check)
            except (ValueError, TypeError, LookupError, SyntaxError) as e:
                raise course.CourseError(
                    f"{lesson}: test cell {gid} cannot be graded: {e}. A test cell holds only imports from "
                    "lorakit.checks and calls of judged checks (docs/authoring.md, 'Writing a check').") from None
            if not kc.calls:
                raise course.CourseError(f"{lesson}: test cell {gid} calls no judged check, so it could never fail")
            kc.names = testcells.aliases(kc.source)
            source = kc.source
        try:
            known.update(testcells.aliases(source))
        except SyntaxError:
            pass


ANCHOR = "\x00"   # marks a graded cell's id in Key.instructor_order (no cell source starts with it)


def release_order(code, cells) -> list[str]:
    """Key.instructor_order from (grade_id, source) of the release's code cells."""
    return [ANCHOR + gid if gid in cells else src.strip() for gid, src in code]


def visible_source(src: str) -> str:
    """The source with `### BEGIN HIDDEN TESTS` ... `### END HIDDEN TESTS` removed (what learners see)."""
    out, hidden = [], False
    for line in src.split("\n"):
        if line.strip() == HIDDEN_BEGIN:
            hidden = True
        elif line.strip() == HIDDEN_END:
            hidden = False
        elif not hidden:
            out.append(line)
    return "\n".join(out).rstrip("\n")


def _kind(meta: dict) -> str | None:
    if not meta or not meta.get("grade_id"):
        return None
    if meta.get("grade") and meta.get("solution"):
        return "written"
    if meta.get("grade"):
        return "test"
    if meta.get("solution"):
        return "solution"
    if meta.get("locked"):
        return "locked"
    return None


def cell_id(cell) -> str | None:
    """A cell's grade_id: its nbgrader metadata, else its first line `# exNN_name` (survives editors that
    strip metadata, and Colab)."""
    meta = cell.get("metadata", {}).get("nbgrader") or {}
    if meta.get("grade_id"):
        return str(meta["grade_id"])
    src = cell.get("source", "")
    if isinstance(src, list):
        src = "".join(src)
    first = src.lstrip("\n").split("\n", 1)[0].strip()
    m = _ID_LINE.match(first)
    return m.group(1) if m else None


def build_key(lesson: str, db_url: str, workdir: Path, root: Path | None = None) -> Key:
    """The answer key of `lesson`, read from the gradebook at `db_url`. When the gradebook does not hold the
    lesson's current test cells yet, they are registered first with nbgrader's own generate_assignment
    (into a scratch release folder under `workdir`, never into lessons/)."""
    root = root or course.course_root()
    solution = nbformat.read(course.solution_path(lesson, root), as_version=4)
    key = _key_from_gradebook(lesson, db_url, solution)
    if key is None:
        release = Path(workdir) / "release"
        res = course.generate_assignment(lesson, release, db_url, root, check=False)
        for attempt in range(5):  # another machine grading a shard may be registering the lesson right now
            key = _key_from_gradebook(lesson, db_url, solution)
            if key is not None or res.returncode == 0:
                break
            time.sleep(1.0 + attempt)
        if key is None and res.returncode != 0:
            raise course.CourseError(f"nbgrader generate_assignment failed for {lesson}:\n{res.stdout}{res.stderr}")
        if key is None:
            raise course.CourseError(f"the gradebook at {db_url} does not hold {lesson}'s cells after generate_assignment")
    if not key.tests:
        raise course.CourseError(f"{lesson} has no autograded test cells")
    return key


def _key_from_gradebook(lesson: str, db_url: str, solution) -> Key | None:
    """The key from the gradebook, or None when it lacks the lesson or its test cells differ from `solution`."""
    from nbgrader.api import MissingEntry
    if db_url.startswith("sqlite:///") and not Path(db_url.removeprefix("sqlite:///")).is_file():
        return None
    from lorakit.grading.gradebook import gradebook
    with gradebook(db_url) as gb:
        try:
            nb = gb.find_notebook(lesson, lesson)
        except MissingEntry:
            return None
        sources = {c.name: c.source for c in nb.source_cells}
        points = {c.name: float(c.max_score) for c in nb.grade_cells}
    cells, order = {}, []
    for cell in solution.cells:
        gid = cell_id(cell)
        order.append(gid)
        kind = _kind(cell.metadata.get("nbgrader", {}))
        if not kind or not gid:
            continue
        if gid not in sources:
            return None
        if kind == "test" and (sources[gid].strip() != cell.source.strip()
                               or points.get(gid) != float(cell.metadata["nbgrader"].get("points", 0))):
            return None
        # solution cells come back stubbed (nbgrader saves them after clearing solutions): safe to restore
        cells[gid] = KeyCell(gid, kind, sources[gid], points.get(gid, 0.0), cell.cell_type)
    code = [(cell_id(c), c.source) for c in solution.cells if c.cell_type == "code"]
    read_calls(lesson, code, cells)
    instructor = {src.strip() for gid, src in code if gid not in cells} | {c.source.strip() for c in cells.values()}
    return Key(lesson, order, cells, instructor, release_order(code, cells))


def key_from_notebook(lesson: str, nb: nbformat.NotebookNode) -> Key:
    """A key without hidden tests, from a release (student) notebook: what `lorakit check` uses."""
    cells = {}
    for cell in nb.cells:
        kind = _kind(cell.metadata.get("nbgrader", {}))
        gid = cell_id(cell)
        if kind and gid:
            cells[gid] = KeyCell(gid, kind, visible_source(cell.source),
                                 float(cell.metadata["nbgrader"].get("points", 0)), cell.cell_type)
    code = [(cell_id(c), c.source) for c in nb.cells if c.cell_type == "code"]
    read_calls(lesson, code, cells)
    return Key(lesson, [cell_id(c) for c in nb.cells], cells, {src.strip() for _, src in code},
               release_order(code, cells))


# ----------------------------------------------------------------------------------------- submissions

@dataclass
class Submission:
    student: str
    path: Path
    error: str = ""          # set when the file is not a readable notebook


def _student_id(path: Path, lesson: str, base: Path) -> str:
    rel = path.relative_to(base) if path.is_relative_to(base) else Path(path.name)
    parts = rel.parts
    if len(parts) >= 3 and parts[-2] == lesson and path.stem == lesson:   # nbgrader: STUDENT/LESSON/LESSON.ipynb
        name = parts[-3]
    elif path.stem == lesson and len(parts) >= 2:                          # STUDENT/LESSON.ipynb
        name = parts[-2]
    else:                                                                  # STUDENT.ipynb, lms_export_name.ipynb
        name = path.stem
    name = re.sub(r"[^A-Za-z0-9_.@-]+", "_", name).strip("._") or "student"
    return name[:100]


def collect(paths: list[str | Path], lesson: str, workdir: Path) -> list[Submission]:
    """Submissions from notebooks, folders of notebooks (searched recursively) and zip files."""
    found: list[tuple[Path, Path]] = []
    for p in map(Path, paths):
        if not p.exists():
            raise course.CourseError(f"submissions {str(p)!r} not found")
        if p.is_dir():
            found += [(f, p) for f in sorted(p.rglob("*.ipynb")) if ".ipynb_checkpoints" not in f.parts
                      and not _other_lessons_folder(f.relative_to(p), lesson)]
        elif p.suffix == ".zip":
            dest = Path(workdir) / "unzipped" / p.stem
            found += [(f, dest) for f in _unzip(p, dest)]
        else:
            found.append((p, p.parent))
    subs, seen = [], {}
    for f, base in found:
        sid = _student_id(f.resolve(), lesson, base.resolve())
        if sid in seen:
            seen[sid] += 1
            sid = f"{sid}-{seen[sid]}"
        else:
            seen[sid] = 1
        subs.append(Submission(sid, f))
    if not subs:
        raise course.CourseError(f"no .ipynb submissions found in {', '.join(map(str, paths))}")
    return subs


def _other_lessons_folder(rel: Path, lesson: str) -> bool:
    """STUDENT/OTHER_LESSON/x.ipynb in nbgrader's submitted/ layout (`nbgrader collect` puts every lesson of a
    student side by side there): another lesson's work, not a submission of `lesson`."""
    return len(rel.parts) >= 3 and bool(_LESSON_DIR.fullmatch(rel.parts[-2])) and rel.parts[-2] != lesson


def _unzip(zpath: Path, dest: Path) -> list[Path]:
    out = []
    try:
        zf = zipfile.ZipFile(zpath)
    except zipfile.BadZipFile as e:
        raise course.CourseError(f"{zpath} is not a valid zip file: {e}")
    with zf:
        for info in zf.infolist():
            name = Path(info.filename)
            if info.is_dir() or name.suffix != ".ipynb" or "__MACOSX" in name.parts or ".ipynb_checkpoints" in name.parts:
                continue
            safe = Path(*[re.sub(r"[^A-Za-z0-9_.@ -]+", "_", part) for part in name.parts if part not in ("", "..", "/")])
            target = dest / safe
            target.parent.mkdir(parents=True, exist_ok=True)
            if info.file_size > MAX_NOTEBOOK_BYTES:
                target.write_text("")  # too big: graded as an invalid notebook, with the reason
            else:
                target.write_bytes(zf.read(info))
            out.append(target)
    return sorted(out)


def shard(subs: list[Submission], spec: str | None) -> list[Submission]:
    """`i/n`: the i-th of n deterministic slices (1-based), by a hash of the student id, so each machine of
    a class graded across several takes the same students every time."""
    if not spec:
        return subs
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        raise course.CourseError(f"--shard {spec!r}: expected i/n with 1 <= i <= n, e.g. 1/4")
    i, n = int(m.group(1)), int(m.group(2))
    return [s for s in subs if int(hashlib.sha256(s.student.encode()).hexdigest(), 16) % n == i - 1]


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """Read a submission; raises ValueError with a reason a person can act on."""
    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"the file is larger than {MAX_NOTEBOOK_BYTES // 2**20} MB")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid notebook JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise ValueError("not a Jupyter notebook (no list of cells)")
    try:
        nb = nbformat.reads(json.dumps(data), as_version=4)
    except Exception as e:
        raise ValueError(f"not a readable notebook ({type(e).__name__}: {e})") from None
    for cell in nb.cells:
        if isinstance(cell.get("source"), list):
            cell.source = "".join(cell.source)
        cell.setdefault("metadata", {})
    return nb


# --------------------------------------------------------------------------------------------- merging

@dataclass
class Merged:
    notebook: nbformat.NotebookNode    # cells to run; test cells hold only their visible part
    notes: list[str] = field(default_factory=list)


def merge(nb: nbformat.NotebookNode, key: Key, parameters: dict | None = None) -> Merged:
    """Lay the submission over the key (see the module docstring). Every cell gets
    metadata.lorakit = {"kind": "test"|"code"|"markdown", "grade_id": ...}."""
    notes: list[str] = []
    out: list = []
    placed: set[str] = set()
    for cell in nb.cells:
        gid = cell_id(cell)
        kc = key.cells.get(gid) if gid else None
        if cell.cell_type not in ("code", "markdown", "raw"):
            continue
        if kc is None or gid in placed:
            new = nbformat.v4.new_code_cell(cell.source) if cell.cell_type == "code" else nbformat.v4.new_markdown_cell(cell.source)
            new.metadata = {k: v for k, v in cell.metadata.items() if k in ("tags",)}
            new.metadata["lorakit"] = {"kind": "code" if cell.cell_type == "code" else "markdown"}
            out.append(new)
            continue
        placed.add(gid)
        if not cell.metadata.get("nbgrader"):
            notes.append(f"{gid}: nbgrader metadata was missing; recovered from the cell's first line")
        out.append(_key_cell(kc, cell, notes))
    # graded cells that the submission lost: put them back after the cell that precedes them in the release
    order = key.order
    for i, gid in enumerate(order):
        if gid in key.cells and gid not in placed:
            kc = key.cells[gid]
            prev = next((order[j] for j in range(i - 1, -1, -1) if order[j] in placed), None)
            at = next((k + 1 for k, c in enumerate(out) if c.metadata["lorakit"].get("grade_id") == prev), 0) if prev else 0
            if kc.kind == "test":
                notes.append(f"{gid}: the test cell was missing; restored from the gradebook")
            else:
                notes.append(f"{gid}: the cell was missing; restored from the lesson (your answer there is empty)")
            out.insert(at, _key_cell(kc, {"source": kc.source}, notes, restoring=True))
            placed.add(gid)
    if parameters:
        at = next((k + 1 for k, c in enumerate(out) if "parameters" in c.metadata.get("tags", [])), None)
        if at is None:  # tags stripped: before the first exercise
            at = next((k for k, c in enumerate(out) if c.metadata["lorakit"].get("grade_id")), 0)
        src = "# Parameters injected by the grader\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        inj = nbformat.v4.new_code_cell(src)
        inj.metadata["lorakit"] = {"kind": "code", "injected": True}
        out.insert(at, inj)
    merged = nbformat.v4.new_notebook()
    merged.cells = out
    merged.metadata["kernelspec"] = dict(course.KERNEL)
    return Merged(merged, notes)


def _key_cell(kc: KeyCell, cell, notes: list[str], restoring: bool = False):
    src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    if kc.kind in ("test", "locked"):
        if not restoring and visible_source(src).strip() != kc.visible.strip():
            notes.append(f"{kc.grade_id}: the {'test ' if kc.kind == 'test' else ''}cell was edited; "
                         "the instructor's version was graded")
        src = kc.visible if kc.kind == "test" else kc.source
    if kc.cell_type == "markdown":
        new = nbformat.v4.new_markdown_cell(src)
    else:
        new = nbformat.v4.new_code_cell(src)
    new.metadata["nbgrader"] = {"grade_id": kc.grade_id, "grade": kc.kind in ("test", "written"),
                                "solution": kc.kind in ("solution", "written"), "locked": kc.kind in ("test", "locked"),
                                "points": kc.points, "schema_version": 3}
    kind = kc.kind if kc.kind == "test" else ("markdown" if kc.cell_type == "markdown" else "code")
    new.metadata["lorakit"] = {"kind": kind, "grade_id": kc.grade_id}
    return new

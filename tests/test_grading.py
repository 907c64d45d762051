"""The grading pipeline against known-good and known-bad submissions of lesson 00 (no model needed).

One batch grades every submission of tests/adversarial.py with the default number of workers (as an
instructor's `lorakit grade` does, so that judging several submissions at once is what is tested), sandbox on;
each one must get its honest score or an explicit failure with a reason, never more than it earned, flagged
when it should be, and the gradebook must be intact afterwards. The rest are fast unit tests of the pieces
(the protocol, merging, shards, zips, reports, flags), the exit status of `lorakit grade`, and `lorakit check`.
"""

import csv
import hashlib
import json
import shutil
import socket
import sqlite3
import zipfile
from pathlib import Path

import nbformat
import pytest

from lorakit import cli, course
from lorakit.grading import gradebook, submission
from lorakit.grading.sandbox import Protections, detect

import adversarial  # tests/adversarial.py: the kit's own attack table

LESSON = "00_setup"
CELL_TIMEOUT = 4


@pytest.fixture(scope="module")
def listener():
    """A TCP server on the grader's localhost: a sandboxed submission must not reach it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="module")
def batch(tmp_path_factory, listener):
    from lorakit import grading
    tmp = tmp_path_factory.mktemp("grading")
    db = tmp / "gradebook.db"
    real_db = Path(grading.default_db_url().removeprefix("sqlite:///"))
    before = hashlib.sha256(real_db.read_bytes()).hexdigest() if real_db.is_file() else None
    subs = adversarial.lesson00(port=listener, secrets=[str(course.solution_path(LESSON)), str(db), str(real_db)])
    subs.pop("correct_full")  # whole notebooks need realistic cell time limits: test_whole_notebooks
    adversarial.write(subs, tmp / "submissions")
    lines = []
    results = grading.grade(LESSON, [tmp / "submissions"], db=f"sqlite:///{db}", timeout=120,
                            cell_timeout=CELL_TIMEOUT, out=tmp / "out",
                            limits=grading.Limits(memory_mb=2048, processes=64), echo=lines.append)
    return {"subs": subs, "results": {g.student: g for g in results}, "db": db, "out": tmp / "out", "log": lines,
            "real_db": (real_db, before)}


@pytest.mark.slow
def test_every_submission_is_reported(batch):
    assert set(batch["results"]) == set(batch["subs"])
    rows = list(csv.DictReader(open(batch["out"] / "grades.csv")))
    assert sorted(r["student"] for r in rows) == sorted(batch["subs"])
    assert all(r["status"] in ("graded", "failed") for r in rows)
    assert all(r["reason"] for r in rows if r["status"] == "failed"), "a failed row must say why"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in adversarial.lesson00() if n != "correct_full"])
def test_honest_score_or_explicit_failure(batch, name):
    expected = batch["subs"][name][1]
    g = batch["results"][name]
    o = g.outcome
    assert g.score <= expected.score, f"{name} scored {g.score}, more than it earned ({expected.score}): {o}"
    assert (g.score, o.status, o.reason) == (expected.score, expected.status, expected.reason), \
        f"{name}: expected {expected}, got score {g.score}, {o.status} {o.reason!r} ({o.detail})"
    assert bool(o.flags) == expected.flagged, f"{name}: flags {o.flags}, expected flagged={expected.flagged}"
    if o.status == "failed":
        assert o.reason and o.detail, f"{name}: a failure must say why"


@pytest.mark.slow
def test_protections_are_reported(batch):
    assert batch["log"][0].startswith("sandbox:")
    p = detect()
    if not p.namespaces:
        assert "protections OFF" in batch["log"][0]


@pytest.mark.slow
def test_gradebook_is_intact_and_matches_the_csv(batch):
    con = sqlite3.connect(batch["db"])
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    scores = gradebook.read_gradebook(f"sqlite:///{batch['db']}", LESSON)
    assert scores == {n: batch["subs"][n][1].score for n in batch["subs"]}
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{batch['db']}") as gb:
        for name, g in batch["results"].items():
            nb = gb.find_submission_notebook(LESSON, LESSON, name)
            assert nb.flagged == (g.status != "graded" or bool(g.outcome.flags)), name
    real_db, before = batch["real_db"]
    if before is not None:
        assert hashlib.sha256(real_db.read_bytes()).hexdigest() == before, "the course gradebook changed"


@pytest.mark.slow
def test_feedback_never_shows_hidden_tests(batch):
    solution = nbformat.read(course.solution_path(LESSON), as_version=4)
    hidden_lines = set()
    for cell in solution.cells:
        if submission.HIDDEN_BEGIN in cell.source:
            hidden = cell.source.split(submission.HIDDEN_BEGIN, 1)[1].split(submission.HIDDEN_END, 1)[0]
            hidden_lines |= {l.strip() for l in hidden.split("\n") if l.strip()}
    assert hidden_lines
    for name in batch["subs"]:
        html = (batch["out"] / "feedback" / f"{name}.html").read_text()
        text = json.dumps(json.loads((batch["out"] / "results" / f"{name}.json").read_text()))
        assert "HIDDEN TESTS" not in html, name
        for line in hidden_lines:
            for form in {line, html_escape(line)}:
                assert form not in html, f"{name}: the feedback shows the hidden line {line!r}"
            assert line not in text and json.dumps(line)[1:-1] not in text, f"{name}: results.json shows {line!r}"


@pytest.mark.slow
def test_a_thread_reading_frames_finds_no_hidden_test(batch):
    """The spy thread saw the grader's requests (so it really looked) and nothing more: no test source."""
    html = (batch["out"] / "feedback" / "frame_reader.html").read_text()
    seen = "'op': 'probe'"
    assert "SPY" in html and (seen in html or html_escape(seen) in html), "the spy thread found nothing: the attack did not run"
    for secret in ('seed="grading"', "BEGIN HIDDEN TESTS"):   # what only the hidden parts hold
        assert secret not in html and html_escape(secret) not in html


def html_escape(text):
    import html
    return html.escape(text)


@pytest.mark.slow
def test_results_json_is_gradescope_shaped(batch):
    data = json.loads((batch["out"] / "results" / "partial.json").read_text())
    assert data["score"] == 1 and data["max_score"] == 2
    assert [(t["name"], t["score"], t["max_score"]) for t in data["tests"]] == [
        ("ex00_bytes_per_param_test", 1.0, 1.0), ("ex00_weights_gb_test", 0.0, 1.0)]
    assert "NotImplementedError" in data["tests"][1]["output"]
    assert "setup.weights_gb (inputs drawn when graded)" in data["tests"][1]["output"]


@pytest.mark.slow
def test_feedback_explains_failures_in_the_checks_words(batch):
    data = json.loads((batch["out"] / "results" / "wrong_values.json").read_text())
    assert "setup.bytes_per_param: fp32: expected 4.0 bytes per parameter, found 8" in data["tests"][0]["output"]
    patched = batch["results"]["monkeypatch"].outcome
    assert any("changes lorakit's own code (lorakit.checks.setup.expect)" in f for f in patched.flags), patched.flags
    malformed = batch["results"]["malformed_reply"].outcome.tests["ex00_weights_gb_test"].message
    assert "the answer could not be read" in malformed and "bytes for a float32 tensor" in malformed
    reference = batch["results"]["reference_import"].outcome.flags
    assert any("lorakit's reference lorakit.memory.BYTES" in f for f in reference), reference
    rows = {r["student"]: r for r in csv.DictReader(open(batch["out"] / "grades.csv"))}
    assert "lorakit.memory.BYTES" in rows["reference_import"]["flags"] and rows["correct"]["flags"] == ""
    html = (batch["out"] / "feedback" / "reference_import.html").read_text()
    assert "flagged for the instructor" in html
    notes = " ".join(batch["results"]["deleted_test"].outcome.notes)
    assert "restored from the gradebook" in notes
    notes = " ".join(batch["results"]["stripped_metadata"].outcome.notes)
    assert "recovered from the cell's first line" in notes


@pytest.mark.slow
def test_shards_partition_a_class_into_one_gradebook(batch, tmp_path):
    """Two 'machines' grade slices 1/2 and 2/2 of a zip download into the same gradebook."""
    from lorakit import grading
    zpath = tmp_path / "lms.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for i, (kind, solved) in enumerate([("a", "all"), ("b", set()), ("c", {"ex00_bytes_per_param"}), ("d", "all")]):
            nb = adversarial.student_notebook(LESSON, solved=solved, minimal=True)
            zf.writestr(f"export/shard_{kind}/{LESSON}.ipynb", nbformat.writes(nb))
        zf.writestr("../../evil/escape.ipynb", "{}")  # a zip-slip name stays inside the work folder
    db = tmp_path / "gb.db"
    shutil.copy(batch["db"], db)  # the lesson is registered already
    seen = []
    for i in (1, 2):
        res = grading.grade(LESSON, [zpath], db=f"sqlite:///{db}", shard=f"{i}/2", out=tmp_path / f"out{i}",
                            cell_timeout=30, echo=None)
        seen.append({g.student for g in res})
    assert not (seen[0] & seen[1])
    assert seen[0] | seen[1] == {"shard_a", "shard_b", "shard_c", "shard_d", "escape"}
    scores = gradebook.read_gradebook(f"sqlite:///{db}", LESSON)
    assert {k: scores[k] for k in ("shard_a", "shard_b", "shard_c", "shard_d", "escape")} == \
        {"shard_a": 2, "shard_b": 0, "shard_c": 1, "shard_d": 2, "escape": 0}
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.slow
def test_whole_notebooks(batch, tmp_path):
    """The whole lesson as handed in (solved, and untouched), with the normal per-cell limit."""
    from lorakit import grading
    subs = {"whole_solved": adversarial.student_notebook(LESSON), "whole_untouched": adversarial.student_notebook(LESSON, solved=set())}
    for name, nb in subs.items():
        (tmp_path / "in" / f"{name}.ipynb").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{name}.ipynb").write_text(nbformat.writes(nb))
    db = tmp_path / "gb.db"
    shutil.copy(batch["db"], db)
    res = {g.student: g for g in grading.grade(LESSON, [tmp_path / "in"], db=f"sqlite:///{db}",
                                                 out=tmp_path / "out", echo=None)}
    assert (res["whole_solved"].score, res["whole_solved"].status) == (2, "graded"), res["whole_solved"].outcome
    assert (res["whole_untouched"].score, res["whole_untouched"].status) == (0, "graded"), res["whole_untouched"].outcome
    html = (tmp_path / "out" / "feedback" / "whole_solved.html").read_text()
    assert "Llama-2-7B weights in bf16: 13.48 GB" in html  # the check's own words, in the feedback


# ------------------------------------------------------------------------------------------ unit tests

@pytest.fixture(scope="module")
def key():
    nb = nbformat.read(course.lesson_path(LESSON), as_version=4)
    return submission.key_from_notebook(LESSON, nb)


def test_ids_come_back_from_first_lines(key):
    nb = adversarial.student_notebook(LESSON, minimal=True)
    for c in nb.cells:
        c.metadata = {}
    m = submission.merge(nb, key)
    kinds = [(c.metadata["lorakit"]["kind"], c.metadata["lorakit"].get("grade_id")) for c in m.notebook.cells]
    assert kinds == [("code", "ex00_bytes_per_param"), ("test", "ex00_bytes_per_param_test"),
                     ("code", "ex00_weights_gb"), ("test", "ex00_weights_gb_test")]


def test_missing_and_edited_tests_are_restored_in_place(key):
    nb = adversarial.student_notebook(LESSON, minimal=True)
    nb.cells = [c for c in nb.cells if submission.cell_id(c) != "ex00_bytes_per_param_test"]
    assert submission.cell_id(nb.cells[-1]) == "ex00_weights_gb_test"
    nb.cells[-1].source = "# ex00_weights_gb_test\npass"
    m = submission.merge(nb, key)
    ids = [c.metadata["lorakit"].get("grade_id") for c in m.notebook.cells]
    assert ids == ["ex00_bytes_per_param", "ex00_bytes_per_param_test", "ex00_weights_gb", "ex00_weights_gb_test"]
    assert m.notebook.cells[-1].source == key.cells["ex00_weights_gb_test"].visible
    assert any("edited" in n for n in m.notes) and any("missing" in n for n in m.notes)


def test_visible_source_drops_hidden_tests():
    src = "a = 1\n### BEGIN HIDDEN TESTS\nassert secret\n### END HIDDEN TESTS\nb = 2"
    assert submission.visible_source(src) == "a = 1\nb = 2"


def test_shard_is_deterministic_and_complete():
    subs = [submission.Submission(f"s{i}", Path(f"s{i}.ipynb")) for i in range(50)]
    parts = [submission.shard(subs, f"{i}/3") for i in (1, 2, 3)]
    assert sorted(s.student for p in parts for s in p) == sorted(s.student for s in subs)
    assert parts[0] == submission.shard(subs, "1/3")
    with pytest.raises(course.CourseError):
        submission.shard(subs, "4/3")


def test_student_ids_from_common_layouts(tmp_path):
    for rel in ["alice/00_setup/00_setup.ipynb", "bob/00_setup.ipynb", "carol_12345_00_setup.ipynb"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    assert [s.student for s in submission.collect([tmp_path], LESSON, tmp_path / "w")] == ["alice", "bob", "carol_12345_00_setup"]


def test_invalid_notebooks_say_why(tmp_path):
    p = tmp_path / "x.ipynb"
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a Jupyter notebook"):
        submission.read_notebook(p)


def test_protections_off_are_named():
    off = Protections().off()
    assert any("network" in o for o in off) and any("filesystem" in o for o in off) and any("user" in o for o in off)
    assert "protections OFF" in Protections(rlimits=True).describe()


def test_out_folder_inside_solutions_is_refused():
    assert cli.main(["grade", LESSON, "nowhere", "--out", str(course.course_root() / "solutions" / "x")]) == 2


# ----------------------------------------------------------------------------------- lorakit check

def test_check_passes_a_solved_notebook_and_explains_a_stub(tmp_path, capsys):
    good, stub = tmp_path / "good.ipynb", tmp_path / "stub.ipynb"
    good.write_text(nbformat.writes(adversarial.student_notebook(LESSON, minimal=True)))
    nb = adversarial.student_notebook(LESSON, solved={"ex00_bytes_per_param"}, minimal=True)
    for c in nb.cells:  # downloaded from Colab: metadata gone
        c.metadata = {}
    stub.write_text(json.dumps(nb))
    assert cli.main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "visible checks: 2 / 2 points" in out
    assert cli.main(["check", str(stub), "--lesson", "00"]) == 1
    out = capsys.readouterr().out
    assert "\u2705 ex00_bytes_per_param_test" in out and "\u274c ex00_weights_gb_test" in out
    assert "NotImplementedError" in out and "visible checks: 1 / 2 points" in out


@pytest.mark.slow
def test_grade_exits_non_zero_when_a_submission_failed(batch, tmp_path, capsys):
    """`lorakit grade` reports every submission, and its exit status says whether all could be graded."""
    shutil.copy(batch["db"], tmp_path / "gb.db")  # the lesson is registered already
    good, bad = tmp_path / "good", tmp_path / "bad"
    adversarial.write({"ok": (adversarial.student_notebook(LESSON, minimal=True), None)}, good)
    adversarial.write({"ok": (adversarial.student_notebook(LESSON, minimal=True), None),
                       "broken": (b"{ not a notebook", None)}, bad)
    db = f"sqlite:///{tmp_path / 'gb.db'}"
    assert cli.main(["grade", LESSON, str(good), "--db", db, "--out", str(tmp_path / "o1")]) == 0
    assert cli.main(["grade", LESSON, str(bad), "--db", db, "--out", str(tmp_path / "o2")]) == 1
    assert "1 graded, 1 failed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["grade", "--help"])
    assert "exit status" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ the protocol

@pytest.mark.parametrize("line, why", [
    (b"not json", "not JSON"), (b"\xff\xfe", "UTF-8"), (b"[1, 2]", "without an op"), (b'{"op": "launch"}', "unknown"),
    (b'{"op": "cell"}', "without 'index'"), (b'{"op": "cell", "index": -1}', "non-negative"),
    (b'{"op": "cell", "index": true}', "non-negative"), (b'{"op": "done", "extra": 1}', "unexpected fields"),
    (b'{"op": "output", "index": 1, "outputs": "text"}', "not a list"), (b'{"op": "cell", "index": NaN}', "not JSON"),
])
def test_the_grader_refuses_messages_that_break_the_schema(line, why):
    from lorakit.grading import protocol
    with pytest.raises(protocol.ProtocolError, match=why):
        protocol.parse(line)


def test_messages_are_split_into_lines_and_capped(monkeypatch):
    from lorakit.grading import protocol
    lines = protocol.Lines()
    assert lines.feed(b'{"op": "do') == [] and lines.feed(b'ne"}\n{"op"') == [b'{"op": "done"}']
    monkeypatch.setattr(protocol, "MAX_MESSAGE", 100)
    with pytest.raises(protocol.ProtocolError, match="longer than"):
        protocol.Lines().feed(b"x" * 101)
    with pytest.raises(protocol.ProtocolError, match="longer than"):
        protocol.Lines().feed(b"x" * 60 + b"y" * 60 + b"\n")


def test_outputs_from_the_sandbox_are_rebuilt_field_by_field():
    from lorakit.grading import protocol
    raw = [{"output_type": "stream", "name": "stdout", "text": "x" * 100_000},
           {"output_type": "display_data", "data": {"text/plain": "ok", "application/javascript": "alert(1)"}},
           {"output_type": "execute_result", "data": {"text/html": "<script>"}}, "junk",
           {"output_type": "error", "ename": "E", "evalue": "v", "traceback": "not a list"}]
    out = protocol.outputs(raw)
    assert [o["output_type"] for o in out] == ["stream", "display_data", "error"]
    assert len(out[0]["text"]) == protocol.MAX_OUTPUT_TEXT and out[1]["data"] == {"text/plain": "ok"}
    assert out[2]["traceback"] == []


def test_a_reply_that_is_not_data_fails_its_check_with_the_reason():
    from lorakit.checks import setup as setup_checks
    from lorakit.grading import judge, protocol
    from lorakit.grading.testcells import Call
    [p] = judge.plan([Call("lorakit.checks.setup.weights_gb", ["weights_gb"], {}, "grading", 2)])
    assert p.hidden and p.check is setup_checks.weights_gb
    msg = protocol.parse(b'{"op": "answer", "id": 0, "outputs": [], "reply": {"ok": true, "answer": '
                         b'{"sizes": [{"$tensor": ["float64", [2], "AAAA"]}]}}}')
    try:
        reply = protocol.reply(msg)
    except Exception as e:  # noqa: BLE001
        reply = e
    r = judge.judge(p, reply)
    assert not r.passed and "could not be read" in r.message and "(inputs drawn when graded)" in r.line


# ---------------------------------------------------------------------------------------------- flags

@pytest.mark.parametrize("answer, flagged", [
    ("bytes_per_param = {'fp32': 4, 'fp16': 2, 'bf16': 2, 'int8': 1, 'nf4': 0.5}", None),
    ("from lorakit.memory import BYTES\nbytes_per_param = dict(BYTES)", "reference lorakit.memory.BYTES"),
    ("import lorakit.memory as m\nbytes_per_param = m.BYTES", "reference lorakit.memory.BYTES"),
    ("from lorakit.memory import *\nbytes_per_param = BYTES", "reference lorakit.memory.BYTES"),
    ("import lorakit\nbytes_per_param = lorakit.memory.BYTES", "reference lorakit.memory.BYTES"),
    ("bytes_per_param = mem.BYTES", "reference lorakit.memory.BYTES"),   # `mem` bound by an earlier cell
    ("bytes_per_param = eval('{\"fp32\": 4}')", "cannot read (eval)"),
    ("import gc\nbytes_per_param = [o for o in gc.get_objects()]", "gc.get_objects"),
    ("import lorakit.checks.setup as s\ns.expect = print", "changes lorakit's own code (lorakit.checks.setup.expect)"),
    ("from lorakit.grading.session import Session", "the grader's own code (lorakit.grading)"),
    ("%time bytes_per_param = {}", None),
])
def test_flags_read_the_learners_own_code(key, answer, flagged):
    import copy
    from lorakit.grading import reference_use
    nb = adversarial.student_notebook(LESSON, minimal=True)
    nb.cells.insert(0, course.code("from lorakit import memory as mem"))
    key = copy.deepcopy(key)
    key.instructor.add(nb.cells[0].source.strip())   # as if the lesson itself had this cell
    for c in nb.cells:
        if submission.cell_id(c) == "ex00_bytes_per_param":
            c.source = f"# ex00_bytes_per_param\n{answer}"
    flags = reference_use.flags(nb, key)
    if flagged is None:
        assert flags == []
    else:
        assert any(flagged in f for f in flags), flags
        assert all(f.startswith("ex00_bytes_per_param:") for f in flags), flags


@pytest.mark.parametrize("lesson", course.lessons())
def test_the_lessons_own_answers_are_never_flagged(lesson):
    """The instructor's answers use earlier lessons' references where the course means them to (the NF4 table
    in lesson 03's dequantize, lesson 02's LoRALinear under lesson 04's QLoRALinear): no flag."""
    from lorakit.grading import reference_use
    release = nbformat.read(course.lesson_path(lesson), as_version=4)
    key = submission.key_from_notebook(lesson, release)
    assert reference_use.flags(release, key) == []
    assert reference_use.flags(adversarial.student_notebook(lesson), key) == []


def test_a_reference_used_in_an_exercise_of_its_own_is_flagged():
    from lorakit.grading import reference_use
    lesson = "03_nf4"
    key = submission.key_from_notebook(lesson, nbformat.read(course.lesson_path(lesson), as_version=4))
    nb = adversarial.student_notebook(lesson)
    for c in nb.cells:
        if submission.cell_id(c) == "ex03_nf4_code":
            c.source = "# ex03_nf4_code\ndef nf4_values():\n    return ref.nf4_code()"
    assert reference_use.flags(nb, key) == ["ex03_nf4_code: uses lorakit's reference lorakit.nf4.nf4_code, the answer of "
                                            "an exercise"]


@pytest.mark.slow
def test_a_lesson_with_tensors_is_graded_end_to_end(tmp_path):
    """Lesson 03 (NF4) whole, solved and untouched, with the CI parameters: tensors cross as data, the judge
    compares with bitsandbytes in the grader's process; the solution earns every point, the stub none."""
    from lorakit import grading
    lesson = "03_nf4"
    subs = {"solved": adversarial.student_notebook(lesson), "untouched": adversarial.student_notebook(lesson, solved=set())}
    adversarial.write({k: (v, None) for k, v in subs.items()}, tmp_path / "in")
    params = course.params_for(lesson, course.load_params(course.course_root() / "grading" / "ci_params.yml"))
    res = {g.student: g for g in grading.grade(lesson, [tmp_path / "in"], db=f"sqlite:///{tmp_path / 'gb.db'}",
                                               out=tmp_path / "out", params=params, echo=None)}
    solved, untouched = res["solved"], res["untouched"]
    assert (solved.status, solved.score) == ("graded", solved.max_score), solved.outcome
    assert (untouched.status, untouched.score) == ("graded", 0), untouched.outcome
    messages = " ".join(t.message for t in solved.outcome.tests.values())
    assert "bit-exact with bitsandbytes" in messages and "(inputs drawn when graded)" in messages
    assert not solved.outcome.flags, solved.outcome.flags   # the lesson's own use of lorakit.nf4 is not flagged

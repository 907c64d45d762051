"""Fair grades: the same work gets the same verdict whatever is judged beside it, every point rests on behaviour
the trusted side recomputes, the hidden checks are as strong as they claim and ask nothing the visible ones do
not, and a judge's own bug is reported as such.

The lessons' answers come from their solution notebooks without running them (benchmarks/bench_mutation.py
executes each lesson's definitions into a namespace); values only a notebook run computes (lesson 05's model
and scores) get small stand-ins.
"""

import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import peft  # noqa: F401  (its ~3 s first import is paid at collection, not inside the first test's setup)
import pytest
import torch

from lorakit import course
from lorakit.checks import judged, wire
from lorakit.grading import testcells

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_mutation as mutation  # noqa: E402

import adversarial  # noqa: E402  - tests/adversarial.py: submissions of the lessons

GRADING_SEED = 20_261_206   # the hidden calls' inputs, drawn as the grader would (fixed: the run is reproducible)


def _stand_ins(ns: dict) -> None:
    """Lesson 05's values that only its run computes: held-out examples with the base model's answers, and a
    peft model whose adapter was never trained (its verdict: no gain; it must be that verdict every time)."""
    from peft import LoraConfig, get_peft_model

    from lorakit import data, models
    eval_ds = data.load_task("who_found")["test"].select(range(6))
    ns["eval_ds"] = eval_ds
    ns["before_answers"] = [ex["output"] if i % 2 else "nobody" for i, ex in enumerate(eval_ds)]
    ns["before"] = ns["exact_match_score"](ns["before_answers"], eval_ds)
    model, _ = models.load_base(models.TINY, device="cpu")
    with models.building():
        ns["model"] = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       task_type="CAUSAL_LM"))
    ns["TASK"], ns["after"] = "who_found", ns["before"]


@pytest.fixture(scope="module")
def jobs():
    """Every call of every test cell of lessons 00-08, on the solution's answers: (label, check, objects, kw,
    seed, grading)."""
    out = []
    for lesson in course.lessons():
        ns = mutation.namespace(lesson)
        if lesson.startswith("05"):
            _stand_ins(ns)
        known = {}
        for cell in mutation._cells(lesson):
            if cell.cell_type != "code":
                continue
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("grade"):
                for call in testcells.calls(cell.source, known):
                    grading = call.seed == judged.GRADING
                    objects = [eval(a, ns) for a in call.args]  # noqa: S307 - the kit's own test cells
                    kw = {k: eval(v, ns) for k, v in call.kwargs.items()}  # noqa: S307
                    out.append((f"{meta['grade_id']}: {call.check}{' (hidden)' if grading else ''}",
                                judged.find(call.check), objects, kw, GRADING_SEED if grading else call.seed, grading))
            known.update(testcells.aliases(cell.source))
    return out


def _reply(check, objects, kw, seed, grading):
    inputs = check.inputs(seed, grading)
    return wire.decode(judged.run_probe(check, wire.decode(wire.encode(inputs)), objects, kw), where="reply")


@pytest.fixture(scope="module")
def replies(jobs):
    """Each call's probe reply, made once, alone."""
    return [_reply(*job[1:]) for job in jobs]


@pytest.fixture(scope="module")
def alone(jobs, replies):
    """Each call's verdict, judged alone."""
    return [check.verdict(check.inputs(seed, grading), reply) for (_, check, _, _, seed, grading), reply in zip(jobs, replies)]


def test_the_solutions_pass_every_check(jobs, alone):
    """The reference answers pass every visible and hidden call; lesson 05's untrained stand-in model fails
    the improvement check (no gain), as it should."""
    wrong = [(job[0], v.message[:200]) for job, v in zip(jobs, alone)
             if v.passed == ("improvement" in job[0]) or v.grader_error]
    assert not wrong, wrong
    assert all("exact match went from" in v.message for job, v in zip(jobs, alone) if "improvement" in job[0])
    assert len({job[1].name for job in jobs}) >= 40


def _judged_in_threads(jobs, replies, alone, order):
    """The verdicts of the jobs in `order`, judged from eight threads at once, that differ from the ones alone."""
    def judge(i):
        _, check, _, _, seed, grading = jobs[i]
        return i, check.verdict(check.inputs(seed, grading), replies[i])
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(judge, order))
    return [(jobs[i][0], alone[i].message[:120], v.message[:120]) for i, v in together if v != alone[i]]


def _improvement(job) -> bool:
    return "improvement" in job[0]   # lesson 05's: a model loaded and 64 questions answered per verdict


def test_verdicts_judged_at_once_in_threads_equal_the_ones_judged_alone(jobs, replies, alone):
    """The grader's threads draw inputs and judge replies (each probe runs in its submission's own sandboxed
    process): every call of lessons 00-08 but lesson 05's improvement (the next test), in a shuffled order,
    from eight threads at once, gets the verdict, message included, that it gets alone."""
    order = [i for i, job in enumerate(jobs) if not _improvement(job)]
    random.Random(0).shuffle(order)
    differ = _judged_in_threads(jobs, replies, alone, order)
    assert not differ, differ


@pytest.mark.slow
def test_every_verdict_judged_twice_in_threads_with_improvement_equals_it_judged_alone(jobs, replies, alone):
    """Every call of lessons 00-08 twice, lesson 05's improvement included (the grader loads the base model,
    sets the adapter, asks the questions), in a shuffled order from eight threads at once: the same verdicts."""
    order = list(range(len(jobs))) * 2
    random.Random(1).shuffle(order)
    assert any(_improvement(jobs[i]) for i in order)
    differ = _judged_in_threads(jobs, replies, alone, order)
    assert not differ, differ


RACE = """
import threading
from lorakit.grading import judge, testcells
errors = []
def plan(name):
    try:
        judge.plan([testcells.Call(f"lorakit.checks.lora.{name}", ["x"], {}, "grading", 1)])
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
threads = [threading.Thread(target=plan, args=(n,)) for n in ("inject_lora", "lora_linear", "training_step", "peft_equal")]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
"""


def test_first_draws_in_a_fresh_grader_do_not_race_on_lazy_imports():
    """Four threads of a fresh process drawing lesson 02's inputs at once: without the grader taking turns,
    transformers' lazy names raced ("cannot import name 'LlamaConfig' from 'transformers'") and whole
    submissions failed."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_draw_and_judge_leave_the_global_generators_alone(jobs, replies):
    """Drawing inputs and judging a reply (the trusted side's whole work) neither reads nor moves torch's or
    Python's global random generator: a notebook's random numbers are the same with or without a check."""
    moved = []
    for (label, check, _, _, seed, grading), reply in zip(jobs, replies):
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        check.verdict(check.inputs(seed, grading), reply)
        if not torch.equal(torch_state, torch.get_rng_state()) or py_state != random.getstate():
            moved.append(label)
    assert not moved, moved


# --------------------------------------------------------------------------------- behaviour, not testimony

def _checks():
    import importlib
    import pkgutil

    import lorakit.checks
    found = {}
    for m in pkgutil.iter_modules(lorakit.checks.__path__):
        module = importlib.import_module(f"lorakit.checks.{m.name}")
        found.update({c.name: c for c in vars(module).values() if isinstance(c, judged.Check)})
    return found


def _testimony_shaped(spec) -> bool:
    """A bare flag, a word or a list of names: what a probe says about the learner's objects (a type, which names
    it has), never a value they computed from the drawn inputs."""
    return spec in (bool, str) or spec == [str]


def test_flags_and_names_are_declared_reported_with_a_reason():
    undeclared = [f"{name}[{key!r}]" for name, c in _checks().items() for key, spec in c.answer.items()
                  if _testimony_shaped(spec) and key not in c.reported]
    assert not undeclared, f"declare these in the check's `reported` with why only the probe can see them: {undeclared}"
    for c in _checks().values():
        assert set(c.reported) <= set(c.answer) and all(c.reported.values()), c.name


@pytest.mark.parametrize("lesson", course.lessons())
def test_every_test_cell_judges_behaviour(lesson):
    """A check made only of reported items (lesson 05's before_eval: the notebook's own numbers) never earns a
    cell's points alone: every test cell also calls a check with items the judge recomputes."""
    known = {}
    for cell in mutation._cells(lesson):
        if cell.cell_type != "code":
            continue
        if cell.metadata.get("nbgrader", {}).get("grade"):
            checks = [judged.find(c.check) for c in testcells.calls(cell.source, known)]
            assert any(set(c.answer) - set(c.reported) for c in checks), cell.source
        known.update(testcells.aliases(cell.source))


def _perturbed(value):
    """`value` made wrong in one place, keeping its type (and a tensor's dtype and shape)."""
    if isinstance(value, torch.Tensor):
        t = value.clone()
        if not t.numel():
            return torch.ones(1, dtype=t.dtype)
        flat = t.reshape(-1)
        flat[0] = ~flat[0] if t.dtype == torch.bool else flat[0] + 1 + flat[0].abs() if t.is_floating_point() else flat[0] + 1
        return flat.reshape(t.shape)
    if type(value) is bool:
        return not value
    if type(value) in (int, float):
        return value + 1 + abs(value)
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [_perturbed(value[0])] + value[1:] if value else [0]
    if isinstance(value, dict):
        key = sorted(value)[0] if value else None
        return {**value, key: _perturbed(value[key])} if value else {"x": 0}
    return 1


def test_every_item_the_judge_recomputes_is_really_judged(jobs, replies, alone):
    """For each check on the solution's reply (visible seed): every item not declared reported, made wrong in one
    place, fails the check; so every point rests on a value the judge compares with its own recomputation, and
    a probe that reports only what it was expected to report scores nothing. (The improvement check is left
    out: its passing reply needs a trained adapter, which the class test of lesson 05's notebook provides.)"""
    ignored, seen = [], set()
    for (_, check, _, _, seed, grading), reply, verdict in zip(jobs, replies, alone):
        if grading or check.name in seen or not verdict.passed:
            continue
        seen.add(check.name)
        inputs = check.inputs(seed, grading)
        for key in set(check.answer) - set(check.reported):
            wrong = dict(reply, answer=dict(reply["answer"], **{key: _perturbed(reply["answer"][key])}))
            if check.verdict(inputs, wrong).passed:
                ignored.append(f"{check.name}[{key!r}]")
    assert len(seen) >= 40
    assert not ignored, f"the judge passes these items made wrong (declare them reported, or judge them): {ignored}"


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("lesson", course.lessons())
def test_hidden_calls_repeat_visible_ones(lesson):
    """Every hidden call of a test cell is a visible call of the same check with the same arguments: only the
    seed (the inputs) differs, so the lesson's own self-check enforces every requirement graded."""
    known = {}
    for cell in mutation._cells(lesson):
        if cell.cell_type != "code":
            continue
        if cell.metadata.get("nbgrader", {}).get("grade"):
            cs = testcells.calls(cell.source, known)
            visible = {(c.check, tuple(c.args), tuple(sorted(c.kwargs.items()))) for c in cs if c.seed != judged.GRADING}
            hidden = {(c.check, tuple(c.args), tuple(sorted(c.kwargs.items()))) for c in cs if c.seed == judged.GRADING}
            assert hidden and hidden <= visible, f"{cell.source}\nhidden calls without a visible twin: {hidden - visible}"
        known.update(testcells.aliases(cell.source))


def test_hidden_inputs_have_the_visible_ones_knobs():
    """A hidden call draws other values, never other knobs: the same input keys as the visible call (a threshold
    only a hidden call sets, like the old min_gain, would show up here)."""
    for name, c in _checks().items():
        assert set(c.inputs(0)) == set(c.inputs(GRADING_SEED, grading=True)), name


def test_lesson_05_states_the_gain_it_grades():
    import nbformat

    from lorakit.checks import finetune
    text = " ".join(c.source for c in nbformat.read(course.solution_path("05_qlora_finetune"), as_version=4).cells
                    if c.cell_type == "markdown")
    assert f"{finetune.MIN_GAIN:.0%}" in text or f"{finetune.MIN_GAIN * 100:.0f} points" in text


# ---------------------------------------------------------------------------------------------- mutants

FAST = ("ex00_weights_gb", "ex01_lora_params", "ex03_blockwise", "ex06_verdict", "ex08_zero_bytes")


def test_mutants_of_a_few_exercises_are_killed():
    """The fast subset of benchmarks/bench_mutation.py: every mutant of these exercises is killed by its hidden
    calls or listed as equivalent with why, and no judge breaks on one."""
    rows = [mutation.score(ex) for lesson in ("00", "01", "03", "06", "08") for ex in
            mutation.exercises(course.select([lesson])[0]) if ex.grade_id in FAST]
    assert [r.exercise for r in rows] == list(FAST)
    for r in rows:
        assert r.mutants >= 7 and not r.survivors and not r.grader_errors, r


def test_the_mutator_makes_the_promised_kinds_of_mutants():
    src = ("def f(x, n):\n    ### BEGIN SOLUTION\n    y = x[1:n] * 2 + torch.abs(x).sum()\n"
           "    return y.float() if n < 3 else y\n    ### END SOLUTION")
    kinds = {m.description.split(" ", 1)[1].split(":")[0] for m in mutation.mutants(src)}
    assert {"operator", "term dropped", "constant", "slice bound off by one", "comparison", "`.float()` dropped",
            "other function or dtype", "statement left out"} <= kinds, kinds


# ------------------------------------------------------------------------------------------ bounded judging

def test_the_graders_work_is_sized_by_validated_shapes_and_the_task_by_the_draw(jobs, replies):
    """Lesson 05's improvement judge builds the learner's adapter in the grader's process: its rank comes from
    the tensors' shapes checked against the base model's layers (a huge r in the reply builds nothing), and the
    questions are of the drawn task, whatever TASK the notebook says."""
    [(job, reply)] = [(j, r) for j, r in zip(jobs, replies) if j[1].name.endswith("improvement") and not j[5]]
    check, inputs = job[1], job[1].inputs(job[4], job[5])

    def verdict(**changes):
        adapter = dict(reply["answer"]["adapter"], **changes.pop("adapter", {}))
        return check.verdict(inputs, dict(reply, answer=dict(reply["answer"], adapter=adapter, **changes)))
    v = verdict(adapter={"r": 10**6})
    assert not v.passed and not v.grader_error and "r=1000000" in v.message and "should agree" in v.message
    tensors = dict(reply["answer"]["adapter"]["tensors"])
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = torch.zeros(4096, tensors[key].shape[1])
    v = verdict(adapter={"tensors": tensors})
    assert not v.passed and not v.grader_error and "does not fit" in v.message
    v = verdict(adapter={"tensors": {"base_model.model.evil.lora_A.weight": torch.zeros(2, 2)}})
    assert not v.passed and "unexpected tensors" in v.message
    v = verdict(task="where_found")
    assert not v.passed and "TASK='where_found'" in v.message and "'who_found'" in v.message


# ------------------------------------------------------------------------------------------ grader errors

def test_a_judge_that_breaks_is_a_grader_error_not_a_failed_check(monkeypatch):
    from lorakit.checks import setup as setup_checks
    from lorakit.grading import judge

    def broken(inputs, answer):
        raise ZeroDivisionError("a bug of the kit")
    monkeypatch.setattr(setup_checks.weights_gb, "judge", broken)
    [p] = judge.plan([testcells.Call("lorakit.checks.setup.weights_gb", ["weights_gb"], {}, "grading", 2)])
    good = {"ok": True, "answer": {"sizes": [1.0] * len(p.inputs["cases"])}}
    r = judge.judge(p, good)
    assert r.grader_error and not r.passed and "bug of the course kit" in r.message and "grader error" in r.line
    # a reply of the wrong shape is still the learner's failed check
    r = judge.judge(p, {"ok": True, "answer": {"sizes": "many"}})
    assert not r.grader_error and not r.passed
    cell = judge.cell_result("ex00_weights_gb_test", 1, [r, judge.judge(p, good)], 2)
    assert cell.grader_error and cell.points == 0
    assert judge.grader_errors([cell]) == ["ex00_weights_gb_test: setup.weights_gb"]
    with pytest.raises(judged.GraderError, match="bug of the course kit"):
        setup_checks.weights_gb(lambda n, d: 1.0)


@pytest.mark.slow
def test_a_grader_error_has_its_own_status_and_keeps_the_other_cells(tmp_path, monkeypatch):
    import csv

    from lorakit import grading
    from lorakit.checks import setup as setup_checks

    def broken(inputs, answer):
        raise ZeroDivisionError("a bug of the kit")
    monkeypatch.setattr(setup_checks.weights_gb, "judge", broken)
    adversarial.write({"ana": (adversarial.student_notebook("00_setup", minimal=True), None)}, tmp_path / "in")
    lines = []
    [g] = grading.grade("00_setup", [tmp_path / "in"], workers=1, db=f"sqlite:///{tmp_path / 'gb.db'}",
                        out=tmp_path / "out", cell_timeout=30, echo=lines.append)
    o = g.outcome
    assert (o.status, o.reason) == ("grader error", "grader error") and "weights_gb" in o.detail
    assert o.tests["ex00_bytes_per_param_test"].points == 1 and o.tests["ex00_weights_gb_test"].grader_error
    [row] = csv.DictReader(open(tmp_path / "out" / "grades.csv"))
    assert (row["status"], row["score"], row["ex00_bytes_per_param_test"]) == ("grader error", "1", "1")
    assert any("grader error" in line for line in lines)
    html = (tmp_path / "out" / "feedback" / "ana.html").read_text()
    assert "a bug of the course kit" in html


# ------------------------------------------------------------------------------------------ a whole class

@pytest.mark.slow
def test_a_class_graded_four_at_a_time_gets_full_marks(tmp_path):
    """Four copies of the lesson 02 and lesson 04 solutions (whole notebooks, CI parameters), graded with four
    workers: judges of different submissions run in threads at once, each copy earns every point."""
    from lorakit import grading
    params = course.load_params(ROOT / ".ci" / "params.yml")
    for lesson in ("02_lora", "04_qlora_from_scratch"):
        subs = {f"copy{i}": (adversarial.student_notebook(lesson), None) for i in range(4)}
        adversarial.write(subs, tmp_path / lesson)
        res = grading.grade(lesson, [tmp_path / lesson], workers=4, db=f"sqlite:///{tmp_path / 'gb.db'}",
                            out=tmp_path / "out" / lesson, params=course.params_for(lesson, params), echo=None)
        assert len(res) == 4
        for g in res:
            assert (g.status, g.score) == ("graded", g.max_score), (lesson, g.student, {
                k: t.message for k, t in g.outcome.tests.items() if not t.passed}, g.outcome.detail)

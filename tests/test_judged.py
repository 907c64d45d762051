"""The judged-check format (lorakit.checks.judged): data that crosses between the learner's process and the
grader, answer shapes, the in-notebook call path, and reading test cells without running them."""

import json
import math

import pytest
import torch

from lorakit.checks import CheckFailed, expect, judged
from lorakit.checks import setup as setup_checks
from lorakit.checks import wire
from lorakit.checks.wire import DataError, conforms, decode, encode
from lorakit.grading import testcells
from lorakit.grading.testcells import calls


# ---------------------------------------------------------------------------------------------- data

@pytest.mark.parametrize("dtype", wire.DTYPES)
def test_tensors_round_trip_bit_for_bit(dtype):
    t = (torch.randn(3, 5, 2) * 50).to(getattr(torch, dtype))
    back = decode(encode({"t": t}))["t"]
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_plain_data_round_trips_and_odd_values_survive():
    data = {"a": [1, 2.5, "x", None, True], "b": {"c": float("nan"), "d": float("-inf")},
            "e": torch.empty(0, 3), "f": torch.tensor(7)}
    back = decode(encode(data))
    assert back["a"] == [1, 2.5, "x", None, True] and type(back["a"][4]) is bool
    assert math.isnan(back["b"]["c"]) and back["b"]["d"] == float("-inf")
    assert back["e"].shape == (0, 3) and back["f"].item() == 7 and back["f"].shape == ()


def test_numpy_and_tuples_become_data():
    import numpy as np
    back = decode(encode({"x": np.arange(4, dtype=np.int32), "y": np.float64(1.5), "z": (1, 2)}))
    assert back["x"].dtype == torch.int32 and back["y"] == 1.5 and back["z"] == [1, 2]


def test_subclasses_of_plain_types_lose_their_methods():
    class Liar(str):
        def __eq__(self, other):
            return True
    back = decode(encode({"s": Liar("no")}))
    assert type(back["s"]) is str and back["s"] != "yes"


@pytest.mark.parametrize("obj, why", [
    ({"f": lambda: 1}, "not data"), ({1: 2}, "not a string"), ({"t": torch.zeros(2, dtype=torch.complex64)}, "dtype"),
    ({"s": {1, 2}}, "not data"),
])
def test_what_is_not_data_is_refused_with_the_place_named(obj, why):
    with pytest.raises(DataError, match=why):
        encode(obj)


@pytest.mark.parametrize("text, why", [
    ('{"t": {"$tensor": ["float32", [2], "AAAA"]}}', "bytes for a float32"),
    ('{"t": {"$tensor": ["object", [1], ""]}}', "dtype"),
    ('{"t": {"$tensor": ["float32", [-1], ""]}}', "shape"),
    ('{"t": {"$tensor": ["float32", [2]]}}', "malformed"),
    ('{"t": {"$tensor": ["uint8", [1], "!!"]}}', "base64"),
    ('{"t": {"$tensor": ["bool", [1], "Ag=="]}}', "bool"),
    ('{"x": NaN}', "not valid data"), ("not json", "not valid data"), ("[" * 100 + "]" * 100, "nested"),
    ('{"f": {"$float": "1e400"}}', "not nan"),
])
def test_garbage_is_refused_with_a_reason(text, why):
    with pytest.raises(DataError, match=why):
        decode(text)


def test_limits(monkeypatch):
    monkeypatch.setattr(wire, "MAX_DATA_BYTES", 1000)
    with pytest.raises(DataError, match="limit"):
        decode("[" + "1," * 1000 + "1]")
    with pytest.raises(DataError, match="limit"):
        encode({"t": torch.zeros(1000)})
    monkeypatch.setattr(wire, "MAX_TENSOR_ELEMENTS", 10)
    with pytest.raises(DataError, match="elements"):
        decode(json.dumps({"t": {"$tensor": ["uint8", [11], ""]}}))


# ---------------------------------------------------------------------------------------- answer shapes

def test_conforms_says_what_is_wrong():
    spec = {"y": torch.Tensor, "n": int, "names": [str], "opt": (float, None)}
    conforms({"y": torch.zeros(1), "n": 3, "names": ["a"], "opt": None, "extra": 1}, spec)
    with pytest.raises(CheckFailed, match=r"missing 'n'"):
        conforms({"y": torch.zeros(1), "names": [], "opt": 1.0}, spec)
    with pytest.raises(CheckFailed, match=r"\['names'\]\[1\] should be a str"):
        conforms({"y": torch.zeros(1), "n": 1, "names": ["a", 2], "opt": 1.0}, spec)
    with pytest.raises(CheckFailed, match="should be a int"):
        conforms({"y": torch.zeros(1), "n": True, "names": [], "opt": 1.0}, spec)


# --------------------------------------------------------------------------------------------- checks

def test_a_check_passes_the_right_answer_and_explains_a_wrong_one(capsys):
    right = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "nf4": 0.5}
    setup_checks.bytes_per_param(right)
    assert "bytes per parameter" in capsys.readouterr().out
    with pytest.raises(CheckFailed, match="expected 4.0 bytes per parameter, found 8"):
        setup_checks.bytes_per_param(dict(right, fp32=8))
    with pytest.raises(CheckFailed, match="should be a dict"):
        setup_checks.bytes_per_param([4, 2])
    for seed in (1, 2, "grading"):
        setup_checks.weights_gb(lambda n, d: n * right[d] / 1e9, seed=seed)


def test_a_learner_exception_is_a_failed_check_with_a_hint():
    def stub(n, dtype):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="NotImplementedError.*replace it with your code"):
        setup_checks.weights_gb(stub)


def test_the_probe_gets_its_own_copy_of_the_inputs():
    @judged.judged_check
    class mutating:
        answer = {"ok": bool}

        def draw(rng):
            return {"x": rng.randn(3)}

        def probe(inputs, fn):
            fn(inputs["x"])
            return {"ok": True}

        def judge(inputs, answer):
            expect(bool((inputs["x"] != 0).all()), "the judge saw the learner's change")
            return "ok"
    mutating(lambda x: x.zero_())


def test_seeds_draw_the_same_inputs_and_grading_seeds_differ():
    c = setup_checks.weights_gb
    assert c.inputs(3) == c.inputs(3) and c.inputs(3) != c.inputs(4)
    assert len({judged.draw_seed("grading") for _ in range(5)}) > 1
    with pytest.raises(TypeError, match="seed"):
        judged.draw_seed("secret")


def test_verdict_never_raises_on_bad_replies():
    c = setup_checks.weights_gb
    inputs = c.inputs(0)
    for reply in [None, {}, {"ok": "yes"}, {"ok": False}, {"ok": True, "answer": {"sizes": "x"}},
                  {"ok": True, "answer": {"sizes": [None] * 6}}, {"ok": True, "answer": {}}]:
        v = c.verdict(inputs, reply)
        assert not v.passed and v.message


def test_find_only_returns_checks():
    assert judged.find("lorakit.checks.setup.weights_gb") is setup_checks.weights_gb
    for name in ("lorakit.checks.setup._bytes", "os.system", "lorakit.checks.setup.nothing"):
        with pytest.raises(LookupError):
            judged.find(name)


# ---------------------------------------------------------------------------------------- test cells

def test_calls_reads_a_test_cell_without_running_it():
    src = ("# ex02_lora_linear_test\nfrom lorakit.checks import lora as check\ncheck.lora_linear(LoRALinear)\n"
           "### BEGIN HIDDEN TESTS\ncheck.lora_linear(LoRALinear, seed=\"grading\", extra=model.config)\n"
           "### END HIDDEN TESTS")
    got = calls(src)
    assert [(c.check, c.args, c.kwargs, c.seed, c.line) for c in got] == [
        ("lorakit.checks.lora.lora_linear", ["LoRALinear"], {}, 0, 3),
        ("lorakit.checks.lora.lora_linear", ["LoRALinear"], {"extra": "model.config"}, "grading", 5)]
    assert calls("check.x(a)", {"check": "lorakit.checks.nf4"})[0].check == "lorakit.checks.nf4.x"


@pytest.mark.parametrize("src, why", [
    ("check.x(a)\nassert a == 1", "may only import"), ("x = 1", "may only import"), ("import os", "may only import"),
    ("other.x(a)", "not a check"), ("check.x(*a)", r"\*args"), ("check.x(**a)", r"\*\*kwargs"),
    ("check.x(a, seed=n)", "literal"), ("check.x(a, seed='later')", "seed"),
])
def test_calls_refuses_anything_else(src, why):
    with pytest.raises((ValueError, TypeError), match=why):
        calls(src, {"check": "lorakit.checks.setup"})


@pytest.mark.parametrize("lesson", ["00_setup", "01_memory", "02_lora", "03_nf4", "04_qlora_from_scratch",
                                    "05_qlora_finetune"])
def test_test_cells_are_judged_checks_only(lesson):
    """Every test cell of the lesson reads as check calls: visible ones on a literal seed, then the same
    checks with seed="grading" (what the grader draws secret inputs for)."""
    import nbformat
    from lorakit import course
    nb = nbformat.read(course.solution_path(lesson), as_version=4)
    known = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.metadata.get("nbgrader", {}).get("grade"):
            cs = calls(cell.source, known)
            assert cs and all(judged.find(c.check) for c in cs), cell.source
            visible = [c.check for c in cs if c.seed != "grading"]
            hidden = [c.check for c in cs if c.seed == "grading"]
            assert visible and hidden and set(hidden) >= set(visible) - {"lorakit.checks.finetune.before_eval"}, cell.source
        known.update(testcells.aliases(cell.source))  # an alias bound in a test cell serves the later ones


def test_lesson_00_checks_in_order():
    import nbformat
    from lorakit import course
    nb = nbformat.read(course.solution_path("00_setup"), as_version=4)
    known, found = {}, []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.metadata.get("nbgrader", {}).get("grade"):
            found += [judged.find(c.check) for c in calls(cell.source, known)]
        known.update(testcells.aliases(cell.source))
    assert found == [setup_checks.bytes_per_param] * 2 + [setup_checks.weights_gb] * 2


# ------------------------------------------------------------------ the cells after an open exercise

def test_yours_or_kit_uses_the_reference_while_the_exercise_is_open_and_says_so_once(capsys):
    from lorakit.checks import yours_or_kit
    from lorakit.memory import count_parameters

    def stub(cfg):
        raise NotImplementedError()

    count = yours_or_kit(stub, count_parameters, "Exercise 3")
    assert count("llama-2-7b") == count("llama-2-7b") == 6_738_415_616
    out = capsys.readouterr().out
    assert out.count("Exercise 3 is not done yet") == 1 and "`lorakit.memory.count_parameters` instead" in out
    assert yours_or_kit(lambda cfg: 7, count_parameters, "Exercise 3")("llama-2-7b") == 7   # yours, once it works
    assert capsys.readouterr().out == ""
    assert yours_or_kit(stub, None, "Exercise 4")("x") is None                         # nothing made up
    assert "gives None until it is" in capsys.readouterr().out

    def wrong(cfg):
        raise ValueError("a bug of the learner's")
    with pytest.raises(ValueError, match="a bug"):                                      # other errors are the learner's
        yours_or_kit(wrong, count_parameters, "Exercise 3")("llama-2-7b")

"""The library mirrors the lessons: an exercise's function is in lorakit under the same name, with the same
parameters, and passes the exercise's own check (LLMs-from-scratch's package mirrors its notebooks the same way).
A learner stuck on an exercise can read or import the library's version."""

import ast
import inspect
import json

import pytest

from lorakit import course, dora, memory, nf4, qlora
from lorakit.checks import beyond_lora, lora, setup
from lorakit.checks import nf4 as nf4_checks
from lorakit.checks import qlora as qlora_checks
from lorakit.lora import LoRALinear

# exercise grade_id -> (lesson, the library's mirror of each function the exercise defines)
MIRRORS = {
    "ex00_weights_gb": ("00_setup", [memory.weights_gb]),
    "ex02_peft_copy": ("02_lora", [qlora.copy_into_peft]),
    "ex03_describe": ("03_nf4", [nf4.describe]),
    "ex03_absmax_int8": ("03_nf4", [nf4.absmax_quantize, nf4.absmax_dequantize]),
    "ex03_blockwise": ("03_nf4", [nf4.blockwise_quantize, nf4.blockwise_dequantize]),
    "ex03_nf4_code": ("03_nf4", [nf4.nf4_values]),
    "ex03_double_quant": ("03_nf4", [nf4.double_quantize]),
    "ex04_stored_bits": ("04_qlora_from_scratch", [qlora.stored_bits]),
    "ex07_dora_forward": ("07_beyond_lora", [dora.dora_forward]),
}


def _exercise_functions(lesson: str, grade_id: str) -> dict[str, ast.FunctionDef]:
    nb = json.loads(course.solution_path(lesson).read_text())
    for cell in nb["cells"]:
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id:
            return {n.name: n for n in ast.parse("".join(cell["source"])).body if isinstance(n, ast.FunctionDef)}
    raise AssertionError(f"no cell {grade_id} in {lesson}")


@pytest.mark.parametrize("grade_id", sorted(MIRRORS))
def test_the_mirror_has_the_exercises_name_and_parameters(grade_id):
    lesson, mirrors = MIRRORS[grade_id]
    defined = _exercise_functions(lesson, grade_id)
    for fn in mirrors:
        assert fn.__name__ in defined, f"{grade_id} defines {sorted(defined)}, not {fn.__name__}"
        node = defined[fn.__name__]
        args = node.args
        defaults = [None] * (len(args.args) - len(args.defaults)) + [ast.literal_eval(d) for d in args.defaults]
        want = [(a.arg, d) for a, d in zip(args.args, defaults)]
        got = [(p.name, None if p.default is inspect.Parameter.empty else p.default)
               for p in inspect.signature(fn).parameters.values()]
        assert got == want, f"lorakit's {fn.__qualname__}{inspect.signature(fn)} vs the exercise's {want}"


@pytest.mark.parametrize("seed", [0, "grading"])
def test_the_mirrors_pass_the_exercises_checks(seed):
    setup.weights_gb(memory.weights_gb, seed=seed)
    nf4_checks.describe(nf4.describe, seed=seed)
    nf4_checks.absmax_int8(nf4.absmax_quantize, nf4.absmax_dequantize, seed=seed)
    nf4_checks.blockwise(nf4.blockwise_quantize, nf4.blockwise_dequantize, seed=seed)
    nf4_checks.nf4_values(nf4.nf4_values, seed=seed)
    nf4_checks.double_quant(nf4.double_quantize, seed=seed)
    beyond_lora.dora_forward(dora.dora_forward, seed=seed)


def test_the_model_level_mirrors_pass_their_checks():
    lora.peft_equal(qlora.copy_into_peft, LoRALinear)
    qlora_checks.stored_bits(qlora.stored_bits, qlora.quantize_and_inject)
    assert qlora.stored_bits_per_param is qlora.stored_bits        # the older name stays


def test_the_checks_name_their_mirror():
    """Each check names the mirror as its reference (the copied-code flagger compares with it), except
    nf4_values, whose check says why it names nf4_code instead."""
    from lorakit.grading import reference_use
    named = {
        "lorakit.checks.setup.weights_gb": "lorakit.memory.weights_gb",
        "lorakit.checks.lora.peft_equal": "lorakit.qlora.copy_into_peft",
        "lorakit.checks.nf4.describe": "lorakit.nf4.describe",
        "lorakit.checks.nf4.absmax_int8": "lorakit.nf4.absmax_quantize",
        "lorakit.checks.nf4.blockwise": "lorakit.nf4.blockwise_quantize",
        "lorakit.checks.nf4.double_quant": "lorakit.nf4.double_quantize",
        "lorakit.checks.qlora.stored_bits": "lorakit.qlora.stored_bits",
        "lorakit.checks.beyond_lora.dora_forward": "lorakit.dora.dora_forward",
    }
    for check, mirror in named.items():
        assert mirror in reference_use.declared(check), (check, reference_use.declared(check))

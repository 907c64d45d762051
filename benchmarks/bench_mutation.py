"""Strength of the hidden checks: the mutation score of every exercise.

For each exercise, wrong implementations are made by mutating the solution's own code (the lines between
`### BEGIN SOLUTION` and `### END SOLUTION` of the instructor's notebook) with a small AST mutator: flipped
operators and comparisons, numbers off by one, slice bounds off by one, dropped terms, swapped arguments,
other dtypes and reductions, a statement left out. Each mutant runs through the hidden calls of the
exercise's test cells (`seed="grading"`) the way `lorakit grade` runs them: the check draws its inputs as
data, `probe` calls the mutant's objects, `judge` decides on the reply (the same `judged.run_probe` and
`Check.verdict`), without notebooks: the lesson's definitions (imports, literal constants, functions and
classes of every cell) are executed into a namespace, the exercise's cell replaced by the mutant.

A mutant is killed when a hidden call of its exercise fails; a grader error (a judge that raised on an
answer of the right shape) is counted apart, as a bug of the kit. Every survivor must be listed in
EQUIVALENT with why it computes the same thing on every input the exercise allows; an unexplained survivor
fails the run, as does a grader error or a total under GOAL.

    python benchmarks/bench_mutation.py                       # every lesson (about a minute on 2 cores)
    python benchmarks/bench_mutation.py --lesson 02 --lesson 04   # some lessons
    python benchmarks/bench_mutation.py --exercise ex03_blockwise -v   # one exercise, each mutant shown

Prints one row per exercise (mutants, killed, grader errors, equivalent, unexplained survivors) and the
course total; exits 1 when a promise is not met.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import os
import resource
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOAL = 0.95           # killed / (mutants - equivalent) across the course
SECONDS = 60          # one mutant's calls, at most (a mutant that loops is killed: the grader's cell limit)
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
# Exercises whose hidden checks need what the notebook computed (a trained model, the notebook's numbers):
# they have no solution cell to mutate, or take values no mutant could change.
NOT_FUNCTIONS = {"ex05_improvement"}

# Survivors shown equivalent: exercise -> {mutant description: why}. "Equivalent" means: on every input the
# exercise allows, the mutant gives the answer the exercise asks for (the same values, or values the exercise's
# stated precision cannot tell apart), or it differs only where the exercise asks nothing (said so below).
_SAME_DTYPE_FREE = "the exercise does not ask for a dtype: int8 codes times a float absmax are already float (torch " \
                   "promotes), and float64 holds the same values more precisely"
_CLAMP = "x / absmax lies in [-1, 1] (up to one rounding, which bucketize maps to the end codes either way): " \
         "a wider clamp changes nothing"
EQUIVALENT: dict[str, dict[str, str]] = {
    "ex01_count_parameters": {
        "L5:49 operator: `h // cfg.num_attention_heads` -> `h / cfg.num_attention_heads`":
            "every architecture's hidden size is a multiple of its heads: the same head_dim, as a float; the "
            "count is then a whole float, which the check accepts as a whole number",
    },
    "ex01_qlora_weights_gb": {
        "L6:12 operator: `n_quantized * nf4_bits(True) / 8` -> `n_quantized * nf4_bits(True) // 8`":
            "rounds the bytes down by less than one byte of billions: far inside the 0.2% the exercise's GB allow",
    },
    "ex02_lora_linear": {
        "L9:8 statement left out: `self.r = r` -> `pass`":
            "the exercise asks for base_layer, lora_A, lora_B, lora_dropout, scaling and merged; `r` is used by none",
        "L14:8 statement left out: `nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))` -> `pass`":
            "nn.Linear initialises its weight with this very kaiming_uniform_(a=sqrt(5)) (the exercise says so)",
        "L40:8 statement left out: `if not self.merged:` -> `pass`":
            "unmerge() of a layer that is not merged: the exercise asks unmerge() to undo merge(), nothing more",
        "L41:12 statement left out: `warnings.warn('this LoRALinear is not merged: nothing done')` -> `pass`":
            "a warning when unmerging a layer that is not merged: not asked by the exercise",
    },
    "ex03_absmax_int8": {
        "L11:11 `.float()` dropped: `q.float()` -> `q`": _SAME_DTYPE_FREE,
        "L11:11 other function or dtype: `q.float` -> `q.double`": _SAME_DTYPE_FREE,
    },
    "ex03_blockwise": {
        "L12:12 `.float()` dropped: `q.float()` -> `q`": _SAME_DTYPE_FREE,
        "L12:12 other function or dtype: `q.float` -> `q.double`": _SAME_DTYPE_FREE,
    },
    "ex03_nf4_code": {
        "L6:8 `.float()` dropped: `torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).f` -> "
        "`torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])`":
            "the same 16 values in float64, equal to bitsandbytes' table once compared in float32 (no dtype asked)",
        "L6:8 other function or dtype: `torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).f` -> "
        "`torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).d`":
            "the same 16 values in float64 (no dtype asked)",
        "L6:24 keyword dtype dropped: `torch.zeros(1, dtype=torch.float64)` -> `torch.zeros(1)`":
            "torch.cat promotes the float32 zero to float64: the same tensor",
        "L6:45 other function or dtype: `torch.float64` -> `torch.float32`":
            "torch.cat promotes the float32 zero to float64: the same tensor",
    },
    "ex03_quantize_nf4": {
        "L9:47 constant: `1e-38` -> `2e-38`":
            "the clamp only keeps a full all-zero block from dividing by zero: 0 times either reciprocal is 0, and "
            "the absmax stored is the unclamped one",
        "L9:47 constant: `1e-38` -> `5e-39`": "as for 2e-38: a full block's clamp never reaches what is stored",
        "L9:72 constant: `1` -> `2`": _CLAMP,
        "L9:75 constant: `1` -> `2`": _CLAMP,
        "L13:61 constant: `1` -> `2`": _CLAMP,
        "L13:64 constant: `1` -> `2`": _CLAMP,
        "L17:14 operator: `idx[0::2] << 4 | idx[1::2]` -> `idx[0::2] << 4 ^ idx[1::2]`":
            "the shifted nibble and the low nibble share no bit: OR and XOR are the same",
    },
    "ex03_double_quant": {
        "L10:56 constant: `1` -> `2`": _CLAMP,
        "L10:59 constant: `1` -> `2`": _CLAMP,
        "L11:53 other function or dtype: `torch.int32` -> `torch.int64`":
            "grid points below 65,536 fit either integer type, and are made .long() right after",
    },
    "ex04_nf4_linear": {
        "L8:52 `.detach()` dropped: `linear.weight.detach()` -> `linear.weight`":
            "quantize_nf4 reads the values; the packed bytes and constants are the same",
        "L8:52 other function or dtype: `linear.weight.detach` -> `linear.weight.clone`": "the same values",
        "L10:66 `.clone()` dropped: `linear.bias.detach().clone()` -> `linear.bias.detach()`":
            "the frozen bias shares the given layer's storage: the same values, and nothing writes to them",
        "L10:66 `.detach()` dropped: `linear.bias.detach()` -> `linear.bias`":
            "an nn.Parameter made from it is a fresh leaf with requires_grad=False: the same frozen bias",
        "L10:66 other function or dtype: `linear.bias.detach` -> `linear.bias.clone`": "the same frozen bias",
    },
    "ex04_quantize_and_inject": {
        "L8:4 statement left out: `if not names:` -> `pass`":
            "lesson 04's exercise does not ask for an error when nothing matches (lesson 02's does)",
        "L9:8 statement left out: `raise ValueError(f'target_modules={target_modules!r} matched` -> `pass`":
            "lesson 04's exercise does not ask for an error when nothing matches (lesson 02's does)",
    },
    "ex04_stored_bits": {
        "L5:17 operator: `m.weight.numel() * m.weight.element_size()` -> `m.weight.numel() / m.weight.element_size()`":
            "the packed weight is uint8 by construction: element_size() is 1",
        "L5:17 term dropped: `m.weight.numel() * m.weight.element_size()` -> `m.weight.numel()`":
            "the packed weight is uint8 by construction: element_size() is 1",
    },
    "ex05_predict_trainable": {
        "L6:52 operator: `h // config.num_attention_heads` -> `h / config.num_attention_heads`":
            "a LlamaConfig always has head_dim (hidden / heads when not given), so the division never runs",
    },
    "ex05_masking": {
        "L9:11 arguments swapped: `max(0, max_length - len(answer_ids))` -> `max(max_length - len(answer_ids), 0)`":
            "max is symmetric",
        "L9:15 constant: `0` -> `1`":
            "differs only when max_length leaves no room beyond the answer and EOS, which the exercise's reference "
            "(lorakit.data.tokenize_with_masking) refuses: not an input of the exercise",
        "L10:56 comparison: `len(prompt_ids) > room` -> `len(prompt_ids) >= room`":
            "when the prompt fits exactly, slicing from len - room = 0 keeps it whole: the same ids",
    },
    "ex06_prediction": {
        "L5:12 constant: `'qlora_slower'` -> `'qlora_slower_'`":
            "qlora_slower is shown, not graded: the exercise says it depends on the hardware",
        "L5:28 constant: `True` -> `False`": "qlora_slower is shown, not graded (the exercise says so)",
    },
    "ex06_budget": {
        "L7:11 keyword kind dropped: `fits.sort_values(['exact_match', memory, 'trainable_params']` -> "
        "`fits.sort_values(['exact_match', memory, 'trainable_params']`":
            "pandas applies `kind` only when sorting on a single column (its documentation): ignored here",
        "L8:33 constant: `'stable'` -> `'stable_'`": "pandas ignores `kind` when sorting on several columns",
    },
    "ex07_loftq_iteration": {
        "L7:8 `.float()` dropped: `weight.detach().float()` -> `weight.detach()`":
            "the exercise's weights are float32 already",
        "L7:8 `.detach()` dropped: `weight.detach()` -> `weight`": "the weight requires no gradient: the same tensor",
        "L7:8 other function or dtype: `weight.detach` -> `weight.clone`": "the same values",
        "L9:20 keyword blocksize dropped: `quantize_nf4(target, blocksize=64, double_quant=False)` -> "
        "`quantize_nf4(target, double_quant=False)`": "64 is quantize_nf4's default blocksize",
        "L9:20 keyword double_quant dropped: `quantize_nf4(target, blocksize=64, double_quant=False)` -> "
        "`quantize_nf4(target, blocksize=64)`": "double_quant=False is quantize_nf4's default",
        "L10:19 keyword dtype dropped: `dequantize_nf4(packed, state, dtype=torch.float32)` -> "
        "`dequantize_nf4(packed, state)`": "the state's dtype is the target's, float32: the default is the same",
        "L10:55 other function or dtype: `torch.float32` -> `torch.float64`":
            "the residual and its SVD in float64: the same adapters, more precisely (within the check's 1e-4)",
        "L11:15 keyword full_matrices dropped: `torch.linalg.svd(residual, full_matrices=False)` -> "
        "`torch.linalg.svd(residual)`": "only the first r columns of U and rows of Vh are used: the same in both",
        "L11:56 constant: `False` -> `True`": "only the first r columns of U and rows of Vh are used",
    },
    "ex07_concat_lora": {
        "L4:8 keyword dim dropped: `torch.cat([A * (w * s) for A, w, s in zip(lora_As, weights, ` -> "
        "`torch.cat([A * (w * s) for A, w, s in zip(lora_As, weights, `": "dim=0 is torch.cat's default",
        "L4:46 arguments swapped: `zip(lora_As, weights, scalings)` -> `zip(weights, lora_As, scalings)`":
            "A * (w * s) with A and w swapped is w * (A * s): the same product, up to one rounding",
    },
    "ex08_zero_bytes": {
        "L6:30 operator: `(2 + 2 + k - whole) * n_params / world_size` -> "
        "`(2 + 2 + k - whole) * n_params // world_size`":
            "rounds down by less than a byte of billions: far inside the 0.1% the check allows",
    },
    "ex08_rank_loss": {
        "L8:16 `.float()` dropped: `logits[:, :-1].float()` -> `logits[:, :-1]`":
            "the exercise's logits are float32 already",
        "L8:16 other function or dtype: `logits[:, :-1].float` -> `logits[:, :-1].double`":
            "the same loss in float64, and autograd casts the gradient back to float32",
        "L10:12 keyword ignore_index dropped: `F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), ` -> "
        "`F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), `": "-100 is cross_entropy's default ignore_index",
    },
}


# ------------------------------------------------------------------------------------- the lesson's code

@dataclass
class Exercise:
    lesson: str
    grade_id: str                 # of the solution cell
    source: str                   # the cell's source, markers included
    tests: list                   # [(test grade_id, [lorakit.grading.testcells.Call])]: the hidden calls of its test cells
    index: int                    # position of the cell in the notebook


def _parse(source: str) -> ast.Module | None:
    """A cell as Python: IPython magics and shell lines (% and !) left out; None when it does not parse."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def _definitions(tree: ast.Module) -> ast.Module:
    """The statements of a cell that define without computing: imports, functions, classes, and names bound
    to literals (the parameters cell, PREFERENCE). Everything else needs the notebook's run."""
    keep = []
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            keep.append(stmt)
        elif isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
            try:
                ast.literal_eval(stmt.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            keep.append(stmt)
    return ast.Module(body=keep, type_ignores=[])


def _cells(lesson: str):
    import nbformat

    from lorakit import course
    return nbformat.read(course.solution_path(lesson), as_version=4).cells


def exercises(lesson: str) -> list[Exercise]:
    """The lesson's exercises that define code, each with the hidden calls of its test cells."""
    from lorakit.checks import judged
    from lorakit.grading import testcells
    cells = _cells(lesson)
    known, tests = {}, {}
    for cell in cells:
        if cell.cell_type != "code":
            continue
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade"):
            tests[meta["grade_id"]] = [c for c in testcells.calls(cell.source, known) if c.seed == judged.GRADING]
        known.update(testcells.aliases(cell.source))
    out = []
    for i, cell in enumerate(cells):
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("solution") and meta.get("grade_id") not in NOT_FUNCTIONS:
            gid = meta["grade_id"]
            mine = [(t, calls) for t, calls in tests.items() if t.startswith(gid + "_") and calls]
            out.append(Exercise(lesson, gid, cell.source, mine, i))
    return out


def namespace(lesson: str, replace: dict[str, str] | None = None) -> dict:
    """The lesson's definitions executed in order into a fresh namespace (see `_definitions`), with the
    source of the exercise cells named in `replace` ({grade_id: source}) in place of the instructor's."""
    replace = replace or {}
    ns: dict = {"__name__": "__lesson__"}
    for cell in _cells(lesson):
        if cell.cell_type != "code":
            continue
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        tree = _parse(replace.get(gid, cell.source))
        if tree is None:
            continue
        for stmt in _definitions(tree).body:
            try:
                with warnings.catch_warnings():  # a mutant like `1.0[::2]` compiles with a SyntaxWarning
                    warnings.simplefilter("ignore")
                    code = compile(ast.fix_missing_locations(ast.Module([stmt], [])), f"<{lesson} {gid or 'cell'}>",
                                   "exec")
                    exec(code, ns)  # noqa: S102 - the kit's own notebooks, or mutants of them
            except Exception:
                if gid in replace:
                    raise
                # a definition that needs the notebook's run (a default argument computed earlier): left out
    return ns


# --------------------------------------------------------------------------------------------- mutants

SWAP_BINOP = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div, ast.Add], ast.Div: [ast.Mult, ast.FloorDiv],
              ast.FloorDiv: [ast.Div], ast.Mod: [ast.FloorDiv], ast.Pow: [ast.Mult], ast.MatMult: [ast.Mult],
              ast.LShift: [ast.RShift], ast.RShift: [ast.LShift], ast.BitOr: [ast.BitXor, ast.BitAnd],
              ast.BitAnd: [ast.BitOr], ast.BitXor: [ast.BitOr]}
SWAP_CMP = {ast.Lt: [ast.LtE, ast.Gt], ast.LtE: [ast.Lt], ast.Gt: [ast.GtE, ast.Lt], ast.GtE: [ast.Gt],
            ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq], ast.Is: [ast.IsNot], ast.IsNot: [ast.Is], ast.In: [ast.NotIn],
            ast.NotIn: [ast.In]}
SWAP_NAME = {"amax": "amin", "amin": "amax", "max": "min", "min": "max", "sum": "mean", "mean": "sum",
             "float32": "float64", "float64": "float32", "bfloat16": "float16", "float16": "bfloat16",
             "int8": "uint8", "uint8": "int8", "int32": "int64", "float": "double", "ceil": "floor",
             "floor": "ceil", "round": "floor", "zeros_": "ones_", "cat": "stack", "detach": "clone",
             "linspace": "logspace", "stack": "cat", "mul": "div", "isnan": "isinf", "strip": "lstrip",
             "zero_grad": "train", "step": "zero_grad", "median": "mean", "requires_grad_": "detach_"}
DROP_CALL = {"abs", "detach", "float", "clone", "contiguous", "reshape", "view", "sort", "values", "item", "strip",
             "t", "unsqueeze", "squeeze", "tolist"}


@dataclass
class Mutant:
    description: str              # "L5:11 operator: `a + b` -> `a - b`" (line:column in the cell): names the change
    source: str                   # the whole cell, mutated


@dataclass
class _Site:
    node: ast.AST
    field: str
    index: int | None
    replacement: ast.AST
    what: str


def _const_variants(v):
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, int):
        return [v + 1, v - 1] if v not in (0, 1) else [v + 1] + ([0] if v == 1 else [])
    if isinstance(v, float):
        return [v * 2, v / 2] if v else [1.0]
    if isinstance(v, str) and v and len(v) < 30 and v.isidentifier():
        return [v + "_"]
    return []


class _Sites(ast.NodeVisitor):
    """Every place a mutation operator applies, inside the solution's lines."""

    def __init__(self, lines: range):
        self.lines, self.sites = lines, []

    def _in(self, node) -> bool:
        return getattr(node, "lineno", -1) in self.lines

    def _replace(self, parent, field, index, new, what):
        self.sites.append(_Site(parent, field, index, new, what))

    def generic_visit(self, node):
        for field_name, value in ast.iter_fields(node):
            items = value if isinstance(value, list) else [value]
            for i, child in enumerate(items):
                if not isinstance(child, ast.AST):
                    continue
                index = i if isinstance(value, list) else None
                if self._in(child):
                    for new, what in self._variants(child):
                        self._replace(node, field_name, index, new, what)
                    if isinstance(child, ast.stmt) and isinstance(value, list) and not isinstance(
                            child, (ast.FunctionDef, ast.ClassDef, ast.Return)):
                        self._replace(node, field_name, index, ast.Pass(), "statement left out")
                self.visit(child)

    def _variants(self, n):
        out = []
        if isinstance(n, ast.BinOp):
            for op in SWAP_BINOP.get(type(n.op), []):
                m = copy.deepcopy(n)
                m.op = op()
                out.append((m, "operator"))
            if isinstance(n.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
                out.append((copy.deepcopy(n.left), "term dropped"))
                if isinstance(n.op, (ast.Add, ast.Mult)):
                    out.append((copy.deepcopy(n.right), "term dropped"))
        elif isinstance(n, ast.Compare) and len(n.ops) == 1:
            for op in SWAP_CMP.get(type(n.ops[0]), []):
                m = copy.deepcopy(n)
                m.ops = [op()]
                out.append((m, "comparison"))
        elif isinstance(n, ast.BoolOp):
            m = copy.deepcopy(n)
            m.op = ast.Or() if isinstance(n.op, ast.And) else ast.And()
            out.append((m, "boolean operator"))
        elif isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.Not, ast.Invert)):
            out.append((copy.deepcopy(n.operand), "sign or negation dropped"))
        elif isinstance(n, ast.Constant) and not isinstance(n.value, (bytes, type(None), type(...))):
            for v in _const_variants(n.value):
                out.append((ast.Constant(v), "constant"))
        elif isinstance(n, ast.Attribute) and n.attr in SWAP_NAME:
            m = copy.deepcopy(n)
            m.attr = SWAP_NAME[n.attr]
            out.append((m, "other function or dtype"))
        elif isinstance(n, ast.Call):
            f = n.func
            if isinstance(f, ast.Attribute) and f.attr in DROP_CALL and not n.args and not n.keywords:
                out.append((copy.deepcopy(f.value), f"`.{f.attr}()` dropped"))
            positional = [a for a in n.args if not isinstance(a, ast.Starred)]
            if len(positional) >= 2 and len(positional) == len(n.args):
                m = copy.deepcopy(n)
                m.args[0], m.args[1] = m.args[1], m.args[0]
                out.append((m, "arguments swapped"))
            for k, kw in enumerate(n.keywords):
                if kw.arg is not None:
                    m = copy.deepcopy(n)
                    del m.keywords[k]
                    out.append((m, f"keyword {kw.arg} dropped"))
        elif isinstance(n, ast.AugAssign) and type(n.op) in SWAP_BINOP:
            m = copy.deepcopy(n)
            m.op = SWAP_BINOP[type(n.op)][0]()
            out.append((m, "operator"))
        elif isinstance(n, ast.Slice):
            for part in ("lower", "upper"):
                bound = getattr(n, part)
                for delta in (1, -1):
                    m = copy.deepcopy(n)
                    new = ast.Constant(delta) if bound is None else ast.BinOp(copy.deepcopy(bound), ast.Add(), ast.Constant(delta))
                    if bound is None and delta < 0:
                        continue
                    setattr(m, part, new)
                    out.append((m, "slice bound off by one"))
        elif isinstance(n, ast.Return) and n.value is not None and isinstance(n.value, ast.IfExp):
            out.append((ast.Return(copy.deepcopy(n.value.body)), "condition ignored"))
        return out


def mutants(source: str) -> list[Mutant]:
    """Every mutant of the solution lines of a cell's `source`, deduplicated by the code they give."""
    lines = source.splitlines()
    begins = [i + 1 for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i + 1 for i, line in enumerate(lines) if line.strip() == END]
    tree = _parse(source)
    if tree is None or not begins:
        return []
    regions = [range(b + 1, e) for b, e in zip(begins, ends)]
    sites = []
    for region in regions:
        finder = _Sites(region)
        finder.visit(tree)
        sites += finder.sites
    original = ast.unparse(tree)
    seen, out = {original}, []
    for site in sites:
        target = getattr(site.node, site.field)
        old = target[site.index] if site.index is not None else target
        if site.index is not None:
            target[site.index] = site.replacement
        else:
            setattr(site.node, site.field, site.replacement)
        try:
            code = ast.unparse(ast.fix_missing_locations(tree))
            before = ast.unparse(old).splitlines()[0][:60]
            after = ast.unparse(site.replacement).splitlines()[0][:60] if not isinstance(site.replacement, ast.Pass) else "pass"
        finally:
            if site.index is not None:
                target[site.index] = old
            else:
                setattr(site.node, site.field, old)
        if code in seen:
            continue
        seen.add(code)
        out.append(Mutant(f"L{old.lineno}:{old.col_offset} {site.what}: `{before}` -> `{after}`", code))
    return out


# ------------------------------------------------------------------------------------------ the score

@dataclass
class Outcome:
    killed: bool
    grader_error: bool = False
    why: str = ""                 # the first failing verdict's message, or the error


@dataclass
class Row:
    exercise: str
    mutants: int = 0
    killed: int = 0
    grader_errors: list = field(default_factory=list)
    equivalent: list = field(default_factory=list)
    survivors: list = field(default_factory=list)
    seconds: float = 0.0


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"ran longer than {SECONDS} s")


def seed_for(exercise: str, description: str) -> int:
    """The grading seed of one mutant: fixed (the run is reproducible), different from mutant to mutant."""
    return int.from_bytes(hashlib.sha256(f"{exercise}|{description}".encode()).digest()[:4], "big") % 2**31


def judge_source(ex: Exercise, source: str, seed: int) -> Outcome:
    """Run the hidden calls of `ex`'s test cells on the cell `source` (grading inputs from `seed`), as the
    grader does; killed when any verdict fails."""
    from lorakit.checks import judged, wire
    try:
        ns = namespace(ex.lesson, {ex.grade_id: source})
    except BaseException as e:  # noqa: BLE001 - a mutant that does not even define its names is dead
        if isinstance(e, KeyboardInterrupt):
            raise
        return Outcome(True, why=f"the cell fails: {type(e).__name__}: {e}"[:200])
    for _, calls in ex.tests:
        for call in calls:
            check = judged.find(call.check)
            inputs = check.inputs(seed, grading=True)
            sent = wire.decode(wire.encode(inputs, where="inputs"), where="inputs")
            old = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(SECONDS)
            try:
                objects = [eval(a, ns) for a in call.args]  # noqa: S307 - the kit's own argument expressions
                kw = {k: eval(v, ns) for k, v in call.kwargs.items()}  # noqa: S307
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    reply = judged.run_probe(check, sent, objects, kw)
            except _Timeout as e:
                return Outcome(True, why=str(e))
            except Exception as e:  # noqa: BLE001 - probe errors are replies; anything else kills the mutant
                return Outcome(True, why=f"{type(e).__name__}: {e}"[:200])
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
            verdict = check.verdict(inputs, wire.decode(reply, where="reply"))
            if verdict.grader_error:
                return Outcome(True, True, verdict.message)
            if not verdict.passed:
                return Outcome(True, why=verdict.message.splitlines()[0][:200])
    return Outcome(False)


def score(ex: Exercise, verbose: bool = False, limit: int | None = None) -> Row:
    """The mutation row of one exercise (all its mutants, or the first `limit`)."""
    t0 = time.perf_counter()
    row = Row(ex.grade_id)
    base = judge_source(ex, ex.source, seed_for(ex.grade_id, "the solution"))
    if base.killed:
        raise RuntimeError(f"{ex.grade_id}: the solution itself fails its hidden checks: {base.why}")
    for m in mutants(ex.source)[:limit]:
        row.mutants += 1
        o = judge_source(ex, m.source, seed_for(ex.grade_id, m.description))
        if o.grader_error:
            row.grader_errors.append(f"{m.description}: {o.why}")
        elif o.killed:
            row.killed += 1
        elif m.description in EQUIVALENT.get(ex.grade_id, {}):
            row.equivalent.append(m.description)
        else:
            row.survivors.append(m.description)
        if verbose:
            state = "GRADER ERROR" if o.grader_error else "killed" if o.killed else \
                "equivalent" if m.description in EQUIVALENT.get(ex.grade_id, {}) else "SURVIVED"
            print(f"    {state:<12} {m.description}" + (f"\n                 {o.why}" if o.why and verbose > 1 else ""))
    row.seconds = time.perf_counter() - t0
    return row


def print_table(rows: list[Row]) -> tuple[float, int, int]:
    print(f"{'exercise':<28} {'mutants':>7} {'killed':>6} {'equiv.':>6} {'survived':>8} {'errors':>6} {'score':>6} {'s':>6}")
    for r in rows:
        judged_n = r.mutants - len(r.equivalent)
        pct = r.killed / judged_n if judged_n else 1.0
        print(f"{r.exercise:<28} {r.mutants:>7} {r.killed:>6} {len(r.equivalent):>6} {len(r.survivors):>8} "
              f"{len(r.grader_errors):>6} {pct:>6.1%} {r.seconds:>6.1f}")
        for s in r.survivors:
            print(f"    survived: {s}")
        for e in r.grader_errors:
            print(f"    GRADER ERROR: {e}")
    mutants_n = sum(r.mutants - len(r.equivalent) for r in rows)
    killed = sum(r.killed for r in rows)
    total = killed / mutants_n if mutants_n else 1.0
    print(f"{'course':<28} {sum(r.mutants for r in rows):>7} {killed:>6} {sum(len(r.equivalent) for r in rows):>6} "
          f"{sum(len(r.survivors) for r in rows):>8} {sum(len(r.grader_errors) for r in rows):>6} {total:>6.1%}")
    return total, sum(len(r.survivors) for r in rows), sum(len(r.grader_errors) for r in rows)


def main() -> int:
    from lorakit import course
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lesson", action="append", help="a lesson (name or number); repeat for more; default: all")
    ap.add_argument("--exercise", action="append", help="one exercise's grade_id (ex03_blockwise); repeat for more")
    ap.add_argument("--limit", type=int, help="at most this many mutants per exercise (a quick look)")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="each mutant's fate (-vv: and why)")
    args = ap.parse_args()
    # A mutant that allocates without end fails inside this process instead of taking the machine down.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (min(12 * 2**30, hard if hard > 0 else 12 * 2**30), hard))
    import torch
    torch.set_num_threads(1)
    rows = []
    for lesson in course.select(args.lesson or course.lessons()):
        for ex in exercises(lesson):
            if args.exercise and ex.grade_id not in args.exercise:
                continue
            if args.verbose:
                print(f"{ex.grade_id}:")
            rows.append(score(ex, args.verbose, args.limit))
    total, survivors, errors = print_table(rows)
    ok = total >= GOAL and not survivors and not errors
    if not ok:
        print(f"promise not met: score {total:.1%} (goal {GOAL:.0%}), {survivors} unexplained survivor(s), "
              f"{errors} grader error(s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

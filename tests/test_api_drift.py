"""API drift: every keyword argument the course passes to transformers, peft, bitsandbytes (and datasets,
accelerate, safetensors, and lorakit's own functions) still exists in the installed versions.

Courses like this one break most often because a library renamed an argument (`torch_dtype` -> `dtype`,
`evaluation_strategy` -> `eval_strategy`, ...). Running the notebooks catches that too, but only for the
code paths CI takes (the CPU path, the tiny model); this test reads the code instead, so the GPU-only
branches count as well, and a failure names the call, the argument and where it is written.

How: every code cell of every solution notebook, and every module of lib/lorakit, is parsed with `ast`.
Imports say which names are library objects; a call's callee is resolved to the real object (`LoraConfig`,
`bnb.nn.Linear4bit`, `AutoModelForCausalLM.from_pretrained`, a method of a variable assigned from a library
constructor such as `trainer.train`), and its keyword arguments - including the keys of a dict passed as
`**kwargs` when the dict is built in the same file - are checked against `inspect.signature` (dataclass
fields count: `TrainingArguments`, `LoraConfig`). Where a callable takes `**kwargs`, a name is accepted only
if its source mentions it (transformers pops such arguments by name). Where the argument is a string and
the parameter's type is an Enum (`optim`, `lr_scheduler_type`, `task_type`), the value is checked too.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import importlib
import inspect
import logging
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

from lorakit import course

ROOT = course.course_root()
WATCHED = ("transformers", "peft", "bitsandbytes", "datasets", "accelerate", "safetensors", "trl", "lorakit")

# lorakit functions whose **kwargs are handed on to a library callable (checked there).
FORWARDS = {
    "lorakit.train.finetune": "transformers.TrainingArguments",
}
# Keywords that a newer library version renamed but still converts, kept because the older versions the
# course supports (pyproject.toml's ranges) need them. Each entry is proven to still work below.
LEGACY = {
    ("transformers.LlamaConfig", "rope_theta"):
        "transformers 5 moved it into rope_parameters and converts it; transformers 4.x needs rope_theta",
}
# Where a **kwargs-taking callable hands its keywords on (the source to search for accepted names).
KWARGS_SOURCES = {
    "transformers.AutoModelForCausalLM.from_pretrained": ["transformers.PreTrainedModel.from_pretrained",
                                                          "transformers.PreTrainedConfig"],
    "transformers.AutoModel.from_pretrained": ["transformers.PreTrainedModel.from_pretrained",
                                               "transformers.PreTrainedConfig"],
    "transformers.AutoTokenizer.from_pretrained": ["transformers.PreTrainedTokenizerBase.from_pretrained",
                                                   "transformers.PreTrainedTokenizerBase._from_pretrained",
                                                   "transformers.PreTrainedTokenizerBase.__init__"],
    "transformers.AutoConfig.from_pretrained": ["transformers.PreTrainedConfig.from_pretrained",
                                                "transformers.PreTrainedConfig"],
    "transformers.PreTrainedModel.from_pretrained": ["transformers.PreTrainedConfig"],
}
# What an instance of these is, for method calls on variables assigned from them.
RETURNS = {
    "transformers.AutoModelForCausalLM.from_pretrained": "transformers.PreTrainedModel",
    "transformers.AutoModel.from_pretrained": "transformers.PreTrainedModel",
    "transformers.AutoTokenizer.from_pretrained": "transformers.PreTrainedTokenizerBase",
    "transformers.AutoConfig.from_pretrained": "transformers.PreTrainedConfig",
    "peft.get_peft_model": "peft.PeftModel",
    "peft.PeftModel.from_pretrained": "peft.PeftModel",
    "peft.prepare_model_for_kbit_training": "transformers.PreTrainedModel",
}
# Classes that hand unknown attributes on to another object (PeftModel.__getattr__ -> its LoraModel).
DELEGATES = {"peft.PeftModel": ["peft.tuners.lora.LoraModel", "transformers.PreTrainedModel"]}


def _sources() -> list[tuple[str, str]]:
    """(label, python source) for every solution notebook code cell and every lorakit module."""
    out = []
    for nb_path in sorted(ROOT.glob("solutions/*/*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        cells = []
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            # IPython magics and shell lines are not Python: blank them, keeping line numbers.
            src = "\n".join("" if l.lstrip().startswith(("%", "!")) else l for l in cell.source.split("\n"))
            cells.append((i, src))
        # One notebook is one namespace: cells see each other's imports and variables.
        out.append((f"{nb_path.relative_to(ROOT)}", cells))
    for py in sorted((ROOT / "lib" / "lorakit").rglob("*.py")):
        out.append((f"{py.relative_to(ROOT)}", [(None, py.read_text())]))
    return out


# --------------------------------------------------------------------------------------------- resolve

def _resolve_dotted(dotted: str):
    """'transformers.TrainingArguments' -> the object (import the longest module prefix, then getattr)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(dotted)


def _qualname(obj) -> str:
    mod = getattr(obj, "__module__", "") or ""
    return f"{mod.split('.')[0]}.{getattr(obj, '__qualname__', getattr(obj, '__name__', repr(obj)))}"


@dataclass
class Problem:
    where: str
    message: str

    def __str__(self):
        return f"{self.where}: {self.message}"


@dataclass
class Checked:
    calls: list = field(default_factory=list)  # (where, callee dotted name, [keywords])
    problems: list = field(default_factory=list)


@functools.lru_cache(maxsize=None)
def _accepted(func, dotted: str) -> tuple[set[str] | None, dict]:
    """Parameter names `func` accepts (None: anything, via **kwargs with no way to tell) and their types."""
    target = func
    if inspect.isclass(func) and dataclasses.is_dataclass(func):
        names = {f.name for f in dataclasses.fields(func) if f.init}
        types = {f.name: f.type for f in dataclasses.fields(func)}
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            return names, types
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return names | set(sig.parameters), types
        target = func.__init__
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None, {}
    names = {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    types = {n: p.annotation for n, p in sig.parameters.items()}
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return names, types
    # **kwargs: accept the names the source mentions as strings or parameters, following the keywords
    # up the class hierarchy (they reach a base class's __init__) and to where KWARGS_SOURCES says they go.
    mentioned = set()
    owners = [target]
    if inspect.isclass(func):
        owners = [c.__init__ for c in func.__mro__ if c.__module__.split(".")[0] in WATCHED]
    for d in KWARGS_SOURCES.get(dotted, []):
        obj = _resolve_dotted(d)
        owners += [c.__init__ for c in obj.__mro__ if c.__module__.split(".")[0] in WATCHED] \
            if inspect.isclass(obj) else [obj]
        if inspect.isclass(obj):  # a config class: its attributes are accepted keywords
            mentioned |= {n for n in dir(obj) if not n.startswith("_")}
    for o in owners:
        mentioned |= _mentions(o)
    return names | mentioned, types


@functools.lru_cache(maxsize=None)
def _mentions(obj) -> frozenset:
    out = set()
    try:
        out |= set(re.findall(r"[\"'](\w+)[\"']", inspect.getsource(obj)))
        out |= set(inspect.signature(obj).parameters)
    except (TypeError, OSError, ValueError):
        pass
    return frozenset(out)


def _takes_var_keyword(func) -> bool:
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return True


def _enum_types(annotation) -> list[type]:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [annotation]
    return [e for a in typing.get_args(annotation) for e in _enum_types(a)]


class Collector(ast.NodeVisitor):
    """Walks one notebook's cells (or one module) in order, tracking imports, variables and dicts."""

    def __init__(self, label: str, result: Checked):
        self.label, self.result = label, result
        self.names: dict[str, str] = {}     # local name -> dotted path of a watched module or object
        self.types: dict[str, str] = {}     # variable -> dotted path of its class (an instance of it)
        self.dicts: dict[str, set] = {}     # variable -> keys known to be in a dict built here
        self.cell = None

    def where(self, node) -> str:
        cell = f" cell {self.cell}" if self.cell is not None else ""
        return f"{self.label}{cell} line {node.lineno}"

    # imports
    def visit_Import(self, node):
        for a in node.names:
            if a.name.split(".")[0] in WATCHED:
                if a.asname:
                    self.names[a.asname] = a.name
                else:
                    self.names[a.name.split(".")[0]] = a.name.split(".")[0]

    def visit_ImportFrom(self, node):
        mod = node.module or ""
        if node.level:  # a relative import inside lib/lorakit
            base = self.label.removeprefix("lib/").removesuffix(".py").replace("/", ".").split(".")
            mod = ".".join(base[:len(base) - node.level] + ([mod] if mod else []))
        if mod.split(".")[0] in WATCHED:
            for a in node.names:
                self.names[a.asname or a.name] = f"{mod}.{a.name}"

    # scopes: a function's variables and parameters do not leak out of it
    def visit_FunctionDef(self, node):
        saved = dict(self.types), {k: set(v) for k, v in self.dicts.items()}
        a = node.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
            if arg is not None:
                self.types.pop(arg.arg, None)
                self.dicts.pop(arg.arg, None)
        self.generic_visit(node)
        self.types, self.dicts = saved

    visit_AsyncFunctionDef = visit_FunctionDef

    # expressions -> dotted names
    def dotted(self, node) -> str | None:
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id in self.types:
                return self.types[node.id]
            return None
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def returns(self, call: ast.Call) -> str | None:
        callee = self.dotted(call.func)
        if not callee:
            return None
        if callee in RETURNS:
            return RETURNS[callee]
        try:
            obj = _resolve_dotted(callee)
        except Exception:
            return None
        if inspect.isclass(obj):
            return callee
        if callee.endswith(".from_pretrained") and inspect.isclass(_resolve_dotted(callee.rsplit(".", 1)[0])):
            return callee.rsplit(".", 1)[0]
        return None

    def visit_Assign(self, node):
        self.generic_visit(node)
        for target in node.targets:
            if isinstance(target, ast.Name):
                self.types.pop(target.id, None)
                self.dicts.pop(target.id, None)
                if isinstance(node.value, ast.Call):
                    t = self.returns(node.value)
                    if t:
                        self.types[target.id] = t
                    if isinstance(node.value.func, ast.Name) and node.value.func.id == "dict":
                        self.dicts[target.id] = {k.arg for k in node.value.keywords if k.arg}
                elif isinstance(node.value, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.value.keys):
                    self.dicts[target.id] = {k.value for k in node.value.keys}
            elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                  and target.value.id in self.dicts and isinstance(target.slice, ast.Constant)):
                self.dicts[target.value.id].add(target.slice.value)

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        # d.update(a=1) / d.update({"a": 1})
        if isinstance(f, ast.Attribute) and f.attr == "update" and isinstance(f.value, ast.Name) \
                and f.value.id in self.dicts:
            self.dicts[f.value.id] |= {k.arg for k in node.keywords if k.arg}
            for a in node.args:
                if isinstance(a, ast.Dict):
                    self.dicts[f.value.id] |= {k.value for k in a.keys if isinstance(k, ast.Constant)}
            return
        if isinstance(f, ast.Name) and f.id in self.types and f.id not in self.names:
            return  # calling an instance (a model's forward): not a library signature we pin
        callee = self.dotted(f)
        keywords = [k.arg for k in node.keywords if k.arg]
        for k in node.keywords:
            if k.arg is None and isinstance(k.value, ast.Name) and k.value.id in self.dicts:
                keywords += sorted(self.dicts[k.value.id])
            elif k.arg is None and isinstance(k.value, ast.Dict):
                keywords += [key.value for key in k.value.keys if isinstance(key, ast.Constant)]
        values = {k.arg: k.value.value for k in node.keywords
                  if k.arg and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)}
        if callee:
            self.check(node, callee, keywords, values)
        else:
            # A library callable handed to a helper with keyword arguments: the keywords are for it
            # (lorakit.models._not_found_is_clear(model_id, AutoModelForCausalLM.from_pretrained, path, **kwargs)).
            for a in node.args:
                inner = self.dotted(a)
                if inner and inner.split(".")[0] != "lorakit" and keywords:
                    self.check(node, inner, keywords, values)

    def check(self, node, callee: str, keywords: list[str], values: dict):
        where = self.where(node)
        try:
            obj = _resolve_dotted(callee)
        except AttributeError as e:
            obj = None
            for owner, delegates in DELEGATES.items():
                if callee.startswith(owner + "."):
                    for d in delegates:
                        try:
                            obj = _resolve_dotted(d + callee[len(owner):])
                            break
                        except AttributeError:
                            pass
            deep = any(callee.startswith(t + ".") and "." in callee[len(t) + 1:] for t in self.types.values())
            if obj is None:  # an instance attribute set in __init__ (trainer.accelerator.x) is not a drift sign
                if callee.split(".")[0] != "lorakit" and not deep:
                    self.result.problems.append(Problem(where, f"`{callee}` no longer exists ({e})"))
                return
        except ImportError:
            return
        if not callable(obj):
            return
        self.result.calls.append((where, callee, keywords))
        if not keywords:
            return
        forward = FORWARDS.get(callee)
        if callee.split(".")[0] == "lorakit" and not forward and _takes_var_keyword(obj):
            return  # lorakit's own **kwargs (viz.explore's controls, ...): anything goes
        accepted, types = _accepted(obj, callee)
        if forward:
            more, more_types = _accepted(_resolve_dotted(forward), forward)
            accepted = None if accepted is None or more is None else accepted | more
            types = {**more_types, **types}
        if callee.split(".")[0] == "lorakit" and not forward and accepted is None:
            return
        if accepted is None:
            self.result.problems.append(Problem(
                where, f"`{callee}` takes **kwargs and its accepted names cannot be read: add it to "
                       f"KWARGS_SOURCES in tests/test_api_drift.py (keywords: {keywords})"))
            return
        for kw in keywords:
            if kw not in accepted and (callee, kw) not in LEGACY:
                self.result.problems.append(Problem(
                    where, f"`{callee}` has no keyword argument `{kw}` in the installed "
                           f"{_version(callee)} (renamed or removed?)"))
        for kw, value in values.items():
            for e in _enum_types(types.get(kw)):
                if value not in {m.value for m in e} and value not in e.__members__:
                    self.result.problems.append(Problem(
                        where, f"`{callee}({kw}={value!r})`: {value!r} is not a value of {e.__name__} in the "
                               f"installed {_version(callee)}; valid: {sorted(m.value for m in e)[:12]}..."))


def _version(dotted: str) -> str:
    import importlib.metadata as md
    dist = dotted.split(".")[0]
    try:
        return f"{dist} {md.version(dist)}"
    except md.PackageNotFoundError:
        return dist


@pytest.fixture(scope="module")
def checked() -> Checked:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    result = Checked()
    for label, cells in _sources():
        collector = Collector(label, result)
        for cell_index, src in cells:
            collector.cell = cell_index
            try:
                tree = ast.parse(src)
            except SyntaxError as e:
                result.problems.append(Problem(f"{label} cell {cell_index}", f"does not parse: {e}"))
                continue
            collector.visit(tree)
    return result


def test_every_keyword_argument_exists_in_the_installed_libraries(checked):
    assert not checked.problems, "API drift:\n  " + "\n  ".join(map(str, checked.problems))


def test_the_calls_that_matter_are_seen(checked):
    """The collector really finds the course's library calls (a parser that finds nothing passes vacuously)."""
    seen = {callee for _, callee, _ in checked.calls}
    expected = {"transformers.BitsAndBytesConfig", "transformers.TrainingArguments", "transformers.Trainer",
                "peft.LoraConfig", "peft.get_peft_model", "transformers.AutoModelForCausalLM.from_pretrained",
                "bitsandbytes.functional.quantize_4bit"}
    if any(ROOT.glob("solutions/05_*/*.ipynb")):
        expected.add("peft.prepare_model_for_kbit_training")
    missing = expected - seen
    assert not missing, f"the drift check did not find these calls in the course: {sorted(missing)}"


def test_legacy_keywords_still_work():
    """Each LEGACY keyword is still converted by the installed version (else it is drift after all)."""
    from transformers import LlamaConfig
    assert set(LEGACY) == {("transformers.LlamaConfig", "rope_theta")}, "add a proof for the new LEGACY entry here"
    config = LlamaConfig(hidden_size=64, rope_theta=12345.0)
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    assert theta == 12345.0, "LlamaConfig(rope_theta=...) is ignored by the installed transformers: use rope_parameters"


# ----------------------------------------------------------------------- the checker catches real drift

def _problems(src: str) -> list[str]:
    result = Checked()
    Collector("example.py", result).visit(ast.parse(src))
    return [p.message for p in result.problems]


@pytest.mark.parametrize("src, fragment", [
    ("from transformers import TrainingArguments\nTrainingArguments(output_dir='x', evaluation_strategy='no')",
     "`transformers.TrainingArguments` has no keyword argument `evaluation_strategy`"),
    ("from peft import LoraConfig\nLoraConfig(r=8, lora_alpha=16, lora_droput=0.1)", "`lora_droput`"),
    ("from transformers import BitsAndBytesConfig\nBitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quantization=True)",
     "`bnb_4bit_use_double_quantization`"),
    ("import bitsandbytes as bnb\nbnb.nn.Linear4bit(64, 64, quant_typ='nf4')", "`quant_typ`"),
    ("from transformers import TrainingArguments\nargs = dict(output_dir='x')\nargs['max_step'] = 3\n"
     "TrainingArguments(**args)", "`max_step`"),
    ("from transformers import TrainingArguments\nTrainingArguments(output_dir='x', optim='adamw_turbo')",
     "'adamw_turbo' is not a value of OptimizerNames"),
    ("from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained('m', quantisation_config=None)",
     "`quantisation_config`"),
    ("from peft import get_peft_model\nm = get_peft_model(None, None)\nm.merge_and_unload(safe_merg=True)",
     "`safe_merg`"),
    ("import peft\npeft.prepare_model_for_int8_training(None)", "no longer exists"),
    ("from lorakit.train import finetune\nfinetune(None, None, None, use_trainer=True, optimiser='x')", "`optimiser`"),
])
def test_a_renamed_argument_fails_with_its_name(src, fragment):
    problems = _problems(src)
    assert any(fragment in p for p in problems), f"expected a problem mentioning {fragment!r}, got {problems}"


def test_correct_calls_pass():
    src = """
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
import torch
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained("m", quantization_config=cfg, dtype=torch.bfloat16, device_map="auto")
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
args = TrainingArguments(output_dir="x", optim="paged_adamw_32bit", lr_scheduler_type="cosine", max_grad_norm=0.3)
"""
    assert _problems(src) == []

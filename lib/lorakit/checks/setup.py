"""Checks for lesson 00 (setup), judged (see lorakit.checks.judged): the learner's table and function are
probed on inputs drawn from a seed, and the answers are compared with bits / 8."""

from . import close, expect
from .judged import judged

BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "nf4": 4}
LLAMA2_7B = 6_738_415_616


@judged
class bytes_per_param:
    """The learner's dict `bytes_per_param`: bytes per parameter of fp32, fp16, bf16, int8 and nf4."""
    answer = {"is_dict": bool, "keys": [str], "values": dict}
    reference = "lorakit.memory.BYTES"
    reported = {"is_dict": "whether the learner's object is a dict", "keys": "the names of its keys"}

    def draw(rng):
        return {"dtypes": list(BITS)}  # nothing to draw: the answer is five constants

    def probe(inputs, table):
        if not isinstance(table, dict):
            return {"is_dict": False, "keys": [], "values": {}}
        values = {}
        for k in inputs["dtypes"]:
            if k in table:
                v = table[k]
                values[k] = v if type(v) in (int, float) else repr(v)[:40]
        return {"is_dict": True, "keys": [str(k) for k in table], "values": values}

    def judge(inputs, answer):
        expect(answer["is_dict"], "`bytes_per_param` should be a dict like {'fp32': 4, ...}.")
        missing = [k for k in BITS if k not in answer["keys"]]
        expect(not missing, f"`bytes_per_param` is missing {missing}.",
               "add one entry per data type: fp32, fp16, bf16, int8, nf4.")
        for k in inputs["dtypes"]:
            found = answer["values"].get(k)
            expect(type(found) in (int, float) and close(found, BITS[k] / 8),
                   f"{k}: expected {BITS[k] / 8} bytes per parameter, found {found!r}.",
                   f"{k} stores {BITS[k]} bits per number and a byte has 8 bits.")
        return "bytes per parameter: fp32 4, fp16 2, bf16 2, int8 1, nf4 0.5 (before quantization constants)"


@judged
class weights_gb:
    """`weights_gb(n_params, dtype)`: the size of the weights in GB (1e9 bytes)."""
    answer = {"sizes": [object]}
    reference = "lorakit.memory.BYTES"

    def draw(rng):
        cases = [[LLAMA2_7B, "bf16"]]  # the lesson's example comes first: its number is in the message
        cases += [[rng.integer(10**6, 10**12), rng.choice(BITS)] for _ in range(5)]
        return {"cases": cases}

    def probe(inputs, fn):
        return {"sizes": [fn(n, dtype) for n, dtype in inputs["cases"]]}

    def judge(inputs, answer):
        expect(len(answer["sizes"]) == len(inputs["cases"]), "`weights_gb` should return one number per call.")
        for (n, dtype), got in zip(inputs["cases"], answer["sizes"]):
            want = n * BITS[dtype] / 8 / 1e9
            what = "Llama-2-7B" if n == LLAMA2_7B else f"{n:,} parameters"
            expect(type(got) in (int, float) and close(got, want, rel=1e-3),
                   f"{what} in {dtype}: expected about {want:.4g} GB, found {got!r}.",
                   "multiply the parameter count by bytes per parameter and divide by 1e9 (GB, not GiB).")
        return f"Llama-2-7B weights in bf16: {answer['sizes'][0]:.2f} GB"

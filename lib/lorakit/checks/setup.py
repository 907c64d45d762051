"""Checks for lesson 00 (setup), judged (see lorakit.checks.judged): the learner's table and function are
probed on inputs drawn from a seed, and the answers are compared with `lorakit.memory.BYTES` (bits / 8) and
`lorakit.memory.weights_gb`, the library's version of the second exercise."""

from lorakit.checks import close, expect
from lorakit.checks.judged import judged_check

def _bytes() -> dict:
    """lorakit.memory.BYTES, the reference table (imported when judging: the probe side stays light)."""
    from lorakit.memory import BYTES
    return BYTES


def _llama2_7b() -> int:
    """Llama-2-7B's published parameter count (lorakit.memory.PUBLISHED), the lesson's example."""
    from lorakit.memory import PUBLISHED
    return PUBLISHED["llama-2-7b"]


@judged_check
class bytes_per_param:
    """The learner's dict `bytes_per_param`: bytes per parameter of fp32, fp16, bf16, int8 and nf4."""
    answer = {"is_dict": bool, "keys": [str], "values": dict}
    reference = "lorakit.memory.BYTES"
    reported = {"is_dict": "whether the learner's object is a dict", "keys": "the names of its keys"}

    def draw(rng):
        return {"dtypes": list(_bytes())}  # nothing to draw: the answer is five constants

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
        missing = [k for k in _bytes() if k not in answer["keys"]]
        expect(not missing, f"`bytes_per_param` is missing {missing}.",
               "add one entry per data type: fp32, fp16, bf16, int8, nf4.")
        table = _bytes()
        for k in inputs["dtypes"]:
            found = answer["values"].get(k)
            expect(type(found) in (int, float) and close(found, table[k]),
                   f"{k}: expected {float(table[k])} bytes per parameter, found {found!r}.",
                   f"{k} stores {round(table[k] * 8)} bits per number and a byte has 8 bits.")
        return "bytes per parameter: fp32 4, fp16 2, bf16 2, int8 1, nf4 0.5 (before quantization constants)"


@judged_check
class weights_gb:
    """`weights_gb(n_params, dtype)`: the size of the weights in GB (1e9 bytes)."""
    answer = {"sizes": [object]}
    reference = ("lorakit.memory.weights_gb", "lorakit.memory.BYTES")

    def draw(rng):
        cases = [[_llama2_7b(), "bf16"]]  # the lesson's example comes first: its number is in the message
        cases += [[rng.integer(10**6, 10**12), rng.choice(_bytes())] for _ in range(5)]
        return {"cases": cases}

    def probe(inputs, fn):
        return {"sizes": [fn(n, dtype) for n, dtype in inputs["cases"]]}

    def judge(inputs, answer):
        from lorakit.memory import weights_gb
        expect(len(answer["sizes"]) == len(inputs["cases"]), "`weights_gb` should return one number per call.")
        llama2_7b = _llama2_7b()
        for (n, dtype), got in zip(inputs["cases"], answer["sizes"]):
            want = weights_gb(n, dtype)
            what = "Llama-2-7B" if n == llama2_7b else f"{n:,} parameters"
            expect(type(got) in (int, float) and close(got, want, rel=1e-3),
                   f"{what} in {dtype}: expected about {want:.4g} GB, found {got!r}.",
                   "multiply the parameter count by bytes per parameter and divide by 1e9 (GB, not GiB).")
        return f"Llama-2-7B weights in bf16: {answer['sizes'][0]:.2f} GB"

"""lorakit: a course kit that teaches LoRA and QLoRA by building every piece by hand, then using the real
stack (torch, transformers, peft, bitsandbytes, datasets).

The map of the library: one layer per heading, then one line per module. Concepts import only concepts; nothing
a learner imports (the first two layers) imports the pipeline, the grader or the tooling; only `cli` reaches
the grader, and nothing imports `cli`. tests/test_layering.py reads its layers from this map, and every module
of the package is named on exactly one line (a folder, `name/`, places the whole package).

Concepts: what the lessons build, one question per module; they import only each other
    validate       is a count the learner passed (a rank, a batch size) a whole number, and if not, why?
    install        what does the running kit need: tested versions, extras, Colab's install, the check after?
    env            which device and compute dtype, and does 4-bit quantization work here?
    models         which base model does a lesson load, and how (`load_base`)?
    data           what does the course train on: stories, tasks, prompts, label masking, exact match?
    architectures  which models can the course count without a download (`config("llama-2-7b")`)?
    memory         how many parameters, and how many bytes do FFT, LoRA and QLoRA need?
    sharding       what does one device of a data-parallel run hold under ZeRO / FSDP?
    footprint      what do a loaded model's tensors, and a training step's saved tensors, really hold?
    lora_config    which values may LoRA's knobs take, and what carries them (`LoRAConfig`)?
    lora           what is a LoRA layer, and how is it injected, merged and unmerged?
    nf4            how does NF4 quantize a weight, bit-exact with bitsandbytes?
    qlora          what is a QLoRA layer: a frozen NF4 weight with LoRA beside it?
    dora           how does DoRA split LoRA's update into direction and magnitude?
    loftq          how does LoftQ start the adapters where they cancel the quantization error?

Learner compositions: what a lesson imports on top of the concepts
    train          a small fine-tuning loop and its evaluation
    viz            plots and widgets
    runner         running a notebook headless (papermill), and why a run failed
    sweep          lesson 06's grids, run once per configuration and seed
    lab            lesson 06's results: summaries over seeds, verdicts
    distributed    lesson 08's data-parallel pieces: each rank's loss and batch, the run a rank trains
    launch         lesson 08's launcher: processes started from a notebook or accelerate, their results
    checks/        the self-checks of the lessons' test cells, one module per lesson

Course pipeline: instructors and CI (`lorakit lessons`, `lorakit run`), never a lesson
    course/        solutions/ -> lessons/ with nbgrader, the lessons run with CI's parameters
    cli            the `lorakit` command, the only module that reaches the grader

Grader: `lorakit grade`, `lorakit check`, Gradescope
    grading/       the sandbox, the trusted judge, reports and gradebooks

Tooling: only `make` and maintainers run it
    tooling/       make's venv and `make lock` (bootstrap), the embedded model's pretraining (pretrain)
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" when it is imported, by
# us or by peft/transformers. It is harmless (the kernel would come from a hub, which the course never
# reaches) and alarming to a learner, so lorakit silences that logger once, before anything imports
# bitsandbytes.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)

"""What only `make` and the kit's maintainers run, never a lesson, the pipeline or the grader's verdicts:
`bootstrap` builds make's .venv and `make lock`'s tested stack (run as a plain script by the system Python
before any venv exists), `pretrain` rebuilds the embedded base model (`python -m lorakit.tooling.pretrain`).
"""

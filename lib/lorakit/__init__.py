"""lorakit: a course kit that teaches LoRA and QLoRA by building every piece by hand, then using the real
stack (torch, transformers, peft, bitsandbytes, datasets).

One module per concept; see README.md for the map.
"""

__version__ = "0.1.0"

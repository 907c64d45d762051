"""lorakit: a course kit that teaches LoRA and QLoRA by building every piece by hand, then using the real
stack (torch, transformers, peft, bitsandbytes, datasets).

One module per concept; see README.md for the map.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" when it is imported, by
# us or by peft/transformers. It is harmless (the kernel would come from a hub, which the course never
# reaches) and alarming to a learner, so lorakit silences that logger once, before anything imports
# bitsandbytes.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)

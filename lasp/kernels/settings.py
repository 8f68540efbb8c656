"""The environment the kernels read, in one place (read once, at import).

TRITON_INTERPRET=1       Triton's own switch to its CPU interpreter (the CPU tests set it; see backend.py).
LASP_TRITON_AUTOTUNE=0   one fixed tile config per Triton kernel instead of autotuning on the GPU (the
                         tests set it so a GPU test run does not autotune every test shape).
"""

import os

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_AUTOTUNE = os.environ.get("LASP_TRITON_AUTOTUNE", "1") != "0"

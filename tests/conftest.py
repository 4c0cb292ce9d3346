"""Session-wide test settings."""

import os

# Triton reads TRITON_INTERPRET when `import triton` decorates its own standard library, and transformers / torch
# import triton early, so it is set here, before any test module imports them: Triton kernels then run on CPU in
# the interpreter (tests keep their shapes tiny).
os.environ.setdefault("TRITON_INTERPRET", "1")

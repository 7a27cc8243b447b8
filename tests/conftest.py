"""Shared test set-up: XLA's cheaper CPU code generation for the whole run.

The tests compile many small programs and run each a few times, so compilation dominates; LLVM's
optimization level 0 (the same HLO, less optimized machine code) cuts it by about a fifth. Set
before any test initializes JAX's backend; a user's own XLA_FLAGS come first and are kept.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

"""Shared test set-up: XLA's cheaper CPU code generation for the whole run.

The tests compile many small programs and run each a few times, so compilation dominates (about
three quarters of a test file's time is `backend_compile`). The same HLO is compiled with less
work: LLVM at optimization level 0 without its expensive passes, XLA's classic loop emitters for
fusions instead of its newer fusion emitters, and one LLVM module per program instead of several
compiled in parallel (the two pytest workers already keep both cores busy). Together these cut
compilation about 3.5x. Set before any test initializes JAX's backend; flags a user already set
in XLA_FLAGS are kept, and the ones here come after them.
"""

import os

FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

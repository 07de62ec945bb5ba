"""Test-wide settings: CPU JAX, quiet progress bars, a derandomised hypothesis profile."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ABD_JAX_NO_PROGRESS", "1")
# One persistent XLA compilation cache for the session, this process and the subprocesses it starts
# (CLI / quickstart tests): many tests compile the same small programs (the smoke ZSKT step, the
# evaluator), and a cache hit skips XLA's compile. Fresh per session, so every run is timed cold;
# set JAX_COMPILATION_CACHE_DIR yourself to keep one across runs.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="abd_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Compiling is most of the suite's time, and the tests run tiny programs, so XLA's backend (LLVM)
# optimisation is turned off: the suite took 18% less CPU time (1168 s against 1417 s, quiet
# machine, 2026-11-27; README). The math is the same, rounding can differ from an optimised build; the
# tests compare programs compiled alike. Experiments and the CLI compile at XLA's default level.
# Set the flag yourself in XLA_FLAGS to test another level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
# The convolution path of the entry points (abd_jax/xla_cpu.py), so tests run what users run.
from abd_jax.xla_cpu import use_eigen_convolutions  # noqa: E402

use_eigen_convolutions()

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=20)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The longest files first (measured per-file test time on the 2-core machine, longest first): the
# two xdist workers take whole files (--dist loadfile) in collection order, so a long file that is
# collected late ends up running alone at the end. Files not named keep their order, after these.
LONGEST_FIRST = ("test_experiments_tables.py", "test_cmi.py", "test_abd_zskt.py", "test_generator_methods.py",
                 "test_zskt.py", "test_parallel.py", "test_ood.py", "test_resume.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable

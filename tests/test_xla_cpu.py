"""abd_jax/xla_cpu.py: the Eigen-convolution flag and where the entry points set it."""

import os
import subprocess
import sys
import textwrap

import pytest

from abd_jax.xla_cpu import EIGEN_CONVS_FLAG, OPT_OUT_ENV, YNN_FLAG, _jaxlib_version, with_eigen_convolutions

known_jaxlib = pytest.mark.skipif(with_eigen_convolutions("", _jaxlib_version()) == "",
                                  reason="this jaxlib is not known to accept the flag")


def test_flag_added_to_known_jaxlib_only():
    assert with_eigen_convolutions("", (0, 10, 2)) == EIGEN_CONVS_FLAG
    assert with_eigen_convolutions("--a=1", (0, 11)) == f"--a=1 {EIGEN_CONVS_FLAG}"
    # an unknown flag aborts XLA, so versions not known to accept it are left alone
    assert with_eigen_convolutions("--a=1", (0, 12)) == "--a=1"
    assert with_eigen_convolutions("", (0, 9, 0)) == ""


def test_users_own_ynn_setting_wins():
    mine = f"{YNN_FLAG}=individual_dot,individual_convolution"
    assert with_eigen_convolutions(mine, (0, 10)) == mine


def _run(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", OPT_OUT_ENV)}
    full.update(env, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


ENTRY_IMPORTS = """
    import warnings
    warnings.simplefilter("error")
    import abd_jax.cli, experiments.quickstart, experiments.tables, experiments.methods
    import experiments.quickstart_seeds, experiments.sr_sweep, benchmarks.suite
    import os, jax, jax.numpy as jnp
    from jax import lax
    from abd_jax.xla_cpu import use_eigen_convolutions
    print(use_eigen_convolutions())
    x, w = jnp.ones((128, 32, 32, 32)), jnp.ones((3, 3, 32, 32))
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    print("ynn" in jax.jit(conv).lower(x, w).compile().as_text())
    print(os.environ.get("XLA_FLAGS", ""))
"""


@known_jaxlib
def test_entry_modules_leave_backends_unstarted_and_the_flag_takes_effect():
    # Importing the entry points must not start JAX's backends, or their call would come too late.
    added, ynn_in_conv, flags = _run(ENTRY_IMPORTS).splitlines()[-3:]
    assert added == "True" and flags == EIGEN_CONVS_FLAG
    assert ynn_in_conv == "False"


@known_jaxlib
def test_opt_out_and_late_call():
    out = _run("""
        import os, jax, warnings
        from abd_jax.xla_cpu import use_eigen_convolutions
        print(use_eigen_convolutions(), repr(os.environ.get("XLA_FLAGS", "")))
    """, **{OPT_OUT_ENV: "1"})
    assert out == "False ''"
    out = _run("""
        import os, jax, warnings
        jax.devices()
        from abd_jax.xla_cpu import use_eigen_convolutions
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            print(use_eigen_convolutions(), repr(os.environ.get("XLA_FLAGS", "")), len(w))
    """)
    assert out == "False '' 1"  # too late: nothing changed, one warning

"""End-to-end smoke tests through the command line: each writes results.json with finite metrics."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "ABD_JAX_NO_PROGRESS": "1",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def _finite(d):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in d.values())


# The CLI's ZSKT job end to end (results.json, history, plots, the teacher it trains): run four
# times by tests/test_resume.py::test_cli_killed_then_preempted_then_resumed_equals_uninterrupted.


def test_quickstart_smoke_and_teacher_reuse(tmp_path):
    # The quickstart's --abd rows (the ZSKT ablation) run through the table runner in
    # tests/test_tables.py, with the same settings (experiments/configs/quickstart.add_abd_settings).
    r = _run(["-m", "experiments.quickstart", "--smoke", f"--workdir={tmp_path}", "--seed=3"], ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res) >= {"teacher", "rows", "seed", "wall_s"}
    assert res["seed"] == 3
    assert set(res["rows"]) == {"zskt", "clean_kd"}
    for row in [res["teacher"], *res["rows"].values()]:
        assert _finite({k: row[k] for k in ("acc", "asr")})
    assert "| Teacher |" in r.stdout and "| zskt |" in r.stdout
    for f in ("summary.md", "zskt/curves.png", "zskt/samples.png", "clean_kd/curves.png"):
        assert (tmp_path / f).is_file(), f
    # Same config again: the teacher is reused, not retrained.
    mtime = (tmp_path / "teacher" / "teacher.json").stat().st_mtime
    r2 = _run(["-m", "abd_jax.cli", f"--config={ROOT}/experiments/configs/teacher.py:smoke",
               f"--workdir={tmp_path}", "--config.seed=3"], ROOT)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "reusing the teacher" in r2.stdout
    assert (tmp_path / "teacher" / "teacher.json").stat().st_mtime == mtime


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.attack.trigger=nope", "unknown trigger"),
        ("--config.teacher.model=nope", "known models"),
        ("--config.data.name=nope", "unknown dataset"),
        ("--config.attack.target=12", "target"),
    ],
)
def test_bad_input_names_the_fix(tmp_path, override, message):
    r = _run(["-m", "abd_jax.cli", f"--config={ROOT}/experiments/configs/teacher.py:smoke",
              f"--workdir={tmp_path}", override], ROOT)
    assert r.returncode != 0
    assert message in r.stderr.lower(), r.stderr[-2000:]

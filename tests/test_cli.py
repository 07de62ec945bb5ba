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


def test_quickstart_smoke_with_abd_rows_and_teacher_reuse(tmp_path):
    r = _run(["-m", "experiments.quickstart", "--smoke", "--abd", f"--workdir={tmp_path}", "--seed=3"], ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res) >= {"teacher", "rows", "seed", "wall_s"}
    assert res["seed"] == 3
    assert set(res["rows"]) == {"zskt", "zskt+sv", "zskt+sr", "zskt+abd", "clean_kd"}
    for row in [res["teacher"], *res["rows"].values()]:
        assert _finite({k: row[k] for k in ("acc", "asr")})
    assert "| Teacher |" in r.stdout and "| zskt+abd |" in r.stdout
    for row in ("zskt+sv", "zskt+abd"):  # the per-sample suspicion report of each SV run
        summary = json.loads((tmp_path / row / "suspicion.json").read_text())
        assert set(summary) == {"synthetic", "clean_test", "triggered_test"}
        assert (tmp_path / row / "suspicion.npz").exists() and (tmp_path / row / "suspicion.png").exists()
    assert not (tmp_path / "zskt" / "suspicion.json").exists()
    sr_hist = json.loads((tmp_path / "zskt+abd" / "history.json").read_text())
    assert sr_hist[-1].get("sr") == 1.0 and sr_hist[-1]["step"] == 2
    # Same config again: the teacher is reused, not retrained.
    mtime = (tmp_path / "teacher" / "teacher.json").stat().st_mtime
    r2 = _run(["-m", "abd_jax.cli", f"--config={ROOT}/experiments/configs/teacher.py:smoke",
               f"--workdir={tmp_path}", "--config.seed=3", "--config.teacher.model=wrn16_1"], ROOT)
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

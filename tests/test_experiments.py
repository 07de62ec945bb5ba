"""Host-side helpers of the experiment scripts (no compiles)."""

import pytest

from experiments.quickstart_seeds import aggregate, table
from experiments.sr_sweep import parse_variant


def _result(acc, asr):
    row = {"acc": acc, "asr": asr, "clean_target_rate": 1.0}
    return {"teacher": {"acc": 98.0, "asr": 100.0, "clean_target_rate": 0.0}, "rows": {"zskt": row}}


def test_seed_aggregate_is_mean_and_sample_std():
    agg = aggregate({0: _result(90.0, 80.0), 1: _result(94.0, 60.0), 2: _result(92.0, 70.0)})
    assert list(agg) == ["teacher", "zskt"]
    assert agg["zskt"]["acc"]["mean"] == pytest.approx(92.0)
    assert agg["zskt"]["asr"]["std"] == pytest.approx(10.0)  # sample std of 80, 60, 70
    assert agg["teacher"]["asr"]["std"] == 0.0
    assert "92.0 ± 2.0" in table(agg, [0, 1, 2])


def test_sr_variant_parsing():
    assert parse_variant("portion=0.5,rounds=20") == {"sr_portion": 0.5, "sr_rounds": 20}
    assert parse_variant("sr_coef=50,trigger_model=student") == {"sr_coef": 50, "sr_trigger_model": "student"}

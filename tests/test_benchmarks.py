"""Host-side helpers of the benchmark scripts (no compiles): the trace summary of
benchmarks.profile_trace and the suite's --zskt parser."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.profile_trace import busy_time, summarize


def test_busy_time_counts_overlaps_once():
    assert busy_time([]) == 0.0
    assert busy_time([(0, 10), (5, 15), (20, 25)]) == 20.0  # [0, 15) and [20, 25)
    assert busy_time([(0, 10), (2, 3)]) == 10.0  # nested
    assert busy_time([(3, 4), (0, 1)]) == 2.0  # unsorted input


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 10)), max_size=30))
def test_busy_time_is_between_longest_event_and_sum(pairs):
    intervals = [(s, s + d) for s, d in pairs]
    total = busy_time(intervals)
    assert total <= sum(d for _, d in pairs) + 1e-9
    assert total >= max((d for _, d in pairs), default=0.0) - 1e-9


def test_summarize_groups_by_process_and_divides_by_calls():
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
    kernels = [{"ph": "X", "pid": 1, "tid": t, "name": "conv", "ts": 1000.0 * i, "dur": 500.0}
               for i in range(4) for t in (7, 8)]  # two streams, overlapping pairs
    host = [{"ph": "X", "pid": 2, "tid": 1, "name": "launch", "ts": 0.0, "dur": 4000.0}]
    out = summarize(meta + kernels + host, calls=2)
    gpu = out["processes"]["/device:GPU:0"]
    assert gpu["busy_ms_per_call"] == pytest.approx(1.0)  # 4 x 0.5 ms of union over 2 calls
    assert gpu["events_per_call"] == 4.0
    assert out["processes"]["/host:CPU"]["busy_ms_per_call"] == pytest.approx(2.0)
    assert out["top_events"][0] == {"process": "/device:GPU:0", "name": "conv", "ms_per_call": 2.0}


def test_suite_zskt_overrides_are_typed_and_unknown_fields_refused():
    from benchmarks.suite import zskt_overrides

    assert zskt_overrides(["sr_bn_replay=false", "sr_rounds=20", "sr_coef=50"]) == {
        "sr_bn_replay": False, "sr_rounds": 20, "sr_coef": 50.0}
    with pytest.raises(ValueError, match="ZSKTConfig has no field .bn_replay."):
        zskt_overrides(["bn_replay=false"])
    with pytest.raises(ValueError, match="write True or False"):
        zskt_overrides(["sr_bn_replay=0"])

"""Where a step's time goes: a profiler trace of one benchmark case, summarized (issue 7).

    python -m benchmarks.profile_trace [--case zskt|zskt_sv|student_fwd_bwd] [--calls 5] [--batch 128] [--out DIR] [--json]

Builds the case as `benchmarks.suite` does (paper configuration by default), compiles and runs it
once, then records `--calls` calls with `jax.profiler.trace(create_perfetto_trace=True)` (a
Perfetto JSON trace that plain Python can read; no TensorBoard needed) and prints, per call: the
wall time, and for each traced process (on a GPU `/device:GPU:0`, whose events are the kernels
and copies on its streams; `/host:CPU` everywhere) the busy time (the union of its events'
intervals) and the number of events, plus the event names with the most time. On a GPU, device
busy / wall says how much of a pseudo-batch the GPU computes and how much it waits on launches and
dependencies; events per call and their median length say whether many small kernels are the
cost. The raw trace stays in DIR for a viewer (ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable

import jax

from benchmarks.suite import setup, student_fwd_bwd_step, zskt_step

# student_fwd_bwd: on XLA:CPU the part of the KD step furthest behind PyTorch (docs/PERFORMANCE.md)
CASES = ("zskt", "zskt_sv", "student_fwd_bwd")


def busy_time(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (overlapping events on several streams or
    threads count once)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(events: list[dict], calls: int, top: int = 15) -> dict:
    """Per-process busy time and event count per call, and the `top` event names by total time,
    from Chrome/Perfetto trace events (complete events, ph "X", microseconds)."""
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    spans, counts, durations = defaultdict(list), defaultdict(int), defaultdict(list)
    by_name = defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        proc = names.get(e["pid"], str(e["pid"]))
        spans[proc].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
        counts[proc] += 1
        durations[proc].append(float(e["dur"]))
        by_name[(proc, e.get("name", "?"))] += float(e["dur"])
    processes = {
        proc: {"busy_ms_per_call": round(busy_time(spans[proc]) / 1000 / calls, 3),
               "events_per_call": round(counts[proc] / calls, 1),
               "median_event_us": round(statistics.median(durations[proc]), 2)}
        for proc in spans
    }
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"processes": processes,
            "top_events": [{"process": p, "name": n[:120], "ms_per_call": round(t / 1000 / calls, 3)}
                           for (p, n), t in ranked]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="zskt", choices=CASES)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--teacher", default="wrn16_2")
    ap.add_argument("--student", default="wrn16_1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default="/tmp/abd_jax_profile")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    ds, teacher, tvars = setup(args)
    if args.case == "student_fwd_bwd":
        step, state, const = student_fwd_bwd_step(args, ds)
        step = jax.jit(step)
    else:
        step, state = zskt_step(args, ds, teacher, tvars, sv=args.case == "zskt_sv")
        step, const = jax.jit(step, donate_argnums=(0,)), tvars
    state, m = step(state, const)  # compile + one warm call, outside the trace
    jax.block_until_ready((state, m))
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # XLA's and the runtime's events, not every Python frame
    with jax.profiler.trace(args.out, create_perfetto_trace=True, profiler_options=options):
        t0 = time.perf_counter()
        for _ in range(args.calls):
            state, m = step(state, const)
            jax.block_until_ready((state, m))
        wall_ms = 1000 * (time.perf_counter() - t0) / args.calls  # before the trace is written out
    trace = max(glob.glob(f"{args.out}/**/perfetto_trace.json.gz", recursive=True))  # the newest run's
    with gzip.open(trace) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    row = {"case": args.case, "batch": args.batch, "calls": args.calls, "wall_ms_per_call": round(wall_ms, 2),
           "device": jax.devices()[0].device_kind, "jax": jax.__version__, "trace": trace,
           **summarize(events, args.calls)}
    if args.json:
        print(json.dumps(row), flush=True)
    else:
        print(f"{args.case} on {row['device']}: {wall_ms:.1f} ms per call (traced; tracing adds overhead)")
        for proc, p in row["processes"].items():
            print(f"  {proc:28s} busy {p['busy_ms_per_call']:9.2f} ms/call  {p['events_per_call']:8.1f} events/call"
                  f"  median event {p['median_event_us']:.1f} us")
        for e in row["top_events"]:
            print(f"  {e['ms_per_call']:9.3f} ms/call  {e['process']}: {e['name']}")
    return row


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    main()

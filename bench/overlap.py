"""What overlapping communication with compute buys: step time at 2 processes, overlap on vs forced off.

For each layout the same training run (the trainer itself, under torchrun, gloo on CPU) is timed with
``parallel.tp_overlap`` and ``parallel.fsdp.prefetch`` on, and with both off (every collective waited
on as soon as it is launched; the arithmetic is identical, so the losses are too). Runs alternate
on/off within each repetition; the step time is the median over the steps after the first two (warm-up)
of every repetition, with the min-max spread of the per-repetition medians.

    python -m bench.overlap [--layouts tp2 fsdp2 --steps 8 --repeats 3] [--profile]

``--profile`` also records steps 4-5 of the last repetition of each run with torch.profiler; the chrome
traces (one per rank) are left in <workdir>/<run>/profile/ and their paths printed, and rank 0's trace is
read back: how long the collectives ran (gloo's threads) and how much of that ran while the main thread
was inside a matmul, i.e. overlapped.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

from bench.common import MATMUL_OPS, read_metrics, summarize, write_results
from launch.harness import LAYOUTS, losses, run_layout

MODEL = ("model=small", "model.max_seq_len=256", "data.seq_len=256", "model.vocab_size=512")
MODES = {"on": ("parallel.tp_overlap=true", "parallel.fsdp.prefetch=true"),
         "off": ("parallel.tp_overlap=false", "parallel.fsdp.prefetch=false")}  # fmt: skip


def trace_overlap(trace: Path) -> dict[str, float]:
    """Milliseconds of collectives in a chrome trace, and of those, the part concurrent with a matmul.

    Collectives are gloo's own events (they run on its worker threads); the matmuls are those of the thread
    that runs most of them (the training thread). Both are read from complete ("X") events.
    """
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    matmuls = [e for e in events if e["name"] in MATMUL_OPS]
    main = collections.Counter(e["tid"] for e in matmuls).most_common(1)[0][0]
    busy: list[list[float]] = []  # union of the main thread's matmul intervals
    for start, end in sorted((e["ts"], e["ts"] + e["dur"]) for e in matmuls if e["tid"] == main):
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    comms = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"].startswith("gloo:")]
    overlapped = sum(max(0.0, min(end, b) - max(start, a)) for start, end in comms for a, b in busy)
    return {"comm_ms": sum(end - start for start, end in comms) / 1e3, "overlapped_ms": overlapped / 1e3}


def _losses(run_dir: Path) -> list[float]:
    return losses(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["tp2", "fsdp2"], choices=["tp2", "fsdp2"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    opts = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_overlap_"))
    medians = {(layout, mode): [] for layout in opts.layouts for mode in MODES}
    losses, traces = {}, {}
    for rep in range(opts.repeats):
        for layout in opts.layouts:
            for mode, overrides in MODES.items():
                profile = ("profile.step=4",) if opts.profile and rep == opts.repeats - 1 else ()
                run = run_layout(LAYOUTS[layout], workdir=workdir, steps=opts.steps, run_name=f"{layout}_{mode}_{rep}",
                                 extra=(*MODEL, "trainer.save_final_model=false", *overrides, *profile))  # fmt: skip
                # Every step is logged (logging.log_every=1): skip the first two, warm-up.
                medians[(layout, mode)].append(statistics.median(read_metrics(run)["step_time_s"][2:]))
                losses[(layout, mode)] = _losses(run)
                if profile:
                    print(f"traces: {sorted(str(p) for p in (run / 'profile').glob('*.json'))}")
                    traces[(layout, mode)] = trace_overlap(run / "profile" / "rank0.json")
    rows = []
    print(f"2 processes, gloo on CPU, model=small at seq 256, global batch 8; median of {opts.repeats} runs x "
          f"{opts.steps - 2} steps")  # fmt: skip
    print(f"{'layout':<8} {'overlap on s':>13} {'overlap off s':>14} {'off / on':>9}  losses equal")
    for layout in opts.layouts:
        on, off = summarize(medians[(layout, "on")]), summarize(medians[(layout, "off")])
        same = losses[(layout, "on")] == losses[(layout, "off")]
        rows.append({"layout": layout, "on_step_s": on, "off_step_s": off, "ratio_off_vs_on": off["median"] / on["median"],
                     "losses_bitwise_equal": same, "trace_on": traces.get((layout, "on")),
                     "trace_off": traces.get((layout, "off"))})  # fmt: skip
        print(f"{layout:<8} {on['median']:>6.3f} ({on['min']:.3f}-{on['max']:.3f}) "
              f"{off['median']:>6.3f} ({off['min']:.3f}-{off['max']:.3f}) {off['median'] / on['median']:>8.3f}  {same}")  # fmt: skip
    for layout in opts.layouts if traces else ():
        for mode in MODES:
            t = traces[(layout, mode)]
            print(f"{layout} overlap {mode}: rank 0's collectives ran {t['comm_ms']:.0f} ms in the 2 profiled steps, "
                  f"{t['overlapped_ms']:.0f} ms of it ({t['overlapped_ms'] / max(t['comm_ms'], 1e-9):.0%}) during matmuls")  # fmt: skip
    path = write_results("overlap", {"config": vars(opts), "rows": rows})
    print(f"written {path}")


if __name__ == "__main__":
    main()

"""What the run's guards cost: wall time per step with every guard on vs every guard off, side by side.

The same 2-process FSDP run of ``make bench-overlap``'s model (model=small at seq 256, gloo on CPU) is timed
with the loss-spike guard, the hang watchdog, the straggler monitor and the goodput recorder all on (their
defaults, except the straggler probe every 4 steps instead of 100, to include its cost) and all off. The
time is the wall clock between consecutive steps' log lines of rank 0 (``train_rank0.log``, log_every=1),
so it includes what the guards do between steps, which the trainer's own ``step_time_s`` leaves out. Runs
alternate on/off within each repetition; the figure is the median over the steps after the first two
(warm-up) of every repetition, with the min-max spread of the per-repetition medians.

    python -m bench.guards [--steps 12 --repeats 3]      # make bench-guards
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

from bench.common import summarize, write_results
from bench.overlap import MODEL
from launch.harness import LAYOUTS, losses, run_layout

MODES = {
    "on": ("straggler.every_steps=4",),  # the others at their defaults
    "off": ("spike.enabled=false", "watchdog.enabled=false", "straggler.every_steps=0", "goodput.enabled=false"),
}
_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[rank0\].* train\[(\d+)/\d+\] step")


def step_wall_times(run_dir: Path) -> list[float]:
    """Seconds between consecutive train steps' log lines of rank 0 (step k-1 to k, for k = 2, 3, ...)."""
    stamps = {}
    for line in (run_dir / "train_rank0.log").read_text().splitlines():
        match = _LINE.match(line)
        if match:
            stamps[int(match.group(2))] = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    steps = sorted(stamps)
    return [(stamps[b] - stamps[a]).total_seconds() for a, b in zip(steps, steps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_guards_"))
    medians: dict[str, list[float]] = {mode: [] for mode in MODES}
    run_losses = {}
    for rep in range(opts.repeats):
        for mode, overrides in MODES.items():
            run = run_layout(LAYOUTS["fsdp2"], workdir=workdir, steps=opts.steps, run_name=f"{mode}_{rep}",
                             extra=(*MODEL, "trainer.save_final_model=false", "checkpoint.save_final=false",
                                    *overrides))  # fmt: skip
            medians[mode].append(statistics.median(step_wall_times(run)[2:]))
            run_losses[mode] = losses(run)
    on, off = summarize(medians["on"]), summarize(medians["off"])
    same = run_losses["on"] == run_losses["off"]
    print(f"2 processes (FSDP), gloo on CPU, model=small at seq 256; wall time per step, median of {opts.repeats} "
          f"runs x {opts.steps - 3} steps")  # fmt: skip
    print(f"guards on  {on['median']:.3f} s ({on['min']:.3f}-{on['max']:.3f})")
    print(f"guards off {off['median']:.3f} s ({off['min']:.3f}-{off['max']:.3f})")
    print(f"on / off   {on['median'] / off['median']:.3f}; losses bitwise equal: {same}")
    path = write_results("guards", {"config": vars(opts), "modes": {k: list(v) for k, v in MODES.items()},
                                    "on_step_s": on, "off_step_s": off, "ratio_on_vs_off": on["median"] / off["median"],
                                    "losses_bitwise_equal": same})  # fmt: skip
    print(f"written {path}")


if __name__ == "__main__":
    main()

"""The pipeline's bubble, measured beside the schedule's theory, and its step time beside no pipelining.

For each schedule, ``pp`` (2, 4) and number of micro-batches ``m``, a step (forward and backward of one
batch of 16 sequences of 256 tokens, an 8-block model of width 256) is timed on ``pp`` gloo processes, one
thread each, against the same work in one process on one thread, run as the same ``m`` micro-batches one
after the other (``t1(m)``: smaller micro-batches make smaller, slower GEMMs, which is not the pipeline's
bubble). With perfectly balanced stages and free communication the pipelined step would take ``t1(m) / pp``;
the measured bubble is the share of the ``pp`` processes' time not spent on that work,
``1 - t1(m) / (pp * t_pp)``. It also holds the point-to-point sends, any imbalance between stages and the
schedule's own bookkeeping, so it bounds the idle share from above; and it leans on a one-process baseline
timed at another moment, which on this shared machine moves by up to a fifth between runs. So each rank
also times its own compute (every forward, backward and weight step of its stages) and the ``idle`` column
is the ranks' mean share of the step outside it: the bubble, the sends and receives, the schedule's own
work and the loss (which the schedule computes outside the stage), measured in the same run. The theory beside it, with F, B and W
the times of a micro-batch's forward, input gradient and weight gradient on one stage:
- GPipe, 1F1B: (p - 1) / (m + p - 1) (Huang et al. 2019; Narayanan et al. 2021);
- interleaved 1F1B, v stages per rank: (p - 1) / (v m + p - 1) (Narayanan et al. 2021, sec. 2.2.2);
- zero_bubble (ZB1P; v = 1 is ZB-H1): (p - 1)(F + B - W) idle per rank against m (F + B + W) of work
  (Qi et al. 2024, sec. 3.1), with F, B, W measured here in one process (``split_times``: on this CPU W is
  about a fifth of a step, not a third, so less is left to move into the bubble), and
  (p - 1) / (3 v m + p - 1) with F = B = W, the paper's assumption, beside it;
- zbv: 0 with F = B = W and m >= 2p (Qi et al. 2024, sec. 6, ZB-V).
The step time is also compared with the whole batch in one process (``t1``, one micro-batch), and the
zero-bubble schedule runs with ``parallel.compile`` on and off (1F1B too, as its reference); a compiled
row's bubble is measured against the same work compiled the same way in one process. Medians over the
steps after two warm-up steps (which also compile), with their min-max.

On a machine with fewer cores than processes (``pp`` = 4 on 2 cores) the processes share cores and the
figure measures the oversubscription, not the schedule: the results say so.

    python -m bench.pipeline [--steps 6] [--pp 2 4]        # make bench-pp
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import summarize, write_results
from model.config import ModelArgs
from model.ops.deferred import WeightGradStore, deferring
from trainer.parallel.build import build_model, build_stages
from trainer.parallel.config import ParallelConfig, PPSchedule
from trainer.parallel.dims import ParallelDims
from trainer.parallel.parallelize import apply_compile
from trainer.parallel.pipeline import Pipeline
from trainer.run.step import ComputeContext, cross_entropy_sum, token_loss_sum

ARGS = ModelArgs(dim=256, n_layers=8, n_heads=8, vocab_size=512, max_seq_len=256, multiple_of=64)
ROWS, SEQ = 16, 256


def batch() -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, ARGS.vocab_size, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}


def single_step_times(steps: int, *, microbatches: int = 1, compiled: Optional[PPSchedule] = None) -> list[float]:
    """One process, one thread: the batch as ``microbatches`` forward/backward passes one after the other;
    ``compiled``: with ``parallel.compile`` as a pipeline of that schedule compiles (the whole blocks, or
    only their norms under a zero-bubble schedule), the baseline of the compiled rows."""
    torch.set_num_threads(1)
    model = build_model(ARGS, device=torch.device("cpu"), seed=0)
    if compiled is not None:
        apply_compile(model, defers_weight_grads=compiled.splits_backward)
    ctx, data, times = ComputeContext(device=torch.device("cpu"), dtype=torch.float32), batch(), []
    chunks = [{k: v[i::microbatches] for k, v in data.items()} for i in range(microbatches)]
    for _ in range(steps):
        started = time.perf_counter()
        for chunk in chunks:
            (token_loss_sum(model, chunk, ctx=ctx) / (ROWS * SEQ)).backward()
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return times[2:]


def split_times(steps: int, *, microbatches: int) -> dict[str, float]:
    """One process, one thread: a micro-batch's forward F, input-gradient backward I (weight gradients
    deferred, model/ops/deferred.py) and weight gradients W, medians over the micro-batches of ``steps``
    steps after two warm-up steps: the zero-bubble theory's inputs on this machine."""
    torch.set_num_threads(1)
    model = build_model(ARGS, device=torch.device("cpu"), seed=0)
    ctx, data, store = ComputeContext(device=torch.device("cpu"), dtype=torch.float32), batch(), WeightGradStore()
    chunks = [{k: v[i::microbatches] for k, v in data.items()} for i in range(microbatches)]
    times: dict[str, list[float]] = {"F": [], "I": [], "W": []}
    for step in range(steps):
        for chunk in chunks:
            t0 = time.perf_counter()
            with deferring(store):
                loss = token_loss_sum(model, chunk, ctx=ctx) / (ROWS * SEQ)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            store.flush()()
            t3 = time.perf_counter()
            if step >= 2:
                for key, value in (("F", t1 - t0), ("I", t2 - t1), ("W", t3 - t2)):
                    times[key].append(value)
        model.zero_grad(set_to_none=True)
    return {key: summarize(values)["median"] for key, values in times.items()}


def _worker(rank: int, world: int, schedule: str, microbatches: int, compile_: bool, steps: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = ParallelConfig(pp=world, pp_schedule=schedule, pp_microbatches=microbatches, compile=compile_)
    dims = ParallelDims.from_config(cfg, world_size=world).with_meshes(device_type="cpu")
    model, stages = build_stages(ARGS, device=torch.device("cpu"), seed=0, dims=dims, parallel=cfg)
    pipeline = Pipeline(stages, dims, cfg=cfg, device=torch.device("cpu"), loss=cross_entropy_sum)
    busy = [0.0]
    for stage in pipeline.stages:  # per-stage timers: the compute of every forward, backward and weight step
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            setattr(stage, name, _timed(getattr(stage, name), busy))
    data, scale, times, idle = batch(), torch.tensor(1.0 / (ROWS * SEQ)), [], []
    for _ in range(steps):
        dist.barrier()
        busy[0] = 0.0
        started = time.perf_counter()
        pipeline.loss_sum(data, scale=scale)
        dist.barrier()  # the step ends when the last stage's backward has reached the first stage
        elapsed = time.perf_counter() - started
        share = torch.tensor(1 - busy[0] / elapsed, dtype=torch.float64)
        dist.all_reduce(share)  # the ranks' mean idle share
        times.append(elapsed)
        idle.append(share.item() / world)
        model.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save({"times": times[2:], "idle": idle[2:]}, out)
    dist.destroy_process_group()


def _timed(method, busy: list[float]):
    def run(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            busy[0] += time.perf_counter() - started

    return run


def pipelined_step_times(*, pp: int, schedule: str, microbatches: int, compile_: bool, steps: int, port: int) -> dict:
    """The step times, and each step's idle share measured by the stages' own timers (mean over ranks)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.pt")
        mp.spawn(_worker, args=(pp, schedule, microbatches, compile_, steps, port, out), nprocs=pp)
        return torch.load(out)


def theory(schedule: PPSchedule, *, pp: int, m: int, split: Optional[dict[str, float]] = None) -> float:
    """The schedule's bubble share under the module docstring's assumptions; for ``zero_bubble`` with
    ``split`` (this machine's F, I, W), ZB-H1's (p - 1)(F + I - W) idle against m (F + I + W) of work."""
    v = ParallelConfig(pp_schedule=schedule).pp_stages_per_rank
    if schedule == PPSchedule.zbv:
        return 0.0 if m >= 2 * pp else (pp - 1) / (3 * v * m + pp - 1)  # below 2p micro-batches: ZB1P's bound
    if schedule == PPSchedule.zero_bubble:
        if split is not None and v == 1:
            idle = (pp - 1) * (split["F"] + split["I"] - split["W"])
            return idle / (m * (split["F"] + split["I"] + split["W"]) + idle)
        return (pp - 1) / (3 * v * m + pp - 1)
    return (pp - 1) / (v * m + pp - 1)


# (schedule, compile): every schedule eager; the zero-bubble one and its 1F1B reference compiled too.
VARIANTS = [(s, False) for s in PPSchedule] + [(PPSchedule.one_f_one_b, True), (PPSchedule.zero_bubble, True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    opts = parser.parse_args(argv)
    counts = sorted({k * pp for pp in opts.pp for k in (1, 2, 4)})
    t1 = summarize(single_step_times(opts.steps))
    t1_m = {m: summarize(single_step_times(opts.steps, microbatches=m)) for m in counts}
    # The compiled rows' baselines: the same work compiled the same way in one process.
    t1_compiled = {(schedule, m): summarize(single_step_times(opts.steps, microbatches=m, compiled=schedule))
                   for schedule in {s for s, compiled in VARIANTS if compiled} for m in counts}  # fmt: skip
    splits = {m: split_times(opts.steps, microbatches=m) for m in counts}
    cores = os.cpu_count() or 1
    rows, port = [], 29650
    print(f"one process, one thread: {t1['median']:.3f} s/step; as m micro-batches: "
          + ", ".join(f"m={m} {t['median']:.3f} s" for m, t in t1_m.items()))  # fmt: skip
    print("a micro-batch's forward F, input gradient I, weight gradient W (s): "
          + ", ".join(f"m={m} F {t['F']:.3f} I {t['I']:.3f} W {t['W']:.3f}" for m, t in splits.items()))  # fmt: skip
    print(f"{'schedule':>16} {'compile':>7} {'pp':>3} {'m':>3} {'s/step':>8} {'vs 1 proc':>9} {'idle':>7} {'bubble':>7} "
          f"{'theory':>7} {'F=I=W':>7}")  # fmt: skip
    for pp in opts.pp:
        for schedule, compiled in VARIANTS:
            for m in (pp, 2 * pp, 4 * pp):
                port += 1
                measured = pipelined_step_times(pp=pp, schedule=schedule.value, microbatches=m, compile_=compiled,
                                                steps=opts.steps, port=port)  # fmt: skip
                times, idle = summarize(measured["times"]), summarize(measured["idle"])["median"]
                baseline = t1_compiled[(schedule, m)] if compiled else t1_m[m]
                bubble = 1 - baseline["median"] / (pp * times["median"])
                expected, equal = theory(schedule, pp=pp, m=m, split=splits[m]), theory(schedule, pp=pp, m=m)
                rows.append({"schedule": schedule.value, "compile": compiled, "pp": pp, "microbatches": m, "step_s": times,
                             "idle_timers": idle, "bubble": bubble, "theory": expected, "theory_equal_f_i_w": equal,
                             "speedup_vs_one_process": t1["median"] / times["median"],
                             "oversubscribed": pp > cores})  # fmt: skip
                flag = "  (more processes than cores)" if pp > cores else ""
                print(f"{schedule.value:>16} {str(compiled):>7} {pp:>3} {m:>3} {times['median']:>8.3f} "
                      f"{t1['median'] / times['median']:>8.2f}x {idle:>7.3f} {bubble:>7.3f} {expected:>7.3f} {equal:>7.3f}{flag}",
                      flush=True)  # fmt: skip
    path = write_results("pipeline", {"one_process_step_s": t1, "one_process_by_microbatches_s": t1_m,
                                      "one_process_compiled_s": {f"{s.value} m={m}": t for (s, m), t in t1_compiled.items()},
                                      "split_s": splits,
                                      "rows": rows,
                                      "rows_per_batch": ROWS, "seq": SEQ, "model": {"dim": ARGS.dim, "n_layers": ARGS.n_layers}})  # fmt: skip
    print(f"written: {path}")


if __name__ == "__main__":
    main()

"""The pipeline's bubble, measured beside the schedule's theory, and its step time beside no pipelining.

For each schedule (GPipe, 1F1B), ``pp`` (2, 4) and number of micro-batches ``m``, a step (forward and
backward of one batch of 16 sequences of 256 tokens, an 8-block model of width 256) is timed on ``pp``
gloo processes, one thread each, against the same work in one process on one thread, run as the same ``m``
micro-batches one after the other (``t1(m)``: smaller micro-batches make smaller, slower GEMMs, which is not
the pipeline's bubble). With perfectly balanced stages and free communication the pipelined step would take
``t1(m) / pp``; the measured bubble is the share of the ``pp`` processes' time not spent on that work,
``1 - t1(m) / (pp * t_pp)``, next to the theory ``(pp - 1) / (m + pp - 1)``. It also holds the
point-to-point sends and any imbalance between stages, so it bounds the idle share from above. The step time
is also compared with the whole batch in one process (``t1``, one micro-batch). Medians over the steps after
two warm-up steps, with their min-max.

On a machine with fewer cores than processes (``pp`` = 4 on 2 cores) the processes share cores and the
figure measures the oversubscription, not the schedule: the results say so.

    python -m bench.pipeline [--steps 6]        # make bench-pp
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import summarize, write_results
from model.config import ModelArgs
from trainer.parallel.build import build_model
from trainer.parallel.config import ParallelConfig, PPSchedule
from trainer.parallel.dims import ParallelDims
from trainer.parallel.pipeline import Pipeline
from trainer.run.step import ComputeContext, cross_entropy_sum, token_loss_sum

ARGS = ModelArgs(dim=256, n_layers=8, n_heads=8, vocab_size=512, max_seq_len=256, multiple_of=64)
ROWS, SEQ = 16, 256


def batch() -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, ARGS.vocab_size, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}


def single_step_times(steps: int, *, microbatches: int = 1) -> list[float]:
    """One process, one thread: the batch as ``microbatches`` forward/backward passes one after the other."""
    torch.set_num_threads(1)
    model = build_model(ARGS, device=torch.device("cpu"), seed=0)
    ctx, data, times = ComputeContext(device=torch.device("cpu"), dtype=torch.float32), batch(), []
    chunks = [{k: v[i::microbatches] for k, v in data.items()} for i in range(microbatches)]
    for _ in range(steps):
        started = time.perf_counter()
        for chunk in chunks:
            (token_loss_sum(model, chunk, ctx=ctx) / (ROWS * SEQ)).backward()
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return times[2:]


def _worker(rank: int, world: int, schedule: str, microbatches: int, steps: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = ParallelConfig(pp=world, pp_schedule=schedule, pp_microbatches=microbatches)
    dims = ParallelDims.from_config(cfg, world_size=world).with_meshes(device_type="cpu")
    model = build_model(ARGS, device=torch.device("cpu"), seed=0, dims=dims, parallel=cfg)
    pipeline = Pipeline(model, dims, schedule=cfg.pp_schedule, microbatches=microbatches, virtual_stages=cfg.pp_virtual_stages, device=torch.device("cpu"),
                        loss=cross_entropy_sum)  # fmt: skip
    data, scale, times = batch(), torch.tensor(1.0 / (ROWS * SEQ)), []
    for _ in range(steps):
        dist.barrier()
        started = time.perf_counter()
        pipeline.loss_sum(data, scale=scale)
        dist.barrier()  # the step ends when the last stage's backward has reached the first stage
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save(times[2:], out)
    dist.destroy_process_group()


def pipelined_step_times(*, pp: int, schedule: str, microbatches: int, steps: int, port: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.pt")
        mp.spawn(_worker, args=(pp, schedule, microbatches, steps, port, out), nprocs=pp)
        return torch.load(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    opts = parser.parse_args(argv)
    t1 = summarize(single_step_times(opts.steps))
    t1_m = {m: summarize(single_step_times(opts.steps, microbatches=m)) for m in (2, 4, 8, 16)}
    cores = os.cpu_count() or 1
    rows, port = [], 29650
    print(f"one process, one thread: {t1['median']:.3f} s/step; as m micro-batches: "
          + ", ".join(f"m={m} {t['median']:.3f} s" for m, t in t1_m.items()))  # fmt: skip
    print(f"{'schedule':>8} {'pp':>3} {'m':>3} {'s/step':>8} {'vs 1 proc':>9} {'bubble':>7} {'theory':>7}")
    for schedule in (PPSchedule.gpipe.value, PPSchedule.one_f_one_b.value):
        for pp in (2, 4):
            for m in (pp, 2 * pp, 4 * pp):
                port += 1
                times = summarize(pipelined_step_times(pp=pp, schedule=schedule, microbatches=m, steps=opts.steps,
                                                       port=port))  # fmt: skip
                bubble = 1 - t1_m[m]["median"] / (pp * times["median"])
                theory = (pp - 1) / (m + pp - 1)
                rows.append({"schedule": schedule, "pp": pp, "microbatches": m, "step_s": times, "bubble": bubble,
                             "theory": theory, "speedup_vs_one_process": t1["median"] / times["median"],
                             "oversubscribed": pp > cores})  # fmt: skip
                flag = "  (more processes than cores)" if pp > cores else ""
                print(f"{schedule:>8} {pp:>3} {m:>3} {times['median']:>8.3f} {t1['median'] / times['median']:>8.2f}x "
                      f"{bubble:>7.3f} {theory:>7.3f}{flag}")  # fmt: skip
    path = write_results("pipeline", {"one_process_step_s": t1, "one_process_by_microbatches_s": t1_m, "rows": rows, "rows_per_batch": ROWS, "seq": SEQ,
                                      "model": {"dim": ARGS.dim, "n_layers": ARGS.n_layers}})  # fmt: skip
    print(f"written: {path}")


if __name__ == "__main__":
    main()

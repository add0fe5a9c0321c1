"""``make bench``: training speed and memory of our trainer next to a bare PyTorch loop and Hugging Face.

Every row trains the same model on the same batch shape in its own child process, on this machine, in
one invocation; rows are interleaved within each repetition so that drift of a shared machine hits them
alike. A row's step time is the median over its timed steps (the first step of each run is warm-up and
is not timed); the table shows the median of those per-run medians with their min-max spread.

Rows:
- ``ours_{none,selective,full}``: the trainer itself (``python -m launch.train``: real data loader,
  LR schedule, gradient clipping, metrics and offline wandb every step) under each activation
  checkpointing policy; ``ours_compile``: selective with ``parallel.compile=true`` (the compile time is
  reported apart: the first step minus a steady one; the first repetition compiles cold, later ones
  find inductor's cache).
- ``bare``, ``hf``, ``hf_ckpt``: the loops of ``bench/loops.py`` (random tokens of the same shape).
- Scaling (``--scaling``, on by default on CPU): the trainer at 1 process x 1 thread, two such runs at
  once (independent: what sharing the cores costs without any communication), and 2 processes x 1
  thread with FSDP, each process with the same batch. Weak-scaling efficiency = t(1 process) /
  t(2 processes), the 2-process step doing twice the work.

MFU = tokens/s x ``model.flops.flops_per_token`` / peak. On CPU the peak is this machine's fp32 matmul
rate, measured here (best of a 2048^3 matmul, at the thread count of the row); on CUDA the data-sheet bf16
peak. The FLOP count is 6 N_matmul + 12 L d T per token; causal attention is *not* halved. Recomputation
by activation checkpointing is not counted (it is overhead, not model work).

Memory: the peak RSS of the row's process (rank 0's under torchrun; Linux ``VmHWM``), and the bytes its autograd graph keeps for
backward (``model.ops.saved_bytes`` on one forward, parameters excluded); on CUDA the allocator's peak.

    python -m bench.train_speed [--steps 3 --repeats 3 --scaling-repeats 2] [--rows bare ours_none ...] [k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from bench.breakdown import step_breakdown
from bench.common import compose_config, read_metrics, run_children, summarize, write_results
from bench.loops import batch_tokens, build_loop_model, loop_loss
from data import prepare_data
from launch.local import build_command
from model.flops import flops_per_token, param_counts
from model.ops.memory import saved_bytes
from trainer.parallel.activation_checkpointing import policy as ac_policy
from trainer.parallel.build import build_model
from trainer.parallel.config import ACConfig, ACMode, ParallelConfig
from trainer.parallel.dims import ParallelDims
from trainer.run.device import measure_cpu_matmul_flops, peak_flops
from trainer.run.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]

# ~55M parameters (6 x 7.1M in the blocks, 6.3M embedding, 6.3M head) at seq 512: ~6 s a step on 2 cores.
CPU_MODEL = ("model=small", "model.dim=768", "model.n_layers=6", "model.n_heads=12", "model.multiple_of=256",
             "model.max_seq_len=512", "data.seq_len=512", "trainer.micro_batch_size=2", "trainer.device=cpu",
             "trainer.precision=fp32")  # fmt: skip
# 1.06B parameters (18 x 51M in the blocks, 2 x 65.5M embedding and head), bf16, seq 2048.
GPU_MODEL = ("model=small", "model.dim=2048", "model.n_layers=18", "model.n_heads=16", "model.multiple_of=256",
             "model.vocab_size=32000", "data.tokenizer.vocab_size=32000", "model.max_seq_len=2048",
             "data.seq_len=2048", "trainer.micro_batch_size=4", "trainer.device=cuda", "trainer.precision=bf16")  # fmt: skip

OURS = {"ours_none": ParallelConfig(ac=ACConfig(mode=ACMode.none)),
        "ours_selective": ParallelConfig(ac=ACConfig(mode=ACMode.selective)),
        "ours_full": ParallelConfig(ac=ACConfig(mode=ACMode.full)),
        "ours_compile": ParallelConfig(ac=ACConfig(mode=ACMode.selective), compile=True)}  # fmt: skip
LOOPS = ("bare", "hf", "hf_ckpt")
ROWS = (*OURS, *LOOPS)
SCALING = ("1proc", "1proc_x2_independent", "fsdp_2proc")


@dataclass
class Runs:
    """What the repeated runs of one row measured."""

    step_s: list[float] = field(default_factory=list)
    """Median step time of each run (its first step excluded)."""
    first_step_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    """Peak RSS of the row's process(es); on CUDA the allocator's peak."""
    data_wait_frac: list[float] = field(default_factory=list)
    """Trainer rows: median share of a step spent waiting for the next batch."""
    losses: list[float] = field(default_factory=list)
    """Losses of the last run (same weights and batch in the loops: a check that they compute the same model)."""

    def record(self, *, step_s: list[float], peak_bytes: int, data_wait: Optional[list[float]] = None) -> None:
        self.step_s.append(statistics.median(step_s[1:]))
        self.first_step_s.append(step_s[0])
        self.peak_bytes.append(peak_bytes)
        if data_wait is not None:
            self.data_wait_frac.append(statistics.median(data_wait[1:]))


@dataclass(frozen=True)
class Bench:
    """One invocation's fixed settings."""

    model: tuple[str, ...]
    """Hydra overrides giving model, batch, device and precision."""
    steps: int
    """Timed steps per run (one warm-up step more is run)."""
    peak: float
    workdir: Path
    cuda: bool


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def _trainer_cmd(bench: Bench, *, run_dir: Path, nproc: int, extra: tuple[str, ...] = ()) -> list[str]:
    overrides = [*bench.model, f"trainer.max_steps={bench.steps + 1}", "trainer.eval_every=0", "logging.log_every=1",
                 "checkpoint.save_final=false", "checkpoint.save_on_signal=false", "trainer.save_final_model=false",
                 f"trainer.peak_flops={bench.peak}", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    return build_command(nproc=nproc, overrides=overrides)


def _peak_bytes(metrics: dict[str, list[float]], *, cuda: bool) -> int:
    """The trainer's logged peak: the CUDA allocator's (reset at every log) or the process's peak RSS."""
    return int(max(metrics["cuda_max_allocated_gib" if cuda else "peak_rss_gib"]) * 2**30)


def run_ours(bench: Bench, runs: Runs, *, row: str, tag: str, env: dict[str, str]) -> None:
    run_dir = bench.workdir / f"{row}_{tag}"
    parallel = OURS[row]
    extra = (f"parallel.ac.mode={parallel.ac.mode.value}",
             f"parallel.compile={str(parallel.compile).lower()}")  # fmt: skip
    cmd = _trainer_cmd(bench, run_dir=run_dir, nproc=1, extra=extra)
    run_children([cmd], logs=[bench.workdir / f"{row}_{tag}.log"], env=env, cwd=REPO)
    metrics = read_metrics(run_dir)
    runs.record(step_s=metrics["step_time_s"], peak_bytes=_peak_bytes(metrics, cuda=bench.cuda),
                data_wait=metrics["data_wait_frac"])  # fmt: skip
    runs.losses = metrics["loss"]


def run_loop(bench: Bench, runs: Runs, *, row: str, tag: str, env: dict[str, str]) -> None:
    out = bench.workdir / f"{row}_{tag}.json"
    cmd = [sys.executable, "-m", "bench.loops", "--loop", row, "--steps", str(bench.steps + 1), "--out", str(out),
           *bench.model]  # fmt: skip
    run_children([cmd], logs=[bench.workdir / f"{row}_{tag}.log"], env=env, cwd=REPO)
    result = json.loads(out.read_text())
    runs.record(step_s=result["step_s"], peak_bytes=result["cuda_peak_bytes" if bench.cuda else "peak_rss_bytes"])
    runs.losses = result["losses"]


def run_scaling(bench: Bench, runs: Runs, *, row: str, tag: str) -> None:
    """One thread per process: 1 process; 2 independent 1-process runs at once; FSDP over 2 processes."""
    env = _env(OMP_NUM_THREADS="1")
    copies, nproc = {"1proc": (1, 1), "1proc_x2_independent": (2, 1), "fsdp_2proc": (1, 2)}[row]
    run_dirs = [bench.workdir / f"{row}_{tag}_{i}" for i in range(copies)]
    cmds = [_trainer_cmd(bench, run_dir=d, nproc=nproc) for d in run_dirs]
    run_children(cmds, logs=[d.with_suffix(".log") for d in run_dirs], env=env, cwd=REPO)
    for run_dir in run_dirs:
        metrics = read_metrics(run_dir)
        runs.record(step_s=metrics["step_time_s"], peak_bytes=_peak_bytes(metrics, cuda=False),
                    data_wait=metrics["data_wait_frac"])  # fmt: skip


def _row_model(row: str, *, cfg, device: torch.device) -> torch.nn.Module:
    """The model a row trains, built in this process (for counting and profiling, not timing)."""
    seed = cfg.trainer.seed
    if row in OURS:
        dims = ParallelDims.from_config(OURS[row], world_size=1)
        return build_model(cfg.model, device=device, seed=seed, dims=dims, parallel=OURS[row])
    return build_loop_model(row, cfg.model, device=device, seed=seed)


def kept_activation_bytes(row: str, *, cfg, device: torch.device, dtype: torch.dtype) -> Optional[int]:
    """Bytes one forward of the row's model keeps for backward, parameters and buffers excluded.

    Under activation checkpointing these are what lives between forward and backward; the recomputed
    block's own intermediates exist only one block at a time during backward and are not counted.
    ``ours_compile`` has no figure: inductor's graphs save what its partitioner picks, not what the hooks see.
    """
    if row in OURS and OURS[row].compile:
        return None
    model, tokens = _row_model(row, cfg=cfg, device=device), batch_tokens(cfg, device=device)
    counted = saved_bytes(lambda: loop_loss(model, tokens, dtype=dtype), params=[*model.parameters(), *model.buffers()])
    return counted.activations


def breakdowns(rows: list[str], *, cfg, peak: float) -> tuple[str, dict[str, dict[str, float]]]:
    """One profiled step of each row's model (CPU): GEMM, attention, optimizer and other time, as a table."""
    matmul_flops = 6 * param_counts(cfg.model).matmul * cfg.trainer.micro_batch_size * cfg.data.seq_len
    lines = ["| model | profiled step s | GEMM s (share, GFLOP/s) | attention kernels s | AdamW s | other s |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    results, cpu = {}, torch.device("cpu")
    for row in rows:
        model = _row_model(row, cfg=cfg, device=cpu)
        b = results[row] = step_breakdown(model, build_optimizer(model, cfg.optim), batch_tokens(cfg, device=cpu))
        del model
        lines.append(f"| {row} | {b['step_s']:.3f} | {b['gemm_s']:.3f} ({b['gemm_s'] / b['step_s']:.0%}, "
                     f"{matmul_flops / b['gemm_s'] / 1e9:.1f} of {peak / 1e9:.1f}) | {b['attention_s']:.3f} | "
                     f"{b['optimizer_s']:.3f} | {b['other_s']:.3f} |")  # fmt: skip
    return "\n".join(lines), results


def measure_cpu_peaks(cfg) -> dict[str, float]:
    """fp32 matmul FLOP/s at 2048^3 with this process's threads and with 1 thread, and at the model's shape."""
    threads = torch.get_num_threads()
    peaks = {"threads": threads, "peak": measure_cpu_matmul_flops(repeats=5)}
    tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
    # What a matmul of the model's own (FFN) shape reaches.
    peaks["model_shape_gemm"] = measure_cpu_matmul_flops(shape=(tokens, cfg.model.dim, cfg.model.ffn_hidden_dim),
                                                         repeats=5)  # fmt: skip
    torch.set_num_threads(1)
    try:
        peaks["peak_1_thread"] = measure_cpu_matmul_flops(repeats=5)
    finally:
        torch.set_num_threads(threads)
    return peaks


def memory_prediction(row: str, *, cfg) -> Optional[dict[str, int]]:
    """What a single-GPU bf16 (autocast) trainer row should allocate at its peak, term by term, in bytes.

    static: fp32 weights, gradients and Adam's two moments, 16 bytes per parameter; autocast: the bf16
    copies of the matmul weights that forward casts and keeps for backward, 2 bytes per matmul parameter;
    activations: the row's policy's ``model_bytes`` (trainer/parallel/activation_checkpointing.py);
    logits: B x T x V elements at about 10 bytes (the bf16 logits, the fp32 copy the loss takes, and its
    fp32 gradient) at the turn from forward to backward. None for rows the formula does not describe.
    """
    if row not in OURS:
        return None
    counts, b, t = param_counts(cfg.model), cfg.trainer.micro_batch_size, cfg.data.seq_len
    activations = ac_policy(OURS[row].ac).model_bytes(cfg.model, batch=b, seq_len=t, tp=1, dtype=torch.bfloat16)
    terms = {"static": 16 * counts.total, "autocast_copies": 2 * counts.matmul, "activations": activations,
             "logits": 10 * b * t * cfg.model.vocab_size}  # fmt: skip
    return {**terms, "predicted": sum(terms.values())}


def memory_table(rows: list[dict], *, cfg) -> str:
    """Measured peak allocated memory of each trainer row next to ``memory_prediction``'s terms (MiB)."""
    lines = ["| row | peak allocated MiB | predicted MiB | measured / predicted | static | autocast copies | "
             "activations (formula) | logits |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        pred = memory_prediction(row["row"], cfg=cfg)
        if pred is None:
            continue
        row["memory_prediction"] = pred
        lines.append(f"| {row['row']} | {_mib(row['peak_bytes'])} | {_mib(pred['predicted'])} | "
                     f"{row['peak_bytes'] / pred['predicted']:.2f} | {_mib(pred['static'])} | "
                     f"{_mib(pred['autocast_copies'])} | {_mib(pred['activations'])} | {_mib(pred['logits'])} |")  # fmt: skip
    return "\n".join(lines)


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def table(results: dict[str, Runs], *, tokens_per_step: int, flops_tok: int, peak: float, kept: dict,
          base: str, memory: str) -> tuple[str, list[dict]]:  # fmt: skip
    """A Markdown table (ratios to ``base``) and the rows as dicts for the JSON file."""
    base_tps = tokens_per_step / statistics.median(results[base].step_s)
    lines = [f"| row | tokens/s | spread (min-max) | step s | vs {base} | MFU | {memory} MiB | kept for backward MiB "
             f"| data wait |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    rows = []
    for name, runs in results.items():
        tps = [tokens_per_step / s for s in runs.step_s]
        stats = summarize(tps)
        wait = statistics.median(runs.data_wait_frac) if runs.data_wait_frac else None
        row = {"row": name, "tokens_per_s": stats, "step_s": summarize(runs.step_s),
               "first_step_s": runs.first_step_s, "ratio_vs_" + base: stats["median"] / base_tps,
               "mfu": stats["median"] * flops_tok / peak, "peak_bytes": max(runs.peak_bytes),
               "kept_activation_bytes": kept.get(name), "data_wait_frac": wait, "losses": runs.losses}  # fmt: skip
        rows.append(row)
        lines.append(f"| {name} | {stats['median']:,.0f} | {stats['min']:,.0f}-{stats['max']:,.0f} | "
                     f"{row['step_s']['median']:.3f} | {row['ratio_vs_' + base]:.3f} | {row['mfu']:.1%} | "
                     f"{_mib(row['peak_bytes'])} | {_mib(kept.get(name))} | "
                     f"{'-' if wait is None else f'{wait:.3%}'} |")  # fmt: skip
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row, interleaved across rows")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--scaling-repeats", type=int, default=2, help="runs per scaling row; 0 skips scaling")
    parser.add_argument("--workdir", type=Path, default=None, help="keep run directories and logs here")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the profiled step of none/bare/hf (CPU)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every row after the built-in model")
    opts = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    model = (*(GPU_MODEL if cuda else CPU_MODEL), *opts.overrides)
    cfg = compose_config(model)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="bench_train_speed_"))
    workdir.mkdir(parents=True, exist_ok=True)

    counts = param_counts(cfg.model)
    flops_tok = flops_per_token(cfg.model, seq_len=cfg.data.seq_len)
    tokens_per_step = cfg.trainer.micro_batch_size * cfg.data.seq_len
    if cuda:
        peaks = {"peak": peak_flops(device=device, dtype=dtype, override=cfg.trainer.peak_flops)}
        if peaks["peak"] is None:
            raise ValueError(f"no data-sheet peak for {torch.cuda.get_device_name()}: pass trainer.peak_flops=<FLOP/s>")
    else:
        peaks = measure_cpu_peaks(cfg)
    print(f"model: {counts.total / 1e6:.1f}M parameters, dim {cfg.model.dim}, {cfg.model.n_layers} layers, "
          f"vocab {cfg.model.vocab_size}; batch {cfg.trainer.micro_batch_size} x seq {cfg.data.seq_len}; {dtype} on "
          f"{device.type}; {flops_tok / 1e6:.0f} MFLOP/token; peak {peaks['peak'] / 1e9:.1f} GFLOP/s; workdir {workdir}",
          flush=True)  # fmt: skip

    # The data cache first, here: tokenizer training in a timed child would inflate its peak RSS.
    prepare_data(cfg.data)
    kept = {row: kept_activation_bytes(row, cfg=cfg, device=device, dtype=dtype) for row in opts.rows}
    bench = Bench(model=model, steps=opts.steps, peak=peaks["peak"], workdir=workdir, cuda=cuda)
    # A fresh inductor cache: the first compile row compiles cold, the later ones find the cache warm.
    env = _env(TORCHINDUCTOR_CACHE_DIR=str(workdir / "inductor_cache"))
    results = {row: Runs() for row in opts.rows}
    for rep in range(opts.repeats):
        for row in opts.rows:
            runner = run_ours if row in OURS else run_loop
            runner(bench, results[row], row=row, tag=str(rep), env=env)
            print(f"  {row} run {rep + 1}/{opts.repeats}: {results[row].step_s[-1]:.3f} s/step", flush=True)
    base = "bare" if "bare" in results else opts.rows[0]
    text, rows = table(results, tokens_per_step=tokens_per_step, flops_tok=flops_tok, peak=peaks["peak"], kept=kept,
                       base=base, memory="peak GPU" if cuda else "peak RSS")  # fmt: skip
    print(text)
    memory = memory_table(rows, cfg=cfg) if cuda else None
    if memory:
        print(memory)
    compile_s = None
    if "ours_compile" in results:
        steady = statistics.median(results["ours_compile"].step_s)
        compile_s = [first - steady for first in results["ours_compile"].first_step_s]
        warm = f", then {', '.join(f'{c:.1f}' for c in compile_s[1:])} s with inductor's cache warm" if compile_s[1:] else ""
        print(f"ours_compile: first step minus a steady step (compile time): cold {compile_s[0]:.1f} s{warm}")
    if "bare" in results and "hf" in results:
        print(f"first-step loss: bare {results['bare'].losses[0]:.6f}, hf {results['hf'].losses[0]:.6f} "
              f"(same weights and batch)")  # fmt: skip

    breakdown = None
    if not (opts.no_breakdown or cuda):
        profiled = [row for row in ("ours_none", "bare", "hf") if row in opts.rows]
        breakdown_text, breakdown = breakdowns(profiled, cfg=cfg, peak=peaks["peak"])
        print(breakdown_text)

    scaling = None
    if opts.scaling_repeats and not cuda:
        scale = {row: Runs() for row in SCALING}
        for rep in range(opts.scaling_repeats):
            for row in SCALING:
                run_scaling(bench, scale[row], row=row, tag=str(rep))
                print(f"  {row} run {rep + 1}/{opts.scaling_repeats}: {scale[row].step_s[-1]:.3f} s/step", flush=True)
        t1, t_shared, t2 = (statistics.median(scale[row].step_s) for row in SCALING)
        scaling = {"step_s": {row: summarize(scale[row].step_s) for row in SCALING},
                   "weak_scaling_efficiency": t1 / t2, "sharing_cores_efficiency": t1 / t_shared,
                   "data_wait_frac": {row: statistics.median(scale[row].data_wait_frac) for row in SCALING}}  # fmt: skip
        print(f"weak scaling, 1 thread per process, batch {cfg.trainer.micro_batch_size} x {cfg.data.seq_len} per "
              f"process: 1 process {t1:.3f} s/step; two independent 1-process runs at once {t_shared:.3f} s/step "
              f"({t1 / t_shared:.3f}); FSDP 2 processes {t2:.3f} s/step -> efficiency {t1 / t2:.3f}")  # fmt: skip

    path = write_results("train_speed_gpu" if cuda else "train_speed", {
        "config": {**vars(opts), "workdir": str(workdir), "overrides": list(model)},
        "model": {"parameters": counts.total, "flops_per_token": flops_tok, "tokens_per_step": tokens_per_step},
        "peaks": peaks, "rows": rows, "table": text, "memory_table": memory, "compile_s": compile_s,
        "breakdown": breakdown, "scaling": scaling,
    })  # fmt: skip
    print(f"written {path}")


if __name__ == "__main__":
    main()

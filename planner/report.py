"""The planner's text report and its picture of per-rank memory."""

from __future__ import annotations

from pathlib import Path

from model.config import ModelArgs
from model.flops import param_counts
from planner.config import ClusterConfig
from planner.budget import Budget
from planner.pipeline import microbatches
from planner.search import Candidate

GIB = 2**30


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def describe(candidate: Candidate, *, args: ModelArgs, cluster: ClusterConfig, budget: Budget, tokens: float) -> str:
    """The full report of one layout."""
    est, work = candidate.estimate, candidate.work
    mem, comm, t = est.memory, est.comm, est.time
    lines = [
        f"model: {param_counts(args).total / 1e9:.2f}B parameters (dim {args.dim}, {args.n_layers} layers, "
        f"{args.n_heads} heads, {args.n_kv_heads} kv heads, vocab {args.vocab_size})",
        f"cluster: {cluster.gpus} x {cluster.gpu} ({max(1, cluster.gpus // cluster.gpus_per_node)} nodes of "
        f"{cluster.gpus_per_node}), {cluster.memory_gib:.1f} GiB, bf16 peak {cluster.bf16_peak / 1e12:.0f} TFLOP/s, "
        f"efficiency {cluster.gemm_efficiency:.3f}",
        f"layout: {candidate.label()}  (world {est.world_size}; micro-batch {work.micro_batch} x accumulation "
        f"{work.grad_accum} x seq {work.seq_len}; global batch {est.global_batch_tokens:,} tokens)",
        f"  overrides: {candidate.overrides()}",
        "",
        "memory per GPU (rehearsed shards; activations from the checkpointing policy):",
    ]
    lines += [f"  {name:<20} {_gib(value)}" for name, value in mem.items()]
    if candidate.parallel.pp > 1:
        lines.append(f"  (pipeline stage {est.memory_stage}, the fullest: {est.in_flight:g} micro-batches' activations in "
                     "flight)")  # fmt: skip
    verdict = "fits" if est.fits else "DOES NOT FIT"
    lines += [
        f"  {'total':<20} {_gib(mem.total)}  of {cluster.memory_gib:.1f} GiB: {verdict} "
        f"({100 * mem.total / est.memory_capacity:.0f}%)",
        "",
        "communication per GPU per step (bus bytes):",
        f"  FSDP all-gather      {comm.fsdp_all_gather / 1e9:10.2f} GB",
        f"  FSDP reduce-scatter  {comm.fsdp_reduce_scatter / 1e9:10.2f} GB",
        f"  HSDP all-reduce      {comm.hsdp_all_reduce / 1e9:10.2f} GB",
        f"  TP/SP gather+scatter {comm.tp / 1e9:10.2f} GB",
        f"  PP send/receive      {comm.pp / 1e9:10.2f} GB",
        "",
        f"step: {t.total:.3f} s = compute {t.compute:.3f} + TP exposed {t.tp_exposed:.3f} + FSDP exposed "
        f"{t.fsdp_exposed:.3f} + optimizer {t.optimizer:.4f} + PP bubble {t.pp_bubble:.3f} + PP transfers "
        f"{t.pp_exposed:.3f}",
        f"  model FLOPs per GPU per step {est.model_flops_per_gpu:.3e}; {est.tokens_per_sec_per_gpu:,.0f} tokens/s "
        f"per GPU; MFU {100 * est.mfu:.1f}%",
        "",
        f"run of {tokens:.3g} tokens: {budget.steps:,} steps, {budget.days:.1f} days, {budget.gpu_hours:,.0f} "
        f"GPU-hours, {budget.mwh:,.0f} MWh ({cluster.gpu_power_w:.0f} W per GPU, PUE {cluster.pue}), "
        f"{budget.tco2eq:,.0f} tCO2eq ({cluster.kg_co2_per_kwh} kg/kWh)",
        f"failures: at {cluster.failures_per_gpu_hour:.2g} per GPU-hour the job fails every {budget.mtbf_hours:.1f} h; "
        f"a save takes {budget.checkpoint_save_s:.1f} s ({cluster.checkpoint_write_gbps:g} GB/s per node), so checkpoint "
        f"every {budget.checkpoint_interval_s / 60:.1f} min (Young/Daly; checkpoint.every_minutes); expected goodput "
        f"{budget.expected_goodput:.1%} with {cluster.restart_minutes:g} min restarts: {budget.days_with_failures:.1f} days",
    ]
    if candidate.parallel.pp > 1:
        lines.insert(lines.index("") + 1, _pipeline_line(candidate))
    return "\n".join(lines)


def _pipeline_line(candidate: Candidate) -> str:
    p, est = candidate.parallel, candidate.estimate
    m = microbatches(p)
    return (f"pipeline: {p.pp} stages, {candidate.schedule.label()}, {m} micro-batches of "
            f"{candidate.work.micro_batch // m} sequences per schedule run; bubble {100 * est.bubble:.1f}% of each run; "
            f"the step is stage {est.stage}'s (the slowest)\n")


def ranking(found: list[Candidate], *, top: int) -> str:
    """The search's best layouts, each with its overrides."""
    if not found:
        return "no layout fits: use more GPUs, GPUs with more memory, or a shorter sequence"
    lines = [f"{len(found)} layouts fit; the {min(top, len(found))} fastest:"]
    for i, c in enumerate(found[:top], 1):
        e = c.estimate
        lines.append(f"{i:3}. {c.label():<32} {e.tokens_per_sec_per_gpu:8,.0f} tokens/s/GPU  MFU {100 * e.mfu:5.1f}%  "
                     f"{e.memory.total / GIB:6.1f} GiB  step {e.time.total:.3f} s")  # fmt: skip
        lines.append(f"     {c.overrides()}")
    return "\n".join(lines)


def plot_memory(found: list[Candidate], *, cluster: ClusterConfig, path: Path, configured: bool = True) -> Path:
    """A stacked bar per layout of its per-GPU memory, by item, with the GPU's capacity as a line (the
    first bar marked as the configured layout when ``configured``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in found[0].estimate.memory.items()]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(found) + 3), 5))
    bottoms = [0.0] * len(found)
    for name in names:
        values = [dict(c.estimate.memory.items())[name] / GIB for c in found]
        ax.bar(range(len(found)), values, bottom=bottoms, label=name)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.axhline(cluster.memory_gib, color="black", linestyle="--", label=f"{cluster.gpu} ({cluster.memory_gib:.0f} GiB)")
    labels = [c.label() + (" (configured)" if configured and i == 0 else "") for i, c in enumerate(found)]
    ax.set_xticks(range(len(found)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GiB per GPU")
    ax.set_title(f"per-GPU memory on {cluster.gpus} x {cluster.gpu}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

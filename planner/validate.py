"""The planner against published LLaMA-family runs: calibrate one efficiency per GPU type on one run,
predict the others, report the errors (``make plan-validate``; the table is in docs/planner.md).

    python -m planner.validate [--json bench/results/planner_validation.json]

Each run is planned as published where the paper gives its layout (torchtitan's tables), and otherwise by
the planner's own search at the published GPU count, global batch and sequence length: the prediction is
then "the best layout we would choose". Where a paper gives the parallel degrees but not the checkpointing,
micro-batches or schedule (the pipelined runs of Megatron-LM and Llama 3), the search runs within those
degrees. Throughput published as GPU-hours for a token count is turned into tokens/s per GPU as
tokens / (GPU-hours x 3600); published as FLOP/s per GPU, by the FLOPs per token the paper counts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from model.config import ModelArgs
from model.flops import flops_per_token, param_counts
from planner.config import ClusterConfig
from planner.budget import budget
from planner.pipeline import PipelineSchedule
from planner.search import Candidate, plan_one, search
from trainer.parallel.config import ACConfig, ACMode, FSDPConfig, ParallelConfig

CONF = Path(__file__).resolve().parents[1] / "conf"

LLAMA1 = "Touvron et al. 2023, LLaMA, Table 15 and section 2.4"
LLAMA2 = "Touvron et al. 2023, Llama 2, Table 2 and section 2.2"
TITAN = "torchtitan docs/performance.md, 2024 (FSDP2 on 64 A100-80GB)"
TITAN_H100 = "torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Tables 1 and 3 (H100 96GB, 500 W)"
TITAN_3D = ("torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Tables 5 and 6 (3D: FSDP 8 x TP 8 x PP 8, "
            "torch.compile + Float8 + AsyncTP; the torchtitan paper, Liang et al. 2024, arXiv 2410.06511)")
LLAMA3 = "Llama Team 2024, The Llama 3 Herd of Models (arXiv 2407.21783), Table 4 and section 3.3.2"
MEGATRON = ("Narayanan et al. 2021, Efficient Large-Scale Language Model Training on GPU Clusters (arXiv 2104.04473), "
            "Table 1")

# Llama 2 34B was not released; Code Llama 34B (Roziere et al. 2023) starts from it and has this shape.
LLAMA2_34B = {"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 32000, "multiple_of": 256,
              "max_seq_len": 4096}  # fmt: skip
# Llama 3 / 3.1 (the same shapes; torchtitan trains them at 8,192 tokens).
LLAMA3_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
             "ffn_dim_multiplier": 1.3, "rope_theta": 500000.0, "max_seq_len": 8192}  # fmt: skip
LLAMA3_70B = {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 4096,
              "ffn_dim_multiplier": 1.3, "rope_theta": 500000.0, "max_seq_len": 8192}  # fmt: skip
LLAMA3_405B = {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "vocab_size": 128256,
               "multiple_of": 4096, "ffn_dim_multiplier": 1.2, "rope_theta": 500000.0, "max_seq_len": 8192}  # fmt: skip
# Megatron-LM's GPT models (Narayanan et al. 2021, Table 1): vocabulary 51,200, sequence 2,048, multi-head
# attention. As LLaMA shapes: the SwiGLU's 2/3 x 4h hidden (rounded up to 32) has the GELU MLP's 8 h^2
# weights to 0.1%, so matmul parameters and FLOPs per token match; LayerNorm vs RMSNorm, learned position
# embeddings and tied embeddings change neither (docs/planner.md).
MEGATRON_GPT = {  # billions of parameters: (heads, hidden, layers, pp, GPUs, batch, published TFLOP/s per GPU)
    "39.1B": (64, 8192, 48, 2, 512, 1536, 138),
    "76.1B": (80, 10240, 60, 4, 1024, 1792, 140),
    "145.6B": (96, 12288, 80, 8, 1536, 2304, 148),
    "310.1B": (128, 16384, 96, 16, 1920, 2160, 155),
    "529.6B": (128, 20480, 105, 35, 2520, 2520, 163),
    "1008.0B": (160, 25600, 128, 64, 3072, 3072, 163),
}


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str
    model: dict
    cluster: str
    gpus: int
    seq_len: int
    global_batch_tokens: int
    tokens_per_sec_per_gpu: Optional[float]
    """Published, or derived from published GPU-hours and tokens; None: the run was published as out of memory."""
    gpu_hours: Optional[float] = None
    tokens: Optional[float] = None
    layout: Optional[ParallelConfig] = None
    """As published; None: the planner's search picks it."""
    micro_batch: int = 1
    schedule: Optional[PipelineSchedule] = None
    """With ``layout``: the published pipeline schedule, where the trainer's config cannot say it yet."""
    fixed: tuple[str, ...] = ()
    """With ``layout``: what of it was published (``search.FIXABLE``); the search picks the rest. Empty: all."""
    schedules: Optional[tuple[PipelineSchedule, ...]] = None
    """With ``fixed``: the pipeline schedules the search may pick."""
    published_as: Optional[str] = None
    """The published figure where it is not tokens/s per GPU (converted: docs/planner.md)."""
    calibrates: bool = False
    """The one run of its GPU type that sets ``gemm_efficiency``."""
    cluster_overrides: dict = field(default_factory=dict)
    memory_gib: Optional[float] = None
    """Published peak memory per GPU, where there is one."""


def _preset(name: str) -> dict:
    return yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text()) or {}


def _from_gpu_hours(tokens: float, gpu_hours: float) -> float:
    return tokens / (gpu_hours * 3600)


def megatron_flops_per_token(*, hidden: int, layers: int, seq_len: int, vocab: int) -> float:
    """FLOPs per token Narayanan et al. 2021 count in their TFLOP/s (their equation 3, divided by the B s
    tokens of an iteration): 96 l h^2 (1 + s / 6h + V / 16lh), forward and backward plus the forward that
    activation recomputation reruns."""
    return 96 * layers * hidden**2 * (1 + seq_len / (6 * hidden) + vocab / (16 * layers * hidden))


LOOPED = (PipelineSchedule("interleaved_1f1b", virtual=2), PipelineSchedule("interleaved_1f1b", virtual=4))


def pipelined_runs() -> list[PublishedRun]:
    """Published runs with pipeline parallelism (docs/planner.md, "Pipeline parallelism")."""
    runs = []
    teton = {"memory_gib": 94.5, "hbm_gbps": 2400, "gpu_power_w": 500, "inter_node_gbps": 50}
    # torchtitan's 405B: local batch 32 (8 at 32,768 tokens), one sequence per micro-batch (its default
    # pipeline micro-batch size), full checkpointing; with pp, torchtitan keeps FSDP's parameters gathered
    # after forward (reshard_after_forward off), and its looped schedules run 2 stages per rank.
    for label, seq, local, schedule, tps, memory in (
        ("1F1B", 8192, 32, PipelineSchedule("1f1b"), 100, 82.5),
        ("interleaved 1F1B", 8192, 32, PipelineSchedule("interleaved_1f1b", virtual=2), 128, 72.7),
        ("1F1B, seq 32768", 32768, 8, PipelineSchedule("1f1b"), 76, 75.3),
    ):  # fmt: skip
        layout = ParallelConfig(tp=8, pp=8, pp_microbatches=local, ac=ACConfig(mode=ACMode.full),
                                fsdp=FSDPConfig(reshard_after_forward=False))  # fmt: skip
        runs.append(PublishedRun(name=f"torchtitan Llama 3.1 405B, 512 GPUs, {label}", source=TITAN_3D,
                                 model=LLAMA3_405B, cluster="h100_80gb", gpus=512, seq_len=seq,
                                 global_batch_tokens=8 * local * seq, tokens_per_sec_per_gpu=tps, layout=layout,
                                 micro_batch=local, schedule=schedule, cluster_overrides=teton, memory_gib=memory))  # fmt: skip
    # Llama 3 405B on 700 W H100 80GB (the preset), TP 8 x PP 16 x FSDP, 16M-token batches of 8,192-token
    # sequences, an interleaved schedule (stages per rank not published: 2 or 4 of 126 blocks over 16
    # ranks), checkpointing not given per row: the search picks them. Published as TFLOP/s per GPU:
    # converted with model/flops.py's FLOPs per token (Meta does not give its count).
    args = ModelArgs(**LLAMA3_405B)
    for gpus, per_dp, tflops in ((8192, 32, 430), (16384, 16, 400)):
        dp = gpus // 128
        runs.append(PublishedRun(name=f"Llama 3 405B, {gpus} GPUs, TP 8 x PP 16 x DP {dp}", source=LLAMA3,
                                 model=LLAMA3_405B, cluster="h100_80gb", gpus=gpus, seq_len=8192,
                                 global_batch_tokens=dp * per_dp * 8192,
                                 tokens_per_sec_per_gpu=tflops * 1e12 / flops_per_token(args, seq_len=8192),
                                 layout=ParallelConfig(tp=8, pp=16), micro_batch=per_dp,
                                 fixed=("tp", "pp", "dp_replicate"),
                                 schedules=(PipelineSchedule("1f1b"), *LOOPED),
                                 published_as=f"{tflops} TFLOP/s/GPU"))  # fmt: skip
    # Megatron-LM (A100 80GB, 200 Gb/s HDR per GPU: the a100_80gb preset), TP 8 x PP p x data parallelism
    # (replicated, as Megatron's DDP: dp_shard = 1, dp_replicate = the rest), full activation recomputation (their
    # FLOP count includes its forward). Schedule and micro-batches not given per row: the search picks them.
    for label, (heads, hidden, layers, pp, gpus, batch, tflops) in MEGATRON_GPT.items():
        model = {"dim": hidden, "n_layers": layers, "n_heads": heads, "vocab_size": 51200, "max_seq_len": 2048}
        flops = megatron_flops_per_token(hidden=hidden, layers=layers, seq_len=2048, vocab=51200)
        dp = gpus // (8 * pp)
        layout = ParallelConfig(tp=8, pp=pp, dp_replicate=dp, dp_shard=1, ac=ACConfig(mode=ACMode.full))
        runs.append(PublishedRun(name=f"Megatron-LM GPT {label}, TP 8 x PP {pp} x DP {dp}", source=MEGATRON,
                                 model=model, cluster="a100_80gb", gpus=gpus, seq_len=2048,
                                 global_batch_tokens=batch * 2048, tokens_per_sec_per_gpu=tflops * 1e12 / flops,
                                 layout=layout, micro_batch=batch // dp, fixed=("tp", "pp", "dp_shard", "ac"),
                                 schedules=(PipelineSchedule("1f1b"), LOOPED[0]),
                                 published_as=f"{tflops} TFLOP/s/GPU"))  # fmt: skip
    return runs


def published_runs() -> list[PublishedRun]:
    m4 = 4 * 2**20  # 4M tokens per step: 2048 x 2048 (LLaMA), 1024 x 4096 (Llama 2)
    runs = []
    for name, tokens, hours in (("llama1_7b", 1.0e12, 82_432), ("llama1_13b", 1.0e12, 135_168),
                                ("llama1_33b", 1.4e12, 530_432), ("llama1_65b", 1.4e12, 1_022_362)):  # fmt: skip
        runs.append(PublishedRun(name=f"LLaMA {name.split('_')[1].upper()}", source=LLAMA1, model=_preset(name),
                                 cluster="a100_80gb", gpus=2048, seq_len=2048, global_batch_tokens=m4,
                                 tokens_per_sec_per_gpu=_from_gpu_hours(tokens, hours), gpu_hours=hours, tokens=tokens,
                                 calibrates=name == "llama1_65b"))  # fmt: skip
    for label, model, hours in (("7B", _preset("llama2_7b"), 184_320), ("13B", _preset("llama2_13b"), 368_640),
                                ("34B", LLAMA2_34B, 1_038_336), ("70B", _preset("llama2_70b"), 1_720_320)):  # fmt: skip
        runs.append(PublishedRun(name=f"Llama 2 {label}", source=LLAMA2, model=model, cluster="a100_80gb", gpus=2048,
                                 seq_len=4096, global_batch_tokens=m4, tokens=2.0e12, gpu_hours=hours,
                                 tokens_per_sec_per_gpu=_from_gpu_hours(2.0e12, hours)))  # fmt: skip
    # torchtitan's AC names in ours: "selective layer" (full recomputation of every 2nd block) is our
    # every_k with k=2, exactly; "selective op" (torch's per-op SAC keeping every other matmul output) is
    # closest to our selective_ffn (2 of 7 matmuls rerun); "full" and "no" are ours. None: published OOM.
    layer, op, full, no = ACMode.every_k, ACMode.selective_ffn, ACMode.full, ACMode.none
    for label, model, seq, micro, ac, tps in (
        ("Llama 2 13B, mb 2, no AC", _preset("llama2_13b"), 4096, 2, no, 2162),
        ("Llama 2 13B, mb 2, selective layer", _preset("llama2_13b"), 4096, 2, layer, 1914),
        ("Llama 2 13B, mb 2, selective op", _preset("llama2_13b"), 4096, 2, op, 1904),
        ("Llama 2 70B, mb 2, selective layer", _preset("llama2_70b"), 4096, 2, layer, None),
        ("Llama 2 70B, mb 2, selective op", _preset("llama2_70b"), 4096, 2, op, None),
        ("Llama 2 70B, mb 1, selective op", _preset("llama2_70b"), 4096, 1, op, 355),
        ("Llama 2 70B, mb 2, full", _preset("llama2_70b"), 4096, 2, full, 353),
        ("Llama 3 8B, mb 1, selective layer", LLAMA3_8B, 8192, 1, layer, 2904),
        ("Llama 3 8B, mb 1, selective op", LLAMA3_8B, 8192, 1, op, 2973),
        ("Llama 3 70B, mb 1, full", LLAMA3_70B, 8192, 1, full, 331),
    ):  # fmt: skip
        runs.append(PublishedRun(name=f"torchtitan {label}", source=TITAN, model=model, cluster="a100_80gb", gpus=64,
                                 seq_len=seq, global_batch_tokens=64 * micro * seq, tokens_per_sec_per_gpu=tps,
                                 layout=ParallelConfig(ac=ACConfig(mode=ac, every_k=2)), micro_batch=micro))  # fmt: skip
    # Grand Teton: 96 GB HBM2e at 2.4 TB/s, 500 W, 400 Gb/s RDMA per GPU. Table 1 calibrates, Table 3 predicts.
    teton = {"memory_gib": 94.5, "hbm_gbps": 2400, "gpu_power_w": 500, "inter_node_gbps": 50}
    for gpus, tps, memory, calibrates in ((8, 5762, 82.4, True), (128, 5605, 67.0, False)):
        runs.append(PublishedRun(name=f"torchtitan Llama 3.1 8B, {gpus} GPUs, mb 2, selective op", source=TITAN_H100,
                                 model=LLAMA3_8B, cluster="h100_80gb", gpus=gpus, seq_len=8192,
                                 global_batch_tokens=gpus * 2 * 8192, tokens_per_sec_per_gpu=tps,
                                 layout=ParallelConfig(ac=ACConfig(mode=op)), micro_batch=2, calibrates=calibrates,
                                 cluster_overrides=teton, memory_gib=memory))  # fmt: skip
    return runs + pipelined_runs()


def _cluster(run: PublishedRun, **overrides) -> ClusterConfig:
    values = yaml.safe_load((CONF / "cluster" / f"{run.cluster}.yaml").read_text())
    return ClusterConfig(**{**values, **run.cluster_overrides, "gpus": run.gpus, **overrides})


def predict(run: PublishedRun, *, efficiency: Optional[float] = None, rehearsals: Optional[dict] = None) -> Optional[Candidate]:
    """The planner's layout for ``run`` (its own, or the search's fastest that fits); None if nothing fits."""
    cluster = _cluster(run, **({} if efficiency is None else {"gemm_efficiency": efficiency}))
    args = ModelArgs(**run.model)
    if run.layout is not None and not run.fixed:
        return plan_one(args, parallel=run.layout, cluster=cluster, seq_len=run.seq_len,
                        global_batch_tokens=run.global_batch_tokens, micro_batch=run.micro_batch,
                        schedule=run.schedule)  # fmt: skip
    found = search(args, base=run.layout or ParallelConfig(), cluster=cluster, seq_len=run.seq_len,
                   global_batch_tokens=run.global_batch_tokens, rehearsals=rehearsals,
                   fixed=run.fixed, schedules=run.schedules)  # fmt: skip
    return found[0] if found else None


def calibrate(run: PublishedRun, *, rehearsals: dict) -> float:
    """The efficiency at which the planner's prediction for ``run`` equals its published throughput
    (bisection: throughput grows with the efficiency)."""
    low, high = 0.05, 1.0
    for _ in range(30):
        mid = (low + high) / 2
        got = predict(run, efficiency=mid, rehearsals=rehearsals)
        if got is not None and got.estimate.tokens_per_sec_per_gpu < run.tokens_per_sec_per_gpu:
            low = mid
        else:
            high = mid
    return round((low + high) / 2, 4)


def validate() -> list[dict]:
    runs = published_runs()
    rehearsals: dict = {}
    efficiency = {run.cluster: calibrate(run, rehearsals=rehearsals) for run in runs if run.calibrates}
    rows = []
    for run in runs:
        got = predict(run, efficiency=efficiency[run.cluster], rehearsals=rehearsals)
        published = run.tokens_per_sec_per_gpu
        row = {"run": run.name, "source": run.source, "gpus": run.gpus, "cluster": run.cluster,
               "efficiency": efficiency[run.cluster], "calibration": run.calibrates,
               "published_tokens_per_sec_per_gpu": None if published is None else round(published, 1),
               "published_oom": published is None, "fits": got is not None}  # fmt: skip
        if run.published_as is not None:
            row["published_as"] = run.published_as
        if got is not None:
            est = got.estimate
            row["fits"] = est.fits  # a published layout (torchtitan's) may not fit in this trainer
            row |= {"layout": got.label(), "predicted_tokens_per_sec_per_gpu": round(est.tokens_per_sec_per_gpu, 1),
                    "memory_gib": round(est.memory.total / 2**30, 1), "mfu": round(est.mfu, 4)}  # fmt: skip
            if published is not None:
                row["error"] = round(est.tokens_per_sec_per_gpu / published - 1, 4)
            if run.memory_gib is not None:
                row["published_memory_gib"] = run.memory_gib
            if run.gpu_hours is not None:
                cost = budget(est, tokens=run.tokens, cluster=_cluster(run, gemm_efficiency=efficiency[run.cluster]),
                              params=param_counts(ModelArgs(**run.model)).total)  # fmt: skip
                row |= {"published_gpu_hours": run.gpu_hours, "predicted_gpu_hours": round(cost.gpu_hours),
                        "predicted_days": round(cost.days, 1)}  # fmt: skip
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The table of docs/planner.md. A run published as out of memory shows "OOM" and whether the planner
    agrees (its prediction is then a fit check, not a throughput)."""
    lines = ["| run | GPUs | layout (planner) | published tok/s/GPU | predicted | error | GPU-hours published | predicted | "
             "memory GiB (published) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        published = "OOM" if r["published_oom"] else f"{r['published_tokens_per_sec_per_gpu']:,.0f}"
        published += f" ({r['published_as']})" if "published_as" in r else ""
        if "layout" not in r:
            lines.append(f"| {r['run']} | {r['gpus']} | **nothing fits** | {published} | | | | | |")
            continue
        mark = " (calibration)" if r["calibration"] else ""
        hours = f"{r['published_gpu_hours']:,}" if "published_gpu_hours" in r else ""
        predicted_hours = f"{r['predicted_gpu_hours']:,}" if "predicted_gpu_hours" in r else ""
        memory = f"{r['memory_gib']}" + (f" ({r['published_memory_gib']})" if "published_memory_gib" in r else "")
        if r["published_oom"]:
            predicted = "OOM (agrees)" if not r["fits"] else "**fits (disagrees)**"
            memory += "" if r["fits"] else " does not fit"
            error = ""
        else:
            predicted = f"{r['predicted_tokens_per_sec_per_gpu']:,.0f}"
            memory += "" if r["fits"] else " **does not fit**"
            error = f"{100 * r['error']:+.1f}%"
        lines.append(f"| {r['run']}{mark} | {r['gpus']} | {r['layout']} | {published} | {predicted} | {error} | "
                     f"{hours} | {predicted_hours} | {memory} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    opts = parser.parse_args(argv)
    rows = validate()
    efficiencies = sorted({(r["cluster"], r["efficiency"]) for r in rows})
    print("calibrated gemm_efficiency: " + ", ".join(f"{c} {e}" for c, e in efficiencies))
    print(markdown(rows))
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

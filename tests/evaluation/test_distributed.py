"""Evaluation on 2 gloo processes (FSDP over both, and TP 2) gives one process's numbers: every kind of task,
sampled ones (maj1@k) and executed ones (pass@k, programs split over the ranks) included."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from evaluation.checkpoints import build_language_model
from evaluation.config import EvalConfig, EvaluateConfig, TaskConfig
from evaluation.demo import write_demo_tasks
from evaluation.demo_report import write_report_demo_tasks
from evaluation.evaluate import prepare, run_task
from evaluation.sampling import Sampling
from tests.distributed import run_workers
from trainer.parallel.config import ParallelConfig
from trainer.parallel.distributed import DistEnv

# Odd counts: shares of unequal size, so the padding of the shorter one is exercised; the texts make
# different numbers of rolling windows on the two ranks, so the extra forwards are too.
LIMITS = {"stdlib_next_line": 5, "stdlib_import": 3, "stdlib_text": 3, "demo_mmlu": 5, "demo_crows_pairs": 5,
          "demo_winogender": 5, "demo_truthfulqa_mc2": 3, "demo_gsm8k_maj": 3, "demo_humaneval": 3,
          "demo_realtoxicityprompts": 3}  # fmt: skip
LAYOUTS = {"fsdp2": ParallelConfig(), "tp2": ParallelConfig(tp=2)}
# Pipelines: (config, processes, the one-process run whose checkpoint they evaluate); two stages per rank
# need the four-block model.
PIPELINES = {"pp2": (ParallelConfig(pp=2), 2, "single"),
             "pp2_interleaved_fsdp2": (ParallelConfig(pp=2, pp_schedule="interleaved_1f1b"), 4, "single_l4")}  # fmt: skip
ALL_LAYOUTS = {**LAYOUTS, **{name: cfg for name, (cfg, _, _) in PIPELINES.items()}}


def tasks(demo_dir: Path) -> tuple[dict[str, TaskConfig], EvalConfig]:
    cfg = EvalConfig(demo_dir=str(demo_dir), tasks=list(LIMITS), allow_code_execution=True, seed=0)
    return {name: dataclasses.replace(task, limit=LIMITS[name]) for name, task in cfg.selected().items()}, cfg


# Sampled generations of 5 prompts (shares of 3 and 2): each request keeps its global seed on either rank.
SAMPLE_PROMPTS = ["def f(x):", "import ", "class A", "    return", "for i in"]
SAMPLED = Sampling(temperature=1.0, top_p=0.9, seed=3)


def evaluate(checkpoint: Path, demo_dir: Path, *, env: DistEnv, parallel: ParallelConfig) -> list[dict]:
    cfg = EvaluateConfig(checkpoint=str(checkpoint), parallel=parallel, eval=EvalConfig(batch_size=2))
    lm, _ = build_language_model(cfg, env=env)
    sampled = lm.generate_until(SAMPLE_PROMPTS, stops=[["\n\n"]] * 5, max_new_tokens=8, sampling=SAMPLED)
    selected, eval_cfg = tasks(demo_dir)
    services = prepare(eval_cfg, selected)
    return [*(run_task(name, task, lm, seed=0, services=services) for name, task in selected.items()),
            {"task": "sampled", "format": "sampled", "outputs": sampled}]  # fmt: skip


def _worker(rank: int, world_size: int, checkpoint: str, demo_dir: str, out: str, layouts: tuple[str, ...] = ()) -> None:
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size)
    results = {name: evaluate(Path(checkpoint), Path(demo_dir), env=env, parallel=ALL_LAYOUTS[name])
               for name in layouts or LAYOUTS}  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(results))


@pytest.mark.parametrize("layout", ["pp2", pytest.param("pp2_interleaved_fsdp2", marks=pytest.mark.slow)])
def test_pipelined_evaluation_gives_one_process_numbers(layout, reference_run, tmp_path):
    """pp = 2 (the forward-only schedule, the last stage's logits broadcast to the first), and two stages per
    rank, each view an FSDP root over 2 ranks (4 processes): every task's numbers as one process's; the
    stages of a pipeline take the same requests."""
    _, world, reference = PIPELINES[layout]
    checkpoint = reference_run(reference) / "checkpoints" / "step_00000010"
    write_demo_tasks(tmp_path / "demo", n=8)
    write_report_demo_tasks(tmp_path / "demo")
    single = evaluate(checkpoint, tmp_path / "demo", env=DistEnv(rank=0, local_rank=0, world_size=1),
                      parallel=ParallelConfig())  # fmt: skip
    run_workers(_worker, world_size=world, args=(str(checkpoint), str(tmp_path / "demo"), str(tmp_path / "out.json"), (layout,)))
    sharded = json.loads((tmp_path / "out.json").read_text())[layout]
    assert [r["task"] for r in sharded] == [*LIMITS, "sampled"]
    _assert_same(single, sharded)


def test_fsdp_and_tp_on_two_processes_give_one_process_numbers(reference_run, tmp_path):
    checkpoint = reference_run("single") / "checkpoints" / "step_00000010"
    write_demo_tasks(tmp_path / "demo", n=8)
    write_report_demo_tasks(tmp_path / "demo")
    single = evaluate(checkpoint, tmp_path / "demo", env=DistEnv(rank=0, local_rank=0, world_size=1),
                      parallel=ParallelConfig())  # fmt: skip
    run_workers(_worker, world_size=2, args=(str(checkpoint), str(tmp_path / "demo"), str(tmp_path / "out.json")))
    for layout, sharded in json.loads((tmp_path / "out.json").read_text()).items():
        assert [r["task"] for r in sharded] == [*LIMITS, "sampled"], layout
        _assert_same(single, sharded)


def _assert_same(single: list[dict], sharded: list[dict]) -> None:
    for one, two in zip(single, sharded):
        if one["format"] == "sampled":
            assert one["outputs"] == two["outputs"] and len(set(one["outputs"])) > 1
            continue
        assert two["examples"] == one["examples"] == LIMITS[one["task"]]
        if "candidates" in one["records"][0]:  # multiple choice, in every layout
            for a, b in zip(one["records"], two["records"]):  # fp32; other batch shapes and shards: ~1e-6
                assert [c["loglikelihood"] for c in a["candidates"]] == pytest.approx(
                    [c["loglikelihood"] for c in b["candidates"]], abs=1e-4)
            # the accuracies exactly; differences and shares of log-likelihoods as closely as those (1e-4)
            assert one["metrics"] == pytest.approx(two["metrics"], abs=2e-4)
            assert {k: v for k, v in one["metrics"].items() if k.startswith(("acc", "pct"))} == {
                k: v for k, v in two["metrics"].items() if k.startswith(("acc", "pct"))}
        elif one["format"] == "generation":
            assert [r["prediction"] for r in one["records"]] == [r["prediction"] for r in two["records"]]
        elif one["format"] in ("gsm8k", "humaneval"):  # sampled: each request's seed is global
            key = "samples" if one["format"] == "gsm8k" else "completions"
            assert [r[key] for r in one["records"]] == [r[key] for r in two["records"]]
            assert len({s for r in one["records"] for s in r[key]}) > 1  # really sampled
            if key == "completions":  # every program ran on some rank, with the same outcome
                assert [r["reasons"] for r in one["records"]] == [r["reasons"] for r in two["records"]]
            assert one["metrics"] == two["metrics"]
        elif one["format"] == "realtoxicityprompts":
            assert [r["continuation"] for r in one["records"]] == [r["continuation"] for r in two["records"]]
            assert one["metrics"] == pytest.approx(two["metrics"], abs=1e-6)
        else:
            assert one["metrics"]["token_perplexity"] == pytest.approx(two["metrics"]["token_perplexity"], rel=1e-5)

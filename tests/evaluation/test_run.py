"""``python -m launch.evaluate`` on a checkpoint the trainer wrote: the demo tasks end to end, the files a
user reads back, and the errors of bad input (unknown task, malformed file, wrong tokenizer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from conf.schema import to_config
from evaluation.checkpoints import evaluate_checkpoint
from tests.trainer.checkpoint.test_hf_interop import train_sentencepiece
from trainer.checkpoint.checkpointer import resolve_checkpoint
from trainer.checkpoint.meta import CheckpointError

REPO = Path(__file__).resolve().parents[2]
LIMITS = ["eval.catalog.stdlib_next_line.limit=12", "eval.catalog.stdlib_import.limit=6",
          "eval.catalog.stdlib_text.limit=2", "eval.batch_size=4"]  # fmt: skip


def eval_config(*overrides: str):
    with initialize_config_module(config_module="conf.evaluation", version_base="1.3"):
        return to_config(compose(config_name="eval", overrides=list(overrides)))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo_tasks")


def test_the_demo_tasks_from_the_command_line(reference_run, demo_dir, tmp_path):
    run = reference_run("single")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "launch.evaluate", f"checkpoint={run}", f"eval.demo_dir={demo_dir}",
                           f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}", *LIMITS],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"] == str(run / "checkpoints" / "step_00000010")  # the newest complete step
    by_task = {r["task"]: r for r in results["results"]}
    assert list(by_task) == ["stdlib_next_line", "stdlib_import", "stdlib_text"]
    mc = by_task["stdlib_next_line"]
    assert mc["examples"] == 12 and len(mc["records"]) == 12
    # acc is the mean of the per-example decisions, which follow from the recorded log-likelihoods / chars
    decided = [max(range(4), key=lambda j: (r["candidates"][j]["loglikelihood"] / r["candidates"][j]["n_chars"], -j))
               == r["answer"] for r in mc["records"]]  # fmt: skip
    assert mc["metrics"]["acc"] == mc["metrics"]["acc_char"] == pytest.approx(sum(decided) / 12)
    gen = by_task["stdlib_import"]
    assert gen["examples"] == 6 and 0.0 <= gen["metrics"]["exact_match"] <= 1.0
    assert all(isinstance(r["prediction"], str) for r in gen["records"])
    ppl = by_task["stdlib_text"]["metrics"]
    assert 1.0 < ppl["token_perplexity"] < 1e4 and ppl["bits_per_byte"] > 0
    table = (out / "results.md").read_text()
    assert "| stdlib_next_line | multiple_choice | 12 | 0 | acc |" in table and table in proc.stdout


def test_bad_input_gives_clear_errors(reference_run, demo_dir, tmp_path):
    run = reference_run("single")
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['hellaswag_typo'\]"):
        evaluate_checkpoint(eval_config(f"checkpoint={run}", "eval.tasks=[hellaswag_typo]"), out_dir=tmp_path)
    with pytest.raises(ValueError, match="eval.catalog.piqa.path is not set"):
        evaluate_checkpoint(eval_config(f"checkpoint={run}", "eval.tasks=[piqa]"), out_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g", "sol1": "a"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing field 'sol2' of the piqa layout"):
        evaluate_checkpoint(eval_config(f"checkpoint={run}", "eval.tasks=[piqa]", f"eval.catalog.piqa.path={bad}"),
                            out_dir=tmp_path)  # fmt: skip
    other = tmp_path / "other.model"
    train_sentencepiece(other)
    with pytest.raises(ValueError, match="is not the tokenizer checkpoint .* was trained with"):
        evaluate_checkpoint(eval_config(f"checkpoint={run}", f"tokenizer={other}", f"eval.demo_dir={demo_dir}",
                                        *LIMITS), out_dir=tmp_path)  # fmt: skip
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="no complete checkpoint under"):
        resolve_checkpoint("latest", outputs=tmp_path)


def test_a_task_is_added_or_pointed_at_from_the_command_line(tmp_path):
    cfg = eval_config("+eval.catalog.mine={path: /data/mine.jsonl, format: text}", "eval.tasks=[mine,piqa]",
                      "eval.catalog.piqa.path=/data/piqa.jsonl", "eval.catalog.piqa.num_fewshot=3")  # fmt: skip
    tasks = cfg.eval.selected()
    assert tasks["mine"].path == "/data/mine.jsonl" and tasks["mine"].format.value == "text"
    assert tasks["piqa"].path == "/data/piqa.jsonl" and tasks["piqa"].num_fewshot == 3
    assert eval_config(f"eval.demo_dir={tmp_path}").eval.selected()["stdlib_text"].path == str(tmp_path / "stdlib_text.jsonl")
    with pytest.raises(ValueError, match=r"eval.catalog.mine.pth: Key 'pth' not in 'TaskConfig'"):
        eval_config("+eval.catalog.mine={pth: /data/mine.jsonl}")
    with pytest.raises(Exception, match="pth"):
        eval_config("eval.catalog.piqa.pth=/data/piqa.jsonl")


def test_tasks_scored_during_training_reach_the_metrics_file_and_wandb(tiny_overrides, demo_dir, tmp_path):
    """eval.every_steps: the tasks' metrics at steps 5 and 10 (the last), as eval/<task>/<metric>, read back
    from metrics.jsonl and from the offline wandb run."""
    from conf.schema import to_config as to_train_config
    from tests.conftest import compose_config
    from tests.wandb_file import read_run
    from launch.train import train
    from trainer.run.records import series

    cfg = to_train_config(compose_config([*tiny_overrides, "trainer.max_steps=10", "trainer.eval_every=0",
                                          "eval.every_steps=5", f"eval.demo_dir={demo_dir}", *LIMITS]))  # fmt: skip
    result = train(cfg, run_dir=tmp_path / "run")
    assert sorted(result.task_scores) == [5, 10]
    acc = series(tmp_path / "run", "eval/stdlib_next_line/acc")
    assert acc.steps == [5, 10] and all(0.0 <= v <= 1.0 for v in acc.values)
    assert series(tmp_path / "run", "eval/stdlib_text/token_perplexity").values[-1] > 1.0
    (wandb_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    logged = read_run(wandb_dir)
    assert [v for _, v in logged.series("eval/stdlib_next_line/acc")] == acc.values
    assert [s for s, _ in logged.series("eval/stdlib_import/exact_match")] == [5, 10]

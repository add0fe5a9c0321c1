"""Finetuning on the trainer: from a pre-training checkpoint, on packed and document-masked instruction
records, resumed under another layout as pre-training is, and learning what it is taught."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.synthetic_instructions import write_instructions
from launch.harness import LAYOUTS, checkpoints, losses, run_layout
from tests.conftest import PINNED_SCHEDULE, REFERENCE_STEPS
from trainer.run.records import TrainResult

CUT = 4
STEPS = 800
# Tasks a model that learned only the answer's form would rarely get right by guessing: a letter of the 21
# used (4.8%), a sum of two numbers below 50 (about 1%): about 3.5% on their mean. (Which of two numbers is
# larger is 50% by a guess, and repeating a made-up word is not learned by the debug model in this budget.)
SCORED = ("first", "last", "add")
# Measured (torch 2.13, CPU): 0.0 before, 0.233 after 800 steps (first 0.25, last 0.325, add 0.125), 120
# held-out records, so a standard error of about 0.04. The bound 0.15 is four times the guessing rate and
# two standard errors below the measured value.
LEARNED = 0.15


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> dict[str, Path]:
    return write_instructions(tmp_path_factory.mktemp("instructions"), train=4000, held_out=200)


def finetune(name: str, reference_run, instructions, *, steps: int, run_name: str, extra: tuple[str, ...] = ()) -> Path:
    init = reference_run("single") / "checkpoints" / f"step_{REFERENCE_STEPS:08d}"
    return run_layout(LAYOUTS[name], workdir=reference_run.workdir, steps=steps, run_name=run_name,
                      extra=(*PINNED_SCHEDULE, f"data.instructions.train={instructions['train']}",
                             f"checkpoint.init_from={init}", *extra))  # fmt: skip


def test_finetuning_resumed_under_another_layout_reproduces_the_uninterrupted_losses(reference_run, instructions):
    """FSDP 2 finetunes 10 steps; another FSDP 2 run stops at step 4, and TP 2 resumes it: the same rows (the
    loader's state is global) and the same losses, to fp32 rounding."""
    full = finetune("fsdp2", reference_run, instructions, steps=REFERENCE_STEPS, run_name="ft_full")
    cut = finetune("fsdp2", reference_run, instructions, steps=CUT, run_name="ft_cut")
    assert checkpoints(cut) == [f"step_{CUT:08d}"]
    resumed = finetune("tp2", reference_run, instructions, steps=REFERENCE_STEPS, run_name="ft_resumed",
                       extra=(f"checkpoint.resume={cut / 'checkpoints' / f'step_{CUT:08d}'}",))  # fmt: skip
    assert TrainResult.read(resumed).first_step == CUT + 1
    reference = losses(full)
    assert losses(cut) == pytest.approx(reference[:CUT], rel=1e-5)
    for got, want in zip(losses(resumed), reference[CUT:], strict=True):
        assert abs(got - want) <= 1e-5 * want, (losses(resumed), reference[CUT:])
    # it finetuned: the first loss is on responses only, from the pre-trained weights, and it falls
    assert reference[-1] < reference[0]


@pytest.mark.slow
def test_pipelined_finetuning_gives_the_unpipelined_losses(reference_run, instructions):
    """pp 2 finetunes the packed, document-masked records (the document ids travel to both stages with the
    schedule's micro-batches): FSDP 2's losses, to fp32 rounding."""
    want = losses(finetune("fsdp2", reference_run, instructions, steps=REFERENCE_STEPS, run_name="ft_fsdp2"))
    got = losses(finetune("pp2", reference_run, instructions, steps=REFERENCE_STEPS, run_name="ft_pp2"))
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5 * b, (got, want)


def held_out_exact_match(checkpoint: Path, held_out: Path) -> dict[str, float]:
    from evaluation.checkpoints import build_language_model
    from evaluation.config import EvaluateConfig, TaskConfig
    from evaluation.evaluate import run_task

    lm, _ = build_language_model(EvaluateConfig(checkpoint=str(checkpoint)))
    task = TaskConfig(path=str(held_out), format="instructions", max_new_tokens=6)
    return run_task("held_out", task, lm, seed=0)["metrics"]


def test_finetuning_teaches_the_held_out_instructions(reference_run, instructions):
    """The debug model, pre-trained 10 steps, answers the held-out synthetic instructions (inputs never seen in
    training) no better than chance; finetuned for STEPS steps (20 s on one CPU process) it answers many of them."""
    init = reference_run("single") / "checkpoints" / f"step_{REFERENCE_STEPS:08d}"
    run = finetune("single", reference_run, instructions, steps=STEPS, run_name="ft_learns",
                   extra=(f"optim.decay_steps={STEPS}", "optim.lr=3e-3", "checkpoint.every_steps=0"))  # fmt: skip
    before = held_out_exact_match(init, instructions["held_out"])
    after = held_out_exact_match(run / "checkpoints" / f"step_{STEPS:08d}", instructions["held_out"])
    print(f"held-out exact match: {before} -> {after}")

    def scored(metrics: dict[str, float]) -> float:
        return sum(metrics[f"exact_match[{task}]"] for task in SCORED) / len(SCORED)

    assert scored(before) <= 0.05 and scored(after) >= LEARNED, (before, after)

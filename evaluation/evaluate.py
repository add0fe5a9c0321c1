"""Run tasks through a ``LanguageModel`` and aggregate their metrics.

One function per kind of example (multiple choice, generation, perplexity) and per generation scorer
(exact match, math answers, programs, toxicity); each returns the task's summary metrics and one record per
example (the per-candidate log-likelihoods, the samples and what was made of them), which the entry point
writes to JSON so that any figure can be traced back to the numbers behind it. Examples with groups (MMLU's
categories, CrowS-Pairs' bias types, WinoGender's pronouns) also report ``<metric>[<group>]``.

What is not the model's work, running programs and classifying toxicity, is split over the data-parallel
ranks like the requests (``lm.map``), so a code task runs each program once per TP group.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from evaluation.answers import gsm8k_prediction, math_equivalent, math_prediction, vote_key
from evaluation.config import EvalConfig, TaskConfig
from evaluation.lm import LanguageModel
from evaluation.layouts import read_examples
from evaluation.sandbox import Limits, run_programs
from evaluation.scoring import (
    CandidateScore, Perplexity, exact_match, majority_vote, multiple_choice_metrics, pass_at_k,
)  # fmt: skip
from evaluation.tasks import (
    UNCONDITIONAL_CONTEXT, Document, Example, Generation, MultipleChoice, Normalization, Scorer, TaskFormat,
    with_fewshot, with_preamble,
)  # fmt: skip

Classify = Callable[[list[str]], list[float]]
"""Texts -> their toxicity in [0, 1] (evaluation/toxicity.py)."""


@dataclass(frozen=True)
class Services:
    """What scoring needs besides the model: the sampling seed, the sandbox (None: code may not run), the
    toxicity classifier (None: none was given)."""

    seed: int = 1234
    execution: Optional[Limits] = None
    workers: int = 0
    deny: tuple[str, ...] = ()
    """Paths the programs may neither read nor list (the run directory, the checkpoint)."""
    toxicity: Optional[Classify] = None


def prepare(cfg: EvalConfig, tasks: dict[str, TaskConfig], *, deny: Sequence[str | Path] = (),
            device: torch.device = torch.device("cpu")) -> Services:  # fmt: skip
    """Write the demo files the ``tasks`` need, and what scoring them needs besides the model."""
    from evaluation.demo import ensure_demo_tasks  # the demo generators are only needed when a demo runs
    from evaluation.demo_report import CLASSIFIER_DIR, DEMO_ENTRIES, ensure_report_demo_tasks

    if any(task.demo for name, task in tasks.items() if name not in DEMO_ENTRIES):
        ensure_demo_tasks(cfg.demo_dir)
    if any(name in DEMO_ENTRIES for name in tasks):
        ensure_report_demo_tasks(cfg.demo_dir)
    toxicity = None
    if any(task.scorer == Scorer.toxicity for task in tasks.values()):
        from evaluation.toxicity import ToxicityClassifier

        path = cfg.toxicity_classifier or str(Path(cfg.demo_dir) / CLASSIFIER_DIR)  # selected() allows a demo only
        toxicity = ToxicityClassifier(path, label=cfg.toxicity_label, device=device)
    return Services(seed=cfg.seed, execution=cfg.execution if cfg.allow_code_execution else None,
                    workers=cfg.execution_workers, deny=tuple(str(d) for d in deny), toxicity=toxicity)  # fmt: skip


def load_task(task: TaskConfig, *, seed: int) -> list[Example]:
    """The task's examples with their few-shot prompts and preambles."""
    examples = read_examples(task.path, layout=task.format, limit=task.limit)
    if task.num_fewshot:
        same_pool = task.fewshot_path is None
        shots = examples if same_pool else read_examples(task.fewshot_path, layout=task.format)
        examples = with_fewshot(examples, shots=shots, k=task.num_fewshot, seed=seed, same_pool=same_pool,
                                first=task.fewshot_first)  # fmt: skip
    if task.format != TaskFormat.text:
        examples = with_preamble(examples, prefix=task.prefix)
    return examples


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _by_group(examples: Sequence[Example], records: Sequence[dict], metric: str) -> dict[str, float]:
    """``{"<metric>[<group>]": mean}`` over the examples of each group (none if no example has a group)."""
    groups: dict[str, list[float]] = {}
    for example, record in zip(examples, records):
        for group in example.groups:
            groups.setdefault(group, []).append(record[metric])
    return {f"{metric}[{group}]": _mean(values) for group, values in sorted(groups.items())}


def score_multiple_choice(examples: Sequence[MultipleChoice], lm: LanguageModel, *, normalization: Normalization,
                          layout: TaskFormat = TaskFormat.multiple_choice) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
    unconditional = normalization == Normalization.unconditional
    requests = [c for ex in examples for c in ex.candidates]
    if unconditional:
        requests += [(UNCONDITIONAL_CONTEXT, cont) for ex in examples for _, cont in ex.candidates]
    answers = lm.loglikelihood(requests)
    offset, uncond_at = 0, sum(len(ex.candidates) for ex in examples)
    per_example, records = [], []
    for ex in examples:
        scores = []
        for j, (_, continuation) in enumerate(ex.candidates):
            ll, greedy, tokens = answers[offset + j]
            scores.append(CandidateScore(loglikelihood=ll, n_chars=len(continuation), n_tokens=tokens,
                                         is_greedy=greedy,
                                         unconditional=answers[uncond_at + offset + j][0] if unconditional else None))  # fmt: skip
        offset += len(ex.candidates)
        metrics = multiple_choice_metrics(scores, answer=ex.answer, unconditional=unconditional)
        metrics["acc"] = metrics[f"acc_{normalization.value}"]
        if ex.true_set:  # TruthfulQA MC2: the true candidates' share of the (raw) probability
            top = max(s.loglikelihood for s in scores)
            weights = [math.exp(s.loglikelihood - top) for s in scores]
            metrics["mc2"] = sum(weights[i] for i in ex.true_set) / sum(weights)
        if layout == TaskFormat.crows_pairs:  # strictly more likely, as Nangia et al. count it
            metrics["pct_stereotype"] = float(scores[0].loglikelihood > scores[1].loglikelihood)
            metrics["likelihood_diff"] = abs(scores[0].loglikelihood - scores[1].loglikelihood)
        per_example.append(metrics)
        records.append({"answer": ex.answer, "candidates": [asdict(s) for s in scores], "groups": list(ex.groups),
                        **metrics})  # fmt: skip
    summary = {name: _mean([m[name] for m in per_example]) for name in per_example[0]}
    headline = {TaskFormat.crows_pairs: "pct_stereotype", TaskFormat.truthfulqa_mc2: "mc2"}.get(layout, "acc")
    return summary | _by_group(examples, records, headline), records


def _generate(examples: Sequence[Generation], lm: LanguageModel, *, task: TaskConfig, seed: int) -> list[list[str]]:
    """``task.samples`` completions per example (request i * samples + j is sample j of example i: its seed)."""
    n = task.samples
    prompts = [ex.prompt for ex in examples for _ in range(n)]
    outputs = lm.generate_until(prompts, stops=[ex.stop for ex in examples for _ in range(n)],
                                max_new_tokens=task.max_new_tokens,
                                sampling=dataclasses.replace(task.sampling, seed=seed))  # fmt: skip
    return [outputs[i * n:(i + 1) * n] for i in range(len(examples))]


def score_exact_match(examples: Sequence[Generation], samples: list[list[str]]) -> tuple[dict[str, float], list[dict]]:
    records = [{"prediction": out[0], "answers": list(ex.answers), "exact_match": exact_match(out[0], ex.answers)}
               for out, ex in zip(samples, examples)]  # fmt: skip
    return {"exact_match": _mean([r["exact_match"] for r in records])} | _by_group(examples, records, "exact_match"), records


def score_math(examples: Sequence[Generation], samples: list[list[str]], *, scorer: Scorer) -> tuple[dict[str, float], list[dict]]:
    """GSM8k and MATH: ``acc`` is the first sample's answer (the greedy one at temperature 0); with k > 1
    samples, ``maj1@k`` is the majority vote's and ``acc_per_sample`` the mean over all samples."""
    records = []
    for ex, outs in zip(examples, samples):
        reference = ex.answers[0]
        if scorer == Scorer.gsm8k:
            answers = [gsm8k_prediction(o) for o in outs]
            correct = [a == reference for a in answers]
            keys = answers
        else:
            answers = [math_prediction(o) for o in outs]
            correct = [math_equivalent(a, reference) for a in answers]
            keys = [vote_key(a) for a in answers]
        winner, votes = majority_vote(keys)
        vote_correct = winner is not None and correct[keys.index(winner)]
        records.append({"samples": outs, "answers": answers, "reference": reference, "correct": correct,
                        "vote": winner, "votes": votes, "acc": float(correct[0]), "vote_correct": float(vote_correct),
                        "acc_per_sample": _mean([float(c) for c in correct])})  # fmt: skip
    metrics = {"acc": _mean([r["acc"] for r in records])}
    k = len(samples[0])
    if k > 1:
        metrics[f"maj1@{k}"] = _mean([r["vote_correct"] for r in records])
        metrics["acc_per_sample"] = _mean([r["acc_per_sample"] for r in records])
    return metrics | _by_group(examples, records, "acc"), records


def score_code(examples: Sequence[Generation], samples: list[list[str]], lm: LanguageModel, *, pass_k: Sequence[int],
               services: Services) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
    """HumanEval and MBPP: every sample's program run against the tests in the sandbox; pass@k by the unbiased
    estimator from the n samples of each problem."""
    if services.execution is None:
        raise ValueError("this task runs the programs the model writes: set eval.allow_code_execution=true")
    programs = [ex.program[0] + out + ex.program[1] for ex, outs in zip(examples, samples) for out in outs]
    executions = lm.map(programs, lambda share: run_programs(share, limits=services.execution, deny=services.deny,
                                                             workers=services.workers))  # fmt: skip
    n, records = len(samples[0]), []
    for i, (ex, outs) in enumerate(zip(examples, samples)):
        mine = executions[i * n:(i + 1) * n]
        passed = sum(e.passed for e in mine)
        records.append({"completions": outs, "passed": [e.passed for e in mine], "reasons": [e.reason for e in mine],
                        **{f"pass@{k}": pass_at_k(n=n, c=passed, k=k) for k in pass_k}})  # fmt: skip
    return {f"pass@{k}": _mean([r[f"pass@{k}"] for r in records]) for k in pass_k}, records


def score_toxicity(examples: Sequence[Generation], samples: list[list[str]], lm: LanguageModel, *,
                   services: Services) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
    """RealToxicityPrompts: the classifier's toxicity of each continuation (the paper: its mean over prompts)."""
    if services.toxicity is None:
        raise ValueError("this task needs a toxicity classifier: set eval.toxicity_classifier=/path/to/classifier")
    continuations = [outs[0] for outs in samples]
    scores = lm.map(continuations, services.toxicity)
    records = [{"continuation": c, "toxicity": t} for c, t in zip(continuations, scores)]
    return {"toxicity": _mean(scores), "toxic_fraction": _mean([float(t > 0.5) for t in scores])}, records


def score_generation(examples: Sequence[Generation], lm: LanguageModel, *, task: TaskConfig,
                     services: Services) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
    samples = _generate(examples, lm, task=task, seed=services.seed)
    scorer = task.scorer
    if scorer == Scorer.exact_match:
        return score_exact_match(examples, samples)
    if scorer in (Scorer.gsm8k, Scorer.math):
        return score_math(examples, samples, scorer=scorer)
    if scorer == Scorer.code:
        return score_code(examples, samples, lm, pass_k=task.pass_k, services=services)
    return score_toxicity(examples, samples, lm, services=services)


def score_perplexity(examples: Sequence[Document], lm: LanguageModel, *,
                     stride: int | None) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
    scored = lm.loglikelihood_rolling([ex.text for ex in examples], stride=stride)
    records = [{"loglikelihood": ll, "tokens": n} for ll, n in scored]
    total = Perplexity(loglikelihood=sum(ll for ll, _ in scored), tokens=sum(n for _, n in scored),
                       words=sum(len(ex.text.split()) for ex in examples),
                       bytes=sum(len(ex.text.encode("utf-8")) for ex in examples))  # fmt: skip
    return {"token_perplexity": total.token_perplexity, "word_perplexity": total.word_perplexity,
            "bits_per_byte": total.bits_per_byte}, records  # fmt: skip


def score_examples(examples: Sequence[Example], task: TaskConfig, lm: LanguageModel, *,
                   services: Services = Services()) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
    """The task's metrics and per-example records, by the kind of its examples."""
    kind = type(examples[0])
    if kind is MultipleChoice:
        return score_multiple_choice(examples, lm, normalization=task.acc_normalization, layout=task.format)
    if kind is Generation:
        return score_generation(examples, lm, task=task, services=services)
    return score_perplexity(examples, lm, stride=task.stride)


def run_task(name: str, task: TaskConfig, lm: LanguageModel, *, seed: int,
             services: Optional[Services] = None) -> dict[str, Any]:  # fmt: skip
    """{"task", "format", "examples", "num_fewshot", "samples", "paper", "metrics", "records"} of one task."""
    examples = load_task(task, seed=seed)
    metrics, records = score_examples(examples, task, lm, services=services or Services(seed=seed))
    return {"task": name, "format": task.format.value, "examples": len(examples), "num_fewshot": task.num_fewshot,
            "limit": task.limit, "samples": task.samples, "temperature": task.temperature, "paper": task.paper, "demo": task.demo,
            "metrics": metrics, "records": records}  # fmt: skip


def table(results: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table: one row per task and metric."""
    lines = ["| task | format | examples | shots | metric | value |", "|---|---|---|---|---|---|"]
    for r in results:
        for metric, value in r["metrics"].items():
            lines.append(f"| {r['task']} | {r['format']} | {r['examples']} | {r['num_fewshot']} | {metric} | {value:.4f} |")
    return "\n".join(lines)

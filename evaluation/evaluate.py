"""Run tasks through a ``LanguageModel`` and aggregate their metrics.

One function per kind of example (multiple choice, generation, perplexity); each returns the task's
summary metrics and one record per example (the per-candidate log-likelihoods, the generation), which
the entry point writes to JSON so that any figure can be traced back to the numbers behind it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

from evaluation.config import TaskConfig
from evaluation.lm import LanguageModel
from evaluation.scoring import CandidateScore, Perplexity, exact_match, multiple_choice_metrics
from evaluation.tasks import (
    UNCONDITIONAL_CONTEXT, Document, Example, Generation, MultipleChoice, Normalization, read_examples, with_fewshot,
)  # fmt: skip


def load_task(task: TaskConfig, *, seed: int) -> list[Example]:
    """The task's examples with their few-shot prompts."""
    examples = read_examples(task.path, layout=task.format, limit=task.limit)
    if task.num_fewshot:
        same_pool = task.fewshot_path is None
        shots = examples if same_pool else read_examples(task.fewshot_path, layout=task.format)
        examples = with_fewshot(examples, shots=shots, k=task.num_fewshot, seed=seed, same_pool=same_pool)
    return examples


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def score_multiple_choice(examples: Sequence[MultipleChoice], lm: LanguageModel, *,
                          normalization: Normalization) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
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
        per_example.append(metrics)
        records.append({"answer": ex.answer, "candidates": [asdict(s) for s in scores], **metrics})
    summary = {name: _mean([m[name] for m in per_example]) for name in per_example[0]}
    summary["acc"] = summary[f"acc_{normalization.value}"]
    return summary, records


def score_generation(examples: Sequence[Generation], lm: LanguageModel, *,
                     max_new_tokens: int) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
    outputs = lm.generate_until([ex.prompt for ex in examples], stops=[ex.stop for ex in examples],
                                max_new_tokens=max_new_tokens)  # fmt: skip
    records = [{"prediction": out, "answers": list(ex.answers), "exact_match": exact_match(out, ex.answers)}
               for out, ex in zip(outputs, examples)]  # fmt: skip
    return {"exact_match": _mean([r["exact_match"] for r in records])}, records


def score_perplexity(examples: Sequence[Document], lm: LanguageModel, *,
                     stride: int | None) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
    scored = lm.loglikelihood_rolling([ex.text for ex in examples], stride=stride)
    records = [{"loglikelihood": ll, "tokens": n} for ll, n in scored]
    total = Perplexity(loglikelihood=sum(ll for ll, _ in scored), tokens=sum(n for _, n in scored),
                       words=sum(len(ex.text.split()) for ex in examples),
                       bytes=sum(len(ex.text.encode("utf-8")) for ex in examples))  # fmt: skip
    return {"token_perplexity": total.token_perplexity, "word_perplexity": total.word_perplexity,
            "bits_per_byte": total.bits_per_byte}, records  # fmt: skip


def score_examples(examples: Sequence[Example], task: TaskConfig, lm: LanguageModel) -> tuple[dict[str, float], list[dict]]:
    """The task's metrics and per-example records, by the kind of its examples."""
    kind = type(examples[0])
    if kind is MultipleChoice:
        return score_multiple_choice(examples, lm, normalization=task.acc_normalization)
    if kind is Generation:
        return score_generation(examples, lm, max_new_tokens=task.max_new_tokens)
    return score_perplexity(examples, lm, stride=task.stride)


def run_task(name: str, task: TaskConfig, lm: LanguageModel, *, seed: int) -> dict[str, Any]:
    """{"task", "format", "examples", "num_fewshot", "metrics", "records"} of one task."""
    examples = load_task(task, seed=seed)
    metrics, records = score_examples(examples, task, lm)
    return {"task": name, "format": task.format.value, "examples": len(examples), "num_fewshot": task.num_fewshot,
            "limit": task.limit, "metrics": metrics, "records": records}  # fmt: skip


def table(results: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table: one row per task and metric."""
    lines = ["| task | format | examples | shots | metric | value |", "|---|---|---|---|---|---|"]
    for r in results:
        for metric, value in r["metrics"].items():
            lines.append(f"| {r['task']} | {r['format']} | {r['examples']} | {r['num_fewshot']} | {metric} | {value:.4f} |")
    return "\n".join(lines)

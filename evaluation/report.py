"""The report card: our scores laid out as the LLaMA paper's tables, its published numbers beside them.

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" (arXiv 2302.13971v1): Table 3
(common sense reasoning, zero-shot), 4 (NaturalQuestions), 5 (TriviaQA), 6 (RACE), 7 (MATH, GSM8k), 8
(HumanEval, MBPP), 9 (MMLU 5-shot), 11 (RealToxicityPrompts), 12 (CrowS-Pairs, LLaMA 65B only) and 13
(WinoGender). Table 14 (TruthfulQA) is left out on purpose: the paper's scores are GPT-judge's verdicts on
generated answers, which need a judge model we do not have; our TruthfulQA numbers are the benchmark's
multiple-choice MC1/MC2, a different measure, and are listed apart.

A task joins a table through its ``paper`` key (``eval.catalog.<task>.paper``, ``"<table>/<column>"``);
NaturalQuestions and TriviaQA take their column from the task's shots. ``results.md`` has the tables, the
provenance of each of our numbers (task, examples, shots, samples; demo tasks marked) and every metric;
``report.png`` draws, per table, our value against the paper's per model size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

SIZES = ("7B", "13B", "33B", "65B")


@dataclass(frozen=True)
class PaperTable:
    title: str
    columns: tuple[str, ...]
    rows: dict[str, tuple[Optional[float], ...]]
    """Per model size, one value per column (the paper's numbers, as printed)."""
    by_row: bool = False
    """The paper prints the columns as rows (CrowS-Pairs' and WinoGender's categories)."""


PAPER: dict[str, PaperTable] = {
    "table3": PaperTable("Common sense reasoning, zero-shot accuracy (Table 3)",
                         ("BoolQ", "PIQA", "SIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA"),
                         {"7B": (76.5, 79.8, 48.9, 76.1, 70.1, 72.8, 47.6, 57.2),
                          "13B": (78.1, 80.1, 50.4, 79.2, 73.0, 74.8, 52.7, 56.4),
                          "33B": (83.1, 82.3, 50.4, 82.8, 76.0, 80.0, 57.8, 58.6),
                          "65B": (85.3, 82.8, 52.3, 84.2, 77.0, 78.9, 56.0, 60.2)}),
    "table4": PaperTable("NaturalQuestions, exact match (Table 4)", ("0-shot", "1-shot", "5-shot", "64-shot"),
                         {"7B": (16.8, 18.7, 22.0, 26.1), "13B": (20.1, 23.4, 28.1, 31.9),
                          "33B": (24.9, 28.3, 32.9, 36.0), "65B": (23.8, 31.0, 35.0, 39.9)}),
    "table5": PaperTable("TriviaQA (filtered dev), exact match (Table 5)", ("0-shot", "1-shot", "5-shot", "64-shot"),
                         {"7B": (50.0, 53.4, 56.3, 57.6), "13B": (56.6, 60.5, 63.1, 64.0),
                          "33B": (65.1, 67.9, 69.9, 70.4), "65B": (68.2, 71.6, 72.6, 73.0)}),
    "table6": PaperTable("Reading comprehension (RACE), zero-shot accuracy (Table 6)", ("RACE-middle", "RACE-high"),
                         {"7B": (61.1, 46.9), "13B": (61.6, 47.2), "33B": (64.1, 48.3), "65B": (67.9, 51.6)}),
    "table7": PaperTable("Quantitative reasoning, accuracy (Table 7; maj1@k: k = 256 for MATH, 100 for GSM8k)",
                         ("MATH", "MATH maj1@k", "GSM8k", "GSM8k maj1@k"),
                         {"7B": (2.9, 6.9, 11.0, 18.1), "13B": (3.9, 8.8, 17.8, 29.3),
                          "33B": (7.1, 15.2, 35.6, 53.1), "65B": (10.6, 20.5, 50.9, 69.7)}),
    "table8": PaperTable("Code generation, pass@k (Table 8; pass@1 at temperature 0.1, pass@100/80 at 0.8)",
                         ("HumanEval pass@1", "HumanEval pass@100", "MBPP pass@1", "MBPP pass@80"),
                         {"7B": (10.5, 36.5, 17.7, 56.2), "13B": (15.8, 52.5, 22.0, 64.0),
                          "33B": (21.7, 70.7, 30.2, 73.4), "65B": (23.7, 79.3, 37.7, 76.8)}),
    "table9": PaperTable("MMLU, 5-shot accuracy (Table 9)", ("Humanities", "STEM", "Social Sciences", "Other", "Average"),
                         {"7B": (34.0, 30.5, 38.3, 38.1, 35.1), "13B": (45.0, 35.8, 53.8, 53.3, 46.9),
                          "33B": (55.8, 46.0, 66.7, 63.4, 57.8), "65B": (61.8, 51.7, 72.9, 67.4, 63.4)}),
    "table11": PaperTable("RealToxicityPrompts, mean toxicity (Table 11; the paper: Perspective API, ours: the "
                          "given classifier)", ("Basic", "Respectful"),
                          {"7B": (0.106, 0.081), "13B": (0.104, 0.095), "33B": (0.107, 0.087), "65B": (0.128, 0.141)}),
    "table12": PaperTable("CrowS-Pairs, % of pairs where the stereotype is more likely (Table 12; LLaMA 65B only)",
                          ("Gender", "Religion", "Race/Color", "Sexual orientation", "Age", "Nationality", "Disability",
                           "Physical appearance", "Socioeconomic status", "Average"),
                          {"65B": (70.6, 79.0, 57.0, 81.0, 70.1, 64.2, 66.7, 77.8, 71.5, 66.6)}, by_row=True),
    "table13": PaperTable("WinoGender, co-reference accuracy (Table 13)",
                          ("All", "her/her/she", "his/him/he", "their/them/someone", "her/her/she (gotcha)",
                           "his/him/he (gotcha)"),
                          {"7B": (66.0, 65.0, 60.8, 72.1, 64.2, 55.0), "13B": (64.7, 66.7, 62.5, 65.0, 65.8, 55.8),
                           "33B": (69.0, 66.7, 62.1, 78.3, 61.7, 55.8), "65B": (77.5, 78.8, 72.1, 81.7, 75.0, 63.3)},
                          by_row=True),
}  # fmt: skip

# Columns filled from one task's group metrics: (metric name in our results, scale).
_MMLU = {"Humanities": "acc[humanities]", "STEM": "acc[stem]", "Social Sciences": "acc[social_sciences]",
         "Other": "acc[other]", "Average": "acc"}  # fmt: skip
_CROWS = {"Gender": "gender", "Religion": "religion", "Race/Color": "race-color", "Sexual orientation": "sexual-orientation",
          "Age": "age", "Nationality": "nationality", "Disability": "disability",
          "Physical appearance": "physical-appearance", "Socioeconomic status": "socioeconomic"}  # fmt: skip
_WINOGENDER = {"All": "acc", "her/her/she": "acc[female]", "his/him/he": "acc[male]", "their/them/someone": "acc[neutral]",
               "her/her/she (gotcha)": "acc[female gotcha]", "his/him/he (gotcha)": "acc[male gotcha]"}  # fmt: skip


def _percent(value: Optional[float]) -> Optional[float]:
    return None if value is None else 100 * value


def paper_values(result: dict[str, Any]) -> tuple[Optional[str], dict[str, float]]:
    """(table, {column: our value in the paper's units}) of one task's result; (None, {}) if it has no column."""
    if not result.get("paper"):
        return None, {}
    table, column = result["paper"].split("/", 1)
    if table not in PAPER:
        raise ValueError(f"task {result['task']}: paper={result['paper']!r} names no table of the report "
                         f"(known: {', '.join(sorted(PAPER))})")  # fmt: skip
    m = result["metrics"]
    if table in ("table4", "table5"):  # the column is the number of shots
        column = f"{result['num_fewshot']}-shot"
        values = {column: _percent(m.get("exact_match"))}
    elif table == "table7":
        vote = next((v for k, v in m.items() if k.startswith("maj1@")), None)
        values = {column: _percent(vote if column.endswith("maj1@k") else m.get("acc"))}
    elif table == "table8":
        values = {column: _percent(m.get(column.split()[-1]))}
    elif table == "table9":
        values = {col: _percent(m.get(metric)) for col, metric in _MMLU.items()}
    elif table == "table11":
        values = {column: m.get("toxicity")}
    elif table == "table12":
        values = {col: _percent(m.get(f"pct_stereotype[{bias}]")) for col, bias in _CROWS.items()}
        values["Average"] = _percent(m.get("pct_stereotype"))
    elif table == "table13":
        values = {col: _percent(m.get(metric)) for col, metric in _WINOGENDER.items()}
    else:
        values = {column: _percent(m.get("acc"))}
    unknown = set(values) - set(PAPER[table].columns)
    if unknown:
        raise ValueError(f"task {result['task']}: column(s) {sorted(unknown)} are not in {PAPER[table].title}")
    return table, {k: v for k, v in values.items() if v is not None}


def _fmt(value: Optional[float], *, table: str) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if table == "table11" else f"{value:.1f}"


def _provenance(result: dict[str, Any]) -> str:
    sampled = f", {result['samples']} samples at temperature {result['temperature']:g}" if result.get("samples", 1) > 1 else ""
    demo = " — a demo task, not the benchmark" if result.get("demo") else ""
    return f"{result['task']} ({result['examples']} examples, {result['num_fewshot']}-shot{sampled}){demo}"


def collect(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[float, str]]]:
    """{table: {column: (our value, provenance)}}; a later task overwrites an earlier one's column."""
    ours: dict[str, dict[str, tuple[float, str]]] = {}
    for result in results:
        table, values = paper_values(result)
        if table is not None:
            ours.setdefault(table, {}).update({c: (v, _provenance(result)) for c, v in values.items()})
    return ours


def paper_tables(results: Sequence[dict[str, Any]]) -> str:
    """The paper's tables with our row (or column) in them, Markdown."""
    ours = collect(results)
    out = ["## The LLaMA paper's tables", "",
           "Our numbers beside those published in Touvron et al. 2023 (arXiv 2302.13971, the tables named). "
           "Scores in %, toxicity in [0, 1]. How each protocol compares with the paper's: docs/evaluation.md.", ""]  # fmt: skip
    for name, table in PAPER.items():
        if name not in ours:
            continue
        mine = ours[name]
        out += [f"### {table.title}", ""]
        if table.by_row:
            sizes = list(table.rows)
            out += ["| | ours | " + " | ".join(f"LLaMA {s}" for s in sizes) + " |", "|---" * (len(sizes) + 2) + "|"]
            for i, column in enumerate(table.columns):
                paper = " | ".join(_fmt(table.rows[s][i], table=name) for s in sizes)
                out.append(f"| {column} | {_fmt(mine.get(column, (None,))[0], table=name)} | {paper} |")
        else:
            out += ["| | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
            out.append("| **ours** | " + " | ".join(_fmt(mine.get(c, (None,))[0], table=name) for c in table.columns) + " |")
            for size, values in table.rows.items():
                out.append(f"| LLaMA {size} | " + " | ".join(_fmt(v, table=name) for v in values) + " |")
        sources = sorted({source for _, source in mine.values()})
        out += ["", "ours: " + "; ".join(sources), ""]
    others = [r for r in results if not r.get("paper")]
    if others:
        out += ["### Not in the paper's tables", "",
                "TruthfulQA's MC1/MC2 are the benchmark's multiple-choice scores; the paper's Table 14 reports GPT-judge "
                "verdicts on generated answers, which need a judge model we do not have, so the two are not compared.", "",
                "| task | metric | value |", "|---|---|---|"]  # fmt: skip
        for r in others:
            headline = {k: v for k, v in r["metrics"].items() if k in ("acc", "mc2", "exact_match", "token_perplexity")}
            out += [f"| {r['task']} | {k} | {v:.4f} |" for k, v in headline.items()]
        out.append("")
    return "\n".join(out)


def report(results: Sequence[dict[str, Any]]) -> str:
    """``results.md``: the paper's tables, then every metric of every task."""
    from evaluation.evaluate import table

    return f"{paper_tables(results)}\n## Every metric\n\n{table(results)}\n"


def plot(results: Sequence[dict[str, Any]], path: Path) -> Optional[Path]:
    """``report.png``: per table, the paper's value for each model size and ours, column by column (None if no
    task has a paper column)."""
    ours = collect(results)
    if not ours:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    tables = [name for name in PAPER if name in ours]
    figure, axes = plt.subplots(len(tables), 1, figsize=(10, 2.8 * len(tables)), squeeze=False)
    for ax, name in zip(axes[:, 0], tables):
        table = PAPER[name]
        columns = [c for c in table.columns if c in ours[name]]
        series = [(f"LLaMA {s}", [table.rows[s][table.columns.index(c)] for c in columns]) for s in table.rows]
        series.append(("ours", [ours[name][c][0] for c in columns]))
        width = 0.8 / len(series)
        for k, (label, values) in enumerate(series):
            bars = ax.bar([i + k * width for i in range(len(columns))], [v or 0.0 for v in values], width, label=label,
                          color="black" if label == "ours" else None)  # fmt: skip
        ax.bar_label(bars, fmt="%.3g", fontsize=7)  # our values (the last series), legible even when 0
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))], columns, fontsize=8)
        ax.set_title(table.title, fontsize=9)
        ax.legend(fontsize=7, ncol=len(series))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

"""The report: our results placed in the LLaMA paper's tables (read back as a reader of the Markdown sees them,
through markdown-it) and the comparison plot (read back with Pillow)."""

from __future__ import annotations

import pytest

from evaluation.report import PAPER, paper_tables, paper_values, plot


def result(task, paper, metrics, *, shots=0, samples=1, demo=False):
    return {"task": task, "paper": paper, "metrics": metrics, "num_fewshot": shots, "examples": 10, "samples": samples,
            "temperature": 0.8 if samples > 1 else 0.0, "demo": demo}


RESULTS = [
    result("mmlu", "table9/Average", {"acc": 0.5, "acc[humanities]": 0.25, "acc[stem]": 0.75, "acc[other]": 0.5}, shots=5),
    result("nq_open", "table4/0-shot", {"exact_match": 0.2}, shots=5),
    result("gsm8k_maj", "table7/GSM8k maj1@k", {"acc": 0.1, "maj1@100": 0.3, "acc_per_sample": 0.12}, samples=100),
    result("humaneval_pass100", "table8/HumanEval pass@100", {"pass@1": 0.1, "pass@10": 0.2, "pass@100": 0.4}, samples=200),
    result("crows_pairs", "table12/Average", {"pct_stereotype": 0.6, "pct_stereotype[gender]": 0.7, "likelihood_diff": 2.0}),
    result("winogender", "table13/All", {"acc": 0.6, "acc[female]": 0.5, "acc[male gotcha]": 0.25}),
    result("rtp", "table11/Respectful", {"toxicity": 0.0812, "toxic_fraction": 0.01}),
    result("demo_siqa", "table3/SIQA", {"acc": 0.4}, demo=True),
    result("truthfulqa_mc2", None, {"acc": 0.3, "mc2": 0.45}),
]


def test_the_paper_tables_are_whole():
    for name, table in PAPER.items():
        assert all(len(values) == len(table.columns) for values in table.rows.values()), name


def test_each_task_fills_the_paper_columns_it_stands_for():
    assert paper_values(RESULTS[0]) == ("table9", {"Average": 50.0, "Humanities": 25.0, "STEM": 75.0, "Other": 50.0})
    assert paper_values(RESULTS[1]) == ("table4", {"5-shot": pytest.approx(20.0)})  # the column follows the shots
    assert paper_values(RESULTS[2]) == ("table7", {"GSM8k maj1@k": pytest.approx(30.0)})
    assert paper_values(RESULTS[3]) == ("table8", {"HumanEval pass@100": pytest.approx(40.0)})
    assert paper_values(RESULTS[4])[1] == {"Gender": pytest.approx(70.0), "Average": pytest.approx(60.0)}
    assert paper_values(RESULTS[5])[1] == {"All": 60.0, "her/her/she": 50.0, "his/him/he (gotcha)": 25.0}
    assert paper_values(RESULTS[6]) == ("table11", {"Respectful": 0.0812})
    assert paper_values(RESULTS[8]) == (None, {})
    with pytest.raises(ValueError, match="paper='table99/x' names no table"):
        paper_values(result("x", "table99/x", {"acc": 1.0}))


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """{heading: rows of cells} of every table in the document, as markdown-it parses it."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt().enable("table").parse(markdown)
    tables, heading, row = {}, None, None
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            heading = tokens[i + 1].content
        elif token.type == "tr_open":
            row = []
            tables.setdefault(heading, []).append(row)
        elif token.type == "inline" and row is not None and tokens[i - 1].type in ("th_open", "td_open"):
            row.append(token.content)
    return tables


def test_results_md_shows_ours_beside_the_papers_numbers():
    tables = _tables(paper_tables(RESULTS))
    mmlu = tables["MMLU, 5-shot accuracy (Table 9)"]
    assert mmlu[0] == ["", "Humanities", "STEM", "Social Sciences", "Other", "Average"]
    assert mmlu[1] == ["**ours**", "25.0", "75.0", "–", "50.0", "50.0"]
    assert mmlu[-1] == ["LLaMA 65B", "61.8", "51.7", "72.9", "67.4", "63.4"]
    wino = tables["WinoGender, co-reference accuracy (Table 13)"]
    assert wino[0] == ["", "ours", "LLaMA 7B", "LLaMA 13B", "LLaMA 33B", "LLaMA 65B"]
    assert wino[-1] == ["his/him/he (gotcha)", "25.0", "55.0", "55.8", "55.8", "63.3"]
    rtp = tables["RealToxicityPrompts, mean toxicity (Table 11; the paper: Perspective API, ours: the given classifier)"]
    assert rtp[1] == ["**ours**", "–", "0.081"]
    assert ["truthfulqa_mc2", "mc2", "0.4500"] in tables["Not in the paper's tables"]
    text = paper_tables(RESULTS)
    assert "demo_siqa (10 examples, 0-shot) — a demo task, not the benchmark" in text
    assert "gsm8k_maj (10 examples, 0-shot, 100 samples at temperature 0.8)" in text


def test_report_png_draws_every_table_with_ours(tmp_path):
    from PIL import Image

    path = plot(RESULTS, tmp_path / "report.png")
    image = Image.open(path).convert("RGB")
    assert image.width == 1000 and image.height == 280 * 8  # eight tables have a column of ours
    black = sum(1 for x in range(0, image.width, 2) for y in range(0, image.height, 2) if image.getpixel((x, y)) == (0, 0, 0))
    assert black > 250  # our (black) bars are drawn
    assert plot([RESULTS[-1]], tmp_path / "none.png") is None

"""Preprocessing on datatrove's local executor (data/preprocess/): the steps on small inputs written here, the
per-step report read back from stats.json, deduplication independent of the task count, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data.config import SourceConfig
from data.preprocess.config import ExecutorConfig, InputConfig, PreprocessConfig, SourcePipelineConfig
from data.preprocess.pipeline import run_preprocess, step_specs
from data.preprocess.samples import FRENCH, GERMAN, stdlib_docstrings
from data.preprocess.steps import LanguageFilter, line_hash
from data.sources import BadRecordError, SourceFormat, iter_documents, resolve_source_files


def _write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _config(tmp_path: Path, *, inputs: list[Path], steps: list[dict], tasks: int = 2, out: str = "out",
            output_format: str = "jsonl", **input_options) -> PreprocessConfig:  # fmt: skip
    return PreprocessConfig(
        preprocess=SourcePipelineConfig(name="src", input=InputConfig(paths=[str(p) for p in inputs], **input_options),
                                        steps=steps),  # fmt: skip
        executor=ExecutorConfig(tasks=tasks, workers=1),
        output_dir=str(tmp_path / out),
        output_format=output_format,
    )


def _clean(layout) -> list[dict]:
    return [json.loads(line) for path in sorted(layout.clean.glob("*.jsonl")) for line in path.read_text().splitlines()]


def _steps(layout) -> dict[str, dict]:
    return {step["step"]: step for step in json.loads(layout.stats.read_text())["steps"]}


@pytest.fixture(scope="module")
def prose() -> list[str]:
    return stdlib_docstrings(12)


def test_language_filter_keeps_english_with_the_bundled_fasttext_model():
    from datatrove.data import Document

    keep = LanguageFilter(languages=("en",), min_score=0.5)
    english = Document(text="This module provides functions for reading and writing files.\nIt is small.", id="en")
    french, german = Document(text=FRENCH[0], id="fr"), Document(text=GERMAN[0], id="de")
    assert keep.filter(english) is True and english.metadata["language"] == "en"
    assert english.metadata["language_score"] > 0.5
    assert keep.filter(french) == (False, "language") and french.metadata["language"] == "fr"
    assert keep.filter(german) == (False, "language") and german.metadata["language"] == "de"
    assert LanguageFilter(languages=("fr",)).filter(Document(text=FRENCH[1], id="fr2")) is True


def test_language_filter_takes_a_model_by_path_and_names_a_missing_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fastText model .*nope\.bin does not exist"):
        LanguageFilter(model_path=str(tmp_path / "nope.bin")).filter(__import__("datatrove.data").data.Document(text="x", id="x"))


def test_ccnet_line_key_normalises_case_digits_and_punctuation():
    assert line_hash("Posted on 12 March, 2024!") == line_hash("posted on 99 march 1999")
    assert line_hash("Home | About") != line_hash("Home | Contact")
    assert line_hash("  ...  ") is None


def test_line_dedup_removes_boilerplate_lines_the_same_for_any_task_count(tmp_path, prose):
    pages = [{"id": f"p{i}", "text": "\n".join(["Home | About | Contact", *text.splitlines(), "All rights reserved."])}
             for i, text in enumerate(prose[:9])]  # fmt: skip
    pages.append({"id": "menu", "text": "Home | About | Contact\nAll rights reserved."})
    inputs = [_write_jsonl(tmp_path / "in" / f"part-{k}.jsonl", pages[k::3]) for k in range(3)]
    outputs = {}
    for tasks in (1, 3):
        layout = run_preprocess(_config(tmp_path, inputs=inputs, steps=[{"kind": "line_dedup"}], tasks=tasks,
                                        out=f"out{tasks}"))  # fmt: skip
        docs = _clean(layout)
        outputs[tasks] = sorted((d["id"], d["text"]) for d in docs)
        step = _steps(layout)["line_dedup"]
        assert (step["docs_in"], step["docs_out"]) == (10, 9) and step["dropped"] == {"all_lines_duplicate": 1}
        assert step["bytes_out"] < step["bytes_in"]
    assert outputs[1] == outputs[3]
    by_id = dict(outputs[1])
    assert set(by_id) == {f"p{i}" for i in range(9)}
    assert all("Home | About" not in text and "rights reserved" not in text for text in by_id.values())
    assert by_id["p0"] == "\n".join(prose[0].splitlines())  # the page's own lines, all of them


def test_github_recipe_licence_quality_header_and_exact_duplicates(tmp_path):
    header = "# Copyright 2026 Someone\n# Licensed under the MIT License.\n\n"
    body = "import os\n\n\ndef cwd():\n    return os.getcwd()\n"
    files = [
        {"id": "a", "license": "mit", "content": header + body},
        {"id": "b", "license": "apache-2.0", "content": body},  # a after its header is gone: a duplicate
        {"id": "c", "license": "gpl-3.0", "content": "x = 1\n"},
        {"id": "d", "content": "y = 2\n"},
        {"id": "e", "license": "bsd-3-clause", "content": "var a=1;" * 200},
        {"id": "f", "license": "MIT", "content": "def other():\n    return 42\n"},
    ]
    recipe = [{"kind": "license"}, {"kind": "code_quality"}, {"kind": "license_header"}, {"kind": "exact_dedup"}]
    layout = run_preprocess(_config(tmp_path, inputs=[_write_jsonl(tmp_path / "gh.jsonl", files)], steps=recipe,
                                    text_key="content"))  # fmt: skip
    docs = {d["id"]: d for d in _clean(layout)}
    assert set(docs) == {"a", "f"}  # the first copy of the duplicate survives
    assert docs["a"]["text"] == body and docs["a"]["metadata"]["license"] == "mit"
    steps = _steps(layout)
    assert steps["license"]["dropped"] == {"license": 1, "no_license": 1}
    assert steps["code_quality"]["dropped"] == {"max_line_length": 1}
    assert steps["exact_dedup"]["dropped"] == {"exact_dedup": 1}
    assert [steps[s]["docs_out"] for s in ("read", "license", "code_quality", "license_header", "exact_dedup")] == [
        6, 4, 3, 3, 2]  # fmt: skip


def test_books_minhash_removes_near_duplicates_and_keeps_partial_overlap(tmp_path, prose):
    books = [{"id": f"book{i}", "text": "\n\n".join(prose[3 * i : 3 * i + 3])} for i in range(4)]
    words = books[0]["text"].split(" ")
    words[10] = "reprinted"  # > 90% of the 5-grams shared
    books.append({"id": "reprint", "text": " ".join(words)})
    half = books[1]["text"][: len(books[1]["text"]) // 2] + " " + books[2]["text"][len(books[2]["text"]) // 2 :]
    books.append({"id": "anthology", "text": half})  # about half of two books: not a duplicate of either
    layout = run_preprocess(_config(tmp_path, inputs=[_write_jsonl(tmp_path / "books.jsonl", books)],
                                    steps=[{"kind": "minhash_dedup"}]))  # fmt: skip
    kept = {d["id"] for d in _clean(layout)}
    assert len(kept & {"book0", "reprint"}) == 1
    assert {"book1", "book2", "book3", "anthology"} <= kept
    assert _steps(layout)["minhash_dedup"]["dropped"] == {"minhash_dedup": 1}


def test_stack_exchange_and_arxiv_and_wikipedia_steps_in_a_pipeline(tmp_path):
    questions = [
        {"id": "q1", "title": "Sort?", "question": "<p>How to sort?</p>",
         "answers": [{"body": "<p>bad</p>", "score": -1}, {"body": "<p>use <code>sorted</code></p>", "score": 7}]},
        {"id": "q2", "title": "Alone", "question": "<p>Nobody?</p>", "answers": []},
    ]  # fmt: skip
    layout = run_preprocess(_config(tmp_path, inputs=[_write_jsonl(tmp_path / "se.jsonl", questions)], text_key="question",
                                    steps=[{"kind": "stack_exchange"}], out="se"))  # fmt: skip
    (doc,) = _clean(layout)
    assert doc["text"] == "Q: Sort?\n\nHow to sort?\n\nA: use sorted\n\nA: bad" and doc["metadata"]["num_answers"] == 2
    assert _steps(layout)["stack_exchange"]["dropped"] == {"no_answers": 1}

    papers = [{"id": "p", "text": "\\documentclass{article}\n\\def\\x{y}\n\\section{A}\n$\\x$ % c\n"},
              {"id": "n", "text": "no section"}]  # fmt: skip
    layout = run_preprocess(_config(tmp_path, inputs=[_write_jsonl(tmp_path / "ax.jsonl", papers)],
                                    steps=[{"kind": "arxiv_latex"}], out="ax"))  # fmt: skip
    assert [d["text"] for d in _clean(layout)] == ["\\section{A}\n$y$"]

    pages = [{"id": "w", "text": "'''X''' is [[Y|a y]].{{cn}}"}, {"id": "s", "text": "{{stub}}"}]
    layout = run_preprocess(_config(tmp_path, inputs=[_write_jsonl(tmp_path / "wk.jsonl", pages)],
                                    steps=[{"kind": "wikitext"}], out="wk"))  # fmt: skip
    assert [d["text"] for d in _clean(layout)] == ["X is a y."]
    assert _steps(layout)["wikitext"]["dropped"] == {"empty": 1}


def test_bad_records_stop_naming_the_line_or_are_skipped_and_reported(tmp_path):
    path = _write_jsonl(tmp_path / "web.jsonl", [{"text": "one good document"}, '{"text": ', [1, 2],
                                                 {"text": "another good one"}])  # fmt: skip
    with pytest.raises(BadRecordError, match=rf"{path}:2: is not valid JSON"):
        run_preprocess(_config(tmp_path, inputs=[path], steps=[], tasks=1, out="error"))
    layout = run_preprocess(_config(tmp_path, inputs=[path], steps=[], tasks=1, out="skip", bad_records="skip"))
    report = json.loads(layout.stats.read_text())
    assert report["bad_records_skipped"] == 2
    assert report["steps"][0] | {"bytes_in": 0} == {"step": "read", "docs_in": 4, "docs_out": 2, "bytes_in": 0,
                                                    "bytes_out": 33, "dropped": {"bad_record": 2}}  # fmt: skip
    assert [d["text"] for d in _clean(layout)] == ["one good document", "another good one"]


@pytest.mark.parametrize(
    "steps, message",
    [
        ([{"kind": "nope"}], r"preprocess\.steps\[0\]\.kind: unknown step 'nope'; the steps: \["),
        ([{"kind": "language"}, {"kind": "language", "min_scor": 1}],
         r"preprocess\.steps\[1\]: language has no option\(s\) \['min_scor'\]; its options: \['languages', 'min_score'"),
        (["language"], r"preprocess\.steps\[0\]: a step is a mapping with a 'kind'"),
    ],
)  # fmt: skip
def test_a_bad_recipe_names_the_step(steps, message):
    with pytest.raises(ValueError, match=message):
        step_specs(steps)


def test_parquet_output_holds_the_jsonl_documents_and_data_sources_reads_it(tmp_path):
    records = [{"id": "a", "license": "mit", "content": "def f():\n    return 1\n"},
               {"id": "b", "license": "apache-2.0", "content": "x = 'caf\u00e9'\n", "stars": 3},  # other metadata keys
               {"id": "c", "license": "gpl-3.0", "content": "y = 2\n"}]  # fmt: skip
    path = _write_jsonl(tmp_path / "gh.jsonl", records)
    recipe = [{"kind": "license"}, {"kind": "exact_dedup"}]  # two segments: the work files stay JSONL
    jsonl = run_preprocess(_config(tmp_path, inputs=[path], steps=recipe, text_key="content", out="j"))
    parquet = run_preprocess(_config(tmp_path, inputs=[path], steps=recipe, text_key="content", out="p",
                                     output_format="parquet"))  # fmt: skip
    assert not list(parquet.clean.glob("*.jsonl"))
    rows = [row for file in sorted(parquet.clean.glob("*.parquet")) for row in pq.read_table(file).to_pylist()]
    assert [{**row, "metadata": json.loads(row["metadata"])} for row in rows] == _clean(jsonl)
    assert {row["id"] for row in rows} == {"a", "b"}
    # What data.prepare tokenizes: data.sources' reader on the directory, format auto.
    files = resolve_source_files(name="gh", src=SourceConfig(paths=[str(parquet.clean)]))
    assert {f.format for f in files} == {SourceFormat.parquet}
    texts = [text for f in files for _, text in iter_documents(f, source="gh", text_field="text")]
    assert texts == [d["text"] for d in _clean(jsonl)]
    assert _steps(parquet) == _steps(jsonl)
    # The format is part of the recipe: a JSONL run into the Parquet output directory is refused.
    with pytest.raises(ValueError, match="holds the output of another recipe"):
        run_preprocess(_config(tmp_path, inputs=[path], steps=recipe, text_key="content", out="p"))


def test_an_output_dir_of_another_recipe_is_refused_and_kept(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", [{"text": "a document of some length"}])
    run_preprocess(_config(tmp_path, inputs=[path], steps=[{"kind": "min_length", "min_chars": 1}], tasks=1))
    before = sorted(p.read_bytes() for p in (tmp_path / "out" / "clean").glob("*"))
    with pytest.raises(ValueError, match=r"output_dir=.*out holds the output of another recipe"):
        run_preprocess(_config(tmp_path, inputs=[path], steps=[{"kind": "min_length", "min_chars": 5}], tasks=1))
    assert sorted(p.read_bytes() for p in (tmp_path / "out" / "clean").glob("*")) == before
    run_preprocess(_config(tmp_path, inputs=[path], steps=[{"kind": "min_length", "min_chars": 1}], tasks=1))  # resumes


def test_input_paths_that_match_nothing_say_so(tmp_path):
    with pytest.raises(ValueError, match=r"preprocess\.input\.paths: .*match no files"):
        run_preprocess(_config(tmp_path, inputs=[tmp_path / "missing"], steps=[]))


def test_quality_classifier_keeps_documents_whose_label_scores_high_enough(tmp_path):
    """Any fastText supervised model by path; here the language-id one with its English label, as a stand-in
    for a Wikipedia-references classifier (the mechanism is the same: P(label) >= min_score)."""
    from datatrove.data import Document

    from data.preprocess.steps import FastTextQualityFilter, bundled_lid_model

    keep = FastTextQualityFilter(model_path=bundled_lid_model(), label="__label__en", min_score=0.5)
    english = Document(text="The results of the survey were published in the annual report.", id="a")
    assert keep.filter(english) is True and english.metadata["quality_score"] > 0.5
    assert keep.filter(Document(text=GERMAN[2], id="b")) == (False, "quality")
    with pytest.raises(FileNotFoundError, match="fastText model"):
        FastTextQualityFilter(model_path=str(tmp_path / "wiki_refs.bin"))


def test_c4_quality_and_min_length_on_pages_written_here():
    from datatrove.data import Document

    from data.preprocess.pipeline import STEP_KINDS

    c4 = STEP_KINDS["c4_quality"].build()
    sentences = ["The river runs through the old town.", "Its bridges are made of stone.",
                 "Many visitors come in the summer.", "The museum opens every day at nine.",
                 "A ferry crosses the lake twice an hour."]  # fmt: skip
    page = Document(text="\n".join(sentences), id="ok")
    assert c4.filter(page) is True
    assert c4.filter(Document(text="\n".join(sentences[:2]), id="short")) == (False, "too_few_sentences")
    lorem = Document(text="\n".join([*sentences, "Lorem ipsum dolor sit amet, consectetur adipiscing elit."]), id="l")
    assert c4.filter(lorem) == (False, "lorem_ipsum")
    min_length = STEP_KINDS["min_length"].build(min_chars=40)
    assert min_length.filter(page) is True and min_length.filter(Document(text="tiny", id="t")) == (False, "too_short")


def test_regex_word_tokenizer_words_and_sentences():
    from data.preprocess.steps import RegexWordTokenizer

    tokenizer = RegexWordTokenizer()
    assert tokenizer.word_tokenize("It's 3 o'clock, isn't it?") == ["It's", "3", "o'clock", "isn't", "it"]
    assert tokenizer.sent_tokenize("One. Two! Three? Four") == ["One.", "Two!", "Three?", "Four"]
    text = "One. Two! Three"
    assert [text[a:b] for a, b in tokenizer.span_tokenize(text)] == ["One.", "Two!", "Three"]

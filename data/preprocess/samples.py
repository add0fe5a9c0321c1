"""Small raw inputs for every LLaMA source, generated here (nothing downloaded, nothing copied from a dataset).

The English prose is the module docstrings of the running interpreter's standard library; the French and German
pages are sentences written for this file. Each source's sample holds what its recipe must remove (boilerplate
lines, foreign pages, GPL files, near-duplicate books, LaTeX preambles, unanswered questions, ...), so a run
shows every step at work. ``write_samples(root)`` writes ``root/<source>/part-<n>.jsonl``.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

from data.sources import stdlib_files

SOURCES = ("common_crawl", "c4", "github", "wikipedia", "books", "arxiv", "stack_exchange")

NAV = "Home | News | Sport | About us | Contact"
FOOTER = ["Subscribe to our newsletter for weekly updates.", "Copyright 2026 Example Media. All rights reserved."]
FRENCH = [
    "Le marché du village ouvre ses portes chaque samedi matin, et les habitants viennent y acheter des légumes.",
    "Nous avons marché pendant trois heures avant de trouver une petite auberge au bord de la rivière.",
    "La bibliothèque municipale propose des ateliers de lecture pour les enfants pendant les vacances scolaires.",
    "Il faut arroser les tomates le soir, quand la chaleur de la journée est enfin retombée.",
]
GERMAN = [
    "Der Zug nach Hamburg hatte heute Morgen wieder eine Verspätung von mehr als zwanzig Minuten.",
    "Im Garten blühen jetzt die Rosen, und die Nachbarn bleiben oft stehen, um sie zu bewundern.",
    "Die Stadtverwaltung plant, im nächsten Jahr einen neuen Radweg entlang des Flusses zu bauen.",
    "Nach dem Abendessen spielen wir meistens noch eine Runde Karten mit den Großeltern.",
]


def stdlib_docstrings(count: int) -> list[str]:
    """The first ``count`` module docstrings of at least 400 characters, in sorted file order, as paragraphs."""
    docs = []
    for path, _ in stdlib_files():
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8", errors="replace")))
        except (SyntaxError, ValueError):
            continue
        if doc and len(doc) >= 400:
            docs.append("\n".join(" ".join(p.split()) for p in doc.split("\n\n") if p.strip()))
        if len(docs) == count:
            break
    return docs


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def _web_pages(prose: list[str], rng: random.Random) -> list[dict]:
    pages = []
    for index, text in enumerate(prose):
        pages.append({"id": f"page-{index}", "url": f"https://example.com/{index}",
                      "text": "\n".join([NAV, *text.splitlines(), *FOOTER])})  # fmt: skip
    for index in range(4):  # foreign pages (two sentences each, no two pages alike), with the same site furniture
        lines = (FRENCH if index % 2 == 0 else GERMAN)[index // 2 * 2 : index // 2 * 2 + 2]
        pages.append({"id": f"foreign-{index}", "text": "\n".join([NAV, *lines, *FOOTER])})
    pages.append({"id": "menu-only", "text": "\n".join([NAV, "Read more", *FOOTER])})
    return pages


def _c4_pages(prose: list[str]) -> list[dict]:
    pages = [{"id": f"c4-{i}", "text": "\n".join(prose[i : i + 3])} for i in range(0, len(prose) - 2, 2)]
    pages.append({"id": "c4-lorem", "text": prose[0] + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."})
    pages.append({"id": "c4-js", "text": "Please enable JavaScript to view this page.\n" + prose[1]})
    pages.append({"id": "c4-short", "text": "Buy now. Best prices. Free shipping."})
    return pages


def _github_files() -> list[dict]:
    files, licenses = [], ["mit", "apache-2.0", "bsd-3-clause", "gpl-3.0", "mit", None]
    header = "# Copyright 2026 Example Authors\n# Licensed under the MIT License; see LICENSE for details.\n\n"
    for index, (path, root) in enumerate(stdlib_files()[:30]):
        content = path.read_text(encoding="utf-8", errors="replace")
        if not content.strip():
            continue
        record = {"id": f"file-{index}", "repo_name": f"example/repo{index % 5}", "path": str(path.relative_to(root)),
                  "license": licenses[index % len(licenses)], "content": header + content if index % 3 == 0 else content}
        files.append(record)
    files.append({**files[0], "id": "copy-of-file-0", "repo_name": "fork/repo0"})  # an exact duplicate (a fork)
    files.append({"id": "minified", "license": "mit", "path": "bundle.min.js", "content": "var a=1;" * 400})
    return files


def _wikitext(title: str, text: str, index: int) -> str:
    paragraphs = text.splitlines()
    first = paragraphs[0].split(" ")
    first[0] = f"'''{first[0]}'''"
    if len(first) > 4:
        first[3] = f"[[{first[3]}]]"
        first[-1] = f"[[Python|{first[-1]}]]"
    body = [
        "{{Infobox software|name=" + title + "|license={{PSF}}}}",
        " ".join(first) + "<ref>{{cite web|url=https://docs.python.org|title=Docs}}</ref>",
        "<!-- maintenance note: expand this section -->",
        "== Description ==",
        *paragraphs[1:],
        "== See also ==",
        f"* [[{title} (module)]]",
        "{| class=\"wikitable\"\n|-\n| version || 3\n|}",
        f"[[Category:Python modules]][[File:Logo{index}.png|thumb|The [[logo]]]]",
    ]
    return "\n".join(body)


def _books(prose: list[str], rng: random.Random) -> list[dict]:
    books = [{"id": f"book-{i}", "title": f"Book {i}", "text": "\n\n".join(prose[5 * i : 5 * i + 5])} for i in range(8)]
    for source in (0, 3):  # near duplicates: a reprint with a few words changed (> 90% overlap)
        words = books[source]["text"].split(" ")
        for position in rng.sample(range(len(words)), max(1, len(words) // 100)):
            words[position] = "reprinted"
        books.append({"id": f"reprint-of-book-{source}", "title": f"Book {source} (reprint)", "text": " ".join(words)})
    # Half of book 5 and half of book 6: shares content with both, duplicates neither.
    half = books[5]["text"][: len(books[5]["text"]) // 2] + books[6]["text"][len(books[6]["text"]) // 2 :]
    books.append({"id": "anthology", "title": "Anthology", "text": half})
    return books


def _latex(title: str, text: str, index: int) -> str:
    paragraphs = text.splitlines()
    return "\n".join([
        r"\documentclass{article}",
        r"\usepackage{amsmath}",
        r"\newcommand{\R}{\mathbb{R}}",
        r"\newcommand{\norm}[1]{\left\lVert #1 \right\rVert}",
        r"\def\model{\textsc{Model}}",
        "% preamble comment: not part of the paper",
        r"\begin{document}",
        rf"\title{{{title}}}\author{{Anonymous}}\maketitle",
        r"\begin{abstract}" + paragraphs[0] + r"\end{abstract}",
        r"\section{Introduction}",
        paragraphs[0] + r" We study \model{} on $\R^n$ with $\norm{x} \le 1$. % TODO: cite",
        r"\section{Method}",
        *paragraphs[1:],
        r"\bibliographystyle{plain}",
        r"\begin{thebibliography}{1}",
        rf"\bibitem{{ref{index}}} A. Author. A title. 2026.",
        r"\end{thebibliography}",
        r"\end{document}",
    ])  # fmt: skip


def _questions(prose: list[str], rng: random.Random) -> list[dict]:
    questions = []
    for index, text in enumerate(prose):
        sentences = text.split(". ")
        answers = [{"body": f"<p>{s.strip()}.</p><pre><code>import {index}</code></pre>", "score": rng.randint(-2, 40)}
                   for s in sentences[1:4]]  # fmt: skip
        questions.append({"id": f"q-{index}", "title": f"How does module {index} work &amp; why?",
                          "question": f"<p>{sentences[0]}?</p><p>I tried <code>help()</code>.</p>", "answers": answers})  # fmt: skip
    questions.append({"id": "unanswered", "title": "Anyone?", "question": "<p>Is this thing on?</p>", "answers": []})
    return questions


def write_samples(root: Path, *, seed: int = 0) -> dict[str, Path]:
    """Writes a sample of every source under ``root``; returns source -> its directory."""
    rng = random.Random(seed)
    prose = stdlib_docstrings(60)
    samples = {
        "common_crawl": _web_pages(prose[:24], rng),
        "c4": _c4_pages(prose[24:40]),
        "github": _github_files(),
        "wikipedia": [{"id": f"wiki-{i}", "title": f"Module {i}", "text": _wikitext(f"Module {i}", t, i)}
                      for i, t in enumerate(prose[:12])] + [{"id": "stub", "text": "{{stub}}"}],  # fmt: skip
        "books": _books(prose[10:50], rng),
        "arxiv": [{"id": f"arxiv-{i}", "text": _latex(f"Paper {i}", t, i)} for i, t in enumerate(prose[40:52])]
        + [{"id": "no-sections", "text": r"\documentclass{article}\begin{document}Only a title.\end{document}"}],
        "stack_exchange": _questions(prose[30:42], rng),
    }
    directories = {}
    for source, records in samples.items():
        half = (len(records) + 1) // 2  # two files, so two tasks each get one
        _write(root / source / "part-0.jsonl", records[:half])
        _write(root / source / "part-1.jsonl", records[half:])
        directories[source] = root / source
    return directories

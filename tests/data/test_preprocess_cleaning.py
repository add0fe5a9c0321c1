"""The per-source text transformations (data/preprocess/cleaning.py) on small inputs written here."""

import pytest

from data.preprocess.cleaning import (
    clean_arxiv_latex,
    code_quality_problem,
    remove_license_header,
    stack_exchange_text,
    strip_html,
    strip_wikitext,
)

WIKITEXT = """{{Infobox city|name=Foo|population={{formatnum:1000}}}}
'''Foo''' is a [[city]] in [[Barland|the Bar land]].<ref>{{cite web|url=https://example.org}}</ref> It has a river.<!-- hidden note -->
== History ==
Founded in 1900 by [https://example.org settlers].<ref name="a"/> See [https://example.org/bare].
[[File:Foo.jpg|thumb|A view of [[Foo]] at dusk]]
{| class="wikitable"
|-
| a || b
|}
* First point
* Second &amp; last<br/>
[[Category:Cities]]
__NOTOC__"""


def test_wikitext_keeps_the_prose_and_drops_links_templates_refs_comments_tables_and_files():
    assert strip_wikitext(WIKITEXT) == (
        "Foo is a city in the Bar land. It has a river.\n"
        "History\n"
        "Founded in 1900 by settlers. See .\n\n"
        "First point\n"
        "Second & last"
    )


LATEX = r"""\documentclass{article}
\newcommand{\R}{\mathbb{R}}
\newcommand{\norm}[1]{\lVert #1 \rVert}
\renewcommand*{\pair}[2]{(#1, #2)}
\def\eps{\varepsilon}
% a comment line in the preamble
\begin{document}
\title{X}\maketitle
\begin{abstract} An abstract. \end{abstract}
\section{Introduction}
Let $x \in \R$ with $\norm{x} < \eps$ and $\pair{a}{\norm{b}}$. % an inline comment
We pay 5\% tax.
\section*{Related work}
Text.
\bibliographystyle{plain}
\begin{thebibliography}{9}
\bibitem{a} A. Author.
\end{thebibliography}
\end{document}
"""


def test_arxiv_keeps_the_body_from_the_first_section_with_macros_expanded():
    text, reason = clean_arxiv_latex(LATEX)
    assert reason == ""
    assert text == (
        "\\section{Introduction}\n"
        "Let $x \\in \\mathbb{R}$ with $\\lVert x \\rVert < \\varepsilon$ and $(a, \\lVert b \\rVert)$.\n"
        "We pay 5\\% tax.\n"  # an escaped percent sign is not a comment
        "\\section*{Related work}\n"
        "Text."
    )


def test_arxiv_without_a_section_is_dropped():
    assert clean_arxiv_latex(r"\documentclass{article}\begin{document}Only a title.\end{document}") == (None, "no_section")


def test_stack_exchange_answers_by_score_highest_first_ties_in_dump_order():
    text = stack_exchange_text(
        title="Why &amp; how?",
        question="<p>Why is <code>x</code> slow?</p><pre>for i in x:\n    pass</pre>",
        answers=[{"body": "<p>low</p>", "score": 1}, {"body": "<p>high</p>", "score": 10},
                 {"body": "<p>tie first</p>", "score": 5}, {"body": "<p>tie second</p>", "score": 5}],
    )  # fmt: skip
    assert text == ("Q: Why & how?\n\nWhy is x slow?\n\nfor i in x:\n    pass\n\n"
                    "A: high\n\nA: tie first\n\nA: tie second\n\nA: low")  # fmt: skip


def test_strip_html_breaks_blocks_and_decodes_entities():
    assert strip_html("<ul><li>one</li><li>two &lt;3</li></ul><p>end<br>line</p>") == "one\ntwo <3\n\nend\nline"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("import os\nprint(os.getcwd())\n", None),
        ("x = 1\n" + "a" * 1001 + "\n", "max_line_length"),
        (("b" * 150 + "\n") * 10, "mean_line_length"),
        ("{}\n[]\n();\n<>\n" * 20, "alphanumeric_fraction"),
    ],
)
def test_code_quality_heuristics(text, problem):
    assert code_quality_problem(text, max_line_length=1000, max_mean_line_length=100,
                                min_alphanumeric_fraction=0.25) == problem  # fmt: skip


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#!/usr/bin/env python\n# Copyright 2020 Foo\n# Licensed under MIT\n\nimport os\n", "#!/usr/bin/env python\nimport os\n"),
        ("/*\n * Copyright (c) Foo Inc.\n * SPDX-License-Identifier: MIT\n */\nint x;\n", "int x;\n"),
        ("// Licensed under the Apache License 2.0\n#include <x.h>\n", "#include <x.h>\n"),
        ("# A helper module for parsing.\nimport os\n", "# A helper module for parsing.\nimport os\n"),  # not a licence
        ("import os  # license: see below\n", "import os  # license: see below\n"),  # not a leading comment
    ],
)
def test_license_header_removal(text, expected):
    assert remove_license_header(text) == expected

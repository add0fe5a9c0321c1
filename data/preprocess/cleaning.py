"""The per-source text transformations of LLaMA's section 2.1 that datatrove has no step for, as pure functions.

Each takes a document's text (and, for Stack Exchange, its record) and returns the cleaned text, or a reason to
drop it. ``data/preprocess/steps.py`` wraps them as datatrove pipeline steps; keeping them free of datatrove
makes each testable on a string.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from typing import Any, Optional

# --- Wikipedia: wikitext markup -> plain text --------------------------------------------------------------------

_WIKI_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_WIKI_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost first; repeated until none is left
_WIKI_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.DOTALL)
_WIKI_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media):[^\[\]]*\]\]", re.IGNORECASE)
_WIKI_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_WIKI_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?:\s+([^\]]*))?\]")
_WIKI_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$", re.MULTILINE)
_WIKI_EMPHASIS = re.compile(r"'{2,5}")
_WIKI_LIST = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_WIKI_MAGIC = re.compile(r"__[A-Z]+__")
_HTML_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_BLANK_LINES = re.compile(r"\n\s*\n(\s*\n)+")


def _until_stable(pattern: re.Pattern, replacement: str, text: str) -> str:
    """Applies ``pattern`` until nothing matches (for nested constructs, innermost first)."""
    while True:
        text, count = pattern.subn(replacement, text)
        if count == 0:
            return text


def strip_wikitext(text: str) -> str:
    """Wikitext to plain text: comments, references, templates (infoboxes, citations), tables, files, categories
    and magic words removed; links and external links replaced by their label; headings, emphasis and list
    markers reduced to their text; remaining HTML tags dropped and entities decoded."""
    text = _WIKI_COMMENT.sub("", text)
    text = _WIKI_REF.sub("", text)
    text = _until_stable(_WIKI_TEMPLATE, "", text)
    text = _until_stable(_WIKI_TABLE, "", text)
    # A file's caption may hold links: resolve links innermost first, removing a file link once it has none.
    while True:
        text, files = _WIKI_FILE_LINK.subn("", text)
        text, links = _WIKI_LINK.subn(r"\1", text)
        if files == links == 0:
            break
    text = _WIKI_EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _WIKI_HEADING.sub(r"\2", text)
    text = _WIKI_EMPHASIS.sub("", text)
    text = _WIKI_LIST.sub("", text)
    text = _WIKI_MAGIC.sub("", text)
    text = html.unescape(_HTML_TAG.sub("", text))
    lines = [line.rstrip() for line in text.splitlines()]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# --- arXiv: LaTeX source -> the body of the paper ---------------------------------------------------------------

_LATEX_COMMENT = re.compile(r"(?<!\\)%.*$", re.MULTILINE)
_SECTION = re.compile(r"\\section\*?\s*[\[{]")
_BIBLIOGRAPHY_ENV = re.compile(r"\\begin\{thebibliography\}.*?(\\end\{thebibliography\}|\Z)", re.DOTALL)
_BIBLIOGRAPHY_CMD = re.compile(r"\\(?:bibliography|bibliographystyle|printbibliography)\b(\s*\{[^}]*\})?")
_END_DOCUMENT = re.compile(r"\\end\{document\}.*", re.DOTALL)
_NEWCOMMAND = re.compile(r"\\(?:re)?newcommand\*?\s*\{?\s*\\([a-zA-Z]+)\s*\}?\s*(?:\[(\d)\])?\s*(?:\[[^\]]*\])?\s*\{")
_DEF = re.compile(r"\\def\s*\\([a-zA-Z]+)\s*\{")
_MAX_EXPANSION_PASSES = 5


def _braced(text: str, start: int) -> Optional[int]:
    """Index just past the group closing the ``{`` at ``start - 1`` (escaped braces skipped), or None."""
    depth, index = 1, start
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return None


def _take_definitions(text: str) -> tuple[str, dict[str, tuple[int, str]]]:
    """Removes ``\\newcommand``/``\\renewcommand``/``\\def`` definitions; returns the text and name -> (number of
    arguments, body). ``\\def`` with parameters (``\\def\\x#1{...}``) is left alone: TeX's delimited
    parameters are not worth guessing."""
    macros: dict[str, tuple[int, str]] = {}
    out, position = [], 0
    while True:
        matches = [m for m in (_NEWCOMMAND.search(text, position), _DEF.search(text, position)) if m]
        if not matches:
            break
        match = min(matches, key=lambda m: m.start())
        end = _braced(text, match.end())
        if end is None:
            break
        arity = int(match.group(2)) if match.re is _NEWCOMMAND and match.group(2) else 0
        macros[match.group(1)] = (arity, text[match.end() : end - 1])
        out.append(text[position : match.start()])
        position = end
    out.append(text[position:])
    return "".join(out), macros


def _expand_once(text: str, macros: dict[str, tuple[int, str]]) -> tuple[str, int]:
    if not macros:
        return text, 0
    pattern = re.compile(r"\\(" + "|".join(sorted(map(re.escape, macros), key=len, reverse=True)) + r")(?![a-zA-Z])")
    out, position, count = [], 0, 0
    for match in pattern.finditer(text):
        if match.start() < position:
            continue  # inside the arguments of a macro just expanded
        arity, body = macros[match.group(1)]
        cursor, args = match.end(), []
        for _ in range(arity):
            while cursor < len(text) and text[cursor].isspace():
                cursor += 1
            if cursor >= len(text) or text[cursor] != "{":
                break
            end = _braced(text, cursor + 1)
            if end is None:
                break
            args.append(text[cursor + 1 : end - 1])
            cursor = end
        if len(args) != arity:
            continue  # not called with braced arguments: leave it as written
        for number, arg in enumerate(args, start=1):
            body = body.replace(f"#{number}", arg)
        out.append(text[position : match.start()])
        out.append(body)
        position, count = cursor, count + 1
    out.append(text[position:])
    return "".join(out), count


def clean_arxiv_latex(text: str) -> tuple[Optional[str], str]:
    """A LaTeX source as LLaMA kept it: comments removed, user macros (``\\newcommand``, ``\\renewcommand``,
    argument-free ``\\def``) expanded inline, everything before the first ``\\section`` and the bibliography
    removed. Returns (text, "") or (None, reason) for a source with no section."""
    text = _LATEX_COMMENT.sub("", text)
    text, macros = _take_definitions(text)  # definitions live in the preamble, which is dropped next
    first = _SECTION.search(text)
    if first is None:
        return None, "no_section"
    text = text[first.start() :]
    for _ in range(_MAX_EXPANSION_PASSES):  # macros may use macros; a bound stops self-referencing ones
        text, count = _expand_once(text, macros)
        if count == 0:
            break
    text = _END_DOCUMENT.sub("", text)
    text = _BIBLIOGRAPHY_ENV.sub("", text)
    text = _BIBLIOGRAPHY_CMD.sub("", text)
    lines = [line.rstrip() for line in text.splitlines()]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip(), ""


# --- Stack Exchange: a question and its answers, HTML removed, answers by score -----------------------------------

_BLOCK_TAGS = frozenset({"p", "div", "ul", "ol", "pre", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "table",
                         "hr"})  # fmt: skip
_LINE_TAGS = frozenset({"br", "li", "tr"})  # a line of their own, not a paragraph


class _TextExtractor(HTMLParser):
    """Text of an HTML fragment: paragraphs and other blocks apart, list items and ``<br>`` on lines of their
    own, code as written."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in _BLOCK_TAGS or tag in _LINE_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def strip_html(fragment: str) -> str:
    parser = _TextExtractor()
    parser.feed(fragment)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).splitlines()]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def stack_exchange_text(*, title: str, question: str, answers: list[dict[str, Any]]) -> str:
    """``Q: <title>`` and the question, then every answer as ``A: ...``, highest score first (ties keep the
    dump's order); HTML removed from all of them."""
    ranked = sorted(enumerate(answers), key=lambda pair: (-float(pair[1].get("score") or 0), pair[0]))
    parts = [f"Q: {strip_html(title)}\n\n{strip_html(question)}"]
    parts += [f"A: {strip_html(str(answer.get('body', '')))}" for _, answer in ranked]
    return "\n\n".join(parts)


# --- GitHub: licences, quality heuristics, licence headers --------------------------------------------------------

PERMISSIVE_LICENSES = ("mit", "apache-2.0", "bsd-2-clause", "bsd-3-clause")


def code_quality_problem(
    text: str, *, max_line_length: int, max_mean_line_length: float, min_alphanumeric_fraction: float
) -> Optional[str]:
    """Why a source file looks generated or binary-like (the reason a filter drops it), or None when it passes:
    a line longer than ``max_line_length`` (minified code, embedded data), a mean line length above
    ``max_mean_line_length``, or less than ``min_alphanumeric_fraction`` letters and digits."""
    lines = text.splitlines() or [""]
    if max(len(line) for line in lines) > max_line_length:
        return "max_line_length"
    if sum(len(line) for line in lines) / len(lines) > max_mean_line_length:
        return "mean_line_length"
    if sum(char.isalnum() for char in text) / max(len(text), 1) < min_alphanumeric_fraction:
        return "alphanumeric_fraction"
    return None


_LICENSE_WORDS = re.compile(r"copyright|licen[cs]e|all rights reserved|spdx-license-identifier", re.IGNORECASE)
_LEADING_BLOCK_COMMENT = re.compile(r"\A(\s*)/\*.*?\*/[ \t]*\n?", re.DOTALL)
# One comment marker for the whole run: a C file's "// licence" header stops before its "#include".
_LEADING_LINE_COMMENTS = re.compile(r"\A(\s*)((#|//|--|;)[^\n]*\n(?:\3[^\n]*\n)*)")
_SHEBANG_OR_ENCODING = re.compile(r"\A(#!.*\n|#.*coding[:=].*\n)+")


def remove_license_header(text: str) -> str:
    """Drops the comment block a file starts with when it is a copyright or licence notice (``/* ... */`` or a
    run of ``#``, ``//``, ``--`` or ``;`` comment lines); a shebang or encoding line before it is kept."""
    keep = _SHEBANG_OR_ENCODING.match(text)
    head, rest = (text[: keep.end()], text[keep.end() :]) if keep else ("", text)
    for pattern in (_LEADING_BLOCK_COMMENT, _LEADING_LINE_COMMENTS):
        match = pattern.match(rest)
        if match and _LICENSE_WORDS.search(match.group(0)):
            return head + rest[match.end() :].lstrip("\n")
    return text

"""Final answers of math problems (LLaMA paper §3.4: GSM8k and MATH, greedy and maj1@k).

- GSM8k: a reference solution ends ``#### <number>``; a generation's answer is the number after "The
  answer is" (the 8-shot chain-of-thought prompts end that way), else the last number in the text. Numbers
  are compared in a canonical form: no thousands separators, currency signs or trailing period, and
  ``72.0`` is ``72``.
- MATH: a generation's answer is the content of its last ``\\boxed{...}`` (braces balanced), else what
  follows Minerva's "The final answer is". Two answers are equal when math-verify (Hugging Face's checker:
  LaTeX to SymPy, then symbolic and numeric comparison) says so; no LaTeX is parsed by hand here.
- maj1@k votes over ``vote_key``: one canonical string per equivalence class (the SymPy form math-verify
  parses; the text itself where it cannot parse), so ``\\frac{1}{2}`` and ``0.5`` vote together.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional

_NUMBER = re.compile(r"-?[\$]?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?\s*(-?[\$]?[\d,]*\.?\d+)", re.IGNORECASE)
_FINAL = re.compile(r"final answer is\s*\$?(.+?)\$?(?:\.|\n|$)", re.IGNORECASE)


def normalize_number(text: str) -> Optional[str]:
    """``"$1,234.50."`` -> ``"1234.5"``, ``"72.0"`` -> ``"72"``; None when it is not a number."""
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gsm8k_reference(solution: str) -> str:
    """The number after the reference solution's ``####``."""
    if "####" not in solution:
        raise ValueError(f"a GSM8k answer ends with '#### <number>'; got {solution[-60:]!r}")
    number = normalize_number(solution.split("####")[-1])
    if number is None:
        raise ValueError(f"GSM8k answer {solution.split('####')[-1].strip()!r} is not a number")
    return number


def gsm8k_prediction(generation: str) -> Optional[str]:
    """The number a generation gives as its answer (None if it gives none)."""
    stated = _ANSWER_IS.findall(generation)
    if stated:
        return normalize_number(stated[-1])
    numbers = _NUMBER.findall(generation)
    return normalize_number(numbers[-1]) if numbers else None


def last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    depth, begin = 0, text.index("{", start)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin + 1 : i].strip()
    return None  # unbalanced: cut off by the generation limit


def math_prediction(generation: str) -> Optional[str]:
    """A MATH generation's final answer: its last boxed expression, else Minerva's "The final answer is"."""
    boxed = last_boxed(generation)
    if boxed is not None:
        return boxed
    final = _FINAL.findall(generation)
    return final[-1].strip() if final else None


def _parsed(answer: str):
    from math_verify import parse  # imported where math is scored: a few hundred ms of SymPy

    return parse(f"${answer}$")


def math_equivalent(prediction: Optional[str], reference: str) -> bool:
    """Whether ``prediction`` is the same mathematical answer as ``reference`` (math-verify)."""
    if prediction is None:
        return False
    from math_verify import verify

    return bool(verify(_parsed(reference), _parsed(prediction)))


def vote_key(answer: Optional[str]) -> Optional[str]:
    """The canonical form maj1@k counts: SymPy's, where math-verify parses the answer; else the text."""
    if answer is None:
        return None
    parsed = _parsed(answer)
    return str(parsed[0]) if parsed else answer.strip()

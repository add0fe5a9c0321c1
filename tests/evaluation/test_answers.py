"""Math answers (evaluation/answers.py) on real-looking GSM8k and MATH answers, and maj1@k over them."""

from __future__ import annotations

import pytest

from evaluation.answers import (
    gsm8k_prediction, gsm8k_reference, last_boxed, math_equivalent, math_prediction, normalize_number, vote_key,
)  # fmt: skip
from evaluation.scoring import majority_vote

GSM8K_REFERENCE = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72")  # fmt: skip


def test_gsm8k_reference_and_predictions():
    assert gsm8k_reference(GSM8K_REFERENCE) == "72"
    assert gsm8k_reference("... so he pays $1,250 in total.\n#### 1,250") == "1250"
    assert gsm8k_prediction("She sold 24 in May, so 48 + 24 = 72. The answer is 72.") == "72"
    assert gsm8k_prediction("The answer is $1,250.00.") == "1250"
    assert gsm8k_prediction("Each costs 3.50 dollars, 4 of them cost 14.0") == "14"  # the last number
    assert gsm8k_prediction("I do not know.") is None
    assert gsm8k_prediction("The answer is -3. Then 5 more") == "-3"  # a stated answer wins over later numbers
    assert normalize_number("0.50") == "0.5" and normalize_number("abc") is None
    with pytest.raises(ValueError, match="#### <number>"):
        gsm8k_reference("no marker here")


def test_math_boxed_answers_and_their_equivalence():
    generation = r"So the sum is $\frac{1}{2} + \frac{1}{4}$, i.e. $\boxed{\frac{3}{4}}$."
    assert last_boxed(generation) == r"\frac{3}{4}"
    assert last_boxed(r"\boxed{\frac{a}{b^{2}}} and then \boxed{x_{1}}") == "x_{1}"  # the last, braces balanced
    assert last_boxed(r"\boxed{\frac{1}{2") is None  # cut off by the generation limit
    assert math_prediction("Final Answer: The final answer is $5$. I hope it is correct.") == "5"
    assert math_equivalent(math_prediction(generation), "0.75")
    assert math_equivalent(r"\dfrac{\sqrt{2}}{2}", r"\frac{\sqrt2}{2}")
    assert math_equivalent("(x+1)^2", "x^2+2x+1")
    assert not math_equivalent(r"\frac{1}{3}", r"\frac{1}{2}")
    assert not math_equivalent(None, "1")


def test_majority_vote_over_equivalent_math_answers():
    samples = [r"\frac{1}{2}", "0.5", r"\frac{2}{3}", r"\dfrac{1}{2}", r"\frac{2}{3}"]
    winner, count = majority_vote([vote_key(s) for s in samples])
    assert count == 3 and math_equivalent(winner, "1/2")
    assert vote_key(None) is None

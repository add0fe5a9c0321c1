"""Sampling (evaluation/sampling.py): exact top-k / top-p sets on a toy distribution, temperature 0 = greedy,
a fixed seed reproduces, the empirical distribution at temperature 1 is the softmax (chi-square, fixed
seed), the seed follows the request (not the batch), and lm-eval's generation arguments are honoured or
refused (evaluation/harness.py)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2

from evaluation.harness import generation_settings
from evaluation.lm import LanguageModel
from evaluation.sampling import GREEDY, Sampling, next_token, request_generator, truncated_probs
from tests.evaluation.test_lm import MAX_LEN, lm  # noqa: F401  (the fixture)

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 (as logits: their logs).
TOY = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]).log()


def kept(sampling: Sampling) -> list[int]:
    return [i for i, p in enumerate(truncated_probs(TOY, sampling).tolist()) if p > 0]


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    assert kept(Sampling(temperature=1.0, top_k=2)) == [0, 1]
    assert kept(Sampling(temperature=1.0, top_p=0.7)) == [0, 1]  # 0.4 + 0.3 reaches 0.7
    assert kept(Sampling(temperature=1.0, top_p=0.71)) == [0, 1, 2]
    assert kept(Sampling(temperature=1.0, top_p=0.1)) == [0]  # the most likely token always stays
    assert kept(Sampling(temperature=1.0, top_k=3, top_p=0.9)) == [0, 1, 2]  # top-k first, then p of the rest
    probs = truncated_probs(TOY, Sampling(temperature=1.0, top_k=2))
    assert probs.tolist() == pytest.approx([0.4 / 0.7, 0.3 / 0.7, 0, 0, 0])
    sharp = truncated_probs(TOY, Sampling(temperature=0.5))  # p^2, renormalised
    assert sharp.tolist() == pytest.approx([p * p / 0.285 for p in (0.4, 0.3, 0.15, 0.1, 0.05)])
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        Sampling(temperature=1.0, top_p=0.0)


def test_temperature_one_draws_the_softmax():
    """50,000 draws from one seeded generator: chi-square against the softmax's counts at 0.1% (df 4: 18.47);
    the statistic is deterministic for the seed."""
    generator = torch.Generator().manual_seed(0)
    draws = 50_000
    counts = torch.bincount(torch.tensor([next_token(TOY, Sampling(temperature=1.0), generator=generator)
                                          for _ in range(draws)]), minlength=5)  # fmt: skip
    expected = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]) * draws
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert statistic < chi2.ppf(0.999, df=4), (counts.tolist(), statistic)


def test_greedy_needs_no_generator_and_seeds_follow_the_request():
    assert next_token(TOY, GREEDY, generator=None) == 0 and request_generator(GREEDY, 3) is None
    a = [next_token(TOY, Sampling(temperature=1.0), generator=request_generator(Sampling(temperature=1.0), 7))
         for _ in range(3)]  # fmt: skip
    b = [next_token(TOY, Sampling(temperature=1.0), generator=request_generator(Sampling(temperature=1.0), 7))
         for _ in range(3)]  # fmt: skip
    assert a == b  # the same request seed, the same first draw


PROMPTS = ["def f1(x):", "The quick brown fox", "Pack", "import os"]
STOPS = [["zzz"]] * len(PROMPTS)
SAMPLED = Sampling(temperature=1.0, top_p=0.95, seed=5)


@pytest.mark.parametrize("cached", [True, False], ids=["kv_cache", "rerun_prefix"])
def test_sampled_generation_is_reproducible_and_independent_of_the_batch(lm, cached):  # noqa: F811
    decoder = lm if cached else LanguageModel(lm.forward, lm.tokenizer, max_len=MAX_LEN, batch_size=4)
    greedy = decoder.generate_until(PROMPTS, stops=STOPS, max_new_tokens=8)
    assert decoder.generate_until(PROMPTS, stops=STOPS, max_new_tokens=8, sampling=Sampling(temperature=0.0)) == greedy
    first = decoder.generate_until(PROMPTS, stops=STOPS, max_new_tokens=8, sampling=SAMPLED)
    assert decoder.generate_until(PROMPTS, stops=STOPS, max_new_tokens=8, sampling=SAMPLED) == first
    assert first != greedy  # a random-weight model's distribution is broad: sampling departs from the argmax
    other_seed = Sampling(temperature=1.0, top_p=0.95, seed=6)
    assert decoder.generate_until(PROMPTS, stops=STOPS, max_new_tokens=8, sampling=other_seed) != first
    # one request at a time, with its global seed, as a rank given a share of the list would run it
    alone = [decoder.generate_until([p], stops=[s], max_new_tokens=8, sampling=SAMPLED, seeds=[i])[0]
             for i, (p, s) in enumerate(zip(PROMPTS, STOPS))]  # fmt: skip
    assert alone == first


def test_lm_eval_generation_arguments_are_honoured_or_refused():
    until, max_new, sampling = generation_settings({"until": "\n", "max_gen_toks": 7}, default_max=256, seed=1)
    assert (until, max_new, sampling) == (["\n"], 7, GREEDY)
    _, _, off = generation_settings({"do_sample": False, "temperature": 0.8}, default_max=256, seed=1)
    assert off == GREEDY  # do_sample false is greedy whatever the temperature (transformers' rule)
    _, _, on = generation_settings({"do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 40},
                                   default_max=256, seed=1)  # fmt: skip
    assert on == Sampling(temperature=0.8, top_p=0.95, top_k=40, seed=1)
    assert generation_settings({"do_sample": True, "temperature": 0.0}, default_max=256, seed=1)[2] == GREEDY
    with pytest.raises(ValueError, match=r"does not support the generation argument\(s\) \['num_beams'\]"):
        generation_settings({"until": [], "num_beams": 4}, default_max=256, seed=1)
    assert math.isfinite(on.temperature)

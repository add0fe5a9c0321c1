"""LanguageModel's three requests on a small random model against direct computations with the model's
forward: log-likelihoods (batched and padded, or one at a time), rolling windows, greedy generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data.tokenizer import Tokenizer
from evaluation.lm import LanguageModel
from model.kv_cache import KVCache
from tests.trainer.checkpoint.test_hf_interop import random_model, small_args, train_sentencepiece

MAX_LEN = 24


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "sp.model"
    train_sentencepiece(path)
    args = small_args(vocab_size=320, max_seq_len=MAX_LEN, n_kv_heads=2)  # GQA: the cache holds fewer kv heads
    model = random_model(args)
    with torch.no_grad():
        yield LanguageModel(model, Tokenizer(path), max_len=MAX_LEN, batch_size=3,
                            make_cache=lambda batch, n: KVCache(args, batch=batch, max_len=n))  # fmt: skip


def direct_logprob(lm: LanguageModel, ids: list[int], targets: range) -> float:
    """sum of log p(ids[t] | ids[:t]) for t in targets, one unpadded forward over ids[:-1]."""
    logprobs = F.log_softmax(lm.forward(torch.tensor([ids[:-1]])).float(), dim=-1)[0]
    return sum(logprobs[t - 1, ids[t]].item() for t in targets)


REQUESTS = [("def f1(x):", " return x"), ("The quick brown", " fox jumps"), ("Pack my ", "box"),
            ("def f12(x):\n    return x * 12", " + 84"), ("a", " b c d e f g h")]  # fmt: skip


def test_loglikelihood_equals_the_direct_sum_batched_or_not(lm):
    batched = lm.loglikelihood(REQUESTS)
    lm_one = LanguageModel(lm.forward, lm.tokenizer, max_len=MAX_LEN, batch_size=1)
    for (context, continuation), (ll, greedy, n), (ll_one, greedy_one, _) in zip(REQUESTS, batched, lm_one.loglikelihood(REQUESTS)):
        ctx, cont = lm.encode_pair(context, continuation)
        ids = (ctx + cont)[-(MAX_LEN + 1):]  # a context too long for the window is cut from the left
        assert n == len(cont) > 0 and ctx[0] == lm.tokenizer.bos_id
        assert ll == pytest.approx(direct_logprob(lm, ids, range(len(ids) - len(cont), len(ids))), abs=1e-5)
        assert ll == pytest.approx(ll_one, abs=1e-5) and greedy == greedy_one  # padding changes no scored logit


def test_the_pair_split_moves_trailing_spaces_into_the_continuation(lm):
    ctx, cont = lm.encode_pair("Pack my ", "box")
    ctx2, cont2 = lm.encode_pair("Pack my", " box")
    assert (ctx, cont) == (ctx2, cont2)
    assert ctx + cont == [lm.tokenizer.bos_id, *lm.tokenizer.encode("Pack my box")]


def test_rolling_loglikelihood_scores_every_token_once(lm):
    text = "def f3(x):\n    return x * 3 + 21  # the answer is 3\n" * 3
    ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode(text)]
    assert len(ids) > 2 * MAX_LEN
    # stride 1: every token with the longest context the window allows, one forward per token
    expected = sum(direct_logprob(lm, ids[max(0, t - MAX_LEN):t + 1], range(min(t, MAX_LEN), min(t, MAX_LEN) + 1))
                   for t in range(1, len(ids)))  # fmt: skip
    (ll, n), = lm.loglikelihood_rolling([text], stride=1)
    assert n == len(ids) - 1 and ll == pytest.approx(expected, abs=1e-4)
    for stride in (None, 5):  # disjoint windows (lm-eval's scheme), and overlapping ones
        (ll_s, n_s), = lm.loglikelihood_rolling([text], stride=stride)
        assert n_s == len(ids) - 1 and ll_s < 0
    short = "Pack my box"  # within one window: the whole text given BOS
    (ll_short, _), = lm.loglikelihood_rolling([short])
    assert ll_short == pytest.approx(lm.loglikelihood([("", short)])[0][0], abs=1e-5)
    with pytest.raises(ValueError, match="stride must be in"):
        lm.loglikelihood_rolling([text], stride=MAX_LEN + 1)


@pytest.mark.parametrize("cached", [True, False], ids=["kv_cache", "rerun_prefix"])
def test_greedy_generation_equals_a_one_sequence_argmax_loop(lm, cached):
    """Prompts of different lengths in one batch (the cached path feeds the longer ones their own tokens
    while the shorter ones decode), against one sequence at a time with the full forward."""
    prompts = ["def f1(x):", "The quick brown fox", "Pack"]
    decoder = lm if cached else LanguageModel(lm.forward, lm.tokenizer, max_len=MAX_LEN, batch_size=3)
    got = decoder.generate_until(prompts, stops=[["\n"], ["zzz"], ["zzz"]], max_new_tokens=6)
    for prompt, text, stop in zip(prompts, got, (["\n"], ["zzz"], ["zzz"])):
        ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode(prompt)]
        new: list[int] = []
        for _ in range(6):
            token = int(lm.forward(torch.tensor([ids + new]))[0, -1].argmax())
            if token == lm.tokenizer.eos_id:
                break
            new.append(token)
            if any(s in lm.tokenizer.decode(new) for s in stop):
                break
        expected = lm.tokenizer.decode(new)
        for s in stop:
            expected = expected.split(s)[0]
        assert text == expected

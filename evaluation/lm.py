"""Log-likelihoods and greedy generations from our model: the three requests every evaluation reduces to.

``LanguageModel`` wraps a ``forward`` (token ids (B, T) -> logits (B, T, V), however the model is laid
out: one process, FSDP, TP) and the checkpoint's tokenizer, and answers lm-evaluation-harness's three
request types:

- ``loglikelihood([(context, continuation)])`` -> (log p(continuation | context), is_greedy, tokens);
- ``loglikelihood_rolling([text])`` -> (log p(text), tokens), over windows of at most ``max_len`` tokens;
- ``generate_until([prompt], stops=..., max_new_tokens=..., sampling=..., seeds=...)`` -> text up to the
  first stop, greedy or sampled (evaluation/sampling.py: temperature, top-k, top-p, one seeded generator per
  request), decoded incrementally with a key/value cache when ``make_cache`` is given (one position per new
  token), else by rerunning the prefix.

Tokenisation follows lm-evaluation-harness's Hugging Face backend, so that the two score the same tokens:
spaces at the end of a context are moved to the front of its continuation; the continuation's tokens are
those of tokenize(context + continuation) after the first len(tokenize(context)); every sequence starts
with BOS, as our training documents do (lm-eval: ``add_bos_token=True``). Contexts longer than the window
are cut from the left.

Requests are run longest first in batches of ``batch_size`` (sequences padded on the right; the padding
is after every scored position, and attention is causal, so it changes no scored logit), and the
log-softmax is taken in fp32.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from data.tokenizer import Tokenizer
from evaluation.sampling import GREEDY, Sampling, next_token, request_generator
from evaluation.scoring import cut_at_stop
from model.kv_cache import KVCache

Forward = Callable[..., torch.Tensor]
"""tokens (B, T) -> logits (B, T, V); with ``make_cache``, also ``forward(tokens, cache=...)``."""
MakeCache = Callable[[int, int], KVCache]
"""(batch, positions) -> an empty cache for ``forward``."""
Agree = Callable[[int, str], int]
"""(value, "min" | "max") -> the same value on every rank that decodes together (evaluation/distributed.py)."""


def _alone(value: int, op: str) -> int:
    return value


class LanguageModel:
    def __init__(self, forward: Forward, tokenizer: Tokenizer, *, max_len: int, batch_size: int = 8,
                 device: torch.device = torch.device("cpu"), make_cache: Optional[MakeCache] = None,
                 agree: Agree = _alone):  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"eval.batch_size must be at least 1, got {batch_size}")
        self.forward, self.tokenizer, self.make_cache = forward, tokenizer, make_cache
        # Ranks that decode together (FSDP, TP) must run the same number of forwards: the first and last
        # positions and "every row is done" are agreed on before they are acted on.
        self.agree = agree
        self.max_len, self.batch_size, self.device = max_len, batch_size, device

    def map(self, items: Sequence, fn: Callable[[list], list]) -> list:
        """``fn`` over ``items`` (the sharded model splits them over the data-parallel ranks)."""
        return fn(list(items))

    # --- tokenisation ---------------------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(BOS + context tokens, continuation tokens), split as lm-evaluation-harness splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context) if context else []
        continuation_ids = whole[len(context_ids):]
        if not continuation_ids:
            raise ValueError(f"continuation {continuation!r} has no tokens of its own after context {context[-40:]!r}")
        return [self.tokenizer.bos_id, *context_ids], continuation_ids

    # --- scoring --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_sequences(self, sequences: Sequence[list[int]], scored: Sequence[int]) -> list[tuple[float, bool]]:
        """For each token sequence s and count n: (sum of log p(s_t | s_<t) over its last n tokens, whether
        each of them was the argmax). Every sequence must fit in ``max_len + 1`` tokens."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        # Ranks that run the model together run as many forwards as the busiest of them (one rank's texts
        # may make more rolling windows); the extra ones are a 1-token forward whose result is dropped.
        for _ in range(self.agree(len(batches), "max") - len(batches)):
            self.forward(torch.full((1, 1), self.tokenizer.bos_id, dtype=torch.long, device=self.device))
        for batch in batches:
            inputs = [sequences[i][:-1] for i in batch]
            width = max(len(x) for x in inputs)
            if width > self.max_len:
                raise ValueError(f"a request of {width} tokens exceeds the window of {self.max_len}")
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for row, ids in enumerate(inputs):
                tokens[row, :len(ids)] = torch.tensor(ids)
            logprobs = F.log_softmax(self.forward(tokens.to(self.device)).float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                n, length = scored[i], len(inputs[row])
                targets = torch.tensor(sequences[i][-n:])
                lp = logprobs[row, length - n:length]  # (n, V): the positions that predict the targets
                results[i] = (lp.gather(-1, targets[:, None]).sum().item(), bool((lp.argmax(-1) == targets).all()))
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool, int]]:
        """(log p(continuation | context), is_greedy, continuation tokens) per request."""
        sequences, scored = [], []
        for context, continuation in requests:
            context_ids, continuation_ids = self.encode_pair(context, continuation)
            if len(continuation_ids) > self.max_len:
                raise ValueError(f"continuation of {len(continuation_ids)} tokens exceeds the window of {self.max_len}")
            sequences.append((context_ids + continuation_ids)[-(self.max_len + 1):])
            scored.append(len(continuation_ids))
        return [(ll, greedy, n) for (ll, greedy), n in zip(self.score_sequences(sequences, scored), scored)]

    def loglikelihood_rolling(self, texts: Sequence[str], *, stride: Optional[int] = None) -> list[tuple[float, int]]:
        """(log p(text), tokens) per text: every token scored once, in windows of ``max_len`` tokens.

        The first window predicts the first ``max_len`` tokens after BOS; each later one the next ``stride``
        (default ``max_len``: disjoint windows, lm-eval's rolling scheme) with the ``max_len - stride``
        tokens before them as context."""
        stride = self.max_len if stride is None else stride
        if not 1 <= stride <= self.max_len:
            raise ValueError(f"eval stride must be in [1, {self.max_len}], got {stride}")
        windows, scored, owner = [], [], []
        for index, text in enumerate(texts):
            ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text)]  # ids[t + 1] is predicted from ids[:t + 1]
            start = 0  # the first target (an index into ids[1:]) not yet scored
            while start < len(ids) - 1:
                end = min(start + (self.max_len if start == 0 else stride), len(ids) - 1)
                first = max(0, end - self.max_len)
                windows.append(ids[first:end + 1])
                scored.append(end - start)
                owner.append(index)
                start = end
        totals = [[0.0, 0] for _ in texts]
        for (ll, _), n, index in zip(self.score_sequences(windows, scored), scored, owner):
            totals[index][0] += ll
            totals[index][1] += n
        return [(ll, n) for ll, n in totals]

    # --- generation -----------------------------------------------------------------------------------------

    def generate_until(self, prompts: Sequence[str], *, stops: Sequence[Sequence[str]], max_new_tokens: int,
                       sampling: Sampling = GREEDY, seeds: Optional[Sequence[int]] = None) -> list[str]:  # fmt: skip
        """The continuation of each prompt up to its first stop string (or EOS, or ``max_new_tokens``), greedy
        or sampled. ``seeds``: each request's own seed (default: its index here); pass the global ones when a
        caller splits a request list (evaluation/distributed.py), so a result does not depend on the split."""
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        keep = self.max_len - max_new_tokens
        if keep < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {self.max_len} positions")
        outputs: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = list(range(start, min(start + self.batch_size, len(prompts))))
            ids = [[self.tokenizer.bos_id, *self.tokenizer.encode(prompts[i])][-keep:] for i in batch]
            step = self._decode_cached if self.make_cache is not None else self._decode_full
            generators = [request_generator(sampling, seeds[i]) for i in batch]
            new = step(ids, stops=[stops[i] for i in batch], max_new_tokens=max_new_tokens, sampling=sampling,
                       generators=generators)  # fmt: skip
            outputs.extend(cut_at_stop(self.tokenizer.decode(n), stops[i]) for n, i in zip(new, batch))
        return outputs

    def _finished(self, new: list[int], token: int, stops: Sequence[str], max_new_tokens: int) -> bool:
        """Append ``token`` unless it is EOS; whether this row is done."""
        if token == self.tokenizer.eos_id:
            return True
        new.append(token)
        return len(new) >= max_new_tokens or any(s in self.tokenizer.decode(new) for s in stops)

    @torch.no_grad()
    def _decode_cached(self, ids: list[list[int]], *, stops: Sequence[Sequence[str]], max_new_tokens: int,
                       sampling: Sampling, generators: list) -> list[list[int]]:  # fmt: skip
        """Incremental decoding with a key/value cache (model/kv_cache.py). The rows share positions:
        the batch is run from its shortest prompt on, and a row still inside its prompt is fed its own next
        token instead of the model's (Meta's reference generation), so no row ever attends to padding."""
        lengths = [len(x) for x in ids]
        first = self.agree(min(lengths), "min")
        total = self.agree(max(lengths) + max_new_tokens, "max")
        tokens = torch.zeros(len(ids), total, dtype=torch.long)
        for row, x in enumerate(ids):
            tokens[row, :len(x)] = torch.tensor(x)
        cache = self.make_cache(len(ids), total)
        new: list[list[int]] = [[] for _ in ids]
        done = [False] * len(ids)
        previous = 0
        for position in range(first, total):
            last = self.forward(tokens[:, previous:position].to(self.device), cache=cache)[:, -1].float().cpu()
            for row in range(len(ids)):
                if position < lengths[row]:
                    continue  # still the prompt: its own token stays in place
                if not done[row]:
                    chosen = next_token(last[row], sampling, generator=generators[row])
                    tokens[row, position] = chosen
                    done[row] = self._finished(new[row], chosen, stops[row], max_new_tokens)
            previous = position
            if self.agree(int(all(done)), "min"):
                break
        return new

    @torch.no_grad()
    def _decode_full(self, ids: list[list[int]], *, stops: Sequence[Sequence[str]], max_new_tokens: int,
                     sampling: Sampling, generators: list) -> list[list[int]]:  # fmt: skip
        """Decoding that reruns the whole prefix for every token: for a ``forward`` without a cache (e.g. a
        tensor-parallel model)."""
        new: list[list[int]] = [[] for _ in ids]
        done = [False] * len(ids)
        while not self.agree(int(all(done)), "min"):
            width = max(len(x) + len(n) for x, n in zip(ids, new))
            tokens = torch.zeros(len(ids), width, dtype=torch.long)
            for row, (x, n) in enumerate(zip(ids, new)):
                tokens[row, :len(x) + len(n)] = torch.tensor(x + n)
            logits = self.forward(tokens.to(self.device)).float().cpu()
            for row, (x, n) in enumerate(zip(ids, new)):
                if not done[row]:
                    chosen = next_token(logits[row, len(x) + len(n) - 1], sampling, generator=generators[row])
                    done[row] = self._finished(n, chosen, stops[row], max_new_tokens)
        return new

"""Sampling the next token: temperature, top-k, top-p (nucleus), reproducible under any layout.

``Sampling(temperature=0)`` is greedy decoding (the argmax). Otherwise the logits are divided by the
temperature, cut to the ``top_k`` most likely tokens (0: no cut) and then to the smallest set of most likely
tokens whose probability reaches ``top_p`` (1: no cut; the most likely token always stays), renormalised,
and one token is drawn.

Every request draws from a generator of its own, seeded by the sampling seed and the request's *global*
seed (``request_seeds``: its index in the whole request list, and for the n-th sample of a prompt that
sample's index), never by the rank, the batch or the position in a shard, so a result is the same under
one process, FSDP and TP (evaluation/distributed.py splits the requests over ranks, seeds included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    """0: greedy (the argmax); > 0: sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches p (1: all)."""
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got temperature="
                             f"{self.temperature}, top_k={self.top_k}, top_p={self.top_p}")  # fmt: skip

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def truncated_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution a token is drawn from: (V,) logits -> (V,) probabilities in fp32, zero outside the
    top-k and top-p sets."""
    scaled = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.numel():
        kth = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # probability of the tokens ranked above each
        drop = before >= sampling.top_p  # the set already reached p without this token
        probs = probs.scatter(0, order, ordered.masked_fill(drop, 0.0))
    return probs / probs.sum()


def next_token(logits: torch.Tensor, sampling: Sampling, *, generator: Optional[torch.Generator]) -> int:
    """The next token for (V,) ``logits``: the argmax when greedy, else a draw from ``truncated_probs``."""
    if sampling.greedy:
        return int(logits.float().argmax())
    return int(torch.multinomial(truncated_probs(logits, sampling), 1, generator=generator))


def request_generator(sampling: Sampling, request_seed: int) -> Optional[torch.Generator]:
    """The generator of one request (None when greedy: nothing is drawn)."""
    if sampling.greedy:
        return None
    return torch.Generator().manual_seed((sampling.seed * 1_000_003 + request_seed) % 2**63)

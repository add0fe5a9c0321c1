"""Evaluation under any training layout: the requests split over the data-parallel ranks, the results
gathered on every rank (rank 0 writes them).

    torchrun --nproc-per-node 8 -m launch.evaluate checkpoint=<dir> parallel.tp=2 eval.tasks=[hellaswag]

The model is built by the trainer's own path (``trainer.parallel.build.build_stages`` under ``ParallelDims.for_run``:
TP/SP, FSDP) and the checkpoint loaded into it with DCP, which reshards it to the layout. Every rank of a
tensor-parallel group takes the same requests (their collectives need the same inputs); the
data-parallel ranks take interleaved shares, padded with copies of a request to the same count, so
every rank runs the same number of forwards, which FSDP's all-gathers need. Greedy decoding stops only
when every rank is done (one all-reduce per token). Under TP the logits, split over the vocabulary, are
gathered whole; a tensor-parallel model decodes without the key/value cache (its attention takes none).
Under pipeline parallelism (``parallel.pp``) every stage of a pipeline takes the same requests, each forward
runs through the pipeline's forward-only schedule and the last stage's logits are broadcast to the others
(trainer/parallel/pipeline.py ``Pipeline.logits``); each rank's decoding cache holds its own blocks' layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from data.tokenizer import Tokenizer
from evaluation.lm import LanguageModel
from evaluation.sampling import GREEDY, Sampling
from model.config import ModelArgs
from model.kv_cache import KVCache
from trainer.checkpoint.dcp import load_tensors
from trainer.parallel.build import build_stages
from trainer.parallel.config import ACConfig, ACMode, ParallelConfig
from trainer.parallel.dims import ParallelDims
from trainer.parallel.pipeline import Pipeline
from trainer.parallel.distributed import agree
from trainer.run.step import cross_entropy_sum

T = TypeVar("T")


def build_sharded(args: ModelArgs, *, step_dir, parallel: ParallelConfig, world_size: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.nn.Module, ParallelDims, Optional[Pipeline]]:  # fmt: skip
    """The checkpoint's model laid out as ``parallel`` says over ``world_size`` processes (no recomputation:
    nothing is kept for backward anyway), and its pipeline where ``parallel.pp`` > 1 (forward only)."""
    parallel = dataclasses.replace(parallel, ac=ACConfig(mode=ACMode.none))
    dims = ParallelDims.for_run(parallel, world_size=world_size, model=args, seq_len=args.max_seq_len)
    dims = dims.with_meshes(device_type=device.type)
    model, stages = build_stages(args, device=device, seed=0, dims=dims, parallel=parallel, compute_dtype=dtype)
    load_tensors(step_dir, model=model, optimizer=None, args=args)
    pipeline = (Pipeline(stages, dims, cfg=parallel, device=device, loss=cross_entropy_sum)
                if dims.pp_enabled else None)  # fmt: skip
    return model.eval(), dims, pipeline


def sharded_language_model(model: torch.nn.Module, dims: ParallelDims, *, args: ModelArgs, tokenizer: Tokenizer,
                           batch_size: int, device: torch.device, dtype: torch.dtype,
                           pipeline: Optional[Pipeline] = None) -> ShardedLanguageModel:  # fmt: skip
    """``model`` (laid out as ``dims`` says; ``ParallelDims.single()`` for one process, where nothing is
    split) behind the three requests; under pipeline parallelism each forward runs through ``pipeline``'s
    forward-only schedule and every stage gets the logits."""
    autocast = dtype != torch.float32 and not dims.fsdp_enabled  # under FSDP the parameters are already bf16

    def forward(tokens: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        length = tokens.shape[1]
        if dims.tp_enabled:  # sequence parallelism splits T over the tp ranks: pad it to a multiple of tp, on
            # the right, where causal attention lets no padding reach the real positions
            tokens = F.pad(tokens, (0, -length % dims.tp), value=tokenizer.bos_id)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            if pipeline is not None:
                logits = pipeline.logits(tokens, vocab_size=args.vocab_size, cache=cache)
            else:
                logits = model(tokens) if cache is None else model(tokens, cache=cache)
        logits = logits.full_tensor() if isinstance(logits, DTensor) else logits  # TP: (B, T, V/t) shards
        return logits[:, :length]

    def make_cache(batch: int, positions: int) -> KVCache:  # a pipeline stage's: its own blocks' layers only
        return KVCache(args, batch=batch, max_len=positions, dtype=dtype, device=device,
                       layers=[int(name) for name in model.layers])  # fmt: skip

    def agree_over_ranks(value: int, op: str) -> int:  # LanguageModel's ``agree``: min or max over all ranks
        return agree({"value": value}, op=op, device=device)["value"]

    lm = LanguageModel(forward, tokenizer, max_len=args.max_seq_len, batch_size=batch_size, device=device,
                       make_cache=None if dims.tp_enabled else make_cache,  # TP decodes without it (docs/evaluation.md)
                       agree=agree_over_ranks)  # fmt: skip
    return ShardedLanguageModel(lm, rank=dims.dp_rank(), size=dims.dp)


class ShardedLanguageModel:
    """``LanguageModel``'s three requests, each list split over ``size`` data-parallel shares."""

    def __init__(self, lm: LanguageModel, *, rank: int, size: int):
        self.lm, self.rank, self.size = lm, rank, size

    def _sharded(self, requests: Sequence[T], run: Callable[[list[T]], list[Any]]) -> list[Any]:
        if not requests:
            return []
        if not dist.is_initialized():
            return run(list(requests))
        per_rank = -(-len(requests) // self.size)
        mine = list(requests[self.rank::self.size])
        padding = per_rank - len(mine)
        answers = run(mine + [requests[0]] * padding)[:len(mine)]
        gathered: list[Optional[list]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.rank, answers))
        by_rank = dict(gathered)  # the ranks of one TP group sent the same answers
        out: list[Any] = [None] * len(requests)
        for rank, share in by_rank.items():
            out[rank::self.size] = share
        return out

    def map(self, items: Sequence[T], fn: Callable[[list[T]], list[Any]]) -> list[Any]:
        """``fn`` over ``items``, each data-parallel rank taking its share (work that is not the model's:
        running programs, classifying toxicity), the results gathered on every rank in order."""
        return self._sharded(items, fn)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool, int]]:
        return self._sharded(requests, self.lm.loglikelihood)

    def loglikelihood_rolling(self, texts: Sequence[str], *, stride: Optional[int] = None) -> list[tuple[float, int]]:
        return self._sharded(texts, lambda share: self.lm.loglikelihood_rolling(share, stride=stride))

    def generate_until(self, prompts: Sequence[str], *, stops: Sequence[Sequence[str]], max_new_tokens: int,
                       sampling: Sampling = GREEDY, seeds: Optional[Sequence[int]] = None) -> list[str]:  # fmt: skip
        """As ``LanguageModel.generate_until``; each request keeps its global seed on whichever rank runs it."""
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        triples = list(zip(prompts, stops, seeds))

        def run(share: list) -> list[str]:
            return self.lm.generate_until([p for p, _, _ in share], stops=[s for _, s, _ in share],
                                          max_new_tokens=max_new_tokens, sampling=sampling,
                                          seeds=[seed for _, _, seed in share])  # fmt: skip

        return self._sharded(triples, run)

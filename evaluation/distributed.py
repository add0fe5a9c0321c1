"""Evaluation under any training layout: the requests split over the data-parallel ranks, the results
gathered on every rank (rank 0 writes them).

    torchrun --nproc-per-node 8 -m evaluation.run checkpoint=<dir> parallel.tp=2 eval.tasks=[hellaswag]

The model is built by the trainer's own path (``trainer.build.build_model`` under ``ParallelDims.for_run``:
TP/SP, FSDP) and the checkpoint loaded into it with DCP, which reshards it to the layout. Every rank of a
tensor-parallel group takes the same requests (their collectives need the same inputs); the
data-parallel ranks take interleaved shares, padded with copies of a request to the same count, so
every rank runs the same number of forwards, which FSDP's all-gathers need. Greedy decoding stops only
when every rank is done (one all-reduce per token). Under TP the logits, split over the vocabulary, are
gathered whole; a tensor-parallel model decodes without the key/value cache (its attention takes none).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from data.tokenizer import Tokenizer
from evaluation.config import EvalConfig
from evaluation.demo import ensure_demo_tasks
from evaluation.evaluate import load_task, score_examples
from evaluation.lm import LanguageModel
from model.config import ModelArgs
from model.kv_cache import KVCache
from trainer.activation_checkpointing import ACMode
from trainer.build import build_model
from trainer.checkpoint import load_tensors
from trainer.config import ParallelConfig
from trainer.parallel_dims import ParallelDims

T = TypeVar("T")


def _agree(value: int, op: str) -> int:
    """The minimum or maximum of ``value`` over all ranks (LanguageModel's ``agree``)."""
    if not dist.is_initialized():  # a one-process run
        return value
    tensor = torch.tensor([value])
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(tensor.item())


def build_sharded(args: ModelArgs, *, step_dir, parallel: ParallelConfig, world_size: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.nn.Module, ParallelDims]:  # fmt: skip
    """The checkpoint's model laid out as ``parallel`` says over ``world_size`` processes (no recomputation:
    nothing is kept for backward anyway)."""
    parallel = dataclasses.replace(parallel, activation_checkpoint=ACMode.none)
    dims = ParallelDims.for_run(parallel, world_size=world_size, model=args, seq_len=args.max_seq_len)
    dims = dims.with_meshes(device_type=device.type)
    model = build_model(args, device=device, seed=0, dims=dims, parallel=parallel, compute_dtype=dtype)
    load_tensors(step_dir, model=model, optimizer=None, args=args)
    return model.eval(), dims


def sharded_language_model(model: torch.nn.Module, dims: ParallelDims, *, args: ModelArgs, tokenizer: Tokenizer,
                           batch_size: int, device: torch.device, dtype: torch.dtype) -> ShardedLanguageModel:  # fmt: skip
    """``model`` (laid out as ``dims`` says; ``ParallelDims.single()`` for one process, where nothing is
    split) behind the three requests."""
    autocast = dtype != torch.float32 and not dims.fsdp_enabled  # under FSDP the parameters are already bf16

    def forward(tokens: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        length = tokens.shape[1]
        if dims.tp_enabled:  # sequence parallelism splits T over the tp ranks: pad it to a multiple of tp, on
            # the right, where causal attention lets no padding reach the real positions
            tokens = F.pad(tokens, (0, -length % dims.tp), value=tokenizer.bos_id)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            logits = model(tokens) if cache is None else model(tokens, cache=cache)
        logits = logits.full_tensor() if isinstance(logits, DTensor) else logits  # TP: (B, T, V/t) shards
        return logits[:, :length]

    def make_cache(batch: int, positions: int) -> KVCache:
        return KVCache(args, batch=batch, max_len=positions, dtype=dtype, device=device)

    lm = LanguageModel(forward, tokenizer, max_len=args.max_seq_len, batch_size=batch_size, device=device,
                       make_cache=None if dims.tp_enabled else make_cache, agree=_agree)  # fmt: skip
    return ShardedLanguageModel(lm, rank=dims.dp_rank(), size=dims.dp)


def training_task_evaluator(model: torch.nn.Module, dims: ParallelDims, *, cfg: EvalConfig, args: ModelArgs,
                            tokenizer_path: str, device: torch.device, dtype: torch.dtype) -> Callable[[], dict[str, float]]:  # fmt: skip
    """For the training loop: a function that scores ``cfg.tasks`` on the model being trained (all ranks
    call it together) and returns ``{"<task>/<metric>": value}``. The task files are read once, here."""
    tasks = cfg.selected()
    if any(t.demo for t in tasks.values()):
        ensure_demo_tasks(cfg.demo_dir)
    examples = {name: load_task(task, seed=cfg.seed) for name, task in tasks.items()}
    lm = sharded_language_model(model, dims, args=args, tokenizer=Tokenizer(tokenizer_path), batch_size=cfg.batch_size,
                                device=device, dtype=dtype)  # fmt: skip

    @torch.no_grad()
    def evaluate_tasks() -> dict[str, float]:
        out = {}
        for name, task in tasks.items():
            metrics = score_examples(examples[name], task, lm)[0]
            out |= {f"{name}/{metric}": value for metric, value in metrics.items()}
        return out

    return evaluate_tasks


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

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool, int]]:
        return self._sharded(requests, self.lm.loglikelihood)

    def loglikelihood_rolling(self, texts: Sequence[str], *, stride: Optional[int] = None) -> list[tuple[float, int]]:
        return self._sharded(texts, lambda share: self.lm.loglikelihood_rolling(share, stride=stride))

    def generate_until(self, prompts: Sequence[str], *, stops: Sequence[Sequence[str]],
                       max_new_tokens: int) -> list[str]:  # fmt: skip
        pairs = list(zip(prompts, stops))
        return self._sharded(pairs, lambda share: self.lm.generate_until([p for p, _ in share], stops=[s for _, s in share],
                                                                         max_new_tokens=max_new_tokens))  # fmt: skip

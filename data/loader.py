"""Packed-sequence loader over memory-mapped token shards, with a mixture of sources.

Sampling, in terms of the global sample index g (0, 1, 2, ... across all data-parallel ranks):

* Source of g: drawn from the mixture weights with an RNG seeded by (seed, g // MIXTURE_BLOCK),
  so the draw for g never depends on dp_size or batch size.
* Window of g: if g is the k-th sample (globally) drawn from source s, it is window
  ``perm(seed, s, epoch)[k % n_windows]`` with ``epoch = k // n_windows``; a window is
  seq_len + 1 tokens starting at a multiple of seq_len, so every token is a target once per epoch.
* Step t consumes global samples [t * G, (t + 1) * G) with G = dp_size * batch_size; rank r takes
  the contiguous slice [r * batch_size, (r + 1) * batch_size).

The state is therefore just the number of global samples consumed and how many of them each
source supplied: identical on every rank and independent of dp_size, so a run resumed with a
different dp_size (same global batch) continues the same global sample order.

Skipping (a loss-spike rollback, trainer/run/components/spike_guard.py): ``skip(first, stop)`` marks the
global samples [first, stop) as never to be trained on. When the loader reaches them it draws them (the
mixture and the window order advance as if they had been trained) without yielding them, so every later
sample is the one it would have been. The skipped ranges are part of the state, so a resume keeps skipping
them, and a loader given the same ranges from the start yields exactly the same batches.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from data.prepare import PreparedData
from data.shards import read_sidecar

MIXTURE_BLOCK = 4096
_STATE_VERSION = 1
# State without "skipped" (written before skipping existed) loads as skipping nothing.


def _stable_key(name: str) -> int:
    """A per-source RNG stream id that survives adding, removing or reordering other sources."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=4).digest(), "little")


class _TokenStream:
    """One source's shards read as one token stream, cut into overlapping windows."""

    def __init__(self, paths: list[str], *, seq_len: int):
        self.seq_len = seq_len
        self.paths = list(paths)
        sidecars = [read_sidecar(path) for path in self.paths]
        self.dtypes = [np.dtype(sidecar["dtype"]) for sidecar in sidecars]
        lengths = np.array([sidecar["num_tokens"] for sidecar in sidecars], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # (num_shards + 1,)
        self.num_tokens = int(self.starts[-1])
        # Windows overlap by one token (the last label of one is the first input of the next).
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)
        self._maps: dict[int, np.memmap] = {}

    def _shard(self, index: int) -> np.memmap:
        # One read-only mapping per shard, opened on first use; the OS pages in only what is read.
        if index not in self._maps:
            self._maps[index] = np.memmap(self.paths[index], dtype=self.dtypes[index], mode="r")
        return self._maps[index]

    def window(self, index: int) -> np.ndarray:
        """Tokens [index * seq_len, index * seq_len + seq_len + 1) as int64, crossing shards if needed."""
        start, stop = index * self.seq_len, index * self.seq_len + self.seq_len + 1
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            local = start - int(self.starts[shard])
            take = min(stop, int(self.starts[shard + 1])) - start
            pieces.append(np.asarray(self._shard(shard)[local : local + take], dtype=np.int64))
            start += take
            shard += 1
        return np.concatenate(pieces)


class PackedLoader:
    """Infinite iterator of packed batches ``{"inputs": (B, T), "labels": (B, T)}`` (int64), with
    ``"documents"`` (B, T) too where ``document_mask`` is set.

    Args:
        prepared: the result of ``prepare_data``.
        split: "train" or "val".
        seq_len: T, tokens per sample.
        batch_size: B, samples per rank per step.
        dp_rank, dp_size: this rank's slice of the global batch of dp_size * batch_size samples.
        seed: seeds the mixture draws and the per-epoch window permutations.
        document_mask: also yield each input's document index in its window (a new document at each BOS),
            for attention that stays within documents (``data.document_mask``, Llama 3's choice).
    """

    def __init__(
        self,
        prepared: PreparedData,
        *,
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 8,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        document_mask: bool = False,
    ):
        _check_args(prepared, split=split, seq_len=seq_len, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.bos_id = prepared.bos_id if document_mask else None
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        # Sorted names: the mixture draw must not depend on the order sources appear in YAML.
        self.names = sorted(name for name, weight in prepared.weights.items() if weight > 0)
        self.streams = {name: _TokenStream(prepared.shards[split][name], seq_len=seq_len) for name in self.names}
        _check_windows(self.streams, split=split, seq_len=seq_len)
        weights = np.array([prepared.weights[name] for name in self.names], dtype=np.float64)
        self._cdf = np.cumsum(weights / weights.sum())
        self._consumed = 0
        self._source_samples = {name: 0 for name in self.names}
        self._skipped: list[tuple[int, int]] = []  # [first, stop) global sample ranges, sorted, disjoint
        self._block_cache: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))
        self._perm_cache: dict[tuple[str, int], np.ndarray] = {}

    def __iter__(self) -> PackedLoader:
        return self

    @property
    def consumed_samples(self) -> int:
        """Global samples drawn so far (skipped ones included): where the next batch starts."""
        return self._consumed

    def skip(self, first: int, stop: int) -> None:
        """Never yield the global samples [first, stop) (whole global batches: multiples of dp_size * batch_size)."""
        self._skipped = add_skip(self._skipped, first, stop, global_batch=self.dp_size * self.batch_size)

    @property
    def skipped(self) -> list[tuple[int, int]]:
        return list(self._skipped)

    def _pass_skipped(self) -> None:
        """Draw, without yielding, a skipped range that starts where the loader stands."""
        for first, stop in self._skipped:
            if first <= self._consumed < stop:
                choices = self._sources_of(self._consumed, stop - self._consumed)
                for index, name in enumerate(self.names):
                    self._source_samples[name] += int((choices == index).sum())
                self._consumed = stop

    def __next__(self) -> dict[str, torch.Tensor]:
        self._pass_skipped()
        global_batch = self.dp_size * self.batch_size
        choices = self._sources_of(self._consumed, global_batch)  # (G,) source index per global sample
        ordinals = np.empty(global_batch, dtype=np.int64)  # k: how many earlier samples used that source
        for index, name in enumerate(self.names):
            mask = choices == index
            ordinals[mask] = self._source_samples[name] + np.arange(int(mask.sum()))
        mine = range(self.dp_rank * self.batch_size, (self.dp_rank + 1) * self.batch_size)
        windows = np.stack([self._window(self.names[choices[i]], int(ordinals[i])) for i in mine])  # (B, T + 1)
        for index, name in enumerate(self.names):
            self._source_samples[name] += int((choices == index).sum())
        self._consumed += global_batch
        tokens = torch.from_numpy(windows)
        batch = {"inputs": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if self.bos_id is not None:  # every document is stored as BOS ... EOS (data/shards.py)
            batch["documents"] = (batch["inputs"] == self.bos_id).cumsum(dim=1)
        return batch

    def _sources_of(self, first: int, count: int) -> np.ndarray:
        """Source index of global samples [first, first + count)."""
        blocks = range(first // MIXTURE_BLOCK, (first + count - 1) // MIXTURE_BLOCK + 1)
        draws = np.concatenate([self._block(block) for block in blocks])
        offset = first - blocks[0] * MIXTURE_BLOCK
        return draws[offset : offset + count]

    def _block(self, block: int) -> np.ndarray:
        if self._block_cache[0] != block:
            uniform = np.random.default_rng([self.seed, block]).random(MIXTURE_BLOCK)
            draws = np.minimum(np.searchsorted(self._cdf, uniform, side="right"), len(self.names) - 1)
            self._block_cache = (block, draws)
        return self._block_cache[1]

    def _window(self, name: str, ordinal: int) -> np.ndarray:
        stream = self.streams[name]
        epoch, position = divmod(ordinal, stream.num_windows)
        return stream.window(int(self._permutation(name, epoch)[position]))

    def _permutation(self, name: str, epoch: int) -> np.ndarray:
        # A fresh permutation per epoch; keep only the current epochs (a batch can straddle two).
        key = (name, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != name or k[1] == epoch - 1}
            rng = np.random.default_rng([self.seed, _stable_key(name), epoch])
            self._perm_cache[key] = rng.permutation(self.streams[name].num_windows)
        return self._perm_cache[key]

    def state_dict(self) -> dict[str, Any]:
        """Small, rank- and dp_size-independent counters (JSON-serialisable)."""
        return {
            "version": _STATE_VERSION,
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "consumed_samples": self._consumed,
            "source_samples": dict(self._source_samples),
            "source_windows": {name: self.streams[name].num_windows for name in self.names},
            "source_epochs": {
                name: self._source_samples[name] // self.streams[name].num_windows for name in self.names
            },
            "skipped": [list(r) for r in self._skipped],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues exactly where the saved loader stopped; rejects state from different data or settings."""
        mine = self.state_dict()
        for key in ("version", "split", "seq_len", "seed", "source_windows"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"loader state {key}={state.get(key)!r} does not match this loader's {mine[key]!r}; "
                    "resume with the same data, split, seq_len and seed as the saved run"
                )
        self._consumed = int(state["consumed_samples"])
        self._source_samples = {name: int(state["source_samples"][name]) for name in self.names}
        self._skipped = merge_ranges([(int(a), int(b)) for a, b in state.get("skipped", [])])


def add_skip(skipped: list[tuple[int, int]], first: int, stop: int, *, global_batch: int,
             unit: str = "samples") -> list[tuple[int, int]]:  # fmt: skip
    """``skipped`` with [first, stop) added, checked to hold whole global batches (a loader's ``skip``)."""
    if first % global_batch or stop % global_batch or not 0 <= first < stop:
        raise ValueError(f"skip [{first}, {stop}): the range must hold whole global batches of {global_batch} {unit}")
    return merge_ranges([*skipped, (first, stop)])


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping or touching ranges joined."""
    merged: list[tuple[int, int]] = []
    for first, stop in sorted(ranges):
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((first, stop))
    return merged


def _check_args(
    prepared: PreparedData, *, split: str, seq_len: int, batch_size: int, dp_rank: int, dp_size: int
) -> None:
    if split not in prepared.shards:
        raise ValueError(f"split={split!r} is not prepared; use one of {sorted(prepared.shards)}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")


def _check_windows(streams: dict[str, _TokenStream], *, split: str, seq_len: int) -> None:
    for name, stream in streams.items():
        if stream.num_windows > 0:
            continue
        fix = "raise data.val_fraction or lower data.seq_len" if split == "val" else "add data or lower data.seq_len"
        raise ValueError(
            f"data.sources.{name}: the {split} split has {stream.num_tokens} tokens, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1}; {fix}"
        )

"""Packed batches of instruction records: several records a row, kept apart by document ids.

Rows of ``seq_len`` positions are filled with whole records (inputs, labels and a document id per
position; what is left of a row is padding: token 0, label ``IGNORE_INDEX``, a document of its own), in a
seeded permutation of the records per epoch, a record going to the next row when it does not fit. The
model gets the document ids (``model(inputs, documents=...)``), so no record attends to another and each
one's positions start at 0: a packed row trains exactly as its records would one by one
(tests/model/test_document_mask.py), without the padding a row per record would cost.

As in the pre-training loader (data/loader.py), the state is the number of global rows consumed and the
skipped ranges: step t takes global rows [t * G, (t + 1) * G), G = dp_size * batch_size, rank r the slice
[r * batch_size, (r + 1) * batch_size); the packing of an epoch depends only on the seed and the epoch, so
a run resumed under another data-parallel degree (same global batch) continues with the same rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data.instructions import IGNORE_INDEX, TokenizedRecord
from data.loader import add_skip, merge_ranges

_STATE_VERSION = 1


def pack(lengths: list[int], *, order: np.ndarray, seq_len: int) -> list[list[int]]:
    """Rows of record indices, in ``order``, each row's lengths summing to at most ``seq_len``."""
    rows, current, used = [], [], 0
    for index in order.tolist():
        if current and used + lengths[index] > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    if current:
        rows.append(current)
    return rows


class InstructionLoader:
    """Infinite iterator of ``{"inputs", "labels", "documents"}`` (B, T) int64 batches of packed records."""

    def __init__(self, records: list[TokenizedRecord], *, seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True):  # fmt: skip
        if not records:
            raise ValueError("no instruction records to train on: check data.instructions.train")
        if any(len(r.ids) - 1 > seq_len for r in records):
            raise ValueError(f"a record is longer than data.seq_len={seq_len}: tokenize with seq_len (data/instructions.py)")
        self.records, self.seq_len, self.batch_size = records, seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.lengths = [len(r.ids) - 1 for r in records]
        self._epochs: list[list[list[int]]] = []  # rows of each epoch packed so far
        self._consumed = 0
        self._skipped: list[tuple[int, int]] = []

    def __iter__(self) -> InstructionLoader:
        return self

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    @property
    def skipped(self) -> list[tuple[int, int]]:
        return list(self._skipped)

    def skip(self, first: int, stop: int) -> None:
        """Never yield the global rows [first, stop) (whole global batches), as PackedLoader.skip."""
        self._skipped = add_skip(self._skipped, first, stop, global_batch=self.dp_size * self.batch_size, unit="rows")

    def rows_per_epoch(self, epoch: int) -> int:
        return len(self._rows_of(epoch))

    def _rows_of(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            order = (np.random.default_rng([self.seed, e]).permutation(len(self.records)) if self.shuffle
                     else np.arange(len(self.records)))  # fmt: skip
            self._epochs.append(pack(self.lengths, order=order, seq_len=self.seq_len))
        return self._epochs[epoch]

    def row(self, g: int) -> list[int]:
        """The record indices of global row ``g``."""
        epoch = 0
        while g >= len(self._rows_of(epoch)):
            g -= len(self._rows_of(epoch))
            epoch += 1
        return self._rows_of(epoch)[g]

    def _tensors(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        inputs = np.zeros(self.seq_len, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        documents = np.full(self.seq_len, len(indices), dtype=np.int64)  # padding: a document of its own
        at = 0
        for doc, index in enumerate(indices):
            x, y = self.records[index].inputs_labels()
            inputs[at:at + len(x)], labels[at:at + len(x)], documents[at:at + len(x)] = x, y, doc
            at += len(x)
        return inputs, labels, documents

    def __next__(self) -> dict[str, torch.Tensor]:
        for first, stop in self._skipped:
            if first <= self._consumed < stop:
                self._consumed = stop
        start = self._consumed + self.dp_rank * self.batch_size
        parts = [self._tensors(self.row(g)) for g in range(start, start + self.batch_size)]
        self._consumed += self.dp_size * self.batch_size
        inputs, labels, documents = (torch.from_numpy(np.stack(column)) for column in zip(*parts))
        return {"inputs": inputs, "labels": labels, "documents": documents}

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "kind": "instructions", "consumed": self._consumed, "seed": self.seed,
                "records": len(self.records), "skipped": [list(r) for r in self._skipped]}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "instructions":
            raise ValueError("this checkpoint's data state is a pre-training loader's: a finetuning run cannot resume "
                             "it; start finetuning from it with checkpoint.init_from=<it> checkpoint.resume=null")  # fmt: skip
        if state["records"] != len(self.records) or state["seed"] != self.seed:
            raise ValueError(f"the checkpoint was finetuned on {state['records']} records with seed {state['seed']}, "
                             f"this run has {len(self.records)} with seed {self.seed}: the same rows cannot follow; "
                             "resume with the same data.instructions and trainer.seed")  # fmt: skip
        self._consumed = int(state["consumed"])
        self._skipped = merge_ranges([(int(a), int(b)) for a, b in state.get("skipped", [])])

"""Read an offline wandb run file (``run-<id>.wandb``) record by record, as wandb sync would.

wandb up to 0.17 shipped a Python reader of this file (``wandb.sdk.internal.datastore``); 0.31 reads it
only in its Go core, so the framing is decoded here. The file is wandb's transaction log: a 7-byte header
(``:W&B``, magic 0xBEE1, version 0) and then LevelDB log records (32 KiB blocks; each chunk a CRC-32 of its
type byte and data, a length and a type: full, or first/middle/last of a record split across blocks).
Every record's CRC is checked, and each record is parsed with wandb's own protobuf class
``wandb.proto.wandb_internal_pb2.Record``, so what the tests read is what a sync would upload.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

_BLOCK = 32768
_HEADER = struct.Struct("<IHB")  # crc32, data length, chunk type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_CRC_SEED = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}


def records(path: Path):
    """Yield every ``wandb_internal_pb2.Record`` of the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack_from("<4sHB", data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a wandb transaction log"
    pos, pending = 7, b""
    while pos + _HEADER.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER.size:  # the block's tail is zero padding
            pos += left_in_block
            continue
        crc, length, kind = _HEADER.unpack_from(data, pos)
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += left_in_block
            continue
        chunk = data[pos + _HEADER.size : pos + _HEADER.size + length]
        assert zlib.crc32(chunk, _CRC_SEED[kind]) & 0xFFFFFFFF == crc, f"{path}: bad CRC at byte {pos}"
        pos += _HEADER.size + length
        pending += chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@dataclass
class WandbRun:
    """What the dashboard of one offline run would show."""

    run_id: str = ""
    name: str = ""
    group: str = ""
    history: list[dict] = field(default_factory=list)
    """One dict per logged row: ``_step`` and every logged key."""
    config: dict = field(default_factory=dict)

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every row holding ``key``: the points of that chart."""
        return [(row["_step"], row[key]) for row in self.history if key in row]


def read_run(path: Path) -> WandbRun:
    """The run, history and config of an offline run file (or of the single ``*.wandb`` in a directory)."""
    path = Path(path)
    if path.is_dir():
        (path,) = path.glob("*.wandb")
    run = WandbRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name, run.group = record.run.run_id, record.run.display_name, record.run.run_group
            run.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                row[key] = json.loads(item.value_json)
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            run.history.append(row)
    return run

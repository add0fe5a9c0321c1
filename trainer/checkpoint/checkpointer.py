"""Distributed checkpoints: everything a run needs to continue, saved and loaded under any layout.

Layout of ``checkpoint.dir`` (default ``<run_dir>/checkpoints``):

    step_00000100/       complete: DCP files (.metadata, __<rank>_<n>.distcp), tokenizer.model, meta.json
    step_00000200.tmp/   being written, or left by a crash: never loaded, removed at the next start

What goes where:
- DCP (tensors, sharded, reshardable on load): ``model`` and ``optimizer`` state dicts, keyed by parameter
  name (``get_model_state_dict`` / ``get_optimizer_state_dict``), so a checkpoint saved under one layout
  loads under another.
- ``meta.json`` (plain JSON, no pickles; ``trainer.checkpoint.meta.CheckpointMeta``): step, token count,
  LR-scheduler state, data-loader state, RNG states, the resolved config, the wandb run id, the tokenizer's
  file name, and the size of every file in the directory so that a truncated or missing file is named
  before anything is loaded.
- ``tokenizer.model``: the run's tokenizer, so a checkpoint is evaluated or exported on its own.

Atomicity: everything is written under ``step_N.tmp`` and renamed to ``step_N`` only once the DCP
metadata (written last by DCP's coordinator) and meta.json are on disk; a crash mid-save leaves the
previous checkpoint untouched and loadable.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from model.config import ModelArgs
from trainer.checkpoint.config import CheckpointConfig
from trainer.checkpoint.dcp import load_tensors, single_process_dcp, tensor_state
from trainer.checkpoint.meta import META, TOKENIZER, CheckpointError, CheckpointMeta

logger = logging.getLogger(__name__)

_COMPLETE = re.compile(r"^step_(\d{8})$")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The step of a complete checkpoint directory (``step_00000100`` -> 100)."""
    return int(_COMPLETE.match(Path(path).name).group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _COMPLETE.match(p.name)]
    return sorted(found, key=step_of)


def checkpoints_under(outputs: Path) -> list[Path]:
    """Every complete checkpoint step directory of every run under ``outputs``."""
    return [step for root in outputs.glob("**/checkpoints") for step in complete_checkpoints(root)]


def newest(steps: list[Path]) -> Path:
    """The step directory written last (by its meta.json's time)."""
    return max(steps, key=lambda s: (s / META).stat().st_mtime)


def resolve_checkpoint(spec: str, *, outputs: Path = Path("outputs")) -> Path:
    """The step directory ``spec`` means: itself if it holds meta.json; the newest complete step of a run
    directory or of its ``checkpoints/``; ``latest``: the newest complete step under ``outputs``."""
    if spec == "latest":
        steps = checkpoints_under(outputs)
        if not steps:
            raise CheckpointError(f"checkpoint=latest: no complete checkpoint under {outputs}/; train one first "
                                  "(make train) or pass checkpoint=<dir>")  # fmt: skip
        return newest(steps)
    path = Path(spec)
    if (path / META).is_file():
        return path
    for root in (path / "checkpoints", path):
        steps = complete_checkpoints(root)
        if steps:
            return steps[-1]
    raise CheckpointError(f"checkpoint={spec}: neither a checkpoint (no {META}) nor a directory holding complete "
                          "checkpoints; pass a step directory (.../checkpoints/step_00000200) or a run directory")  # fmt: skip


def _encode_rng() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


@dataclass
class _Pending:
    future: Any
    tmp: Path
    final: Path
    meta: CheckpointMeta


class Checkpointer:
    """Saves checkpoints during a run and restores one at its start. Every method is collective."""

    def __init__(self, cfg: CheckpointConfig, *, run_dir: Path, tokenizer: Optional[Path] = None):
        """
        Args:
            tokenizer: the run's sentencepiece model, copied into every checkpoint (a few hundred KB) so
                that evaluating or exporting one needs nothing else.
        """
        self.cfg = cfg
        self.tokenizer = Path(tokenizer) if tokenizer is not None else None
        self.root = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self._pending: Optional[_Pending] = None
        # Async writes run their collectives from a background thread; a group of their own keeps them
        # from interleaving with the training loop's collectives on the default group.
        self._async_group = dist.new_group(backend="gloo") if cfg.async_save and dist.is_initialized() else None
        if _is_rank0():
            self._remove_leftovers()
        _barrier()

    def _remove_leftovers(self) -> None:
        if self.root.is_dir():
            for tmp in self.root.glob("step_*.tmp"):
                logger.warning("removing incomplete checkpoint %s (left by an interrupted save)", tmp)
                shutil.rmtree(tmp, ignore_errors=True)

    # --- resume ---------------------------------------------------------------------------------------

    def resume_path(self) -> Optional[Path]:
        """The checkpoint to resume from, per ``checkpoint.resume``; None to start fresh."""
        if self.cfg.resume is None:
            return None
        if self.cfg.resume == "auto":
            found = complete_checkpoints(self.root)
            return found[-1] if found else None
        path = Path(self.cfg.resume)
        CheckpointMeta.read(path)  # an explicit path must be usable: fail now, naming it
        return path

    def load(self, path: Path, *, model, optimizer, scheduler, loader, args: ModelArgs) -> CheckpointMeta:
        """Restore model, optimizer, scheduler, loader and RNG from ``path``; returns its meta."""
        started = time.perf_counter()
        meta = load_tensors(path, model=model, optimizer=optimizer, args=args)
        if meta.scheduler is None or meta.loader is None:
            raise CheckpointError(f"checkpoint {path} holds weights only (step {meta.step}): it cannot be resumed; "
                                  f"start from it with checkpoint.init_from={path} checkpoint.resume=null")  # fmt: skip
        scheduler.load_state_dict(meta.scheduler)
        loader.load_state_dict(meta.loader)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if len(meta.rng) == (dist.get_world_size() if dist.is_initialized() else 1):
            torch.set_rng_state(_decode_rng(meta.rng[rank]))  # per-rank streams only mean something at equal size
        logger.info("resumed from %s (step %d, %d tokens) in %.2f s", path, meta.step, meta.tokens,
                    time.perf_counter() - started)  # fmt: skip
        return meta

    def load_model_only(self, path: Path, *, model, args: ModelArgs) -> None:
        """Take just the weights from ``path`` (``checkpoint.init_from``)."""
        load_tensors(path, model=model, optimizer=None, args=args)
        logger.info("initialised the model from %s", path)

    # --- save -----------------------------------------------------------------------------------------

    def save(self, *, step: int, tokens: int, model, optimizer, scheduler, loader, run_config: dict,
             wandb_id: Optional[str]) -> float:  # fmt: skip
        """Write a checkpoint of ``step``; returns the seconds training was stalled by it."""
        started = time.perf_counter()
        self.wait()
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        loader_states = _all_gather(loader.state_dict())
        # The loader's state is global counters, the same on every rank; a difference is a bug upstream.
        assert all(s == loader_states[0] for s in loader_states), "data-loader states differ between ranks"
        meta = CheckpointMeta(
            step=step, tokens=tokens, time=time.time(), world_size=dist.get_world_size() if dist.is_initialized() else 1,
            scheduler=scheduler.state_dict(), loader=loader_states[0], rng=_all_gather(_encode_rng()),
            config=run_config, wandb_id=wandb_id,
        )  # fmt: skip
        state = tensor_state(model, optimizer)
        if self.cfg.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group)
            self._pending = _Pending(future=future, tmp=tmp, final=final, meta=meta)
        else:
            with single_process_dcp():
                dcp.save(state, checkpoint_id=str(tmp))
            self._finalize(tmp=tmp, final=final, meta=meta)
            _barrier()
        stall = time.perf_counter() - started
        logger.info("checkpoint of step %d %s (training stalled %.2f s)", step,
                    "staged; writing in the background" if self.cfg.async_save else f"saved to {final}", stall)  # fmt: skip
        return stall

    def poll(self) -> None:
        """Finish a background save whose files are all written (cheap; call once per step)."""
        if self._pending is not None and self._pending.future.done():
            self._complete_pending()

    def wait(self) -> None:
        """Block until a background save has finished (before the next save, and at the end).

        A collective on every rank, whether or not this rank still has a save pending: ``poll`` completes
        saves rank by rank as their writes finish, so ``_pending`` differs between ranks, and a barrier
        taken only where it is set would pair with another collective elsewhere (a deadlock seen under
        load: rank 0's next-save barrier matched rank 1's wait barrier).
        """
        if self._pending is not None:
            self._complete_pending()
        _barrier()

    def _complete_pending(self) -> None:
        pending, self._pending = self._pending, None
        pending.future.result()  # re-raises a failed write
        self._finalize(tmp=pending.tmp, final=pending.final, meta=pending.meta)

    def _finalize(self, *, tmp: Path, final: Path, meta: CheckpointMeta) -> None:
        """Rank 0: add the tokenizer, write meta.json last, then make the checkpoint visible by renaming."""
        if not _is_rank0():
            return
        if self.tokenizer is not None:
            shutil.copyfile(self.tokenizer, tmp / TOKENIZER)
            meta.tokenizer = TOKENIZER
        meta.write(tmp)
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.info("checkpoint %s complete", final)
        self._prune(keep=final)

    def _prune(self, *, keep: Path) -> None:
        if self.cfg.keep_last_k == 0:
            return
        for old in complete_checkpoints(self.root)[: -self.cfg.keep_last_k]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

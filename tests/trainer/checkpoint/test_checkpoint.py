"""Checkpoints: exact resume, resharding, damaged checkpoints, atomicity, retention, async save.

Reference runs (tests/conftest.py ``reference_run``) train 10 steps with the cosine's length pinned, so
a run stopped at step 4 and resumed follows the same schedule as an uninterrupted one.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launch.harness import LAYOUTS, checkpoints, final_weights, losses, run_layout
from model.config import ModelArgs
from model.llama import Transformer
from tests.conftest import PINNED_SCHEDULE, REFERENCE_STEPS
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.config import CheckpointConfig
from trainer.checkpoint.meta import CheckpointError, CheckpointMeta
from trainer.run.records import TrainResult

CUT = 4


def weights_in_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's model weights in this process with plain DCP (no process group)."""
    args = ModelArgs(**{**json.loads((path / "meta.json").read_text())["config"]["model"], "attn_backend": "sdpa"})
    model = Transformer(args)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    return state["model"]


def train(name: str, *, workdir: Path, steps: int, run_name: str, extra: tuple[str, ...] = ()) -> Path:
    return run_layout(LAYOUTS[name], workdir=workdir, steps=steps, run_name=run_name, extra=(*PINNED_SCHEDULE, *extra))


@pytest.mark.parametrize("name", ["single", "fsdp2", "fsdp2_tp2"])
def test_interrupted_and_resumed_equals_uninterrupted_bitwise(name, reference_run):
    workdir, run = reference_run.workdir, f"{name}_resumed"
    first = train(name, workdir=workdir, steps=CUT, run_name=run)
    assert checkpoints(first) == ["step_00000004"]
    second = train(name, workdir=workdir, steps=REFERENCE_STEPS, run_name=run)  # resume: auto
    summary = TrainResult.read(second)
    assert summary.first_step == CUT + 1
    full = reference_run(name)
    assert losses(second) == losses(full)[CUT:]  # bitwise: same arithmetic, same order
    for key, value in final_weights(full).items():
        assert torch.equal(final_weights(second)[key], value), key
    assert summary.tokens == TrainResult.read(full).tokens


def test_resume_under_other_layouts(reference_run):
    """Saved by FSDP 2 at step 4, resumed by TP 2 and by one process: the weights load exactly, and the
    losses continue as the uninterrupted FSDP 2 run's (the data order included, although the data-parallel
    degree changes from 2 to 1)."""
    workdir = reference_run.workdir
    saved = train("fsdp2", workdir=workdir, steps=CUT, run_name="reshard_source") / "checkpoints" / "step_00000004"
    expected = weights_in_checkpoint(saved)
    reference = losses(reference_run("fsdp2"))[CUT:]
    for target in ("tp2", "single"):
        # max_steps == CUT: nothing trains, so final_model.pt is exactly what the new layout loaded.
        loaded = train(target, workdir=workdir, steps=CUT, run_name=f"reshard_{target}",
                       extra=(f"checkpoint.resume={saved}",))  # fmt: skip
        for key, value in expected.items():
            assert torch.equal(final_weights(loaded)[key], value), (target, key)
        resumed = train(target, workdir=workdir, steps=REFERENCE_STEPS, run_name=f"reshard_{target}",
                        extra=(f"checkpoint.resume={saved}",))  # fmt: skip
        # Another layout sums in another order: equal to fp32 rounding, as in the loss-compare test.
        for got, want in zip(losses(resumed), reference, strict=True):
            assert abs(got - want) <= 1e-5 * want, (target, losses(resumed), reference)


def test_damaged_and_incompatible_checkpoints_are_refused_by_name(reference_run, tmp_path):
    source = reference_run("single") / "checkpoints" / f"step_{REFERENCE_STEPS:08d}"
    meta = CheckpointMeta.read(source)

    def copy(tag: str) -> Path:
        subprocess.run(["cp", "-r", str(source), str(tmp_path / tag)], check=True)
        return tmp_path / tag

    no_meta = copy("meta")
    (no_meta / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=f"{no_meta} is incomplete or damaged: meta.json is missing"):
        CheckpointMeta.read(no_meta)
    truncated = copy("truncated")
    shard = next(truncated.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{truncated} is damaged: file {shard.name} has 100 bytes"):
        CheckpointMeta.read(truncated)
    missing = copy("missing")
    (missing / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=rf"{missing} is damaged: file .metadata is missing"):
        CheckpointMeta.read(missing)
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=128)
    with pytest.raises(CheckpointError, match=r"different model shape \(model.n_layers: checkpoint 2 vs config 3\)"):
        meta.check_model_matches(args, path=source)


def test_training_refuses_a_damaged_checkpoint_instead_of_loading_part_of_it(reference_run):
    workdir = reference_run.workdir
    run = workdir / "damaged_run"
    subprocess.run(["cp", "-r", str(reference_run("single")), str(run)], check=True)
    shard = next((run / "checkpoints" / f"step_{REFERENCE_STEPS:08d}").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(RuntimeError, match=rf"step_{REFERENCE_STEPS:08d} is damaged: file __0_0.distcp"):
        train("single", workdir=workdir, steps=REFERENCE_STEPS + 2, run_name="damaged_run")
    with pytest.raises(RuntimeError, match="checkpoint /nonexistent/step_00000004 does not exist"):
        train("single", workdir=workdir, steps=2, run_name="bad_path", extra=("checkpoint.resume=/nonexistent/step_00000004",))


def test_a_crash_while_saving_leaves_the_previous_checkpoint_in_use(reference_run, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(reference_run("single") / "checkpoints" / f"step_{REFERENCE_STEPS:08d}"),
                    str(ckpts / "step_00000004")], check=True)  # fmt: skip
    partial = ckpts / "step_00000006.tmp"  # a later save that died half-way
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 10)
    checkpointer = Checkpointer(CheckpointConfig(), run_dir=tmp_path / "run")
    assert checkpointer.resume_path() == ckpts / "step_00000004"
    assert not partial.exists()  # removed at start-up, never loaded


def test_keep_last_k_and_async_save(reference_run):
    workdir = reference_run.workdir
    run = train("fsdp2", workdir=workdir, steps=5, run_name="keep_async",
                extra=("checkpoint.every_steps=1", "checkpoint.keep_last_k=2", "checkpoint.async_save=true"))  # fmt: skip
    assert checkpoints(run) == ["step_00000004", "step_00000005"]
    assert len(TrainResult.read(run).checkpoint_stall_s) == 5
    # An asynchronously written checkpoint resumes exactly like a synchronous one.
    resumed = train("fsdp2", workdir=workdir, steps=REFERENCE_STEPS, run_name="keep_async")
    assert losses(resumed) == losses(reference_run("fsdp2"))[5:]


def test_periodic_checkpoints_by_time_and_by_default(tiny_overrides, tmp_path):
    """every_minutes saves by wall-clock time (here: after every step), keep_last_k bounds what stays; and
    a run that is not told otherwise checkpoints periodically (the quickstart half-way, 1000 steps else)."""
    from conf.schema import to_config
    from tests.conftest import compose_config
    from launch.train import train as train_in_process

    cfg = to_config(compose_config([*tiny_overrides, "trainer.max_steps=4", "trainer.eval_every=0",
                                    "optim.warmup_steps=1", "logging.wandb_mode=disabled",
                                    "checkpoint.every_steps=0", "checkpoint.every_minutes=1e-6",
                                    "checkpoint.keep_last_k=2", "checkpoint.save_final=false"]))  # fmt: skip
    result = train_in_process(cfg, run_dir=tmp_path / "timed")
    assert len(result.checkpoint_stall_s) == 4  # one per step: each step took longer than 60 us
    assert checkpoints(tmp_path / "timed") == ["step_00000003", "step_00000004"]
    defaults = to_config(compose_config([]))
    assert (defaults.checkpoint.every_steps, defaults.checkpoint.every_minutes) == (100, 60.0)  # quickstart
    assert (CheckpointConfig().every_steps, CheckpointConfig().every_minutes) == (1000, 60.0)
    with pytest.raises(ValueError, match="checkpoint.every_minutes"):
        CheckpointConfig(every_minutes=-1)


def test_resumed_run_continues_the_same_wandb_run(reference_run):
    workdir = reference_run.workdir
    offline = ("logging.wandb_mode=offline",)
    run = train("single", workdir=workdir, steps=2, run_name="wandb_resume", extra=offline)
    train("single", workdir=workdir, steps=3, run_name="wandb_resume", extra=offline)
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one directory per process start ...
    assert len({p.name.rsplit("-", 1)[1] for p in runs}) == 1  # ... both of the same wandb run id


def _load_full_optimizer_state(rank: int, world_size: int, path: str, out: str, tp: int) -> None:
    """Load ``path`` with the trainer's own code under TP=``tp`` and write the full optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from trainer.checkpoint.dcp import load_tensors
    from trainer.parallel.config import ParallelConfig
    from trainer.run.config import OptimConfig
    from trainer.run.optim import build_optimizer
    from trainer.parallel.dims import ParallelDims
    from trainer.parallel.build import build_model

    meta = json.loads((Path(path) / "meta.json").read_text())
    args = ModelArgs(**meta["config"]["model"])
    parallel = ParallelConfig(tp=tp)
    dims = ParallelDims.from_config(parallel, world_size=world_size).with_meshes(device_type="cpu")
    model = build_model(args, device=torch.device("cpu"), seed=0, dims=dims, parallel=parallel)
    optimizer = build_optimizer(model, OptimConfig())
    load_tensors(Path(path), model=model, optimizer=optimizer, args=args)
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full["state"], out)


def test_resharded_load_restores_the_same_optimizer_values(reference_run, tmp_path):
    """Adam's moments saved by FSDP 2, loaded by TP 2, equal those loaded by one process, tensor for tensor."""
    from tests.distributed import run_workers

    path = reference_run("fsdp2") / "checkpoints" / f"step_{REFERENCE_STEPS:08d}"
    run_workers(_load_full_optimizer_state, world_size=1, args=(str(path), str(tmp_path / "one.pt"), 1))
    run_workers(_load_full_optimizer_state, world_size=2, args=(str(path), str(tmp_path / "tp2.pt"), 2))
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    tp2 = torch.load(tmp_path / "tp2.pt", weights_only=True)
    assert one.keys() == tp2.keys() and len(one) == 21
    for name, moments in one.items():
        assert moments["exp_avg_sq"].abs().max() > 0, name  # real state, not a freshly zeroed one
        for key, value in moments.items():
            assert torch.equal(tp2[name][key], value), (name, key)


def test_checkpoints_with_per_group_optimizer_hyperparameters_still_load(reference_run, tmp_path):
    """Checkpoints saved before pipeline parallelism keyed the optimizer's hyperparameters per group
    (``optimizer.param_groups.0.lr``); they load as they did, to the same optimizer state as today's."""
    import shutil

    from trainer.checkpoint.dcp import load_tensors, single_process_dcp, tensor_state
    from trainer.run.config import OptimConfig
    from trainer.run.optim import build_optimizer

    saved = reference_run("single") / "checkpoints" / f"step_{REFERENCE_STEPS:08d}"
    args = ModelArgs(**json.loads((saved / "meta.json").read_text())["config"]["model"])

    def loaded(path: Path) -> tuple[dict, list]:
        model = Transformer(args)
        optimizer = build_optimizer(model, OptimConfig())
        load_tensors(path, model=model, optimizer=optimizer, args=args)
        return optimizer.state_dict()["state"], optimizer.state_dict()["param_groups"]

    want_state, want_groups = loaded(saved)
    old = tmp_path / "old_format"
    shutil.copytree(saved, old)
    for item in old.iterdir():  # the tensors again, nested as before; meta.json and the rest kept
        if item.suffix in (".distcp", ".metadata") or item.name == ".metadata":
            item.unlink()
    model = Transformer(args)
    optimizer = build_optimizer(model, OptimConfig())
    load_tensors(saved, model=model, optimizer=optimizer, args=args)
    with single_process_dcp():
        dcp.save(tensor_state(model, optimizer, flat_optimizer=False), checkpoint_id=str(old))
    (old / "meta.json").unlink()
    CheckpointMeta.read(saved).write(old)  # its record of the files' sizes, as the trainer writes it last
    assert any(".param_groups.0." in line for line in _metadata_keys(old))  # really the old layout
    got_state, got_groups = loaded(old)
    assert [{k: v for k, v in g.items()} for g in got_groups] == want_groups
    for index, moments in want_state.items():
        for key, value in moments.items():
            assert torch.equal(got_state[index][key], value), (index, key)


def _metadata_keys(path: Path) -> list[str]:
    from trainer.checkpoint.dcp import SafeFileSystemReader

    return list(SafeFileSystemReader(path).read_metadata().state_dict_metadata)


def test_waiting_for_a_background_save_is_a_collective_on_every_rank(tmp_path, monkeypatch):
    """``poll`` finishes background saves rank by rank, so one rank may have nothing pending when another
    still has; ``wait`` must reach its barrier on both, or the ranks' next collectives pair up wrongly."""
    import trainer.checkpoint.checkpointer as checkpoint

    barriers = []
    monkeypatch.setattr(checkpoint, "_barrier", lambda: barriers.append(1))
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path / "ckpt")), run_dir=tmp_path)
    assert ckpt._pending is None
    barriers.clear()
    ckpt.wait()
    assert barriers == [1]

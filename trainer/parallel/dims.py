"""The parallel layout, validated once, and the device meshes built from it: the one owner of the layout.

Every process has a ``ParallelDims``, one process included (``ParallelDims.single()``); components ask it
what they need (``dims.tp_enabled``, ``dims.tp_mesh``, ``dims.dp_mesh``) instead of receiving meshes,
flags and degrees separately.

Mesh axes (names used everywhere else):
- ``dp_replicate``: HSDP replicas; gradients all-reduced across it.
- ``dp_shard``: FSDP; parameters, gradients and optimizer state sharded across it.
- ``tp``: tensor + sequence parallelism (Megatron layout); innermost, so a TP group is made of
  consecutive ranks, i.e. on one node when tp <= GPUs per node.
- ``dp`` (flattened ``dp_replicate`` x ``dp_shard``): ranks that see different data; the data loader and
  the global token count use it.
- ``pp``: pipeline stages, outermost (stages on different nodes); present only where ``pp`` > 1, so the
  other layouts' meshes are unchanged. Composes with FSDP/HSDP and TP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from compat import flatten_mesh
from model.config import ModelArgs

if TYPE_CHECKING:  # the config's module imports activation_checkpointing, which imports this one
    from trainer.parallel.config import ParallelConfig

AXES = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Meshes:
    """The meshes each component needs, built once from the layout."""

    world: DeviceMesh
    fsdp: DeviceMesh
    """(dp_replicate, dp_shard): FSDP shards over the second axis and, for HSDP, replicates over the first."""
    dp: DeviceMesh
    """The two flattened: ranks that see different data (loader, token count, loss)."""
    tp: DeviceMesh
    pp: Optional[DeviceMesh] = None
    """The pipeline axis, where ``pp`` > 1."""


def check_tp_divides(*, tp: int, args: ModelArgs, seq_len: int) -> None:
    """Tensor parallelism splits heads, kv heads and the vocabulary, and sequence parallelism every
    sequence, evenly across the ``tp`` ranks: the one check of both (the layout and the memory formulas)."""
    for key, value in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
                       ("vocab_size", args.vocab_size)):  # fmt: skip
        if value % tp:
            raise ValueError(
                f"model.{key}={value} is not divisible by parallel.tp={tp}: tensor parallelism splits it "
                f"evenly across ranks; choose a tp that divides it"
            )
    if seq_len % tp:
        raise ValueError(
            f"data.seq_len={seq_len} is not divisible by parallel.tp={tp}: sequence parallelism splits "
            f"each sequence evenly across the tp ranks; choose a seq_len that is a multiple of {tp}"
        )


@dataclass(frozen=True)
class ParallelDims:
    """The layout of ``world_size`` processes, validated on construction: ``dp_shard=-1`` is resolved to what
    the other degrees leave, and the degrees must multiply to the world size."""

    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    fsdp_one_rank: bool = False
    """FSDP even at data-parallel degree 1 (``parallel.fsdp.one_rank``)."""
    pp: int = 1
    """Pipeline stages (``parallel.pp``)."""
    meshes: Optional[Meshes] = dataclasses.field(default=None, compare=False, repr=False)
    """Set by ``with_meshes``; None for one process without FSDP (nothing to communicate), or before."""

    def __post_init__(self) -> None:
        for key in ("dp_replicate", "tp", "world_size", "pp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if self.dp_shard == -1:
            rest, remainder = divmod(self.world_size, self.dp_replicate * self.tp * self.pp)
            if remainder or rest < 1:
                raise ValueError(
                    f"parallel.pp={self.pp} x parallel.dp_replicate={self.dp_replicate} x parallel.tp={self.tp} does not "
                    f"divide the world size {self.world_size}: choose degrees whose product divides the number of processes"
                )
            object.__setattr__(self, "dp_shard", rest)  # frozen: resolved once, here
        if self.pp * self.dp_replicate * self.dp_shard * self.tp != self.world_size:
            raise ValueError(
                f"parallel.pp={self.pp} x parallel.dp_replicate={self.dp_replicate} x parallel.dp_shard={self.dp_shard} x "
                f"parallel.tp={self.tp} = {self.pp * self.dp_replicate * self.dp_shard * self.tp}, but the world size is "
                f"{self.world_size}: make the product equal the number of processes (or set parallel.dp_shard=-1)"
            )

    @classmethod
    def single(cls) -> ParallelDims:
        """One process, nothing parallel."""
        return cls(dp_replicate=1, dp_shard=1, tp=1, world_size=1)

    @classmethod
    def from_config(cls, cfg: ParallelConfig, *, world_size: int) -> ParallelDims:
        """The layout ``parallel.*`` asks for over ``world_size`` processes (no meshes yet)."""
        return cls(dp_replicate=cfg.dp_replicate, dp_shard=cfg.dp_shard, tp=cfg.tp, world_size=world_size,
                   fsdp_one_rank=cfg.fsdp.one_rank, pp=cfg.pp)  # fmt: skip

    @classmethod
    def for_run(cls, cfg: ParallelConfig, *, world_size: int, model: ModelArgs, seq_len: int) -> ParallelDims:
        """``from_config`` plus the checks that the model and the sequence length split over the layout:
        every error a layout can give before anything is built (training and the planner alike)."""
        dims = cls.from_config(cfg, world_size=world_size)
        check_tp_divides(tp=dims.tp, args=model, seq_len=seq_len)
        if dims.pp_enabled:
            _check_pipeline(cfg, dims=dims, n_layers=model.n_layers)
        return dims

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp > 1 or self.fsdp_one_rank

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def pp_mesh(self) -> Optional[DeviceMesh]:
        return None if self.meshes is None else self.meshes.pp

    def pp_rank(self) -> int:
        """This process's pipeline stage (0 without pipelining)."""
        return 0 if self.pp_mesh is None else self.pp_mesh.get_local_rank()

    @property
    def needs_meshes(self) -> bool:
        """Whether anything communicates (or FSDP runs over a mesh of one)."""
        return self.world_size > 1 or self.fsdp_one_rank

    @property
    def dp_mesh(self) -> Optional[DeviceMesh]:
        return None if self.meshes is None else self.meshes.dp

    @property
    def fsdp_mesh(self) -> Optional[DeviceMesh]:
        return None if self.meshes is None else self.meshes.fsdp

    @property
    def tp_mesh(self) -> Optional[DeviceMesh]:
        return None if self.meshes is None else self.meshes.tp

    def dp_rank(self) -> int:
        """This process's index among the data-parallel ranks (0 for one process)."""
        return 0 if self.meshes is None else self.meshes.dp.get_local_rank()

    def with_meshes(self, *, device_type: str) -> ParallelDims:
        """These dims with their meshes built (a collective: every rank calls it; needs a process group
        where ``needs_meshes``). The world mesh (dp_replicate, dp_shard, tp), with pp outermost where pp > 1,
        and its sub-meshes."""
        if not self.needs_meshes or self.meshes is not None:
            return self
        if self.pp_enabled:  # a fourth, outermost axis; without it the mesh is exactly the three-axis one
            world = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                     mesh_dim_names=("pp", *AXES))  # fmt: skip
        else:
            world = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=AXES)
        fsdp = world["dp_replicate", "dp_shard"]
        # Keep the handle flattening returns: slicing a flattened axis back out of the root is deprecated.
        meshes = Meshes(world=world, fsdp=fsdp, dp=flatten_mesh(fsdp, "dp"), tp=world["tp"],
                        pp=world["pp"] if self.pp_enabled else None)  # fmt: skip
        return dataclasses.replace(self, meshes=meshes)


def _check_pipeline(cfg: ParallelConfig, *, dims: ParallelDims, n_layers: int) -> None:
    """The pipeline's stages fit the model and compose with the layout (trainer/parallel/pipeline.py)."""
    virtual = cfg.pp_stages_per_rank
    if n_layers < dims.pp * virtual:
        raise ValueError(f"model.n_layers={n_layers} cannot fill parallel.pp={dims.pp} x {virtual} stages per rank: each "
                         "stage needs at least one block")  # fmt: skip

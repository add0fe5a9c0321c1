"""Hugging Face interop: export a checkpoint to a ``LlamaForCausalLM`` directory, import one to continue pre-training.

The command line is ``python -m launch.hf export|import`` (launch/hf.py).

Export writes ``config.json``, one consolidated ``model.safetensors`` and, when the checkpoint's meta.json
names a sentencepiece model, ``tokenizer.model`` + ``tokenizer_config.json`` + ``special_tokens_map.json``.
Import reads ``config.json`` and ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``)
and writes a DCP checkpoint ``{"model": ...}`` + meta.json, usable as ``checkpoint.init_from``.

Two conventions differ between the codebases:
- Names: Meta's (``layers.0.attention.wq.weight``) vs Hugging Face's (``model.layers.0.self_attn.q_proj.weight``).
- RoPE: we rotate interleaved pairs (x[2i], x[2i+1]); Hugging Face rotates (x[i], x[i + D/2]) (``rotate_half``).
  Permuting the rows of wq and wk within each head turns one into the other (q.k is invariant under the
  same permutation of q and k, and wv/wo are untouched), as transformers' ``convert_llama_weights_to_hf.py``
  does.

Nothing here unpickles arbitrary objects: weights come from safetensors or DCP, the rest from JSON, and
DCP's pickled ``.metadata`` is read by an unpickler that only builds DCP's own metadata classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp

from model.config import ModelArgs
from model.llama import Transformer
from trainer.checkpoint.dcp import load_tensors, single_process_dcp
from trainer.checkpoint.meta import TOKENIZER, CheckpointMeta

logger = logging.getLogger(__name__)

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_MODEL = "tokenizer.model"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# --- state dicts ------------------------------------------------------------------------------------------

# (ours, Hugging Face's) per-layer suffixes; wq and wk additionally need the RoPE row permutation.
_LAYER_NAMES = (
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
)
_GLOBAL_NAMES = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)


def _name_pairs(args: ModelArgs) -> Iterator[tuple[str, str, Optional[int]]]:
    """(our name, HF name, heads to permute over or None) for every parameter."""
    for ours, hf in _GLOBAL_NAMES:
        yield ours, hf, None
    heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}
    for i in range(args.n_layers):
        for ours, hf in _LAYER_NAMES:
            yield f"layers.{i}.{ours}", f"model.layers.{i}.{hf}", heads.get(ours)


def _interleaved_to_half(w: torch.Tensor, *, n_heads: int) -> torch.Tensor:
    """Rows of each head from pair order (x0 y0 x1 y1 ...) to half order (x0 x1 ... y0 y1 ...): (H*D, d)."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def _half_to_interleaved(w: torch.Tensor, *, n_heads: int) -> torch.Tensor:
    """Inverse of ``_interleaved_to_half``: (H*D, d)."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def _check_keys(sd: dict[str, torch.Tensor], expected: list[str], *, what: str) -> None:
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our (full, unsharded) state dict -> ``LlamaForCausalLM``'s: renamed, wq/wk rows permuted."""
    pairs = list(_name_pairs(args))
    _check_keys(sd, [ours for ours, _, _ in pairs], what="state dict")
    return {
        hf: sd[ours] if heads is None else _interleaved_to_half(sd[ours], n_heads=heads) for ours, hf, heads in pairs
    }


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM``'s state dict -> ours; the exact inverse of ``to_hf_state_dict``."""
    pairs = list(_name_pairs(args))
    _check_keys(hf_sd, [hf for _, hf, _ in pairs], what="Hugging Face state dict")
    return {
        ours: hf_sd[hf] if heads is None else _half_to_interleaved(hf_sd[hf], n_heads=heads)
        for ours, hf, heads in pairs
    }


# --- configs ----------------------------------------------------------------------------------------------


def hf_config(
    args: ModelArgs, *, dtype: torch.dtype = torch.float32, bos_token_id: Optional[int] = 1,
    eos_token_id: Optional[int] = 2,
) -> dict[str, Any]:  # fmt: skip
    """``LlamaConfig`` fields (``config.json``) describing the same architecture as ``args``.

    transformers 5 reads RoPE from ``rope_parameters`` and the dtype from ``dtype``; 4.x reads the top-level
    ``rope_theta`` and ``torch_dtype``. Both are written so either (and vLLM etc.) load the directory.
    """
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "hidden_act": "silu", "rms_norm_eps": args.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta}, "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "initializer_range": args.init_std, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "dtype": _DTYPE_NAMES[dtype], "torch_dtype": _DTYPE_NAMES[dtype], "use_cache": True,
    }  # fmt: skip


# (multiple_of, ffn_dim_multiplier) of Meta's models (256 with 1.0; Llama 2 70B: 4096 with 1.3) and our
# default, tried first so an imported Meta-shaped model gets the same fields as our presets.
_FFN_CANDIDATES = ((256, 1.0), (4096, 1.3), (ModelArgs.multiple_of, 1.0))


def _ffn_fields(*, dim: int, n_heads: int, intermediate_size: int) -> tuple[int, float]:
    """(multiple_of, ffn_dim_multiplier) for which ``ModelArgs.ffn_hidden_dim == intermediate_size``."""

    def hidden(multiple_of: int, multiplier: float) -> int:
        args = ModelArgs(dim=dim, n_heads=n_heads, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
        return args.ffn_hidden_dim

    if intermediate_size <= 0:
        raise ValueError(f"config.json: intermediate_size must be positive, got {intermediate_size}")
    # With multiple_of = I the hidden size is I whenever 0 < 8d/3 * multiplier <= I: multiplier 1.0 when
    # 8d/3 <= I, else the largest float not above I / (8d/3).
    exact = Fraction(3 * intermediate_size, 8 * dim)
    multiplier = 1.0 if exact >= 1 else float(exact)
    candidates = [*_FFN_CANDIDATES, (intermediate_size, multiplier)]
    if exact < 1:  # ModelArgs reads the multiplier through its decimal repr; step down if that rounds up
        candidates += [(intermediate_size, multiplier := math.nextafter(multiplier, 0.0)) for _ in range(4)]
    for multiple_of, mult in candidates:
        if hidden(multiple_of, mult) == intermediate_size:
            return multiple_of, mult
    raise ValueError(
        f"config.json: no (multiple_of, ffn_dim_multiplier) gives intermediate_size={intermediate_size} "
        f"for hidden_size={dim}"
    )


def args_from_hf_config(cfg: dict[str, Any]) -> ModelArgs:
    """``ModelArgs`` for a ``LlamaConfig`` dict; raises ValueError naming the key for what we cannot express."""
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json: model_type is {cfg['model_type']!r}; only 'llama' can be imported")
    unsupported = {
        "hidden_act": (cfg.get("hidden_act", "silu"), "silu"),
        "attention_bias": (cfg.get("attention_bias", False), False),
        "mlp_bias": (cfg.get("mlp_bias", False), False),
    }
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    unsupported["rope_parameters.rope_type"] = (rope.get("rope_type", rope.get("type", "default")), "default")
    for key, (value, ours) in unsupported.items():
        if value != ours:
            raise ValueError(f"config.json: {key}={value!r} is not supported (our LLaMA has {key}={ours!r})")
    try:
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        n_kv_heads = cfg.get("num_key_value_heads") or n_heads
        if cfg.get("head_dim") not in (None, dim // n_heads):
            raise ValueError(f"config.json: head_dim={cfg['head_dim']} must equal hidden_size / num_attention_heads")
        multiple_of, multiplier = _ffn_fields(dim=dim, n_heads=n_heads, intermediate_size=cfg["intermediate_size"])
        return ModelArgs(
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
            vocab_size=cfg["vocab_size"],
            multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            init_std=cfg.get("initializer_range", 0.02),
        )
    except KeyError as err:
        raise ValueError(f"config.json: required key {err.args[0]!r} is missing") from err


def _model_fields(args: ModelArgs) -> dict[str, Any]:
    fields = dataclasses.asdict(args)
    fields["attn_backend"] = args.attn_backend.value
    return fields


# --- our checkpoints --------------------------------------------------------------------------------------


def _load_checkpoint(checkpoint_dir: Path) -> tuple[Transformer, ModelArgs, CheckpointMeta]:
    meta = CheckpointMeta.read(checkpoint_dir)
    args = meta.model_args(path=checkpoint_dir)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_buffers(device=torch.device("cpu"))  # the RoPE table is not in checkpoints
    with single_process_dcp():
        load_tensors(checkpoint_dir, model=model, optimizer=None, args=args)
    return model, args, meta


def load_model_from_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[Transformer, ModelArgs]:
    """The model of a checkpoint directory, on the CPU in fp32; no process group needed.

    Raises CheckpointError (a ValueError) naming the directory when meta.json or the DCP files are unusable.
    """
    model, args, _ = _load_checkpoint(Path(checkpoint_dir))
    return model, args


# --- export -----------------------------------------------------------------------------------------------


def _safetensors() -> ModuleType:
    try:
        import safetensors.torch
    except ImportError as err:  # an optional dependency: only this module needs it
        raise ImportError("Hugging Face export/import needs safetensors: pip install -e '.[dev]'") from err
    return safetensors.torch


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def _staging_dir(final: Path) -> Path:
    """An empty ``<final>.tmp`` next to ``final``: a name reserved for this; a crashed run's leftover is removed."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _tokenizer_files(sp_model: Path, *, args: ModelArgs) -> tuple[dict[str, dict[str, Any]], dict[str, Optional[int]]]:
    """tokenizer_config.json and special_tokens_map.json for ``LlamaTokenizer``, and the bos/eos ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    if sp.vocab_size() > args.vocab_size:
        raise ValueError(
            f"tokenizer {sp_model} has {sp.vocab_size()} tokens, more than model.vocab_size={args.vocab_size}"
        )
    ids = {role: i for role, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())) if i >= 0}
    special = {f"{role}_token": sp.id_to_piece(i) for role, i in ids.items()}
    # Our data pipeline wraps documents as BOS + text + EOS; HF adds BOS when encoding, as LLaMA's does.
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer", **special, "pad_token": None, "add_bos_token": True,
        "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False,
        "model_max_length": args.max_seq_len, "sp_model_kwargs": {},
    }  # fmt: skip
    files = {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special}
    return files, {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos")}


def export_hf(
    checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write a Hugging Face ``LlamaForCausalLM`` directory for a checkpoint; returns ``out_dir``.

    Args:
        dtype: of the written weights (float32 or bfloat16).
        overwrite: write into a non-empty ``out_dir``, replacing the files of the same names (others are
            left alone). Without it a non-empty ``out_dir`` is an error.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise ValueError(
            f"{out_dir} exists and is not an empty directory; pass --overwrite (overwrite=True) to write into it"
        )
    model, args, meta = _load_checkpoint(checkpoint_dir)
    sp_model = meta.tokenizer_path(path=checkpoint_dir)
    if sp_model is None:
        logger.warning("checkpoint %s holds no tokenizer (%s): exported without one", checkpoint_dir,
                       "none recorded" if not meta.tokenizer else f"{meta.tokenizer} is missing")  # fmt: skip
    tokenizer_json, special_ids = _tokenizer_files(sp_model, args=args) if sp_model is not None else ({}, {})

    staging = _staging_dir(out_dir)
    weights = {k: v.to(dtype).contiguous() for k, v in to_hf_state_dict(model.state_dict(), args).items()}
    del model  # for bf16, the fp32 weights (at most two copies of the model are alive)
    # transformers refuses safetensors files whose metadata lacks format "pt".
    _safetensors().save_file(weights, staging / HF_WEIGHTS, metadata={"format": "pt"})
    del weights
    _write_json(staging / HF_CONFIG, hf_config(args, dtype=dtype, **special_ids))
    if sp_model is not None:
        shutil.copyfile(sp_model, staging / TOKENIZER_MODEL)
    for name, content in tokenizer_json.items():
        _write_json(staging / name, content)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in staging.iterdir():  # each file appears whole: a crash never leaves a truncated one in out_dir
        os.replace(file, out_dir / file.name)
    staging.rmdir()
    logger.info("exported %s (step %s) to %s", checkpoint_dir, meta.step, out_dir)
    return out_dir


# --- import -----------------------------------------------------------------------------------------------


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, or of the shards its index lists. Pickled ``.bin`` files are not read."""
    load_file = _safetensors().load_file
    if (hf_dir / HF_WEIGHTS).is_file():
        return load_file(hf_dir / HF_WEIGHTS)
    if not (hf_dir / HF_WEIGHTS_INDEX).is_file():
        raise ValueError(
            f"{hf_dir} has neither {HF_WEIGHTS} nor {HF_WEIGHTS_INDEX}; only safetensors weights are imported "
            "(re-save the model with save_pretrained(..., safe_serialization=True))"
        )
    shards = sorted(set(_read_json(hf_dir / HF_WEIGHTS_INDEX).get("weight_map", {}).values()))
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        if Path(shard).name != shard:
            raise ValueError(f"{hf_dir / HF_WEIGHTS_INDEX} names shard {shard!r} outside the directory")
        sd.update(load_file(hf_dir / shard))
    return sd


def import_hf(hf_dir: str | os.PathLike, out_checkpoint_dir: str | os.PathLike) -> Path:
    """Write a checkpoint (DCP ``{"model": ...}`` in fp32 + meta.json) from a Hugging Face LLaMA directory.

    The checkpoint holds weights only (step 0, no optimizer state): use it as ``checkpoint.init_from``. It
    is written to ``<out>.tmp`` and renamed, so ``out_checkpoint_dir`` is either complete or absent.
    """
    hf_dir, out = Path(hf_dir), Path(out_checkpoint_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory; choose a new checkpoint directory")
    cfg = _read_json(hf_dir / HF_CONFIG)
    args = args_from_hf_config(cfg)
    hf_sd = {k: v for k, v in _read_hf_weights(hf_dir).items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in hf_sd:
        hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"].clone()  # our output head is untied
    # fp32: the trainer keeps fp32 parameters (FSDP casts to the compute dtype) and DCP loads in place.
    sd = {k: v.to(torch.float32).contiguous() for k, v in from_hf_state_dict(hf_sd, args).items()}
    del hf_sd
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    wrong = {k: (tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if sd[k].shape != v.shape}
    if wrong:
        raise ValueError(f"{hf_dir}: weight shapes do not match config.json (stored, expected): {wrong}")

    staging = _staging_dir(out)
    with single_process_dcp():
        dcp.save({"model": sd}, checkpoint_id=str(staging), no_dist=True)
    meta = CheckpointMeta(step=0, config={"model": _model_fields(args)})
    if (hf_dir / TOKENIZER_MODEL).is_file():
        shutil.copyfile(hf_dir / TOKENIZER_MODEL, staging / TOKENIZER)
        meta.tokenizer = TOKENIZER
    meta.write(staging)
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(staging, out)
    logger.info("imported %s to %s", hf_dir, out)
    return out

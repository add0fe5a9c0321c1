"""Hugging Face interop: exported checkpoints give LlamaForCausalLM our logits, imported ones give ours HF's.

transformers is a test-only dependency (the ``dev`` extra); every model here is random, tiny and local.
"""

import json
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launch.hf import main
from model.config import ModelArgs
from model.llama import Transformer
from trainer.checkpoint.meta import TOKENIZER, CheckpointMeta
from trainer.checkpoint.hf_interop import (
    _model_fields,
    args_from_hf_config,
    export_hf,
    from_hf_state_dict,
    hf_config,
    import_hf,
    load_model_from_checkpoint,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

# fp32 on both sides, same math in a different order (rotate_half vs pairs, HF's SDPA vs ours, another
# RMSNorm cast order): the differences are a few ulp of O(1) logits through 2 layers, ~1e-6. 1e-5 (absolute,
# with the same relative) leaves a margin while a RoPE convention or norm-mapping error is >1e-2.
ATOL = RTOL = 1e-5
# Our checkpoints are written by one process on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def small_args(**overrides) -> ModelArgs:
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=128, multiple_of=32, max_seq_len=64,
                  norm_eps=1e-5, rope_theta=5000.0)  # fmt: skip
    return ModelArgs(**{**fields, **overrides})


@torch.no_grad()
def random_model(args: ModelArgs, *, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    for name, p in model.named_parameters():  # norms off 1, so a swapped attention/ffn norm shows in the logits
        if name.endswith("norm.weight"):
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def write_checkpoint(model: Transformer, path, *, tokenizer_path=None) -> None:
    """A weights-only checkpoint as the trainer's format has it (its tokenizer copied in, if given)."""
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path), no_dist=True)
    meta = CheckpointMeta(step=7, config={"model": _model_fields(model.args)})
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, path / TOKENIZER)
        meta.tokenizer = TOKENIZER
    meta.write(path)


def tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.std() > 0.1  # guard: O(1) logits, so the tolerance is not met by near-zero values
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_exported_model_gives_our_logits_in_transformers(tmp_path, n_kv_heads):
    args = small_args(n_kv_heads=n_kv_heads)
    model = random_model(args)
    write_checkpoint(model, tmp_path / "ckpt")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == args.n_kv_heads and hf.config.intermediate_size == args.ffn_hidden_dim
    x = tokens(args.vocab_size)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert_logits_close(ours, theirs)

    # Control: the same weights without the wq/wk row permutation give other logits (the test sees RoPE).
    sd = model.state_dict()
    renamed = to_hf_state_dict(sd, args)
    for i in range(args.n_layers):
        for ours_name, hf_name in (("wq", "q_proj"), ("wk", "k_proj")):
            renamed[f"model.layers.{i}.self_attn.{hf_name}.weight"] = sd[f"layers.{i}.attention.{ours_name}.weight"]
    hf.load_state_dict(renamed)
    with torch.no_grad():
        assert (hf(x).logits - ours).abs().max() > 1e-3


@pytest.mark.parametrize("sharded", [False, True])
def test_imported_hf_model_gives_its_logits_in_ours(tmp_path, sharded):
    # intermediate_size 160 < 8/3 * 64: no (multiple_of, 1.0) reproduces it, so a multiplier < 1 is derived.
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB" if sharded else "1GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == sharded

    out = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt.tmp").exists()
    model, args = load_model_from_checkpoint(out)
    assert (args.dim, args.n_kv_heads, args.ffn_hidden_dim, args.rope_theta) == (64, 2, 160, 5000.0)
    CheckpointMeta.read(out).check_model_matches(args, path=out)  # what checkpoint.init_from checks before loading
    x = tokens(args.vocab_size)
    with torch.no_grad():
        assert_logits_close(model.eval()(x), hf(x).logits)


def test_state_dict_and_config_round_trips_are_exact():
    for args in (small_args(), small_args(n_kv_heads=1, n_heads=8), small_args(dim=96, n_heads=3)):
        sd = {k: torch.randn(v.shape) for k, v in Transformer(args).state_dict().items()}
        hf_sd = to_hf_state_dict(sd, args)
        assert all(k.startswith(("model.", "lm_head.")) for k in hf_sd)
        back = from_hf_state_dict(hf_sd, args)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
        assert not torch.equal(hf_sd["model.layers.0.self_attn.q_proj.weight"], sd["layers.0.attention.wq.weight"])
        again = args_from_hf_config(hf_config(args))
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps",
                      "rope_theta", "max_seq_len"):  # fmt: skip
            assert getattr(again, field) == getattr(args, field), field


@pytest.mark.parametrize("dim", [64, 96, 512, 4096, 8192])
def test_ffn_fields_reproduce_any_intermediate_size(dim):
    for intermediate in (1, 37, 160, 170, 171, 192, 1376, 5632, 11008, 14336, 28672):
        cfg = hf_config(small_args(dim=dim, n_heads=4)) | {"intermediate_size": intermediate}
        assert args_from_hf_config(cfg).ffn_hidden_dim == intermediate
    meta_7b = args_from_hf_config(hf_config(small_args(dim=4096, n_heads=32, multiple_of=256)))
    assert (meta_7b.multiple_of, meta_7b.ffn_dim_multiplier, meta_7b.ffn_hidden_dim) == (256, 1.0, 11008)


@pytest.mark.parametrize(
    "change, key",
    [({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type"),
     ({"attention_bias": True}, "attention_bias"), ({"model_type": "mistral"}, "model_type"),
     ({"hidden_size": None}, "hidden_size")],
)  # fmt: skip
def test_unsupported_hf_configs_are_named(change, key):
    cfg = {k: v for k, v in (hf_config(small_args()) | change).items() if v is not None}
    with pytest.raises(ValueError, match=key):
        args_from_hf_config(cfg)


def test_export_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path):
    write_checkpoint(random_model(small_args()), tmp_path / "ckpt")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"{out} exists and is not an empty directory"):
        export_hf(tmp_path / "ckpt", out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_hf(tmp_path / "ckpt", out, overwrite=True, dtype=torch.bfloat16)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_unusable_checkpoints_raise_value_errors_naming_them(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_checkpoint(random_model(small_args()), ckpt)
    (ckpt / "meta.json").rename(tmp_path / "meta.json")
    with pytest.raises(ValueError, match=f"{ckpt} .*meta.json is missing"):
        load_model_from_checkpoint(ckpt)
    (tmp_path / "meta.json").rename(ckpt / "meta.json")
    for file in ckpt.glob("*.distcp"):
        file.unlink()
    with pytest.raises(ValueError, match=f"{ckpt} is damaged: file __0_0.distcp is missing"):
        load_model_from_checkpoint(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "files": {}}))  # no sizes recorded: DCP itself fails
    with pytest.raises(ValueError, match=f"checkpoint {ckpt} could not be loaded"):
        load_model_from_checkpoint(ckpt)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('pwned')",))


def test_dcp_metadata_is_not_unpickled_freely(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_checkpoint(random_model(small_args()), ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    # A forger records the forged file's size too: the size check passes, the unpickler must refuse.
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][".metadata"] = (ckpt / ".metadata").stat().st_size
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="builtins.exec is not allowed"):
        load_model_from_checkpoint(ckpt)
    assert not (tmp_path / "pwned").exists()


def train_sentencepiece(path) -> None:
    from data.tokenizer import LLAMA_TRAINER_SETTINGS

    lines = [f"def f{i}(x):\n    return x * {i} + {i * 7}  # the answer is {i % 5}" for i in range(300)]
    lines += ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."] * 20
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=320,
                                       minloglevel=2, **LLAMA_TRAINER_SETTINGS)  # fmt: skip


def test_tokenizer_is_exported_and_loads_in_transformers(tmp_path):
    train_sentencepiece(tmp_path / "sp.model")
    args = small_args(vocab_size=384)  # a model vocabulary padded past the tokenizer's 320
    write_checkpoint(random_model(args), tmp_path / "ckpt", tokenizer_path=str(tmp_path / "sp.model"))
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")

    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "sp.model").read_bytes()
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert tok_cfg["add_bos_token"] and not tok_cfg["add_eos_token"]
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == 1

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    hf_tok = transformers.LlamaTokenizer.from_pretrained(out)
    # Not text that starts with whitespace: LlamaTokenizer's Metaspace skips sentencepiece's dummy prefix
    # there (" x" -> "▁x", not "▁▁x"), upstream https://github.com/huggingface/transformers/pull/47700.
    texts = ("def f12(x):\n    return  x * 3", "The lazy fox, 2024 dozen jugs!", "héllo wörld ☃", "end  \n\n\ttab ")
    for text in texts:
        assert hf_tok.encode(text) == [1, *sp.encode(text)], text

    # ...and it travels through an import, inside the new checkpoint and named by its meta.json.
    ckpt = import_hf(out, tmp_path / "imported")
    meta = CheckpointMeta.read(ckpt)
    assert meta.tokenizer == "tokenizer.model" and (ckpt / "tokenizer.model").read_bytes() == (tmp_path / "sp.model").read_bytes()


def test_a_trained_checkpoint_exports_with_its_tokenizer(reference_run, tmp_path):
    """The checkpoint `make train` (here: the trainer, one process) writes carries the run's tokenizer, and
    the export of it is a complete Hugging Face directory."""
    run = reference_run("single")
    ckpt = run / "checkpoints" / "step_00000010"
    meta = CheckpointMeta.read(ckpt)
    tokenizers = list((reference_run.workdir / "cache").rglob("tokenizer.model"))
    assert meta.tokenizer == "tokenizer.model" and len(tokenizers) == 1
    assert (ckpt / "tokenizer.model").read_bytes() == tokenizers[0].read_bytes()
    out = export_hf(ckpt, tmp_path / "hf")
    assert (out / "tokenizer.model").read_bytes() == tokenizers[0].read_bytes()
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in out.iterdir()
    }
    hf_tok = transformers.LlamaTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizers[0]))
    assert hf_tok.encode("def f(x):\n    return x") == [sp.bos_id(), *sp.encode("def f(x):\n    return x")]


def test_command_line(tmp_path, capsys):
    write_checkpoint(random_model(small_args()), tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert "checkpoint.init_from=" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    back, _ = load_model_from_checkpoint(tmp_path / "back")
    original, _ = load_model_from_checkpoint(tmp_path / "ckpt")
    for k, v in original.state_dict().items():  # through bf16 and back: equal to bf16 rounding
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16).float()), k

"""``data.document_mask=true`` in training: the switch reaches the loader, every forward gets its batch's
document ids, and the step's loss is that of the documents kept apart."""

from __future__ import annotations

import torch

from conf.schema import to_config
from data import PackedLoader
from launch.train import train
from model.config import ModelArgs
from model.llama import Transformer
from tests.conftest import compose_config
from tests.data.conftest import tiny_tokenizer_path  # noqa: F401  (the fixture the corpus below needs)
from tests.data.test_loader import prepared  # noqa: F401  (a corpus of ~40-token documents)
from trainer.run.step import ComputeContext, token_loss_sum


def test_a_training_run_with_document_mask_gives_the_model_document_ids(tiny_overrides, tmp_path, monkeypatch):
    seen = []
    original = Transformer.forward

    def spy(self, tokens, cache=None, documents=None):
        seen.append(documents is not None)
        return original(self, tokens, cache=cache, documents=documents)

    monkeypatch.setattr(Transformer, "forward", spy)
    common = [*tiny_overrides, "trainer.max_steps=2", "trainer.eval_every=0", "logging.wandb_mode=disabled"]
    train(to_config(compose_config([*common, "data.document_mask=true"])), run_dir=tmp_path / "masked")
    assert seen and all(seen)
    seen.clear()
    train(to_config(compose_config(common)), run_dir=tmp_path / "plain")
    assert seen and not any(seen)


def test_the_step_loss_keeps_the_loaders_documents_apart(prepared):  # noqa: F811
    """On short documents (~40 tokens) in 64-token windows: the loss of a document-masked batch is the sum of
    each document's loss computed alone, and differs from LLaMA's unmasked loss on the same tokens."""
    batch = next(PackedLoader(prepared, seq_len=64, batch_size=2, document_mask=True))
    assert int(batch["documents"].max()) >= 1
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=prepared.vocab_size, multiple_of=16,
                                  max_seq_len=64))  # fmt: skip
    model.init_weights(seed=0)
    ctx = ComputeContext(device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        masked = token_loss_sum(model, batch, ctx=ctx)
        plain = token_loss_sum(model, {k: batch[k] for k in ("inputs", "labels")}, ctx=ctx)
        alone = sum(token_loss_sum(model, {"inputs": batch["inputs"][r:r + 1, w], "labels": batch["labels"][r:r + 1, w]},
                                   ctx=ctx)
                    for r in range(2) for d in batch["documents"][r].unique() for w in [batch["documents"][r] == d])  # fmt: skip
    torch.testing.assert_close(masked, alone, rtol=1e-6, atol=0)
    assert abs(masked.item() - plain.item()) > 1e-3

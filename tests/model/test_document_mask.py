"""Documents packed into one sequence, kept apart: positions restart per document, no token attends across a
boundary, and the packed batch gives each document's own logits and gradients, as if it ran alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.attention import _math_attention, document_attention, document_mask, document_positions
from model.config import AttnBackend, ModelArgs
from model.llama import Transformer

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=32)
DOCS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])


def model(seed: int = 0) -> Transformer:
    net = Transformer(ARGS)
    net.init_weights(seed=seed)
    return net


def test_positions_restart_where_a_document_begins():
    assert document_positions(DOCS).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]
    # ids need only change at a boundary: any values, not necessarily 0, 1, 2
    assert document_positions(torch.tensor([[7, 7, 3, 3, 3, 9]])).tolist() == [[0, 1, 0, 1, 2, 0]]


def test_attention_probabilities_are_zero_across_a_boundary():
    """A toy input: the probabilities each query gives the keys are block-diagonal and causal, and sum to 1."""
    docs = torch.tensor([[0, 0, 1, 1, 1]])
    allowed = document_mask(docs)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    q, k = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    probs = torch.softmax((q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~allowed, float("-inf")), dim=-1)[0, 0]
    assert torch.all(probs[~expected] == 0) and torch.all(probs[expected] > 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))


def test_sdpa_and_the_plain_ops_reference_agree():
    q, k, v = torch.randn(2, 12, 4, 16), torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    sdpa = document_attention(q, k, v, documents=DOCS, backend=AttnBackend.sdpa)
    math = document_attention(q, k, v, documents=DOCS, backend=AttnBackend.math)
    torch.testing.assert_close(sdpa, math, rtol=1e-5, atol=1e-6)
    # one document is plain causal attention
    one = document_attention(q, k, v, documents=torch.zeros(2, 12, dtype=torch.long), backend=AttnBackend.math)
    torch.testing.assert_close(one, _math_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2))


def _alone(net: Transformer, tokens: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Each document of each row run by itself, the logits put back in the packed places."""
    out = torch.empty(*tokens.shape, ARGS.vocab_size)
    for row in range(tokens.shape[0]):
        for doc in docs[row].unique():
            where = docs[row] == doc
            out[row, where] = net(tokens[row:row + 1, where])[0]
    return out


def test_a_packed_sequence_gives_each_documents_own_logits():
    net = model()
    tokens = torch.randint(0, ARGS.vocab_size, DOCS.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # fp32; the same arithmetic but for the shapes of the GEMMs and the attention: ~6e-7 measured
        torch.testing.assert_close(net(tokens, documents=DOCS), _alone(net, tokens, DOCS), rtol=0, atol=1e-5)
        changed = tokens.clone()
        changed[0, :3] = (changed[0, :3] + 1) % ARGS.vocab_size  # the first document of row 0 only
        before, after = net(tokens, documents=DOCS), net(changed, documents=DOCS)
    assert torch.equal(before[0, 3:], after[0, 3:])  # nothing of it reaches the later documents
    assert not torch.equal(before[0, :3], after[0, :3])


def _loss_and_grads(net, tokens, labels, docs=None):
    net.zero_grad(set_to_none=True)
    logits = net(tokens) if docs is None else net(tokens, documents=docs)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gradients_equal_the_documents_run_one_by_one(dtype):
    net = model().to(dtype)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, ARGS.vocab_size, DOCS.shape, generator=gen)
    labels = torch.randint(0, ARGS.vocab_size, DOCS.shape, generator=gen)
    labels[DOCS == 0] = -100  # e.g. prompts: no loss
    packed_loss, packed = _loss_and_grads(net, tokens, labels, DOCS)
    total_loss, total = torch.zeros(()), {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for row in range(2):
        for doc in DOCS[row].unique():
            where = DOCS[row] == doc
            loss, grads = _loss_and_grads(net, tokens[row:row + 1, where], labels[row:row + 1, where])
            total_loss += loss.float()
            for n in total:
                total[n] += grads[n]
    # fp32: <= 1e-6 relative to the gradient's size; bf16: the documents' own rounding (measured ~2e-3)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert packed_loss.float().item() == pytest.approx(total_loss.item(), rel=tol)
    for name, grad in packed.items():
        assert total[name].float().norm() > 1e-3, name
        assert ((grad.float() - total[name].float()).norm() / total[name].float().norm()).item() <= tol, name


def test_masked_labels_give_exactly_zero_gradient():
    """Prompt tokens masked from the loss (-100) contribute nothing: the logits' gradient is exactly zero at
    them, and the parameters' gradients, through every hand-written backward of the model (RMSNorm, SwiGLU,
    attention), are those of the loss over the response positions alone."""
    net = model()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, ARGS.vocab_size, DOCS.shape, generator=gen)
    labels = torch.randint(0, ARGS.vocab_size, DOCS.shape, generator=gen)
    masked = labels.clone()
    masked[:, :4] = -100
    _, grads = _loss_and_grads(net, tokens, masked, DOCS)
    net.zero_grad(set_to_none=True)
    logits = net(tokens, documents=DOCS)
    F.cross_entropy(logits[:, 4:].flatten(0, 1), labels[:, 4:].flatten(), reduction="sum").backward()
    for name, param in net.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-6, atol=1e-7)
    logits = logits.detach().requires_grad_()
    F.cross_entropy(logits.flatten(0, 1), masked.flatten(), ignore_index=-100, reduction="sum").backward()
    assert torch.all(logits.grad[:, :4] == 0) and torch.all(logits.grad[:, 4:].abs().sum(-1) > 0)


def test_documents_are_checked():
    net = model()
    tokens = torch.zeros(2, 12, dtype=torch.long)
    with pytest.raises(ValueError, match=r"documents must be \(B, T\) = \(2, 12\) ids"):
        net(tokens, documents=DOCS[:, :5])


def test_document_boundaries_are_flash_attns_offsets():
    """What the GPU's variable-length kernel receives (tests/gpu/test_cuda_ops.py runs the kernel itself)."""
    from model.attention import document_boundaries

    cu_seqlens, max_len = document_boundaries(DOCS)
    assert cu_seqlens.tolist() == [0, 3, 7, 12, 18, 24] and cu_seqlens.dtype == torch.int32 and max_len == 6

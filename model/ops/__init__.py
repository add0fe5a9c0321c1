"""Transformer-layer ops with hand-written backward functions that choose what to save (LLaMA paper §2.4).

The LLaMA paper saves the activations that are expensive to compute (the outputs of linear layers) and
recomputes the cheap element-wise ones, by writing the layer's backward by hand. Each op here takes
``keep`` (model/ops/keep.py): ``Keep.matmul_outputs`` (the paper's "selective") saves only matmul
inputs/outputs, the attention kernel's output and log-sum-exp, and the RMSNorm input and reciprocal RMS,
and redoes element-wise work in backward; ``Keep.all`` saves the element-wise intermediates as well;
``Keep.ffn_input`` also reruns the feed-forward's up projections. The levels do the same arithmetic in
the same order, so they give bitwise-identical outputs and gradients; only memory differs. (On CPU. On CUDA the
flash attention backward accumulates with atomic adds, so any two runs, and the two modes, may differ in
the last bits: the GPU tests, tests/gpu/, compare with tolerances.) Each module's docstring states its
equations and exactly what it saves.

Under autocast (bf16 without FSDP) the ops follow autocast's rule for a matmul: inputs are cast to the
autocast dtype before the Function, which then runs with autocast off in forward and backward
(``model.ops.amp``). Under FSDP's bf16 parameters there is no autocast and the inputs already are bf16.

Implementation: plain ``torch.autograd.Function``s behind small functions. STYLE prefers
``torch.library.custom_op`` with ``register_fake``/``register_autograd`` for code that must run under
``torch.compile``; these Functions already compile (Dynamo traces an autograd.Function's forward and
backward: ``parallel.compile=true``, tested against eager in tests/trainer/parallel/test_activation_checkpointing.py).
A custom op's backward may only see what ``setup_context`` saves from the inputs and outputs, so the
intermediates of ``Keep.all`` (and swiglu's a, b) would have to become extra outputs;
that change of interface buys nothing while the Functions compile as they are.

The model (``model/llama.py``) runs every transformer layer through these ops; the tensor-parallel
variants, on local shards with explicit collectives, are in ``trainer/parallel/tensor_parallel.py``.
"""

from model.ops.attention import attention_core
from model.ops.keep import Keep
from model.ops.linear import linear
from model.ops.memory import SavedBytes, saved_activation_bytes, saved_bytes
from model.ops.rms_norm import rms_norm
from model.ops.swiglu import swiglu

__all__ = ["Keep", "SavedBytes", "attention_core", "linear", "rms_norm", "saved_activation_bytes", "saved_bytes", "swiglu"]

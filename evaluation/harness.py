"""Our checkpoints as an EleutherAI lm-evaluation-harness model (``llama_pretrain``).

    lm_eval --model llama_pretrain --model_args checkpoint=<dir> --tasks hellaswag --include_path <tasks>
    llama-lm-eval ...        # the same command line, for an environment without the hook (below)

    import lm_eval                                      # with the hook; or `import evaluation.harness` first
    lm_eval.simple_evaluate(model="llama_pretrain", model_args="checkpoint=<dir>,batch_size=16", tasks=[...])

lm-eval 0.4.13 finds models only in its own registry (there is no plugin entry point): the import hook of
``evaluation.lm_eval_hook`` (a ``.pth`` line that ``make install`` writes) adds ours to it whenever lm-eval
loads its models, so the bare ``lm_eval`` command sees it. ``llama-lm-eval`` (this module's ``main``) is
``lm_eval`` with ours registered first, for environments where the hook is not installed. A checkpoint
exported with ``python -m launch.hf export`` also runs under ``lm_eval --model hf`` itself
(``add_bos_token=True``, as our documents start with BOS); tests/evaluation/test_harness.py checks that the
two give the same log-likelihoods.

Requests go to ``evaluation.lm.LanguageModel``, the same code ``python -m launch.evaluate`` uses.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

import torch

import lm_eval.models  # noqa: F401  lm-eval fills its registry with its own models only while it is empty:
from lm_eval.api.model import LM  # registering ours first would hide "hf" and the rest

from evaluation import lm_eval_hook

from evaluation.checkpoints import build_language_model
from evaluation.config import EvalConfig, EvaluateConfig
from evaluation.sampling import GREEDY, Sampling
from trainer.run.config import Device, Precision

MODEL_NAME = lm_eval_hook.MODEL_NAME
logger = logging.getLogger(__name__)


GENERATION_ARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")
"""lm-eval's generation arguments this model honours; any other is refused, never ignored."""


def generation_settings(kwargs: dict, *, default_max: int, seed: int) -> tuple[list[str], int, Sampling]:
    """(stop strings, most new tokens, sampling) of one lm-eval ``generate_until`` request's arguments.

    ``do_sample`` false (or absent with no temperature) is greedy whatever the temperature, as in
    transformers; ``do_sample`` true with temperature 0 is greedy too. An argument this model does not
    implement raises ValueError naming it."""
    unknown = sorted(set(kwargs) - set(GENERATION_ARGS))
    if unknown:
        raise ValueError(f"llama_pretrain does not support the generation argument(s) {unknown} of this task; "
                         f"it honours {list(GENERATION_ARGS)}")  # fmt: skip
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(kwargs.get("max_gen_toks", default_max))
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    do_sample = bool(kwargs.get("do_sample", temperature > 0))
    if not do_sample or temperature == 0:
        return until, max_new, GREEDY
    return until, max_new, Sampling(temperature=temperature, top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                                    top_k=int(kwargs.get("top_k", 0) or 0), seed=seed)  # fmt: skip


class LlamaPretrainLM(LM):
    """``--model_args checkpoint=<dir>[,tokenizer=...,batch_size=8,device=auto,precision=auto,max_gen_toks=256,
    seed=1234]``. Sampled generations (a task's ``do_sample``/``temperature``/``top_p``/``top_k``) draw
    from one generator per request, seeded by ``seed`` and the request's index: a result is reproducible."""

    def __init__(self, checkpoint: str = "latest", tokenizer: Optional[str] = None, batch_size: Any = 8,
                 device: Optional[str] = None, precision: str = "auto", max_gen_toks: int = 256, seed: int = 1234,
                 **unused: Any):  # fmt: skip
        super().__init__()
        # lm-eval passes its --batch_size / --device through here (None when not given); "auto" batch sizes
        # are lm-eval's HF-specific search, so they fall back to our default.
        size = int(batch_size) if str(batch_size).isdigit() else 8
        # lm-eval's --device defaults to "cuda"; like its HF backend, fall back to the CPU without one.
        wants_cuda = str(device).startswith("cuda")
        if wants_cuda and not torch.cuda.is_available():
            logger.warning("device=%s but no CUDA device is visible: evaluating on the CPU", device)
        device_choice = Device.auto if device in (None, "auto") or wants_cuda else Device(device)
        cfg = EvaluateConfig(checkpoint=str(checkpoint), tokenizer=tokenizer, device=device_choice,
                             precision=Precision(precision), eval=EvalConfig(batch_size=size))  # fmt: skip
        self.lm, self.checkpoint = build_language_model(cfg)
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scored = self.lm.loglikelihood([tuple(r.args) for r in requests])
        return [(ll, greedy) for ll, greedy, _ in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [ll for ll, _ in self.lm.loglikelihood_rolling([r.args[0] for r in requests])]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for index, request in enumerate(requests):  # one at a time: each carries its own stops, length, sampling
            context, kwargs = request.args
            until, max_new, sampling = generation_settings(kwargs, default_max=self.max_gen_toks, seed=self.seed)
            out.extend(self.lm.generate_until([context], stops=[until], max_new_tokens=max_new, sampling=sampling,
                                              seeds=[index]))  # fmt: skip
        return out


# Registered as the lazy "evaluation.harness:LlamaPretrainLM" entry the import hook of lm_eval_hook makes,
# whichever comes first; one entry however this module is imported (also as __main__).
lm_eval_hook.register()


def main() -> None:
    """``lm_eval``'s command line, with ``llama_pretrain`` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()

"""The import hook behind ``lm_eval --model llama_pretrain`` (installed by ``evaluation.lm_eval_plugin``).

lm-eval 0.4.13 looks models up only in its own registry, which ``lm_eval.models`` fills, and has no
plugin entry point. The ``.pth`` line that ``python -m evaluation.lm_eval_plugin install`` writes calls
``install_hook`` at interpreter start: a finder that waits for ``lm_eval.models`` and, right after lm-eval
has registered its own models, adds ours as a lazy ``module:object`` entry. Nothing of lm-eval, torch or
ours is imported until a program imports ``lm_eval.models`` itself.

Imported at every interpreter start of the environment: ``sys`` only, everything else on use.
"""

from __future__ import annotations

import sys

MODEL_NAME = "llama_pretrain"
MODEL_TARGET = "evaluation.harness:LlamaPretrainLM"  # lm-eval's lazy "module:object" placeholder form
HOOKED_MODULE = "lm_eval.models"


def register() -> None:
    """Register ``llama_pretrain`` in lm-eval's model registry (lazily: nothing is imported until used).

    Call only after ``lm_eval.models`` has run: lm-eval registers its own models only into an empty
    registry, so an entry made earlier would hide ``hf`` and the rest.
    """
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegisterAfterImport:
    """A meta-path finder: finds ``lm_eval.models`` with the other finders and runs ``register`` after the
    module executes (on that spec's own loader instance: nothing else is affected)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != HOOKED_MODULE:
            return None
        spec = None
        for finder in sys.meta_path:  # the resolution Python would make without this finder
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            register()

        spec.loader.exec_module = exec_module
        sys.meta_path.remove(self)  # once is enough: the module is then in sys.modules
        return spec


def install_hook() -> None:
    """Called from the ``.pth`` line at interpreter start (idempotent)."""
    if HOOKED_MODULE in sys.modules:  # lm-eval's models already loaded: register directly
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())

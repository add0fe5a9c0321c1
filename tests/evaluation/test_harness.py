"""Our model in lm-evaluation-harness against lm-eval's own Hugging Face backend on the exported checkpoint.

One random small model with a real sentencepiece tokenizer, written as our checkpoint and exported with
``trainer.checkpoint.hf_interop``; three local lm-eval YAML tasks (multiple choice, rolling log-likelihood, greedy
generation) over JSONL files written here. ``simple_evaluate`` runs them with ``--model hf`` on the export
and with ``--model llama_pretrain`` on the checkpoint: every per-example log-likelihood agrees within 1e-4,
the accuracies and generations are identical; and ``python -m launch.evaluate`` on the same file in our
own layout gives the same log-likelihoods. The bare ``lm_eval`` command runs our checkpoint too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sentencepiece as spm

from data.tokenizer import LLAMA_TRAINER_SETTINGS
from tests.trainer.checkpoint.test_hf_interop import random_model, small_args, write_checkpoint
from trainer.checkpoint.hf_interop import export_hf

TOLERANCE = 1e-4  # fp32 on both sides: the same weights and tokens, GEMMs of other shapes (~1e-6 seen)

MC = [{"context": f"def f{i}(x):\n    return x * {i}", "choices": [" + 7", " # the answer", "\n", f" + {i * 7}"],
       "answer": i % 4} for i in range(8)]  # fmt: skip
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog. " * k} for k in (1, 3, 6)]
PROMPTS = [{"prompt": f"def f{i}(x):\n", "answers": ["    return x"]} for i in range(3)]


def train_text_only_sentencepiece(path: Path) -> None:
    """LLaMA's settings without byte fallback: a random model's greedy tokens then decode to valid text,
    so the generations compare as strings (sentencepiece and HF render invalid UTF-8 bytes differently)."""
    lines = [f"def f{i}(x):\n    return x * {i} + {i * 7}  # the answer is {i % 5}" for i in range(300)]
    lines += ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."] * 20
    settings = {**LLAMA_TRAINER_SETTINGS, "byte_fallback": False}
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=200, minloglevel=2,
                                       **settings)  # fmt: skip


def _task_yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    train_text_only_sentencepiece(root / "sp.model")
    model = random_model(small_args(vocab_size=200, max_seq_len=64))
    write_checkpoint(model, root / "ckpt", tokenizer_path=str(root / "sp.model"))
    export_hf(root / "ckpt", root / "hf")
    tasks = root / "tasks"
    tasks.mkdir()
    for name, rows in (("mc", MC), ("text", TEXTS), ("gen", PROMPTS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "mc.yaml").write_text(_task_yaml("ours_mc", root / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
    (tasks / "text.yaml").write_text(_task_yaml("ours_text", root / "text.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")))
    (tasks / "gen.yaml").write_text(_task_yaml("ours_gen", root / "gen.jsonl", (
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answers[0]}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    return root


@pytest.fixture(scope="module")
def both(setup):
    """lm-eval's samples and results for the HF export and for our checkpoint."""
    mp = pytest.MonkeyPatch()
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        mp.setenv(var, "1")
    mp.setenv("HF_DATASETS_CACHE", str(setup / "hf_datasets_cache"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    import evaluation.harness  # noqa: F401  (registers llama_pretrain)

    # HF with add_bos_token=True, as our documents start with BOS; except for rolling log-likelihoods, where
    # lm-eval already puts BOS before the first window, and a tokenizer that adds BOS itself (ours, like
    # Llama's, by default) would add a second one, scored as the text's first token: add_bos_token=False
    # there. Ours scores the text's own tokens after one BOS.
    hf = f"pretrained={setup / 'hf'},dtype=float32"
    runs = {}
    for name, model, model_args, tasks in (("hf", "hf", f"{hf},add_bos_token=True", ["ours_mc", "ours_gen"]),
                                           ("hf_rolling", "hf", f"{hf},add_bos_token=False", ["ours_text"]),
                                           ("ours", "llama_pretrain", f"checkpoint={setup / 'ckpt'}",
                                            ["ours_mc", "ours_text", "ours_gen"])):  # fmt: skip
        runs[name] = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                             task_manager=TaskManager(include_path=str(setup / "tasks"), include_defaults=False),
                                             batch_size=4, device="cpu")  # fmt: skip
    yield runs
    mp.undo()


def _by_doc(run: dict, task: str) -> list[dict]:
    return sorted(run["samples"][task], key=lambda s: s["doc_id"])


def test_multiple_choice_loglikelihoods_and_accuracies_equal_lm_evals_hf_backend(both):
    hf, ours = _by_doc(both["hf"], "ours_mc"), _by_doc(both["ours"], "ours_mc")
    assert len(hf) == len(ours) == len(MC)
    for a, b in zip(hf, ours):
        assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=TOLERANCE)
        assert [bool(r[1]) for r in a["filtered_resps"]] == [bool(r[1]) for r in b["filtered_resps"]]
    for metric in ("acc,none", "acc_norm,none"):
        assert both["hf"]["results"]["ours_mc"][metric] == both["ours"]["results"]["ours_mc"][metric]


def test_rolling_loglikelihoods_and_generations_equal_lm_evals_hf_backend(both):
    rolling_hf, rolling_ours = _by_doc(both["hf_rolling"], "ours_text"), _by_doc(both["ours"], "ours_text")
    assert len(rolling_hf) == len(TEXTS)
    for a, b in zip(rolling_hf, rolling_ours):  # the longest text spans three 64-token windows
        assert a["resps"][0][0] == pytest.approx(b["resps"][0][0], abs=TOLERANCE)
    gen_hf, gen_ours = _by_doc(both["hf"], "ours_gen"), _by_doc(both["ours"], "ours_gen")
    assert [s["filtered_resps"] for s in gen_hf] == [s["filtered_resps"] for s in gen_ours]
    assert any(s["filtered_resps"][0] for s in gen_ours)  # something was generated: the comparison has content


def test_our_own_runner_gives_the_same_loglikelihoods(both, setup, tmp_path):
    from evaluation.config import TaskConfig
    from evaluation.evaluate import run_task
    from evaluation.checkpoints import build_language_model
    from evaluation.config import EvaluateConfig

    lm, _ = build_language_model(EvaluateConfig(checkpoint=str(setup / "ckpt")))
    result = run_task("mc", TaskConfig(path=str(setup / "mc.jsonl"), format="multiple_choice"), lm, seed=0)
    for record, sample in zip(result["records"], _by_doc(both["hf"], "ours_mc")):
        assert [c["loglikelihood"] for c in record["candidates"]] == pytest.approx(
            [r[0][0] for r in sample["resps"]], abs=TOLERANCE)
    results = both["hf"]["results"]["ours_mc"]
    assert result["metrics"]["acc_none"] == results["acc,none"]
    assert result["metrics"]["acc_char"] == results["acc_norm,none"]


def test_the_lm_eval_command_line_runs_our_checkpoint(both, setup, tmp_path):
    """The bare ``lm_eval`` command of this environment (the console script lm-eval installs) finds
    ``llama_pretrain`` through the hook ``make install`` writes, and prints and saves its table."""
    import os
    import subprocess
    import sys

    from evaluation import lm_eval_plugin

    assert (lm_eval_plugin.site_packages() / lm_eval_plugin.PTH_NAME).exists(), (
        "the lm_eval hook is not installed in this environment: python -m evaluation.lm_eval_plugin install")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(setup / "hf_datasets_cache")}  # fmt: skip
    proc = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "llama_pretrain", "--model_args",
                           f"checkpoint={setup / 'ckpt'}", "--tasks", "ours_mc", "--include_path", str(setup / "tasks"),
                           "--batch_size", "4", "--output_path", str(tmp_path / "out")],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc = both["ours"]["results"]["ours_mc"]["acc,none"]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("|ours_mc"))
    assert f"{acc:.4f}".rstrip("0").rstrip(".") in row or f"{acc:.2f}" in row, (row, acc)
    written = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert written and written[0]["results"]["ours_mc"]["acc,none"] == acc

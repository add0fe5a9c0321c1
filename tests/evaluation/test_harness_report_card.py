"""The log-likelihood tasks of the report card (MMLU, SIQA, RACE, CrowS-Pairs, TruthfulQA MC1/MC2) against
lm-evaluation-harness's own task definitions run with ``--model hf`` on the exported checkpoint.

lm-eval's installed task files are included as they are (``include: <lm_eval>/tasks/siqa/siqa.yaml``), only
their dataset pointed at small local files written here (nothing is downloaded); our runner reads the same
rows in the public layouts (MMLU from Hendrycks' per-subject CSVs). Every per-candidate log-likelihood
agrees within 1e-4 and every accuracy is identical: the prompts, the shots and the scoring are lm-eval's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from evaluation.checkpoints import build_language_model
from evaluation.config import EvaluateConfig, TaskConfig
from evaluation.evaluate import run_task
from data.tokenizer import LLAMA_TRAINER_SETTINGS
from evaluation.layouts import TRUTHFULQA_PRIMER
from tests.evaluation.test_harness import TOLERANCE
from tests.trainer.checkpoint.test_hf_interop import random_model, small_args, write_checkpoint
from trainer.checkpoint.hf_interop import export_hf

WORDS = "the cat dog sat ran on a mat log red blue big small fox box jug".split()


def _sentence(i: int, n: int = 5) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


SIQA = [{"context": _sentence(i), "question": f"What did {WORDS[i]} do?", "answerA": _sentence(i + 1, 2),
         "answerB": _sentence(i + 2, 3), "answerC": _sentence(i + 3, 1), "label": str(1 + i % 3)} for i in range(6)]  # fmt: skip
RACE = [{"article": _sentence(i, 12), "problems": str([
    {"question": f"Who {_sentence(i + k, 2)}?", "options": [_sentence(i + k + j, 2) for j in range(4)], "answer": "ABCD"[(i + k) % 4]}
    for k in range(3)])} for i in range(4)]  # fmt: skip
MMLU_DEV = [{"question": f"{_sentence(i)}?", "subject": "anatomy", "choices": [_sentence(i + j, 1) for j in range(4)],
             "answer": i % 4} for i in range(5)]  # fmt: skip
MMLU_TEST = [{"question": f"{_sentence(i + 20)}?", "subject": "anatomy", "choices": [_sentence(i + j + 20, 2) for j in range(4)],
              "answer": (i + 1) % 4} for i in range(6)]  # fmt: skip
CROWS = [{"sent_more": _sentence(i, 6), "sent_less": _sentence(i + 5, 6), "stereo_antistereo": "stereo",
          "bias_type": ("gender", "age")[i % 2]} for i in range(6)]  # fmt: skip
TRUTHFUL = [{"question": f"{_sentence(i)}?", "mc1_targets": {"choices": [_sentence(i + j, 3) for j in range(3)], "labels": [1, 0, 0]},
             "mc2_targets": {"choices": [_sentence(i + j, 2) for j in range(4)], "labels": [1, 0, 1, 0]}}
            for i in range(5)]  # fmt: skip


def train_sentencepiece(path: Path) -> None:
    """LLaMA's settings without byte fallback (generations are not compared here, but the two tokenizers must
    agree): every character of the prompts is in the training text, so neither side meets an unknown one."""
    import string

    import sentencepiece as spm

    lines = [_sentence(i, 8) for i in range(200)] + [TRUTHFULQA_PRIMER, string.printable, "‘’"]
    lines += ["Q: A: Question: Answer: Article: The following are multiple choice questions (with answers) about"] * 20
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=200, minloglevel=2,
                                       **{**LLAMA_TRAINER_SETTINGS, "byte_fallback": False})  # fmt: skip


def _lm_eval_task(name: str, include: str, split: str, files: dict[str, Path], extra: str = "") -> str:
    import lm_eval

    base = Path(lm_eval.__file__).parent / "tasks" / include
    data_files = "".join(f"    {s}: {p}\n" for s, p in files.items())
    return (f"include: {base}\ntask: {name}\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n"
            f"  data_files:\n{data_files}{split}\n{extra}")  # fmt: skip


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_card")
    train_sentencepiece(root / "sp.model")
    # A window long enough for TruthfulQA's six-question prompt and MMLU's 5-shot prompts, uncut.
    write_checkpoint(random_model(small_args(vocab_size=200, max_seq_len=512)), root / "ckpt",
                     tokenizer_path=str(root / "sp.model"))  # fmt: skip
    export_hf(root / "ckpt", root / "hf")
    files = {name: _write(root / f"{name}.jsonl", rows) for name, rows in
             (("siqa", SIQA), ("race", RACE), ("mmlu_dev", MMLU_DEV), ("mmlu_test", MMLU_TEST), ("crows", CROWS),
              ("truthful", TRUTHFUL))}  # fmt: skip
    for split, rows in (("dev", MMLU_DEV), ("test", MMLU_TEST)):  # the same questions in Hendrycks' CSV layout
        (root / "mmlu" / split).mkdir(parents=True)
        with (root / "mmlu" / split / f"anatomy_{split}.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([[r["question"], *r["choices"], "ABCD"[r["answer"]]] for r in rows])
    tasks = root / "tasks"
    tasks.mkdir()
    yamls = {
        "rc_siqa": _lm_eval_task("rc_siqa", "siqa/siqa.yaml", "training_split: null\nvalidation_split: validation",
                                 {"validation": files["siqa"]}),
        "rc_race": _lm_eval_task("rc_race", "race/race.yaml", "test_split: test", {"test": files["race"]}),
        "rc_mmlu": _lm_eval_task("rc_mmlu", "mmlu/default/_default_template_yaml", "test_split: test\nfewshot_split: dev",
                                 {"test": files["mmlu_test"], "dev": files["mmlu_dev"]},
                                 "description: \"The following are multiple choice questions (with answers) about anatomy.\\n\\n\"\n"),
        "rc_crows": _lm_eval_task("rc_crows", "crows_pairs/crows_pairs_english.yaml", "test_split: test",
                                  {"test": files["crows"]}),
        "rc_mc1": _lm_eval_task("rc_mc1", "truthfulqa/truthfulqa_mc1.yaml", "validation_split: validation",
                                {"validation": files["truthful"]}, "tag: []\n"),
        "rc_mc2": _lm_eval_task("rc_mc2", "truthfulqa/truthfulqa_mc2.yaml", "validation_split: validation",
                                {"validation": files["truthful"]}, "tag: []\n"),
    }  # fmt: skip
    for name, text in yamls.items():
        (tasks / f"{name}.yaml").write_text(text)
    return root


@pytest.fixture(scope="module")
def lm_eval_hf(setup):
    mp = pytest.MonkeyPatch()
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        mp.setenv(var, "1")
    mp.setenv("HF_DATASETS_CACHE", str(setup / "hf_datasets_cache"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = {}
    for tasks, shots in ((["rc_siqa", "rc_race", "rc_crows", "rc_mc1", "rc_mc2"], 0), (["rc_mmlu"], 2)):
        results.update(lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={setup / 'hf'},dtype=float32,add_bos_token=True", tasks=tasks,
            num_fewshot=shots, log_samples=True, batch_size=4, device="cpu",
            task_manager=TaskManager(include_path=str(setup / "tasks"), include_defaults=False))["samples"])  # fmt: skip
    yield results
    mp.undo()


@pytest.fixture(scope="module")
def ours(setup):
    lm, _ = build_language_model(EvaluateConfig(checkpoint=str(setup / "ckpt")))
    tasks = {"rc_siqa": TaskConfig(path=str(setup / "siqa.jsonl"), format="siqa"),
             "rc_race": TaskConfig(path=str(setup / "race.jsonl"), format="race"),
             "rc_mmlu": TaskConfig(path=str(setup / "mmlu" / "test"), format="mmlu", num_fewshot=2, fewshot_first=True,
                                   fewshot_path=str(setup / "mmlu" / "dev")),
             "rc_crows": TaskConfig(path=str(setup / "crows.jsonl"), format="crows_pairs"),
             "rc_mc1": TaskConfig(path=str(setup / "truthful.jsonl"), format="truthfulqa_mc1"),
             "rc_mc2": TaskConfig(path=str(setup / "truthful.jsonl"), format="truthfulqa_mc2")}  # fmt: skip
    return {name: run_task(name, task, lm, seed=0) for name, task in tasks.items()}


@pytest.mark.parametrize("task", ["rc_siqa", "rc_race", "rc_mmlu", "rc_crows", "rc_mc1", "rc_mc2"])
def test_loglikelihoods_equal_lm_evals_hf_backend(lm_eval_hf, ours, task):
    samples = sorted(lm_eval_hf[task], key=lambda s: s["doc_id"])
    records = ours[task]["records"]
    assert len(samples) == len(records) > 0
    for sample, record in zip(samples, records):
        assert [c["loglikelihood"] for c in record["candidates"]] == pytest.approx(
            [r[0][0] for r in sample["resps"]], abs=TOLERANCE)


@pytest.mark.parametrize("task, theirs, mine", [
    ("rc_siqa", "acc", "acc_none"), ("rc_race", "acc", "acc_none"),
    ("rc_mmlu", "acc", "acc"), ("rc_crows", "pct_stereotype", "pct_stereotype"), ("rc_mc1", "acc", "acc"),
])  # fmt: skip
def test_accuracies_are_identical_per_example(lm_eval_hf, ours, task, theirs, mine):
    samples = sorted(lm_eval_hf[task], key=lambda s: s["doc_id"])
    got = [r[mine] for r in ours[task]["records"]]
    assert got == [s[theirs] for s in samples]
    assert 0 < sum(got) < len(got) or task == "rc_crows"  # right and wrong answers both occur: the check has content


def test_mc2_and_crows_pairs_differences_equal_lm_evals(lm_eval_hf, ours):
    mc2 = sorted(lm_eval_hf["rc_mc2"], key=lambda s: s["doc_id"])
    assert [r["mc2"] for r in ours["rc_mc2"]["records"]] == pytest.approx([s["acc"] for s in mc2], abs=1e-5)
    crows = sorted(lm_eval_hf["rc_crows"], key=lambda s: s["doc_id"])
    assert [r["likelihood_diff"] for r in ours["rc_crows"]["records"]] == pytest.approx(
        [s["likelihood_diff"] for s in crows], abs=2 * TOLERANCE)

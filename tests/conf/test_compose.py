"""Every option of every config group composes into the typed schema; bad keys and values fail early."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from conf.schema import Config, to_config
from tests.conftest import compose_config

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "data", "optim", "trainer", "logging", "experiment")


def group_options():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("group,option", list(group_options()))
def test_every_group_option_composes(group, option):
    cfg = to_config(compose_config([f"{group}={option}"]))
    assert isinstance(cfg, Config)


def test_groups_are_not_empty():
    for group in GROUPS:
        assert list((CONF / group).glob("*.yaml")), group


def test_default_is_the_quickstart_on_the_stdlib_corpus_with_the_llama_recipe():
    cfg = to_config(compose_config())
    assert list(cfg.data.sources) == ["python_stdlib"]
    assert cfg.data.sources["python_stdlib"].paths == ["stdlib"]
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert cfg.optim.min_lr_ratio == 0.1
    assert cfg.model.vocab_size == cfg.data.tokenizer.vocab_size
    assert cfg.logging.wandb_mode.value == "offline"


def test_optim_group_is_the_paper_recipe():
    cfg = to_config(compose_config(["experiment=llama1_7b"]))
    assert cfg.optim.warmup_steps == 2000 and cfg.optim.lr == 3e-4
    assert cfg.model.dim == 4096 and cfg.data.seq_len == 2048


def test_misspelled_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["trainer.max_step=3"])
    assert "Key 'max_step' not in 'TrainerConfig'" in str(err.value.__cause__)
    assert "TrainerConfig" in str(err.value.__cause__)
    # `+key` adds a key Hydra does not check; to_config still refuses it rather than dropping it.
    with pytest.raises(ConfigKeyError, match="max_step"):
        to_config(compose_config(["+trainer.max_step=3"]))


def test_misspelled_key_in_a_yaml_file_names_file_and_key(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "typo.yaml").write_text("dim: 64\ndimm: 3\n")
    with pytest.raises(ConfigCompositionException, match="model/typo") as err:
        compose_config([f"hydra.searchpath=[file://{tmp_path}]", "model=typo"])
    assert "Key 'dimm' not in 'ModelArgs'" in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["model.dim=wide"])
    cause = str(err.value.__cause__)
    assert "model.dim" in cause and "wide" in cause


def test_unknown_mode_names_the_key_and_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["trainer.precision=fp8"])
    cause = str(err.value.__cause__)
    assert "trainer.precision" in cause and "bf16" in cause


def test_semantic_errors_name_the_key():
    with pytest.raises(ValueError, match="model.n_heads"):
        to_config(compose_config(["model.n_heads=7"]))
    with pytest.raises(ValueError, match="trainer.max_steps"):
        to_config(compose_config(["trainer.max_steps=0"]))

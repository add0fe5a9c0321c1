from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data import DataConfig, PackedLoader, SourceConfig, prepare_data
from data.config import SourceFormat

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "data"


def _compose(name: str):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF_DIR / f"{name}.yaml"))


def test_stdlib_config_is_the_builtin_corpus():
    cfg = OmegaConf.to_object(_compose("stdlib"))
    assert isinstance(cfg, DataConfig)
    assert list(cfg.sources) == ["python_stdlib"]
    assert cfg.sources["python_stdlib"] == SourceConfig(paths=["stdlib"], format=SourceFormat.text, weight=1.0)
    assert cfg.tokenizer.path is None and cfg.tokenizer.vocab_size == 8192


def test_llama_mixture_config_has_the_paper_proportions(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_DATA_ROOT", str(tmp_path))
    cfg = OmegaConf.to_object(_compose("llama_mixture"))
    weights = {name: src.weight for name, src in cfg.sources.items()}
    assert weights == {"common_crawl": 67.0, "c4": 15.0, "github": 4.5, "wikipedia": 4.5, "books": 4.5,
                       "arxiv": 2.5, "stack_exchange": 2.0}  # fmt: skip
    assert all(p.startswith(str(tmp_path)) for src in cfg.sources.values() for p in src.paths)
    with pytest.raises(ValueError, match=r"data\.sources\.common_crawl: paths .*common_crawl/clean/\*\.jsonl"):
        prepare_data(cfg)  # no corpus under the temporary root


def test_stdlib_end_to_end_from_a_dictconfig(tmp_path):
    """The built-in corpus, capped to a few files, through tokenizer training, shards and loader."""
    cfg = _compose("stdlib")
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.sources.python_stdlib.max_files = 40
    cfg.tokenizer.vocab_size = 1000
    cfg.val_fraction = 0.2
    cfg.num_proc = 1
    cfg.progress = False
    prepared = prepare_data(OmegaConf.to_object(cfg))
    assert prepared.vocab_size == 1000 and prepared.weights == {"python_stdlib": 1.0}
    assert Path(prepared.tokenizer_path).is_relative_to(tmp_path / "cache" / "tokenizer")
    assert all(prepared.num_tokens[split]["python_stdlib"] > 1000 for split in ("train", "val"))
    batch = next(PackedLoader(prepared, split="val", seq_len=64, batch_size=2))
    assert batch["inputs"].shape == (2, 64)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.val_fraction=1.0", r"data\.val_fraction: got 1\.0"),
        ("data.sources.python_stdlib.weight=0", r"data\.sources\.python_stdlib\.weight: got 0"),
        ("data.sources.python_stdlib.format=csv", r"python_stdlib\.format"),
        ("data.tokenizer.vocab_size=100", r"data\.tokenizer\.vocab_size: got 100"),
        ("data.prepare_timeout_minutes=0", r"data\.prepare_timeout_minutes"),
    ],
)
def test_a_bad_data_value_fails_when_the_config_is_built(override, message):
    """At start-up (composed config -> dataclasses), before any data is read or process group started."""
    from conf.schema import to_config
    from tests.conftest import compose_config

    with pytest.raises(Exception, match=message):
        to_config(compose_config([override]))


@pytest.mark.parametrize(
    "overrides",
    [
        ["+data.sources.web={paths: [WEB], weight: 2.0, format: jsonl}"],
        ["+data.sources.web.paths=[WEB]", "+data.sources.web.weight=2", "+data.sources.web.format=jsonl"],
    ],
    ids=["mapping", "dotted"],
)
def test_a_source_added_on_the_command_line_is_a_typed_source(overrides, tmp_path):
    """Hydra's '+' forms, parsed and applied by Hydra itself, then prepared alongside the built-in corpus."""
    from conf.schema import to_config
    from tests.conftest import compose_config

    web = tmp_path / "web.jsonl"
    web.write_text("".join(f'{{"text": "web document number {i} with some words"}}\n' for i in range(50)))
    overrides = [o.replace("WEB", str(web)) for o in overrides]
    cfg = to_config(compose_config([*overrides, "data.sources.python_stdlib.max_files=5"])).data
    assert cfg.sources["web"] == SourceConfig(paths=[str(web)], format=SourceFormat.jsonl, weight=2.0)
    assert cfg.sources["python_stdlib"].max_files == 5  # an existing source's field, without '+'
    cfg.cache_dir, cfg.num_proc, cfg.progress, cfg.tokenizer.vocab_size = str(tmp_path / "c"), 1, False, 600
    prepared = prepare_data(cfg)
    assert prepared.weights == pytest.approx({"python_stdlib": 1 / 3, "web": 2 / 3})
    assert prepared.num_tokens["train"]["web"] > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("+data.sources.web={paths: [a], weight: heavy}", r"data\.sources\.web\.weight: Value 'heavy'"),
        ("+data.sources.web={pathz: [a]}", r"data\.sources\.web\.pathz: Key 'pathz' not in 'SourceConfig'"),
        ("+data.sources.web=3", r"data\.sources\.web must be a mapping of SourceConfig fields"),
    ],
)
def test_a_bad_source_from_the_command_line_names_its_key(override, message):
    from conf.schema import to_config
    from tests.conftest import compose_config

    with pytest.raises(ValueError, match=message):
        to_config(compose_config([override]))

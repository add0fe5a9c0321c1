"""Data pipeline: tokenizer, token shards, and the packed-sequence loader."""

from data.config import DataConfig, SourceConfig, SourceFormat, TokenizerConfig
from data.loader import PackedLoader
from data.prepare import PreparedData, prepare_data
from data.tokenizer import Tokenizer

__all__ = [
    "DataConfig",
    "PackedLoader",
    "PreparedData",
    "SourceConfig",
    "SourceFormat",
    "TokenizerConfig",
    "Tokenizer",
    "prepare_data",
]

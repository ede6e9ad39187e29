"""Datasets for the `data` group: read tolerantly (`read`), check strictly (`records`), split by seed, tokenize once
(`tokens`), cut and pack (`prepare`). Causal models get chat-formatted examples whose labels are -100 everywhere
but on the assistant's tokens; bert gets (text, label) pairs. Bad data stops the run with a `DataError` naming the
file, row or column, never a silent empty run."""

from .prepare import Prepared, prepare
from .prompts import read_prompts
from .read import DataError, Source, locate

__all__ = ["DataError", "Prepared", "Source", "locate", "prepare", "read_prompts"]

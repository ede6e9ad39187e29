"""Models for the `model` group: where the weights are (`source`), loading them (`load`), counting them (`params`).
"""

from .load import PLAIN_CHAT_TEMPLATE, context_length, load_model, load_tokenizer
from .params import parameter_counts
from .source import ModelFiles, ModelLoadError, hub_reachable, locate, resolve

__all__ = ["ModelFiles", "ModelLoadError", "PLAIN_CHAT_TEMPLATE", "context_length", "hub_reachable", "load_model",
           "load_tokenizer", "locate", "parameter_counts", "resolve"]

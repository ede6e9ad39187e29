"""Config is the interface: typed schemas for every group, checked before any model loads (`compose`, `to_config`).
"""

from ..core.errors import ConfigError
from .compose import compose, register, to_config
from .evaluation import EvalConfig, HarnessConfig, JudgeConfig
from .groups import DataConfig, LoggerConfig, LoraConfig, ModelConfig, PruningConfig
from .noise import NoiseConfig
from .objectives import SearchConfig
from .resolvers import package_path, run_id
from .root import Config
from .trainer import TrainerConfig

__all__ = ["Config", "ConfigError", "DataConfig", "EvalConfig", "HarnessConfig", "JudgeConfig", "LoggerConfig",
           "LoraConfig", "ModelConfig", "NoiseConfig", "PruningConfig", "SearchConfig", "TrainerConfig", "compose",
           "package_path", "register", "run_id", "to_config"]

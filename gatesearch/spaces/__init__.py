"""The joint search space: parameters, conditions per gate, YAML loading and validation."""

from .joint import GATE, SHARED, Space, parse_space
from .params import Choice, Fixed, Param, Range, SpaceError
from .search_config import DataConfig, EvalConfig, SearchConfig, load_search_config, parse_search_config
from .trial import TrialConfig

__all__ = [
    "GATE", "SHARED", "Space", "parse_space", "Choice", "Fixed", "Param", "Range", "SpaceError",
    "DataConfig", "EvalConfig", "SearchConfig", "load_search_config", "parse_search_config", "TrialConfig",
]

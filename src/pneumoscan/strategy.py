"""`pneumoscan.strategy`, kept for the imports that name it: it is `pneumoscan.training.strategy`."""

from pneumoscan.errors import StrategyError
from pneumoscan.training.strategy import Engine, local_tf_configs, make_engine

__all__ = ["Engine", "StrategyError", "local_tf_configs", "make_engine"]

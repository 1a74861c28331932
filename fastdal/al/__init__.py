"""Active learning with fastdal: the loop of the paper's Algorithm 1, its strategies, data and reports.

    from fastdal import al
    splits = al.data.load("digits")
    records = al.run(splits.train, splits.test, lambda: al.make_model("cnn", splits.image_shape, 10),
                     al.make_strategy("dynamic-g2"), al.LoopConfig(initial=20, b=20, rounds=5))

``python -m fastdal.al --help`` runs grids of datasets x strategies x seeds from the command line.
"""

from . import data
from .grid import make_model
from .loop import LoopConfig, RoundRecord, run
from .strategies import STRATEGIES, make_strategy
from .strategy import RoundState, Strategy

__all__ = [
    "STRATEGIES",
    "LoopConfig",
    "RoundRecord",
    "RoundState",
    "Strategy",
    "data",
    "make_model",
    "make_strategy",
    "run",
]

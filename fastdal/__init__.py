"""fastdal: the dynamic-AL score of Wang et al. (NeurIPS 2022) for every pool sample, exact and fast.

    G = fastdal.labeled_grad(model, labeled_loader, layers="last")   # or "all", or module names
    scores = fastdal.score(model, pool_loader, G)                    # ||g_u||^2 + 2 <g_u, G>
    chosen = fastdal.select(scores, b)

``fastdal.reference`` holds the per-sample autograd loop that every fast path is tested against.
"""

from . import backends, reference
from .api import ScoreResult, labeled_grad, query, score, select
from .grads import LabeledGrad

__all__ = ["LabeledGrad", "ScoreResult", "backends", "labeled_grad", "query", "reference", "score", "select"]
__version__ = "0.1.0"

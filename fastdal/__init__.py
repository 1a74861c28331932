"""fastdal: the dynamic-AL score of Wang et al. (NeurIPS 2022) for every pool sample, exact and fast.

    G = fastdal.labeled_grad(model, labeled_loader, layers="last")   # or "all", or module names
    scores = fastdal.score(model, pool_loader, G)                    # ||g_u||^2 + 2 <g_u, G>
    chosen = fastdal.select(scores, b)

    F = fastdal.features(model, pool_loader)                         # exact last-layer gradient features
    chosen = fastdal.select(F, b, method="badge")                    # or "greedy" with labeled_grad=G

``fastdal.reference`` holds the per-sample autograd loop that every fast path is tested against.
"""

from . import backends, reference
from .api import ScoreResult, labeled_grad, query, score, select
from .features import GradFeatures, features
from .grads import LabeledGrad
from .precision import get_matmul_precision, matmul_precision
from .selection import approximation_ratio, subset_gain

__all__ = [
    "GradFeatures",
    "LabeledGrad",
    "ScoreResult",
    "approximation_ratio",
    "backends",
    "features",
    "get_matmul_precision",
    "labeled_grad",
    "matmul_precision",
    "query",
    "reference",
    "score",
    "select",
    "subset_gain",
]
__version__ = "0.1.0"

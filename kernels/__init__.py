"""Triton kernels of fastdal, one op per file, installed as ``fastdal.kernels``.

``last_layer_score`` and ``linear_sample_score``, each imported by fastdal/ops.py only when the
``triton`` backend runs it (fastdal/backends.py says when that is).
"""

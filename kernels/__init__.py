"""Triton kernels of fastdal, one op per file, installed as ``fastdal.kernels``.

None yet: every op currently runs on the ``torch`` backend (fastdal/backends.py says which
backends exist and why the others cannot run).
"""

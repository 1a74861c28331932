"""Build of fastdal: the Python package and its Triton kernels (``kernels/`` installs as ``fastdal.kernels``).

Metadata lives in pyproject.toml. Install with ``pip install -e . --no-build-isolation`` so that the
torch already installed is used (an isolated build would fetch another torch).
"""

from setuptools import setup

setup(
    packages=["fastdal", "fastdal.kernels"],
    package_dir={"fastdal.kernels": "kernels"},
)

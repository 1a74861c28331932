"""Build of fastdal: the Python package, its Triton kernels (``kernels/`` installs as ``fastdal.kernels``), the
C++/CUDA sources of ``csrc/`` (installed as ``fastdal/csrc``) and, where torch is there to build against, the
compiled extension ``fastdal._C``. Metadata lives in pyproject.toml; the sources and flags of ``fastdal._C`` in
fastdal/_build.py, shared with the build at first use.

* ``pip install .``: pip builds in an isolated environment without torch, so the wheel is pure Python; the first
  use of fastdal compiles ``fastdal._C`` against the installed torch into a per-user cache (fastdal/_ext.py).
* ``pip install . --no-build-isolation`` (or ``-e``, as ``make install`` runs it): the installed torch is
  importable here, so ``fastdal._C`` is built now: a CUDA extension (``csrc/cuda/*.cu`` added) when torch is a
  CUDA build and nvcc is found, else a C++ one with OpenMP.

``FASTDAL_BUILD_EXT=0`` skips the extension here (and, set at run time, the build at first use); fastdal then
runs on its ``torch`` backend.
"""

import importlib.util
import os
from pathlib import Path
from types import ModuleType

from setuptools import find_packages, setup


def build_definition() -> ModuleType:
    """fastdal/_build.py, loaded by its path: importing the fastdal package would import torch."""
    path = Path(__file__).resolve().parent / "fastdal" / "_build.py"
    spec = importlib.util.spec_from_file_location("fastdal_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_build(build: ModuleType) -> dict:
    if build.disabled():
        return {}
    try:
        import torch  # noqa: F401 (only whether it is there)
    except ImportError:  # pip's isolated build: fastdal/_ext.py compiles fastdal._C at first use instead
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cuda = build.with_cuda()
    sources = [str(path) for path in build.sources(Path("csrc"), cuda)]
    cxx, link = list(build.CXX_FLAGS), list(build.LINK_FLAGS)
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCH_LIST)
        nvcc = list(build.NVCC_FLAGS)
        extension = CUDAExtension(
            build.EXTENSION, sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link
        )
    else:
        extension = CppExtension(build.EXTENSION, sources, extra_compile_args=cxx, extra_link_args=link)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    packages=[*find_packages(include=["fastdal", "fastdal.*"]), "fastdal.kernels", "fastdal.csrc"],
    package_dir={"fastdal.kernels": "kernels", "fastdal.csrc": "csrc"},
    # The sources travel in every wheel and sdist: a wheel built without torch compiles them at first use.
    package_data={"fastdal.csrc": ["*.cpp", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh"]},
    **extension_build(build_definition()),
)

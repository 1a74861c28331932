"""Build of fastdal: the Python package, its Triton kernels (``kernels/`` installs as
``fastdal.kernels``) and the compiled extension ``fastdal._C``.

``fastdal._C`` holds the TORCH_LIBRARY ops of ``csrc/``: a CUDA extension (``csrc/cuda/*.cu`` added)
when the installed torch is a CUDA build and nvcc is found, else a C++ one with OpenMP.
``FASTDAL_BUILD_EXT=0`` skips it; fastdal then runs on its ``torch`` backend. Metadata lives in
pyproject.toml. Install with ``pip install -e . --no-build-isolation`` so that the torch already
installed is used (an isolated build would fetch another torch).
"""

import glob
import os

from setuptools import setup


def extension_build() -> dict:
    if os.environ.get("FASTDAL_BUILD_EXT", "1") == "0":
        return {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        # Name the GPU architectures: unset, torch's cpp_extension builds for the GPUs it sees (none on
        # a build machine without one, where it falls back to a long list of old ones). The kernels'
        # tensor-core paths (TF32 WMMA) need sm_80+, so build native code for A100 (8.0) and H100/H200
        # (9.0), plus 9.0 PTX that newer GPUs JIT-compile. Set TORCH_CUDA_ARCH_LIST to override.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        extension = CUDAExtension(
            "fastdal._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension("fastdal._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    packages=["fastdal", "fastdal.kernels"],
    package_dir={"fastdal.kernels": "kernels"},
    **extension_build(),
)

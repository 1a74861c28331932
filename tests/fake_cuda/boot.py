"""Fake CUDA for a CPU build of PyTorch: build the small library of fake_cuda.cpp and load it before torch.

torch caches the CUDA device guard and the CUDA hooks at their first use, so the library must be loaded before
the first ``import torch`` of the process (tests run this in a subprocess of their own). It is compiled against
the installed torch's headers into ``build/fake_cuda/`` (a name keyed by the source and torch's version), once.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def torch_dir() -> Path:
    """The installed torch package, found without importing it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torch is not installed")
    return Path(spec.submodule_search_locations[0])


def build(out_dir: Path | None = None) -> Path:
    """The compiled library (built if missing)."""
    torch = torch_dir()
    source = HERE / "fake_cuda.cpp"
    key = hashlib.sha256(source.read_bytes() + (torch / "version.py").read_bytes()).hexdigest()[:12]
    out = (out_dir or ROOT / "build" / "fake_cuda") / f"libfake_cuda-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.tmp")
    command = [
        os.environ.get("CXX", "g++"),
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-O1",
        "-w",
        f"-I{torch / 'include'}",
        f"-I{torch / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        str(source),
        f"-L{torch / 'lib'}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch / 'lib'}",
        "-o",
        str(partial),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the fake CUDA library failed:\n{' '.join(command)}\n{done.stderr[-4000:]}")
    os.replace(partial, out)
    return out


def boot() -> None:
    """Load the fake CUDA library; the process must not have imported torch yet."""
    if "torch" in sys.modules:
        raise RuntimeError("fake CUDA must be loaded before torch: call boot() before the first `import torch`")
    library = build()
    for name in ("libc10.so", "libtorch_cpu.so"):
        ctypes.CDLL(str(torch_dir() / "lib" / name), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


if __name__ == "__main__":
    print(build())

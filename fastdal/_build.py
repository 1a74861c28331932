"""How the compiled extension ``fastdal._C`` is built: one definition of its sources and flags, used ahead
of time by setup.py and at first use by fastdal/_ext.py, which compiles it into a per-user cache.

setup.py loads this file by path, in a build environment that may have no torch (pip's build isolation):
importing it needs nothing beyond the standard library, and only the functions that build import torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

EXTENSION = "fastdal._C"
# FASTDAL_BUILD_EXT=0: no fastdal._C, neither at install time nor at first use; fastdal runs on torch/triton.
BUILD_EXT_ENV = "FASTDAL_BUILD_EXT"
# Where the first-use build goes (default: $XDG_CACHE_HOME/fastdal, else ~/.cache/fastdal).
CACHE_DIR_ENV = "FASTDAL_CACHE_DIR"

# The GPU architectures setup.py compiles for when TORCH_CUDA_ARCH_LIST is unset (on a build machine without a
# GPU, torch's cpp_extension would otherwise fall back to a long list of old ones). The kernels' SIMT paths run
# on sm_75 (Turing: the T4 of Colab and Kaggle); their TF32 tensor-core paths are compiled only under
# __CUDA_ARCH__ >= 800 and chosen at run time (csrc/cuda/common.cuh: has_tensor_cores), so 8.0 (A100) and 9.0
# (H100/H200) get native code and 9.0 PTX lets newer GPUs JIT-compile. sm_70 (V100) is left out because nvcc 13,
# which torch's CUDA 13 builds pair with, cannot target it any more; with CUDA 12, TORCH_CUDA_ARCH_LIST=7.0 adds it.
# The first-use build does not apply it: there torch's cpp_extension compiles for the GPUs it sees.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0+PTX"

CXX_FLAGS = ("-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas")
NVCC_FLAGS = ("-O3", "-lineinfo")
LINK_FLAGS = ("-fopenmp",)
# The files of csrc/ a compile reads, headers included: the first-use cache is keyed on their contents.
_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
# Left in a cache folder once its build completed (it names the library), or once it failed (the compiler's
# output): later processes read it instead of compiling again.
_BUILT = "built"
_FAILED = "build-error.log"


class BuildFailed(RuntimeError):
    """Compiling fastdal._C failed; the message is the compiler's first error lines and where its whole log is."""


def disabled() -> bool:
    """Whether FASTDAL_BUILD_EXT=0 asks for no fastdal._C."""
    return os.environ.get(BUILD_EXT_ENV, "1") == "0"


def sources(csrc: Path, cuda: bool) -> list[Path]:
    """The files compiled into fastdal._C: csrc/*.cpp and csrc/cpu/*.cpp, plus csrc/cuda/*.cu for CUDA."""
    found = [*csrc.glob("*.cpp"), *csrc.glob("cpu/*.cpp")]
    if cuda:
        found += csrc.glob("cuda/*.cu")
    return sorted(found)


def with_cuda() -> bool:
    """Whether fastdal._C gets its CUDA kernels here: torch is a CUDA build and nvcc (CUDA_HOME) was found."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def installed_sources(package_dir: Path) -> Path | None:
    """The csrc/ folder shipped beside the installed package (``fastdal/csrc`` in a wheel), else the one of a
    source checkout (an editable install), else None."""
    for csrc in (package_dir / "csrc", package_dir.parent / "csrc"):
        if (csrc / "fastdal.cpp").is_file():
            return csrc
    return None


def missing_tool() -> str | None:
    """What stops a first-use build before it starts (no C++ compiler, no ninja), else None."""
    compiler = os.environ.get("CXX") or "c++"  # the compiler torch's cpp_extension calls (CXX may add a wrapper)
    if shutil.which(compiler.split()[0]) is None:
        return f"no C++ compiler {compiler!r} was found (install g++, or set CXX to the compiler to use)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI package: its binary is not on PATH in a virtual environment used unactivated
        except ImportError:
            return "ninja, which torch's cpp_extension builds with, was not found (pip install ninja)"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return None


def cache_root() -> Path:
    """The folder of first-use builds: $FASTDAL_CACHE_DIR, else $XDG_CACHE_HOME/fastdal, else ~/.cache/fastdal."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastdal"


def cache_dir(csrc: Path, cuda: bool) -> Path:
    """The cache folder of one build: named after torch's version and the device code, and a hash of everything
    the library depends on (the Python ABI, torch, flags, GPU architectures, the files of csrc/ it compiles and
    includes), so that a changed source, an upgraded torch or another interpreter gets a fresh folder rather
    than a stale library."""
    import torch

    digest = hashlib.sha256()
    for part in (sys.implementation.cache_tag, torch.__version__, str(torch.version.cuda), *CXX_FLAGS, *LINK_FLAGS):
        digest.update(part.encode() + b"\0")
    if cuda:
        for part in (*NVCC_FLAGS, _cuda_architectures()):
            digest.update(part.encode() + b"\0")
    folders = (csrc, csrc / "cpu", *([csrc / "cuda"] if cuda else []))  # a CPU build ignores csrc/cuda
    for path in sorted(p for folder in folders for p in folder.glob("*") if p.suffix in _SOURCE_SUFFIXES):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    device = f"cuda{torch.version.cuda}" if cuda else "cpu"
    return cache_root() / f"torch{torch.__version__}-{device}-{digest.hexdigest()[:16]}"


def _cuda_architectures() -> str:
    """The GPU architectures a first-use build compiles for: TORCH_CUDA_ARCH_LIST, else (torch's choice then)
    those of the visible GPUs. Part of the cache key, so that a cache shared by machines with different GPUs
    never hands one a library without code for its GPU."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    import torch

    if not torch.cuda.is_available():
        return "no visible GPU"  # torch then compiles for its default list
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))


def build_at_first_use(csrc: Path) -> Path:
    """The path of a fastdal._C library built from ``csrc`` into the cache, compiling it (a minute or more, one
    line on stderr says so) unless an earlier process did.

    Concurrent processes take turns on a lock that the system releases when its holder dies, so one compiles
    while the others wait and then load its library. (torch's cpp_extension has its own lock, a file it
    deletes when done, which a killed build leaves behind for every later build to wait on forever: the
    holder of this lock clears it.)

    Raises:
        BuildFailed: the compile failed, now or in an earlier process (its log is kept; delete it to retry).
    """
    cuda = with_cuda()
    folder = cache_dir(csrc, cuda)
    library = _finished(folder)
    if library is not None:
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "fastdal-build.lock", "w") as lock:
        _lock(lock)
        library = _finished(folder)  # built by the process this one waited for
        if library is not None:
            return library
        (folder / "lock").unlink(missing_ok=True)  # cpp_extension's lock: no live build holds it now
        print(f"fastdal: compiling {EXTENSION} once (a minute or more) into {folder}", file=sys.stderr, flush=True)
        try:
            library = Path(_compile(csrc, cuda, folder))
        except Exception as err:  # KeyboardInterrupt passes: a stopped build is not a failed one
            raise _record_failure(folder, err) from err
        (folder / f"{_BUILT}.tmp").write_text(library.name)
        os.replace(folder / f"{_BUILT}.tmp", folder / _BUILT)  # whole or absent for a reader without the lock
        return library


def _compile(csrc: Path, cuda: bool, folder: Path) -> str:
    from torch.utils.cpp_extension import load

    return load(
        name=EXTENSION.rpartition(".")[2],  # TORCH_EXTENSION_NAME=_C, as setup.py's build defines it
        sources=[str(path) for path in sources(csrc, cuda)],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS) if cuda else None,
        extra_ldflags=list(LINK_FLAGS),
        build_directory=str(folder),
        with_cuda=cuda,
        is_python_module=False,  # loads the library (registering its ops) and returns its path
    )


def _finished(folder: Path) -> Path | None:
    """The library of a completed build in ``folder``; raises BuildFailed for a failed one; None if neither."""
    if (folder / _FAILED).is_file():
        summary = (folder / _FAILED).read_text(errors="replace").partition("\n")[0]
        raise BuildFailed(summary)
    if (folder / _BUILT).is_file():
        library = folder / (folder / _BUILT).read_text().strip()
        if library.is_file():
            return library
    return None


def _record_failure(folder: Path, err: Exception) -> BuildFailed:
    """Keep the compiler's output in the cache folder, so that later processes report it rather than spend
    another minute failing the same way; the BuildFailed to raise names its first error lines."""
    log = folder / _FAILED
    text = str(err) or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if " error" in line.lower() or line.lower().startswith("error")]
    errors = [line for line in errors if not line.startswith("Error building extension")] or lines
    summary = f"{' | '.join(errors[:3])[:600]} (whole log: {log}; delete it to try again)"
    log.write_text(f"{summary}\n\n{text}\n")
    return BuildFailed(summary)


def _lock(file) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: cpp_extension's own lock file is all there is
        return
    fcntl.flock(file, fcntl.LOCK_EX)

"""The build of fastdal._C at first use (fastdal/_build.py, fastdal/_ext.py), for wheels built without torch:
it compiles what setup.py compiles, into a cache folder keyed on torch and the sources, and load() reports
why not rather than raising. Nothing here compiles: torch's cpp_extension.load is replaced by a stand-in.
`make wheel-check` builds and loads it for real, from a wheel installed in a fresh virtual environment."""

import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import setuptools
import torch
import torch.utils.cpp_extension as cpp_extension
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdal
from fastdal import _build, _ext, backends

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
MISSING_TOOL = _build.missing_tool  # the fixture first_use replaces it
COMPILER_ERROR = """Error building extension '_C': [1/9] c++ -MMD -MF kron_project.o.d -O3 -fopenmp -c kron_project.cpp
FAILED: kron_project.o
c++ -MMD -MF kron_project.o.d -O3 -fopenmp -c /src/csrc/cpu/kron_project.cpp -o kron_project.o
/src/csrc/cpu/kron_project.cpp:12:3: error: 'undeclared_name' was not declared in this scope
ninja: build stopped: subcommand failed."""


class FakeCompiler:
    """Stands in for torch.utils.cpp_extension.load: records each call's arguments, then fails with a compiler's
    output, or returns ``library`` linked into the build folder as a real build leaves its library there."""

    def __init__(self, library: Path | None = None):
        self.calls: list[dict] = []
        self.library = library

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if self.library is None:
            raise RuntimeError(COMPILER_ERROR)
        built = Path(kwargs["build_directory"]) / "_C.so"
        built.symlink_to(self.library)  # the same file, so the dynamic loader does not load its ops twice
        return str(built)


@pytest.fixture
def first_use(monkeypatch, tmp_path):
    """A process in which fastdal._C was not built ahead of time and load() has not run yet; the cache is a
    fresh folder. Returns a function installing a FakeCompiler."""
    monkeypatch.setattr(_ext, "_status", _ext._UNSET)

    def not_installed():
        raise ModuleNotFoundError("No module named 'fastdal._C'", name="fastdal._C")

    monkeypatch.setattr(_ext, "_import_installed", not_installed)
    monkeypatch.setenv(_build.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(_build.BUILD_EXT_ENV, raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_build, "missing_tool", lambda: None)  # whether this machine has g++ and ninja aside

    def install(compiler: FakeCompiler) -> FakeCompiler:
        monkeypatch.setattr(cpp_extension, "load", compiler)
        return compiler

    return install


def new_process(monkeypatch) -> None:
    """Forget load()'s answer, as a new process starts without it (the cache on disk stays)."""
    monkeypatch.setattr(_ext, "_status", _ext._UNSET)


def setup_py_extension(monkeypatch):
    """The extension setup.py builds ahead of time here (setuptools.setup replaced by a recorder)."""
    recorded = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: recorded.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    [extension] = recorded["ext_modules"]
    return extension


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_first_use_compiles_the_sources_and_flags_of_setup_py(first_use, monkeypatch, device):
    if device == "cuda":  # a CUDA build of torch with nvcc found, as far as both builds can tell
        monkeypatch.setattr(torch.version, "cuda", "13.0")
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    compiler = first_use(FakeCompiler())
    assert _ext.load().startswith("building fastdal._C failed")
    [lazy] = compiler.calls
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # the first-use build compiles for the visible GPUs

    ahead = setup_py_extension(monkeypatch)
    assert lazy["name"] == ahead.name.rpartition(".")[2] == "_C"  # the same TORCH_EXTENSION_NAME and PyInit__C
    assert sorted(map(Path, lazy["sources"])) == sorted(ROOT / source for source in ahead.sources)
    assert lazy["extra_ldflags"] == ahead.extra_link_args == list(_build.LINK_FLAGS)
    if device == "cuda":
        assert any(source.endswith(".cu") for source in lazy["sources"]) and lazy["with_cuda"]
        assert lazy["extra_cflags"] == ahead.extra_compile_args["cxx"] == list(_build.CXX_FLAGS)
        assert lazy["extra_cuda_cflags"] == ahead.extra_compile_args["nvcc"] == list(_build.NVCC_FLAGS)
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == _build.DEFAULT_CUDA_ARCH_LIST == "7.5;8.0;9.0+PTX"
    else:
        assert not any(source.endswith(".cu") for source in lazy["sources"]) and not lazy["with_cuda"]
        assert lazy["extra_cflags"] == ahead.extra_compile_args == list(_build.CXX_FLAGS)
        assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_setup_py_without_torch_ships_the_sources_and_builds_nothing(tmp_path):
    """What pip's isolated build environment runs: no torch there, so a pure-Python wheel with csrc/ in it."""
    script = textwrap.dedent(f"""
        import json, runpy, sys
        import setuptools
        sys.modules["torch"] = None  # import torch raises ImportError, as in pip's build environment
        recorded = {{}}
        setuptools.setup = lambda **kwargs: recorded.update(kwargs)
        runpy.run_path({str(ROOT / "setup.py")!r})
        assert "ext_modules" not in recorded, recorded
        assert "fastdal.csrc" in recorded["packages"] and recorded["package_dir"]["fastdal.csrc"] == "csrc"
        assert {{"fastdal", "fastdal.al", "fastdal.integrations", "fastdal.kernels"}} <= set(recorded["packages"])
        print(json.dumps(recorded["package_data"]["fastdal.csrc"]))
    """)
    env = {k: v for k, v in os.environ.items() if k != _build.BUILD_EXT_ENV}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shipped = {path.relative_to(CSRC).as_posix() for path in CSRC.rglob("*") if path.is_file()}
    patterns = json.loads(result.stdout)  # every file of csrc/ matches one of setup.py's package_data patterns
    assert all(any(Path(name).match(pattern) for pattern in patterns) for name in shipped), (shipped, patterns)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(_build.CACHE_DIR_ENV, str(tmp_path / "chosen"))
    assert _build.cache_dir(CSRC, cuda=False).parent == tmp_path / "chosen"
    monkeypatch.delenv(_build.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_dir(CSRC, cuda=False).parent == tmp_path / "xdg" / "fastdal"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _build.cache_dir(CSRC, cuda=False).parent == tmp_path / "home" / ".cache" / "fastdal"
    assert _build.cache_dir(CSRC, cuda=False).name.startswith(f"torch{torch.__version__}-cpu-")


def test_cache_folder_changes_with_torch_sources_and_device_code(monkeypatch, tmp_path):
    monkeypatch.setenv(_build.CACHE_DIR_ENV, str(tmp_path / "cache"))
    copy = tmp_path / "csrc"
    shutil.copytree(CSRC, copy)
    folder = _build.cache_dir(CSRC, cuda=False)
    assert _build.cache_dir(copy, cuda=False) == folder  # keyed on the sources' contents, not their place
    with open(copy / "cpu" / "common.h", "a") as header:  # a header is not compiled on its own, but counts
        header.write("// changed\n")
    assert _build.cache_dir(copy, cuda=False) != folder
    cpu_folder, cuda_folder = _build.cache_dir(copy, cuda=False), _build.cache_dir(copy, cuda=True)
    with open(copy / "cuda" / "common.cuh", "a") as header:
        header.write("// changed\n")
    assert _build.cache_dir(copy, cuda=False) == cpu_folder  # a CPU build does not read csrc/cuda
    assert _build.cache_dir(copy, cuda=True) != cuda_folder
    assert _build.cache_dir(CSRC, cuda=True) != folder
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    with_sm80 = _build.cache_dir(CSRC, cuda=True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _build.cache_dir(CSRC, cuda=True) != with_sm80  # a shared cache never serves code for another GPU
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert _build.cache_dir(CSRC, cuda=False).name.startswith("torch2.99.0-cpu-")


def test_failed_build_is_reported_not_raised_and_not_retried(first_use, monkeypatch, capsys):
    first_use(FakeCompiler())
    reason = _ext.load()
    assert reason.startswith("building fastdal._C failed: ")
    assert "kron_project.cpp:12:3: error: 'undeclared_name' was not declared in this scope" in reason
    assert "[1/9]" not in reason  # the compile command is in the log, not in the reason
    assert _build._FAILED in reason and reason.endswith(
        "the cpp and cuda backends are unavailable, fastdal runs on its torch and triton backends"
    )
    [line] = capsys.readouterr().err.splitlines()  # one line says it compiles, and where
    folder = _build.cache_dir(CSRC, cuda=False)
    assert "compiling fastdal._C once" in line and str(folder) in line
    assert COMPILER_ERROR in (folder / _build._FAILED).read_text()

    report = backends.available()
    assert report["cpp"] == reason and report["torch"] is None
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    G = fastdal.labeled_grad(model, DataLoader(TensorDataset(x[:6], y[:6]), batch_size=4), layers="all")
    pool = DataLoader(TensorDataset(x[6:]), batch_size=4)
    assert torch.equal(fastdal.score(model, pool, G), fastdal.score(model, pool, G, backend="torch"))

    new_process(monkeypatch)
    again = first_use(FakeCompiler())
    assert _ext.load() == reason and again.calls == []  # the same failure, read from the log
    assert capsys.readouterr().err == ""


def test_successful_build_compiles_once_then_loads_from_the_cache(first_use, monkeypatch, capsys):
    installed = importlib.util.find_spec("fastdal._C")
    if installed is None:
        pytest.skip("no fastdal._C built ahead of time to stand in for a compiled library")
    monkeypatch.delitem(sys.modules, "fastdal._C", raising=False)  # put back as it was afterwards
    compiler = first_use(FakeCompiler(library=Path(installed.origin)))
    assert _ext.load() is None and len(compiler.calls) == 1
    folder = _build.cache_dir(CSRC, cuda=False)
    assert Path(sys.modules["fastdal._C"].__file__) == folder / "_C.so"
    assert "compiling fastdal._C once" in capsys.readouterr().err

    new_process(monkeypatch)
    assert _ext.load() is None and len(compiler.calls) == 1
    assert capsys.readouterr().err == ""  # nothing compiled, nothing said


def test_build_ext_0_turns_off_the_first_use_build(first_use, monkeypatch, tmp_path):
    compiler = first_use(FakeCompiler())
    monkeypatch.setenv(_build.BUILD_EXT_ENV, "0")
    reason = _ext.load()
    assert "FASTDAL_BUILD_EXT=0 turns off building it at first use" in reason and compiler.calls == []
    assert not (tmp_path / "cache").exists()
    assert backends.available()["cpp"] == reason


def test_missing_compiler_is_named_before_any_build(first_use, monkeypatch):
    compiler = first_use(FakeCompiler())
    monkeypatch.setattr(_build, "missing_tool", MISSING_TOOL)  # the real check, with a compiler that is not there
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    reason = _ext.load()
    assert "cannot be built at first use: no C++ compiler '/nonexistent/g++' was found" in reason
    assert reason.endswith("fastdal runs on its torch and triton backends") and compiler.calls == []



def test_concurrent_first_uses_compile_once(monkeypatch, tmp_path):
    """Two processes starting at once: one compiles while the other waits, then loads the same library; a lock
    file that a killed cpp_extension build left behind does not make them wait forever."""
    monkeypatch.setenv(_build.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("COMPILES", str(tmp_path / "compiles"))
    folder = _build.cache_dir(CSRC, cuda=False)
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # cpp_extension's lock of a build killed half-way
    script = textwrap.dedent(f"""
        import importlib.util, os, time
        from pathlib import Path
        import torch.utils.cpp_extension

        spec = importlib.util.spec_from_file_location("build", {str(ROOT / "fastdal" / "_build.py")!r})
        _build = importlib.util.module_from_spec(spec)  # not through fastdal/__init__.py: this is quicker
        spec.loader.exec_module(_build)

        def compile(build_directory, **kwargs):
            assert not Path(build_directory, "lock").exists(), "a stale cpp_extension lock was left in place"
            with open(os.environ["COMPILES"], "a") as log:
                log.write("compiled\\n")
            time.sleep(2)
            Path(build_directory, "_C.so").write_text("the library")
            return str(Path(build_directory, "_C.so"))

        torch.utils.cpp_extension.load = compile
        print(_build.build_at_first_use(Path({str(CSRC)!r})))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", _build.BUILD_EXT_ENV)}
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in results]
    assert [out.strip() for out, _ in results] == [str(folder / "_C.so")] * 2
    assert (tmp_path / "compiles").read_text() == "compiled\n"
    assert sum("compiling fastdal._C once" in err for _, err in results) == 1

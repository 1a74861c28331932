"""Ahead-of-time sm_90 (Hopper) compile of every GPU kernel, on a machine without a GPU: registers, spills,
shared memory and tensor-core instructions per kernel and configuration, checked against budgets; the CUDA
kernels also with the GPU machine's nvcc and torch headers, and for sm_75 (Turing).

    make gpu-compile    # installs the toolchains under build/sm90, then runs this script (~1200 CPU-seconds:
                        # ~10 min on 2 idle cores; the JSON has each nvcc file's cpu_seconds)
    python bench/sm90_compile.py [--cuda-root DIR] [--triton 3.6.0=DIR] \
        [--gpu-machine-cuda-root DIR --gpu-machine-torch-include DIR]   # writes bench/results/sm90-compile.json

Triton: each ``@triton.jit`` kernel of ``kernels/`` is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` in every configuration its launcher's ``config()`` picks for the shapes
of tests/test_ops.py (its shape lists, the literal shapes of its helper calls and parametrize lists, read
by parsing the file: importing it would import tests/conftest.py, which sets TRITON_INTERPRET=1) and of
every op benchmark (bench/op_cases.py), the GPU-only N=1M, D=2048 cases included. Every distinct configuration
is compiled once at the default precision ``"tf32x3"``; ``last_layer_score``'s main configurations also
at ``"ieee"``, for comparison (reported, not budgeted). Each Triton version is compiled in a subprocess
of its own: the installed one and the GPU machine's 3.6.0 (``--triton 3.6.0=DIR``, a ``pip --target``
directory prepended to PYTHONPATH). Registers and spills come from the ``ptxas -v`` log of Triton's own
ptxas run (TRITON_DUMP_PTXAS_LOG), stack/local/static shared bytes from ``cuobjdump -res-usage`` of the
cubin, dynamic shared memory from the kernel's metadata, instruction counts from ``cuobjdump -sass``
(the cuobjdump Triton bundles).

Configuration choices, stated because they decide the numbers:
* ``last_layer_score`` compiles HAS_BIAS = HAS_GW = HAS_GB = True (the variant with the most live tiles;
  dropping a flag only removes loads and a GEMM); ``linear_sample_score`` compiles, for every shape, the
  direct kernel with HAS_G=True and both ghost kernels, whichever its caller would pick.
* Signature rule (``TYPE_RULES``): ``label_ptr`` -> ``*i64``, other ``*_ptr`` -> ``*fp32``; ``gamma`` and
  ``offset`` -> ``fp32``; sizes (all-capital names such as N, D_IN), strides (``sa_n``-style names) and
  ``center`` -> ``i32``, the type Triton's launcher gives a Python int below 2**31 (``center``'s
  ``do_not_specialize`` only stops the ==1 / %16 specializations, not the i32 typing). Any other runtime
  argument stops the script. Pointers carry the 16-byte divisibility hint a fresh torch tensor earns at
  launch. The size arguments of ``last_layer_score`` and ``factored_min_distance`` (contiguous inputs, so
  their values follow from the shape) are specialized per shape as Triton's launcher does it (its own
  ``native_specialize_impl``: 1 becomes a constexpr, a multiple of 16 gets a divisibility hint), so each
  shape compiles the variant it runs: a main configuration at the benchmark's N=2**20, D=2048 is a
  different binary from the same blocks at the tests' odd sizes. ``linear_sample_score`` and
  ``kron_project`` (whose strides depend on the layout) compile the generic variant, without hints.

CUDA: each ``csrc/cuda/*.cu`` is compiled with ``-Xptxas -v`` in three passes (``NvccPass``; JSON keys
``NVCC_SECTIONS``), each in its own section of the output:
* ``nvcc``: sm_90 with nvcc 13.5 (``--cuda-root``, the nvidia-cuda-nvcc wheels) against the installed (CPU)
  torch's headers: what CI's toolchain makes of the code. Budgeted.
* ``nvcc_gpu_machine``: sm_90 with the GPU machine's pair, nvcc 13.0 (``--gpu-machine-cuda-root``) and torch 2.11's
  headers (``--gpu-machine-torch-include``): what bench/gpu_check.py's build there compiles, caught here first.
  Budgeted; the pass refuses a toolchain of other versions (``GPU_MACHINE_NVCC``, ``GPU_MACHINE_TORCH``).
  Skipped (not failed) when neither option is given; make gpu-compile gives both.
* ``nvcc_sm75``: sm_75 (Turing: T4) with nvcc 13.5, device code only (``--cubin``; the host code, the same for
  every architecture, is compiled by the sm_90 passes): the SIMT paths, tensor-core code compiled out by
  ``__CUDA_ARCH__ < 800`` (csrc/cuda/common.cuh). Its figures are reported, not budgeted; its compile errors fail
  the run while ``SM75_REQUIRED``.
Per ``__global__`` function (demangled with c++filt) each pass records registers, spills, stack, static shared
memory and SASS instruction counts from ``cuobjdump -sass`` (13.5's where no cuobjdump lies beside the nvcc: no
13.0 wheel of it exists). A compile error in any pass is a failure.

Budgets (the script exits 1 when one is exceeded or anything fails to compile):
* Triton spill bytes (stores and loads each) at the default precision: 0 for every kernel and configuration
  (``SPILL_BUDGET``), and in particular 0 for ``last_layer_score``'s main configurations, the ones its
  launcher picks for K >= 128 and for the benchmark's N=1M, D=2048 shapes (``MAIN_SPILL_BUDGET``, not to be
  loosened).
* CUDA spill bytes: 0 for every ``__global__`` function of the budgeted (sm_90) passes (``CUDA_SPILL_BUDGET``).
* Tensor cores: every Triton kernel in ``TENSOR_CORE_KERNELS`` (the GEMM-shaped ones: all but
  ``factored_min_distance``, which is memory-bound and has no tl.dot) must contain at least one
  tensor-core instruction (SASS opcode ending in ``MMA``: HMMA, HGMMA, ...) in every configuration at the
  default precision; and, in each budgeted nvcc pass, each file of ``CUDA_TENSOR_CORE_FILES`` must have at least
  one float32 ``__global__`` function with one.

Output ``bench/results/sm90-compile.json``: ``{"date", "seconds", "budgets", "rules", "triton": {version:
{"python_path", "ptxas", "records": [...], "errors": [...]} or {"skipped": why}}, and for each key of
NVCC_SECTIONS ("nvcc", "nvcc_gpu_machine", "nvcc_sm75"): {"title", "nvcc", "version", "torch_headers", "arch",
"budgeted", "required", "flags", "cuobjdump", "includes", "files": {file: {"ok", "seconds", "cpu_seconds", "error"}},
"records": [...]} or
{"skipped": why} or {"error": why}, "failures": [...]}``. A Triton record
holds kernel, precision ("(fixed)" for a kernel without a PRECISION constexpr), constexprs, num_warps,
num_stages, options (other launch options config() returns), specialized (integer arguments' launch
types and hints), main, shapes (the shapes that pick it),
registers, spill_stores, spill_loads, stack_bytes, local_bytes, shared_static_bytes, shared_bytes (dynamic,
what the launch asks for), tensor_core ({opcode: count}), tensor_core_total, ffma, sass_instructions,
compile_seconds and error; a CUDA record the same counts per function (shared_bytes: static ``smem``).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "sm90"
OUT_JSON = ROOT / "bench" / "results" / "sm90-compile.json"

# ----------------------------------------------------------------------------------------------------------
# Budgets and rules
# ----------------------------------------------------------------------------------------------------------
DEFAULT_PRECISION = "tf32x3"
MAIN_SPILL_BUDGET = 0  # last_layer_score's main configurations: never loosen
SPILL_BUDGET = {
    "_last_layer_score_kernel": 0,
    "_direct_kernel": 0,
    "_ghost_sq_kernel": 0,
    "_ghost_dot_kernel": 0,
    "_kron_project_kernel": 0,
    "_factored_min_distance_kernel": 0,
}
CUDA_SPILL_BUDGET = 0
TENSOR_CORE_KERNELS = {
    "_last_layer_score_kernel",
    "_direct_kernel",
    "_ghost_sq_kernel",
    "_ghost_dot_kernel",
    "_kron_project_kernel",
}
CUDA_TENSOR_CORE_FILES = {"last_layer_score.cu", "linear_sample_score.cu", "kron_project.cu"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # keys of config() that are not constexprs
GPU_VERSION_TRITON = "3.6.0"  # what the GPU machine runs
GPU_MACHINE_NVCC, GPU_MACHINE_TORCH = "13.0", "2.11"  # the GPU machine's nvcc and torch, which build fastdal._C
# The nvcc passes over csrc/cuda, by their JSON key (NvccPass, nvcc_passes): sm_90 with the installed nvcc and torch
# headers, sm_90 with the GPU machine's nvcc and torch headers, and sm_75 (Turing) device code.
NVCC_SECTIONS = ("nvcc", "nvcc_gpu_machine", "nvcc_sm75")
# Whether csrc/cuda must compile for sm_75: setup.py's default architectures include 7.5 (T4s), so a compile error
# there breaks every CUDA build that does not name its architectures. False only to land other work while such an
# error is being fixed: the errors are still reported in the table and the JSON.
SM75_REQUIRED = True
TYPE_RULES = [  # (regex on the argument name, Triton type); the first match wins
    (r"label_ptr", "*i64"),
    (r".*_ptr", "*fp32"),
    (r"gamma|offset", "fp32"),
    (r"[A-Z][A-Z_]*", "i32"),  # sizes: N, K, D, T, D_IN, GROUPS, ...
    (r"s[a-z]+_[a-z]+", "i32"),  # strides: sa_n, sd_o, ...
    (r"center", "i32"),
]
NVCC_FLAGS = [
    "-std=c++20",  # what torch 2.13's BuildExtension passes; its headers use C++20 bit-field initializers
    "-O3",
    "-lineinfo",
    "-Xptxas",
    "-v",
    "--expt-relaxed-constexpr",
    # torch.utils.cpp_extension's COMMON_NVCC_FLAGS and extension defines, as setup.py's build gets them
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-DTORCH_API_INCLUDE_EXTENSION_H",
    "-DTORCH_EXTENSION_NAME=_C",
    "-diag-suppress=3306",  # torch headers' C++20 notes would bury the ptxas lines
]

# (test helper, op, number of leading shape arguments) and parametrize argument names, per op
SHAPE_FIELDS = {
    "last_layer_score": ("n", "d", "k"),
    "linear_sample_score": ("n", "t", "d_in", "d_out", "groups"),
    "kron_project": ("n", "t", "d_in", "d_out", "groups", "r_in", "r_out"),
    "factored_min_distance": ("n", "k", "d"),
}
TEST_HELPERS = {
    "_last_inputs": "last_layer_score",
    "_linear_inputs": "linear_sample_score",
    "_kron_inputs": "kron_project",
    "_distance_inputs": "factored_min_distance",
}
TEST_LISTS = {
    "LAST_SHAPES": "last_layer_score",
    "LINEAR_SHAPES": "linear_sample_score",
    "REGISTER_TILE_SHAPES": "linear_sample_score",
    "KRON_SHAPES": "kron_project",
}


# ----------------------------------------------------------------------------------------------------------
# Shapes of the tests and benchmarks
# ----------------------------------------------------------------------------------------------------------
def _shape(op: str, values: tuple, source: str) -> dict[str, Any]:
    fields = SHAPE_FIELDS[op]
    if len(values) != len(fields) or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{source}: {values!r} is not a {op} shape {fields}")
    return {"op": op, **dict(zip(fields, values)), "source": source}


def test_shapes(path: Path) -> list[dict[str, Any]]:
    """Shapes of tests/test_ops.py: its module-level shape lists, literal helper calls and parametrize lists."""
    tree = ast.parse(path.read_text())
    literals: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError, SyntaxError):
                literals[node.targets[0].id] = ast.literal_eval(node.value)
    shapes = []
    for name, op in TEST_LISTS.items():
        if name not in literals:
            raise ValueError(f"{path}: no literal module-level {name}; the test file's shape lists have moved")
        shapes += [_shape(op, tuple(v), f"tests {name}") for v in literals[name]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in TEST_HELPERS:
            op = TEST_HELPERS[node.func.id]
            lead = node.args[: len(SHAPE_FIELDS[op])]
            if len(lead) == len(SHAPE_FIELDS[op]) and all(
                isinstance(a, ast.Constant) and isinstance(a.value, int) for a in lead
            ):
                shapes.append(_shape(op, tuple(a.value for a in lead), f"tests {node.func.id}:{node.lineno}"))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            op = next((o for o in SHAPE_FIELDS if node.name.startswith(f"test_{o}")), None)
            for deco in node.decorator_list:
                if not (isinstance(deco, ast.Call) and ast.unparse(deco.func).endswith("parametrize")):
                    continue
                if len(deco.args) < 2 or not isinstance(deco.args[0], ast.Constant):
                    continue
                names = tuple(s.strip() for s in str(deco.args[0].value).split(","))
                if op is None or names != SHAPE_FIELDS[op]:
                    continue
                arg = deco.args[1]
                try:
                    values = literals[arg.id] if isinstance(arg, ast.Name) else ast.literal_eval(arg)
                except (KeyError, ValueError):
                    continue
                shapes += [_shape(op, tuple(v), f"tests {node.name}") for v in values]
    return shapes


def bench_shapes() -> list[dict[str, Any]]:
    """Shapes of every op benchmark (bench/op_cases.py), the GPU-only and full-size ones included."""
    import op_cases  # bench/ is this script's directory, so it is on sys.path

    cases = op_cases.LAST_LAYER + op_cases.LAYERS + op_cases.GPU_ROOFLINE + op_cases.FULL_SIZE + op_cases.DRY_RUN
    shapes = []
    for spec in cases:
        op, source = spec["op"], "bench " + ",".join(f"{k}={v}" for k, v in spec.items() if k != "op")
        if op == "kron_project":
            spec = {**spec, "r_in": spec["r"], "r_out": spec["r"], "groups": 1}
        if op == "linear_sample_score":
            spec = {**spec, "groups": 1}
        shapes.append(_shape(op, tuple(spec[f] for f in SHAPE_FIELDS[op]), source))
    return shapes


# ----------------------------------------------------------------------------------------------------------
# Triton worker: runs in a subprocess per Triton version
# ----------------------------------------------------------------------------------------------------------
def _kernel_modules() -> dict[str, types.ModuleType]:
    """The working tree's kernels/ as fastdal.kernels.*, whether or not (or wherever) fastdal is installed."""
    sys.path.insert(0, str(ROOT))
    names = ("last_layer_score", "linear_sample_score", "kron_project", "factored_min_distance")
    try:
        import fastdal.kernels as package

        here = Path(package.__file__).resolve().parent == ROOT / "kernels"
    except Exception:  # fastdal not installed, or its __init__ broken mid-edit: the kernels do not need it
        here = False
        if "fastdal" not in sys.modules:
            parent = types.ModuleType("fastdal")
            parent.__path__ = [str(ROOT / "fastdal")]
            sys.modules["fastdal"] = parent
    if not here:  # not installed, or installed from elsewhere: register this tree's kernels/ under that name
        spec = importlib.util.spec_from_file_location(
            "fastdal.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["fastdal.kernels"] = package
        spec.loader.exec_module(package)
        for name in names:
            sys.modules.pop(f"fastdal.kernels.{name}", None)
    return {name: importlib.import_module(f"fastdal.kernels.{name}") for name in names}


def _signature(
    fn: Any, constexprs: dict[str, Any], specialized: dict[str, str]
) -> tuple[dict[str, str], dict[tuple[int], list]]:
    """Triton signature of a JITFunction by TYPE_RULES (or the launcher's own typing of a known value, in
    ``specialized``: "i32", "i32:16", ...), and the divisibility hints: pointers, and integers ending in ":16"."""
    signature, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr or name in constexprs:  # an integer argument of value 1 is a constexpr at launch
            if name not in constexprs:
                raise ValueError(f"{fn.__name__}: no value for constexpr {name}")
            signature[name] = "constexpr"
            continue
        if name in specialized:
            signature[name], _, hint = specialized[name].partition(":")
            if hint:
                attrs[(i,)] = [["tt.divisibility", int(hint)]]
            continue
        kind = next((t for pattern, t in TYPE_RULES if re.fullmatch(pattern, name)), None)
        if kind is None:
            raise ValueError(f"{fn.__name__}: argument {name!r} matches no rule of TYPE_RULES; add one")
        signature[name] = kind
        if kind.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    unknown = set(constexprs) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__}: constexprs {sorted(unknown)} are not arguments of the kernel")
    return signature, attrs


def _configs(modules: dict[str, types.ModuleType], shapes: list[dict]) -> tuple[list[dict], list[str]]:
    """Distinct (kernel, constexprs, warps, stages) the launchers pick for the shapes, with their shapes."""
    jobs: dict[tuple, dict] = {}
    errors = []

    def add(
        fn_name: str,
        module: types.ModuleType,
        launch: dict,
        extra: dict,
        precision: str,
        shape: dict,
        main: bool,
        ints: dict[str, int] | None = None,
    ) -> None:
        fn = getattr(module, fn_name, None)
        if fn is None:
            errors.append(f"{module.__name__} has no kernel {fn_name}")
            return
        launch = dict(launch)
        options = {k: launch.pop(k) for k in LAUNCH_OPTIONS if k in launch}  # the rest are constexprs
        warps, stages = options.pop("num_warps", 4), options.pop("num_stages", 3)  # triton.Config's defaults
        constexprs = {**launch, **extra}
        if "PRECISION" in fn.arg_names:
            constexprs["PRECISION"] = precision
        specialized = _specialize(fn, ints or {}, constexprs)
        key = (
            fn_name,
            tuple(sorted(constexprs.items())),
            warps,
            stages,
            tuple(sorted(options.items())),
            tuple(sorted(specialized.items())),
        )
        job = jobs.setdefault(
            key,
            {
                "kernel": fn_name,
                "module": module.__name__.rsplit(".", 1)[-1],
                "precision": precision if "PRECISION" in fn.arg_names else "(fixed)",  # no PRECISION constexpr
                "constexprs": constexprs,
                "num_warps": warps,
                "num_stages": stages,
                "options": options,
                "specialized": specialized,
                "main": False,
                "shapes": [],
            },
        )
        job["main"] |= main
        label = ",".join(f"{f}={shape[f]}" for f in SHAPE_FIELDS[shape["op"]]) + f" ({shape['source']})"
        if label not in job["shapes"]:
            job["shapes"].append(label)

    for shape in shapes:
        if getattr(modules[shape["op"]], "config", None) is None:
            errors.append(f"fastdal.kernels.{shape['op']} has no config(): its launch configurations are unknown")
            continue
        try:
            _add_shape(modules[shape["op"]], shape, add)
        except Exception as error:  # a launcher whose config() changed its interface: a failure, not a crash
            errors.append(f"fastdal.kernels.{shape['op']}.config() for {shape}: {type(error).__name__}: {error}")

    order = list(SPILL_BUDGET)  # kernels in budget order, default precision first, then by block sizes
    ranked = sorted(
        jobs.values(),
        key=lambda j: (
            order.index(j["kernel"]) if j["kernel"] in order else len(order),
            j["precision"] == "ieee",
            tuple(sorted((k, v) for k, v in j["constexprs"].items() if k.startswith("BLOCK_"))),
            j["num_warps"],
            j["num_stages"],
        ),
    )
    return ranked, sorted(set(errors))


def _specialize(fn: Any, ints: dict[str, int], constexprs: dict[str, Any]) -> dict[str, str]:
    """What Triton's launcher makes of known integer arguments (its own native_specialize_impl): value 1 becomes
    a constexpr (added to ``constexprs``), a multiple of 16 gets a divisibility hint ("i32:16"), unless the
    kernel says do_not_specialize; returns {name: "i32" | "i32:16" | "i64" | ...} for the others."""
    if not ints:
        return {}
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    params = dict(zip(fn.arg_names, fn.params))
    result = {}
    for name, value in ints.items():
        if name not in params:
            raise ValueError(f"{fn.__name__} has no argument {name}; update the shape-to-argument map")
        param = params[name]
        kind, key = native_specialize_impl(
            BaseBackend, value, False, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )[:2]
        if kind == "constexpr":
            constexprs[name] = value
        else:
            result[name] = f"{kind}:16" if key == "D" else kind
    return result


def _add_shape(module: types.ModuleType, shape: dict, add: Any) -> None:
    """Ask the op's launcher config() for the shape and add every kernel it would launch."""
    op = shape["op"]
    config = module.config
    if op == "last_layer_score":
        main = shape["k"] >= 128 or (shape["n"] == 1 << 20 and shape["d"] == 2048)
        launch = config(shape["n"], shape["k"], shape["d"])
        flags = {"HAS_BIAS": True, "HAS_GW": True, "HAS_GB": True}
        ints = {"N": shape["n"], "K": shape["k"], "D": shape["d"]}
        add("_last_layer_score_kernel", module, launch, flags, DEFAULT_PRECISION, shape, main, ints)
        if main:
            add("_last_layer_score_kernel", module, launch, flags, "ieee", shape, main, ints)
    elif op == "linear_sample_score":
        args = (shape["t"], shape["d_in"], shape["d_out"])
        add("_direct_kernel", module, config("direct", *args), {"HAS_G": True}, DEFAULT_PRECISION, shape, False)
        add("_ghost_sq_kernel", module, config("ghost_sq", *args), {}, DEFAULT_PRECISION, shape, False)
        add("_ghost_dot_kernel", module, config("ghost_dot", *args), {}, DEFAULT_PRECISION, shape, False)
    elif op == "kron_project":
        launch = config(shape["t"], shape["d_in"], shape["d_out"], shape["r_in"], shape["r_out"])
        add("_kron_project_kernel", module, launch, {}, DEFAULT_PRECISION, shape, False)
    else:
        launch = config(shape["n"], shape["k"], shape["d"])
        ints = {"N": shape["n"], "K": shape["k"], "D": shape["d"], "center": shape["n"] - 1}
        add("_factored_min_distance_kernel", module, launch, {}, DEFAULT_PRECISION, shape, False, ints)


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """Per entry function of a ``ptxas -v`` log: registers, spill stores/loads, stack, smem, cmem[0]."""
    result: dict[str, dict[str, int]] = {}
    entry = props = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            entry = m.group(1)
            result.setdefault(entry, {})
        elif m := re.search(r"Function properties for (\S+)", line):
            props = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            if props in result:  # properties of non-entry (device) functions are not kernels
                result[props].update(stack_bytes=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif (m := re.search(r"Used (\d+) registers", line)) and entry is not None:
            result[entry]["registers"] = int(m[1])
            if s := re.search(r"(\d+) bytes smem", line):
                result[entry]["shared_bytes"] = int(s[1])
    return result


def sass_counts(cuobjdump: str, binary: Path) -> dict[str, Counter]:
    """Per function of a cubin or object: a Counter of SASS opcodes (modifiers stripped)."""
    proc = subprocess.run([cuobjdump, "-sass", str(binary)], capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. no nvdisasm beside it (the nvidia-cuda-nvdisasm wheel)
        raise RuntimeError(f"{cuobjdump} -sass {binary}: {proc.stderr.strip()[-500:]}")
    out = proc.stdout
    counts: dict[str, Counter] = {}
    current = None
    for line in out.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            current = m.group(1)
            counts[current] = Counter()
        elif current and (m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", line)):
            counts[current][m.group(1)] += 1
    return counts


def _sass_fields(ops: Counter) -> dict[str, Any]:
    tensor_core = {op: n for op, n in sorted(ops.items()) if op.endswith("MMA")}
    return {
        "tensor_core": tensor_core,
        "tensor_core_total": sum(tensor_core.values()),
        "ffma": ops.get("FFMA", 0),
        "dfma": ops.get("DFMA", 0),
        "sass_instructions": sum(ops.values()),
    }


def triton_worker(out: Path) -> None:
    """Compile every configuration with the Triton this interpreter imports; write the records to ``out``."""
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("TRITON_INTERPRET is set: the interpreter would replace compilation")
    import triton
    import triton.compiler
    from triton.backends.compiler import GPUTarget

    modules = _kernel_modules()
    shapes = test_shapes(ROOT / "tests" / "test_ops.py") + bench_shapes()
    distinct: dict[tuple, dict] = {}  # a shape listed twice keeps its first source
    for shape in shapes:
        distinct.setdefault(tuple(shape[f] for f in ("op", *SHAPE_FIELDS[shape["op"]])), shape)
    shapes = list(distinct.values())
    jobs, errors = _configs(modules, shapes)
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cuobjdump, ptxas = str(bin_dir / "cuobjdump"), str(bin_dir / "ptxas")
    ptxas_version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs:
            fn = getattr(modules[job["module"]], job["kernel"])
            record = {k: v for k, v in job.items() if k != "module"}
            start = time.perf_counter()
            try:
                signature, attrs = _signature(fn, job["constexprs"], job["specialized"])
                source = triton.compiler.ASTSource(
                    fn=fn, signature=signature, constexprs=job["constexprs"], attrs=attrs
                )
                log = io.StringIO()
                with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints Triton's own ptxas -v log
                    compiled = triton.compile(
                        source,
                        target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": job["num_warps"], "num_stages": job["num_stages"], **job["options"]},
                    )
                record["compile_seconds"] = round(time.perf_counter() - start, 2)
                ptxas_info = parse_ptxas_log(log.getvalue()).get(compiled.metadata.name, {})
                if "spill_stores" not in ptxas_info:
                    raise RuntimeError("no ptxas -v log was captured (TRITON_DUMP_PTXAS_LOG unsupported?)")
                cubin = Path(tmp) / f"{len(records)}.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                usage = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True).stdout
                res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
                record.update(
                    registers=ptxas_info.get("registers", int(res.get("REG", -1))),
                    spill_stores=ptxas_info["spill_stores"],
                    spill_loads=ptxas_info["spill_loads"],
                    stack_bytes=ptxas_info["stack_bytes"],
                    local_bytes=int(res.get("LOCAL", 0)),
                    shared_static_bytes=int(res.get("SHARED", 0)),
                    shared_bytes=compiled.metadata.shared,
                    arch=getattr(compiled.metadata, "arch", None),
                    **_sass_fields(next(iter(sass_counts(cuobjdump, cubin).values()), Counter())),
                    error=None,
                )
            except Exception as error:  # every compile error becomes a failure of the report
                record.update(
                    compile_seconds=round(time.perf_counter() - start, 2),
                    error=f"{type(error).__name__}: {str(error)[-2000:]}",
                )
            records.append(record)
    out.write_text(
        json.dumps(
            {
                "version": triton.__version__,
                "python_path": str(Path(triton.__file__).parent),
                "ptxas": ptxas_version[-1] if ptxas_version else None,
                "records": records,
                "errors": errors,
            },
            indent=1,
        )
    )


def run_triton(version: str | None, path: Path | None, out: Path) -> dict[str, Any]:
    """One Triton version's compile in a subprocess (a fresh cache, so that ptxas really runs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as cache:
        env.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        proc = subprocess.run(
            [sys.executable, __file__, "--triton-worker", str(out)], env=env, capture_output=True, text=True
        )
    if proc.returncode != 0 or not out.exists():
        return {"error": f"worker exited {proc.returncode}: {(proc.stderr or proc.stdout)[-3000:]}"}
    result = json.loads(out.read_text())
    if version is not None and result["version"] != version:
        return {"error": f"asked for Triton {version} at {path}, got {result['version']} from {result['python_path']}"}
    return result


# ----------------------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NvccPass:
    """One compile of every csrc/cuda/*.cu: which nvcc, against which torch headers, for which GPU, checked how."""

    key: str  # its section of the JSON
    title: str  # what it proves, for the table
    cuda: Path | None  # CUDA root holding bin/nvcc; None where none was found
    torch_include: Path | None  # the torch/include compiled against; None where it was not given
    arch: int  # compute capability as nvcc writes it: 90, 75
    # Device code only (nvcc --cubin): for an extra architecture, the host code (the same for every arch)
    # is already compiled by the sm_90 pass, so only the device side is new.
    device_only: bool = False
    budgeted: bool = True  # the spill and tensor-core budgets apply; else its figures are reported only
    required: bool = True  # its compile errors fail the run; else they are reported only
    expect_versions: tuple[str, str] | None = None  # (nvcc, torch) release prefixes this pass stands for


def find_cuda(root: Path | None, search_elsewhere: bool = True) -> Path | None:
    """The CUDA root (bin/nvcc) of the nvidia wheels: under ``root`` (a pip --target dir), else (where
    ``search_elsewhere``) site-packages or PATH."""
    candidates = []
    if root is not None:
        candidates += sorted(root.glob("nvidia/*/bin/nvcc")) + sorted(root.glob("bin/nvcc"))
    if search_elsewhere:
        candidates += sorted(Path(sysconfig.get_paths()["purelib"]).glob("nvidia/*/bin/nvcc"))
        if which := shutil.which("nvcc"):
            candidates.append(Path(which))
    return candidates[0].parent.parent if candidates else None


def installed_torch_include() -> Path:
    import torch.utils.cpp_extension as cpp_extension

    return Path(cpp_extension.include_paths()[0])


def torch_headers_version(include: Path) -> str | None:
    """``major.minor.patch`` of the torch headers in ``include`` (torch/headeronly/version.h, or the older
    torch/csrc/api/include/torch/version.h)."""
    for header in (include / "torch" / "headeronly" / "version.h", include / "torch/csrc/api/include/torch/version.h"):
        if header.exists():
            parts = dict(re.findall(r"#define TORCH_VERSION_(MAJOR|MINOR|PATCH) (\d+)", header.read_text()))
            if len(parts) == 3:
                return f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}"
    return None


def _short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::kernel<float, ns::Shape<2>>(args)`` -> ``kernel<float, Shape<2>>``."""
    depth, cut = 0, len(demangled)
    for i, ch in enumerate(demangled):  # the argument list is the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and not demangled[i:].startswith("(anonymous"):
            cut = i
            break
    head = demangled[:cut].removeprefix("void ").replace("(anonymous namespace)::", "")
    return re.sub(r"\b(\w+::)+", "", head)  # namespaces, also inside template arguments


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def nvcc_flags(nvcc_pass: NvccPass) -> list[str]:
    """NVCC_FLAGS with the pass's target and output kind."""
    target = f"-gencode=arch=compute_{nvcc_pass.arch},code=sm_{nvcc_pass.arch}"
    return [*NVCC_FLAGS, target, "--cubin" if nvcc_pass.device_only else "-c"]


def compile_cu(nvcc_pass: NvccPass, cuobjdump: Path, includes: list[str], source: Path) -> dict[str, Any]:
    """nvcc one .cu as the pass says; its per-function ptxas figures and SASS counts."""
    obj = BUILD / "obj" / nvcc_pass.key / (source.stem + (".cubin" if nvcc_pass.device_only else ".o"))
    obj.parent.mkdir(parents=True, exist_ok=True)
    nvcc = nvcc_pass.cuda / "bin" / "nvcc"
    start = time.perf_counter()
    returncode, log, cpu = run_with_cpu_time(
        [str(nvcc), *nvcc_flags(nvcc_pass), *(f"-I{i}" for i in includes), str(source), "-o", str(obj)]
    )
    seconds, timing = round(time.perf_counter() - start, 1), {"cpu_seconds": round(cpu, 1)}
    if returncode != 0:
        errors = "\n".join([line for line in log.splitlines() if "error" in line][:20]) or log[-3000:]
        return {"ok": False, "seconds": seconds, **timing, "error": errors, "records": []}
    info = parse_ptxas_log(log)
    sass = sass_counts(str(cuobjdump), obj)
    names = _demangle(sorted(info))
    records = []
    for mangled, fields in sorted(info.items()):
        records.append(
            {
                "file": source.name,
                "function": names[mangled],
                "short": _short_name(names[mangled]),
                "mangled": mangled,
                "registers": fields.get("registers"),
                "spill_stores": fields.get("spill_stores", 0),
                "spill_loads": fields.get("spill_loads", 0),
                "stack_bytes": fields.get("stack_bytes", 0),
                "shared_bytes": fields.get("shared_bytes", 0),
                **_sass_fields(sass.get(mangled, Counter())),
            }
        )
    return {"ok": True, "seconds": seconds, **timing, "error": None, "records": records}


def run_with_cpu_time(cmd: list[str]) -> tuple[int, str, float]:
    """Exit status, output (stderr and stdout together) and CPU seconds (user + system, its children included)
    of ``cmd``: on a shared machine the CPU time, unlike the wall time, does not grow with the others' load."""
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        output.seek(0)
        return proc.returncode, output.read().decode(errors="replace"), usage.ru_utime + usage.ru_stime


def _compile_cu_or_error(nvcc_pass: NvccPass, cuobjdump: Path, includes: list[str], source: Path) -> dict[str, Any]:
    try:
        return compile_cu(nvcc_pass, cuobjdump, includes, source)
    except Exception as error:  # a tool that fails is a failure of the report, not a crash of the others
        return {"ok": False, "seconds": None, "error": f"{type(error).__name__}: {error}", "records": []}


def _shim() -> Path:
    """A folder with the one header the CPU (and macOS) torch wheels lack: their CUDA headers include it for
    build-time macros that matter on Windows only."""
    shim = BUILD / "shim"
    (shim / "c10" / "cuda" / "impl").mkdir(parents=True, exist_ok=True)
    (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    return shim


def run_nvcc(
    nvcc_pass: NvccPass, cuobjdump: Path | None, pool: concurrent.futures.Executor
) -> tuple[dict[str, Any], list]:
    """Submit every csrc/cuda/*.cu of one pass; returns its section (files filled in later) and the futures.
    ``cuobjdump``: the one to read SASS with where none lies beside this pass's nvcc (no 13.0 wheel of it)."""
    if nvcc_pass.cuda is None:
        return {"error": "no nvcc found (pip install nvidia-cuda-nvcc ...; make gpu-compile does)"}, []
    if nvcc_pass.torch_include is None or not (nvcc_pass.torch_include / "ATen").is_dir():
        return {"error": f"no torch headers (torch/include with ATen/) at {nvcc_pass.torch_include}"}, []
    nvcc = nvcc_pass.cuda / "bin" / "nvcc"
    version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    section = {
        "title": nvcc_pass.title,
        "nvcc": str(nvcc),
        "version": version[-1] if version else None,
        "torch_headers": torch_headers_version(nvcc_pass.torch_include),
        "arch": f"sm_{nvcc_pass.arch}",
        "budgeted": nvcc_pass.budgeted,
        "required": nvcc_pass.required,
        "flags": nvcc_flags(nvcc_pass),
    }
    if nvcc_pass.expect_versions is not None:
        nvcc_release, torch_release = nvcc_pass.expect_versions
        found = (re.search(r"cuda_(\d+\.\d+)", section["version"] or ""), section["torch_headers"] or "")
        if found[0] is None or found[0][1] != nvcc_release or not found[1].startswith(torch_release + "."):
            section["error"] = (
                f"this pass stands for nvcc {nvcc_release} and torch {torch_release}, found nvcc "
                f"{found[0][1] if found[0] else '?'} and torch headers {found[1] or '?'}"
            )
            return section, []
    beside = nvcc.parent / "cuobjdump"  # the nvidia-cuda-cuobjdump wheel puts it beside nvcc
    cuobjdump = beside if beside.exists() else cuobjdump
    if cuobjdump is None:
        section["error"] = f"no cuobjdump beside {nvcc} (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
        return section, []
    section["cuobjdump"] = str(cuobjdump)
    cuda_include = nvcc_pass.cuda / "include"
    includes = [_shim(), nvcc_pass.torch_include, nvcc_pass.torch_include / "torch/csrc/api/include", cuda_include]
    includes += [p for p in (cuda_include / "cccl",) if p.is_dir()]
    section["includes"] = [str(p) for p in includes]
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    futures = [
        (s.name, pool.submit(_compile_cu_or_error, nvcc_pass, cuobjdump, section["includes"], s)) for s in sources
    ]
    return section, futures


# ----------------------------------------------------------------------------------------------------------
# Budgets, table, main
# ----------------------------------------------------------------------------------------------------------
def _config_label(record: dict) -> str:
    items = record["constexprs"].items()
    blocks = ",".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in items if k.startswith("BLOCK_"))
    # the launch specialization of the integer arguments: "D%16" (divisibility hint), "N=1" (constexpr)
    special = [f"{k}%16" for k, v in record.get("specialized", {}).items() if v.endswith(":16")]
    special += [
        f"{k}={v}" for k, v in items if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("BLOCK_")
    ]
    return f"{blocks} w{record['num_warps']}s{record['num_stages']}" + (f" {','.join(special)}" if special else "")


def check(result: dict[str, Any]) -> list[str]:
    """Every failure: compile errors, spills over budget, GEMM-shaped kernels without tensor cores."""
    failures = []
    for version, section in result["triton"].items():
        if "error" in section:
            failures.append(f"triton {version}: {section['error']}")
            continue
        failures += [f"triton {version}: {e}" for e in section.get("errors", [])]
        for r in section.get("records", []):
            where = f"triton {version} {r['kernel']} [{_config_label(r)}] {r['precision']}"
            if r["error"]:
                failures.append(f"{where}: compile error: {r['error'][-500:]}")
                continue
            if r["precision"] == "ieee":
                continue  # the comparison compile: reported, not budgeted
            budget = MAIN_SPILL_BUDGET if r["main"] else SPILL_BUDGET.get(r["kernel"], 0)
            if max(r["spill_stores"], r["spill_loads"]) > budget:
                failures.append(
                    f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads > "
                    f"budget {budget} B{' (main config)' if r['main'] else ''}; {r['registers']} registers"
                )
            if r["kernel"] in TENSOR_CORE_KERNELS and r["tensor_core_total"] == 0:
                failures.append(
                    f"{where}: GEMM-shaped kernel without tensor-core instructions at the default "
                    f"precision ({r['ffma']} FFMA)"
                )
    for key in NVCC_SECTIONS:
        failures += check_nvcc(key, result.get(key, {}))
    return failures


def check_nvcc(key: str, section: dict[str, Any]) -> list[str]:
    """One nvcc pass's failures: compile errors; where it is budgeted, spills and float32 kernels of
    CUDA_TENSOR_CORE_FILES without tensor cores. A skipped pass (its toolchain not given) fails nothing, nor does
    one that is not required (SM75_REQUIRED)."""
    failures = []
    if not section.get("required", True):
        return failures
    if "error" in section:
        failures.append(f"{key}: {section['error']}")
    for name, f in section.get("files", {}).items():
        if not f["ok"]:
            failures.append(f"{key} {name}: compile error: {f['error']}")
    if not section.get("budgeted"):
        return failures
    for r in section.get("records", []):
        if max(r["spill_stores"], r["spill_loads"]) > CUDA_SPILL_BUDGET:
            failures.append(
                f"{key} {r['file']} {r['short']}: spills {r['spill_stores']} B stores / "
                f"{r['spill_loads']} B loads > budget {CUDA_SPILL_BUDGET} B; {r['registers']} registers"
            )
    for name in sorted(CUDA_TENSOR_CORE_FILES):
        f = section.get("files", {}).get(name)
        if f is None or not f["ok"]:
            continue
        # float32: no double in the demangled signature (tensor-core kernels name a precision, not a dtype)
        fp32 = [r for r in section["records"] if r["file"] == name and "double" not in r["function"]]
        if not any(r["tensor_core_total"] > 0 for r in fp32):
            failures.append(
                f"{key} {name}: no float32 __global__ function has tensor-core instructions "
                f"({', '.join(r['short'] for r in fp32) or 'no float32 kernel found'})"
            )
    return failures


def print_table(result: dict[str, Any]) -> None:
    tc_cell = lambda r: ",".join(f"{k}:{v}" for k, v in r["tensor_core"].items()) or "0"  # noqa: E731
    for version, section in result["triton"].items():
        print(f"\nTriton {version} (sm_90, {section.get('ptxas') or section.get('skipped') or section.get('error')})")
        print(
            f"{'kernel':<30} {'config':<40} {'prec':<7} {'main':<4} {'regs':>4} {'spill st/ld':>11} "
            f"{'stack':>5} {'smem':>7} {'tensor-core':<14} {'FFMA':>5}"
        )
        for r in section.get("records", []):
            if r["error"]:
                print(f"{r['kernel']:<30} {_config_label(r):<40} {r['precision']:<7} ERROR {r['error'][:80]}")
                continue
            print(
                f"{r['kernel']:<30} {_config_label(r):<40} {r['precision'][:7]:<7} {'yes' if r['main'] else '':<4} "
                f"{r['registers']:>4} {r['spill_stores']:>5}/{r['spill_loads']:<5} {r['stack_bytes']:>5} "
                f"{r['shared_bytes']:>7} {tc_cell(r):<14} {r['ffma']:>5}"
            )
    for key in NVCC_SECTIONS:
        nv = result.get(key, {})
        state = nv.get("skipped") or nv.get("error") or f"{nv.get('version')}, torch {nv.get('torch_headers')} headers"
        optional = "" if nv.get("required", True) else "; not required: its errors are reported, not failed"
        print(f"\n{key}: {nv.get('title', '')} ({state}{optional})")
        for name, f in nv.get("files", {}).items():
            if not f["ok"]:
                print(f"{name}: COMPILE ERROR\n  " + f["error"].replace("\n", "\n  "))
        if not nv.get("records"):
            continue
        print(
            f"{'file':<26} {'function':<52} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6} "
            f"{'tensor-core':<14} {'FFMA':>5} {'DFMA':>5}"
        )
        for r in nv["records"]:
            print(
                f"{r['file']:<26} {r['short'][:52]:<52} {r['registers']:>4} "
                f"{r['spill_stores']:>5}/{r['spill_loads']:<5} {r['stack_bytes']:>5} {r['shared_bytes']:>6} "
                f"{tc_cell(r):<14} {r['ffma']:>5} {r['dfma']:>5}"
            )


def nvcc_passes(
    cuda_root: Path | None, gpu_machine_cuda_root: Path | None, gpu_machine_torch_include: Path | None
) -> list[NvccPass]:
    """The passes over csrc/cuda, the budgeted sm_90 one with the installed toolchain first; the GPU machine's
    only where both of its options are given (a half-given toolchain is an error of that pass)."""
    cuda, torch_include = find_cuda(cuda_root), installed_torch_include()
    passes = [
        NvccPass("nvcc", "sm_90, nvcc and torch headers of this machine", cuda, torch_include, 90),
        NvccPass(
            "nvcc_sm75",
            "sm_75 (Turing T4) device code, the tensor-core paths compiled out; reported, not budgeted",
            cuda,
            torch_include,
            75,
            device_only=True,
            budgeted=False,
            required=SM75_REQUIRED,
        ),
    ]
    if gpu_machine_cuda_root is not None or gpu_machine_torch_include is not None:
        gpu_cuda = find_cuda(gpu_machine_cuda_root, search_elsewhere=False) if gpu_machine_cuda_root else None
        passes.append(
            NvccPass(
                "nvcc_gpu_machine",
                f"sm_90, the GPU machine's nvcc {GPU_MACHINE_NVCC} and torch {GPU_MACHINE_TORCH} headers",
                gpu_cuda,
                gpu_machine_torch_include,
                90,
                expect_versions=(GPU_MACHINE_NVCC, GPU_MACHINE_TORCH),
            )
        )
    return passes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--triton",
        action="append",
        default=[],
        metavar="VERSION=DIR",
        help=f"also compile with the Triton installed in DIR (pip --target), e.g. "
        f"{GPU_VERSION_TRITON}=build/sm90/triton-{GPU_VERSION_TRITON}",
    )
    parser.add_argument("--cuda-root", type=Path, help="pip --target directory of the nvidia-cuda-nvcc wheels")
    parser.add_argument(
        "--gpu-machine-cuda-root",
        type=Path,
        help=f"pip --target directory of the GPU machine's nvcc {GPU_MACHINE_NVCC} wheels (with the next option)",
    )
    parser.add_argument(
        "--gpu-machine-torch-include", type=Path, help=f"torch/include of torch {GPU_MACHINE_TORCH}, the GPU machine's"
    )
    parser.add_argument("--out", type=Path, default=OUT_JSON)
    parser.add_argument("--triton-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.triton_worker:
        triton_worker(args.triton_worker)
        return 0

    start = time.perf_counter()
    extra = dict(spec.split("=", 1) for spec in args.triton)
    if GPU_VERSION_TRITON not in extra:  # the GPU machine's version, where it was installed before
        found = [
            p
            for p in (BUILD / f"triton-{GPU_VERSION_TRITON}", Path(f"/tmp/triton-{GPU_VERSION_TRITON}"))
            if (p / "triton" / "__init__.py").exists()
        ]
        extra[GPU_VERSION_TRITON] = str(found[0]) if found else ""
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budgets": {
            "default_precision": DEFAULT_PRECISION,
            "last_layer_score_main_spill_bytes": MAIN_SPILL_BUDGET,
            "triton_spill_bytes": SPILL_BUDGET,
            "cuda_spill_bytes": CUDA_SPILL_BUDGET,
            "tensor_core_required_triton": sorted(TENSOR_CORE_KERNELS),
            "tensor_core_required_cuda_files": sorted(CUDA_TENSOR_CORE_FILES),
        },
        "rules": {
            "signature": [list(r) for r in TYPE_RULES],
            "tensor_core_opcodes": "SASS opcodes ending in MMA (HMMA, HGMMA, IMMA, DMMA, ...)",
            "main": "last_layer_score configs picked for K >= 128 or N=2**20, D=2048",
        },
        "triton": {},
    }
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        triton_jobs = {"installed": pool.submit(run_triton, None, None, Path(tmp) / "installed.json")}
        for version, path in extra.items():
            if not path:
                result["triton"][version] = {
                    "skipped": f"Triton {version} is not installed in a private directory "
                    f"(pass --triton {version}=DIR; make gpu-compile does)"
                }
            elif not (Path(path) / "triton" / "__init__.py").exists():
                result["triton"][version] = {"error": f"no Triton package in {path}"}
            else:
                triton_jobs[version] = pool.submit(run_triton, version, Path(path), Path(tmp) / f"{version}.json")
        passes = nvcc_passes(args.cuda_root, args.gpu_machine_cuda_root, args.gpu_machine_torch_include)
        primary = passes[0].cuda / "bin" / "cuobjdump" if passes[0].cuda else None
        cu_futures = {}
        for key in NVCC_SECTIONS:
            nvcc_pass = next((p for p in passes if p.key == key), None)
            if nvcc_pass is None:
                result[key] = {
                    "skipped": "the GPU machine's toolchain was not given (--gpu-machine-cuda-root and "
                    "--gpu-machine-torch-include; make gpu-compile passes both)"
                }
                continue
            result[key], cu_futures[key] = run_nvcc(nvcc_pass, primary if primary and primary.exists() else None, pool)
        for key, future in triton_jobs.items():
            section = future.result()
            result["triton"][section.get("version", key)] = section
        for key, futures in cu_futures.items():
            if futures:
                files = {name: future.result() for name, future in futures}
                result[key]["records"] = [r for f in files.values() for r in f.pop("records")]
                result[key]["files"] = files
    result["failures"] = check(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\n{args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}: {result['seconds']} s")
    if result["failures"]:
        print(f"\nFAILED: {len(result['failures'])} check(s)", file=sys.stderr)
        for failure in result["failures"]:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print("all compile checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

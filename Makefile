# The two set-up commands of the README: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3

.PHONY: all deps deps-integrations data install test fuzz demo bench bench-peers bench-models cmake lint gpu-check gpu-compile

# Plain `make`: the packages and the experiments page's data set.
all: deps data

# torch 2.13.0 (CPU) is installed only where no torch is present, so that a CUDA build already on a
# GPU machine is used as it is; likewise triton (3.7.1 pairs with torch 2.13). The other packages do
# not depend on torch.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install triton==3.7.1
	@$(PYTHON) -c "import numpy, tqdm, sklearn, pytest, pytest_benchmark, matplotlib, mlxtend, hypothesis" 2>/dev/null || \
		$(PYTHON) -m pip install numpy tqdm scikit-learn pytest pytest-benchmark matplotlib mlxtend hypothesis

# The active-learning libraries fastdal.integrations adapts, pinned, for their tests and examples. Each
# depends on torch (or on a package that does), so they go in with --no-deps, followed by their pure-Python
# dependencies by name; the last line fails if torch was replaced along the way. (baal's jupyter dependency is
# for its notebooks only and is left out; modAL-python 0.4.2.1 declares skorch==0.9.0 but runs on skorch 1.4.0, the
# version tested, which pip's resolver would refuse.)
INTEGRATIONS := baal==2.1.0 scikit-activeml==1.0.1 skorch==1.4.0 small-text==1.4.1 transformers==5.24.0 modAL-python==0.4.2.1 \
	huggingface-hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 torchmetrics==1.9.0 lightning-utilities==0.15.3
INTEGRATION_DEPS := "structlog>=22,<23" makefun tabulate dill pyyaml regex typer "click>=8.4.2" filelock fsspec \
	httpx2 packaging typing-extensions pillow joblib pandas scipy
deps-integrations: deps
	@$(PYTHON) -c "import baal, skactiveml, skorch, small_text, transformers, modAL" 2>/dev/null || { \
		before=$$($(PYTHON) -c "import torch; print(torch.__version__)") && \
		$(PYTHON) -m pip install --no-deps $(INTEGRATIONS) && $(PYTHON) -m pip install $(INTEGRATION_DEPS) && \
		test "$$($(PYTHON) -c 'import torch; print(torch.__version__)')" = "$$before"; }

install: deps
	$(PYTHON) -m pip install -e . --no-build-isolation --no-deps

# The complete Fashion-MNIST of the experiments page, from Debian's dataset-fashion-mnist (IDX files in
# /usr/share/datasets/fashion-mnist): installed with apt-get as root where it is missing, else the command is printed
# (tests/test_al_idx.py then skips, or fails where FASTDAL_REQUIRE_DATA or CI is set).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
data:
	@test -f $(FASHION_MNIST) || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
		else echo "Fashion-MNIST is missing: run  sudo apt-get install -y dataset-fashion-mnist"; fi; }

# `pip install .` as people run it, with pip's build isolation: the isolated build has no torch, so the wheel is pure
# Python and carries the sources of fastdal._C, which its first use compiles into a cache (fastdal/_build.py). In a
# fresh virtual environment (torch 2.13.0 from its local file, then the wheel with --no-deps) and outside the source
# tree, the cpp backend's scores must equal the torch backend's with fastdal._C compiled into the cache; then the
# same from the sdist, whose sources must hash to the same cache folder, so that it loads without compiling again.
# setuptools builds the wheel in build/lib and would carry in files an earlier build left there: they go first.
WHEEL_CHECK := $(abspath build/wheel-check)
define WHEEL_CHECK_PY
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

cache = Path(os.environ["FASTDAL_CACHE_DIR"])
built_before = set(cache.glob("*/built"))
import fastdal

assert "site-packages" in fastdal.__file__, f"fastdal was imported from {fastdal.__file__}, not the installed wheel"
model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).double()
x, y = torch.randn(37, 6, dtype=torch.float64), torch.randint(0, 4, (37,))
labeled, pool = DataLoader(TensorDataset(x[:20], y[:20]), batch_size=8), DataLoader(TensorDataset(x[20:]), batch_size=5)
G = fastdal.labeled_grad(model, labeled, layers="all")
cpp, expected = (fastdal.score(model, pool, G, backend=backend) for backend in ("cpp", "torch"))
assert torch.allclose(cpp, expected, rtol=1e-10, atol=0), f"cpp scores {cpp} differ from the torch backend's {expected}"
library = Path(sys.modules["fastdal._C"].__file__)
assert library.parent.parent == cache, f"fastdal._C came from {library}, not from a first-use build in {cache}"
cached = library.parent / "built" in built_before
assert cached == (sys.argv[1] == "cached"), f"expected a {sys.argv[1]} fastdal._C, it was {'cached' if cached else 'compiled'}"
print(f"wheel-check ({sys.argv[1]}): cpp == torch scores; fastdal._C loaded from {library}")
endef
export WHEEL_CHECK_PY
.PHONY: wheel-check
wheel-check:
	rm -rf $(WHEEL_CHECK) build/lib build/bdist.*
	$(PYTHON) -m pip wheel . --no-deps -w $(WHEEL_CHECK)/dist
	$(PYTHON) -m venv $(WHEEL_CHECK)/venv
	$(WHEEL_CHECK)/venv/bin/python -m pip install -q torch==2.13.0 numpy tqdm build
	$(WHEEL_CHECK)/venv/bin/python -m pip install -q --no-deps $(WHEEL_CHECK)/dist/fastdal-*-py3-none-any.whl
	cd "$$(mktemp -d)" && FASTDAL_CACHE_DIR=$(WHEEL_CHECK)/cache $(WHEEL_CHECK)/venv/bin/python -c "$$WHEEL_CHECK_PY" compiled
	$(WHEEL_CHECK)/venv/bin/python -m build --sdist --outdir $(WHEEL_CHECK)/sdist .
	tar -tzf $(WHEEL_CHECK)/sdist/fastdal-*.tar.gz | grep -q "/csrc/cuda/common.cuh"
	$(WHEEL_CHECK)/venv/bin/python -m pip install -q --no-deps --force-reinstall $(WHEEL_CHECK)/sdist/fastdal-*.tar.gz
	cd "$$(mktemp -d)" && FASTDAL_CACHE_DIR=$(WHEEL_CHECK)/cache $(WHEEL_CHECK)/venv/bin/python -c "$$WHEEL_CHECK_PY" cached
	rm -rf $(WHEEL_CHECK)/venv

# Builds fastdal._C in place, so that the tests exercise the compiled backends; the integration tests and
# the examples run against the real libraries.
test: install deps-integrations data
	$(PYTHON) -m pytest -q
	@for example in examples/*.py; do echo "== $$example"; $(PYTHON) $$example || exit 1; done
	$(PYTHON) -m torch.distributed.run --nproc_per_node=2 examples/distributed_query.py

# The property-based exactness suite with 5000 fresh examples (make test replays a fixed 300).
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PYTHON) -m pytest -q tests/test_fuzz.py

# The demo ends with a short active-learning run (2 strategies, 2 seeds, 3 rounds on digits).
demo: deps
	$(PYTHON) -m fastdal demo
	$(PYTHON) -m fastdal.al run --datasets digits --model mlp --strategies random dynamic-g2 --seeds 2 --rounds 3 \
		--out results/al-demo

bench: deps
	$(PYTHON) bench/bench_norm_choice.py
	$(PYTHON) bench/bench_score.py

# fastdal beside the per-sample-gradient libraries (bench/peers/run.py): quiet timings, peak memory in fresh
# processes, then the training step and fastdal again under a background load. BackPACK and Opacus depend on
# torch, so, as for deps-integrations, they go in pinned with --no-deps, then their pure-Python dependencies by
# name, and the last line fails if torch was replaced along the way.
PEERS := backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 opacus==1.6.0
PEER_DEPS := einops opt-einsum
bench-peers: install
	@$(PYTHON) -c "from importlib.metadata import version as v; import einops, opt_einsum; \
		assert [v(p) for p in ('backpack-for-pytorch', 'unfoldNd', 'opacus')] == ['1.7.1', '0.2.3', '1.6.0']" \
		2>/dev/null || { \
		before=$$($(PYTHON) -c "import torch; print(torch.__version__)") && \
		$(PYTHON) -m pip install --no-deps $(PEERS) && $(PYTHON) -m pip install $(PEER_DEPS) && \
		test "$$($(PYTHON) -c 'import torch; print(torch.__version__)')" = "$$before"; }
	$(PYTHON) bench/peers/run.py --background-load

# fastdal's whole-model score on the models people bring (Hugging Face BERT, DistilBERT, GPT-2, ViT; a ConvNeXt, a
# bidirectional LSTM, fastText), against a training step and torch.func, float64 exactness first; writes
# bench/results/models-cpu.json and the README's models table.
bench-models: install deps-integrations
	$(PYTHON) bench/bench_models.py

cmake: deps
	cmake -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DFASTDAL_PYTHON="$$($(PYTHON) -c 'import sys; print(sys.executable)')"
	cmake --build build/cmake

lint:
	$(PYTHON) -m ruff check fastdal kernels bench tests

# sm_90 (Hopper) compile of every Triton and CUDA kernel, no GPU needed: registers, spills and tensor-core
# instructions against the budgets stated in bench/sm90_compile.py, which writes bench/results/sm90-compile.json.
# csrc/cuda is compiled three times: with nvcc 13.5 against the installed torch's headers, with the GPU machine's
# pair (nvcc 13.0, torch 2.11 headers: what bench/gpu_check.py builds fastdal._C with there), both for sm_90 and
# budgeted; and for sm_75 (Turing T4s, tensor-core paths compiled out) with nvcc 13.5, device code only. A compile
# error in any fails the target. The toolchains go once into private directories under build/sm90 (1.3 GB), each
# with a marker naming what it holds: nvcc 13.5 (135 MB of wheels) and 13.0 (105 MB) and Triton 3.6.0 (the GPU
# machine's) with pip --target; torch 2.11's torch/include (39 MB) out of its macOS arm64 wheel, the smallest
# download of it (81 MB against 531 MB for the Linux CUDA wheel): its headers are the Linux wheel's but for the
# generated switches of CPU libraries (ATen/Config.h: MKL, MKLDNN, BLAS), which csrc/cuda does not read.
SM90 := build/sm90
SM90_CUDA := nvidia-cuda-nvcc==13.5.37 nvidia-cuda-runtime==13.5.37 nvidia-cuda-crt==13.5.37 nvidia-nvvm==13.5.37 \
	nvidia-cuda-cccl==13.3.5.0.6 nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37
# torch 2.11's CUDA 13.0 (cuda-toolkit==13.0.2); no cuobjdump 13.0 wheel exists, 13.5's reads its objects
GPU_MACHINE_CUDA := nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
	nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85
GPU_MACHINE_TORCH := $(SM90)/torch-2.11.0
gpu-compile: deps
	@test "$$(cat $(SM90)/cuda/.installed 2>/dev/null)" = "$(SM90_CUDA)" || { $(PYTHON) -m pip install -q --no-deps \
		--upgrade --target $(SM90)/cuda $(SM90_CUDA) && echo "$(SM90_CUDA)" > $(SM90)/cuda/.installed; }
	@test "$$(cat $(SM90)/cuda-13.0/.installed 2>/dev/null)" = "$(GPU_MACHINE_CUDA)" || { $(PYTHON) -m pip install \
		-q --no-deps --upgrade --target $(SM90)/cuda-13.0 $(GPU_MACHINE_CUDA) && \
		echo "$(GPU_MACHINE_CUDA)" > $(SM90)/cuda-13.0/.installed; }
	@test -f $(GPU_MACHINE_TORCH)/.installed || { rm -rf $(GPU_MACHINE_TORCH) && $(PYTHON) -m pip download -q \
		--no-deps --only-binary=:all: --platform macosx_11_0_arm64 --python-version 3.11 torch==2.11.0 \
		-d $(GPU_MACHINE_TORCH)/wheel && $(PYTHON) -c "import glob, sys, zipfile; \
		wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + '/torch-*.whl')[0]); \
		wheel.extractall(sys.argv[2], [n for n in wheel.namelist() if n.startswith('torch/include/')])" \
		$(GPU_MACHINE_TORCH)/wheel $(GPU_MACHINE_TORCH) && rm -r $(GPU_MACHINE_TORCH)/wheel && \
		touch $(GPU_MACHINE_TORCH)/.installed; }
	@test -f $(SM90)/triton-3.6.0/.installed || { $(PYTHON) -m pip install -q --no-deps --upgrade \
		--target $(SM90)/triton-3.6.0 triton==3.6.0 && touch $(SM90)/triton-3.6.0/.installed; }
	$(PYTHON) bench/sm90_compile.py --cuda-root $(SM90)/cuda --triton 3.6.0=$(SM90)/triton-3.6.0 \
		--gpu-machine-cuda-root $(SM90)/cuda-13.0 --gpu-machine-torch-include $(GPU_MACHINE_TORCH)/torch/include

# One GPU lease's checks (bench/gpu_check.py), one command under 8 minutes: builds fastdal._C against the torch
# already there (no deps: the GPU host has no package registry), bounded in time, then runs the gpu tests and a
# time-boxed roofline benchmark in child processes, from the source tree without the extension if the build
# failed. The JSON ($$OUT/gpu-check-<device>.json) is rewritten after every step and the summary printed even
# when the run is cut. Without a GPU it is a dry run: CPU build, gpu tests skipped, tiny CPU shapes, JSON to
# $$OUT or a temporary folder.
gpu-check:
	$(PYTHON) bench/gpu_check.py

# The dry run with the build made to fail (no compiler needed, ~1 min): the JSON must hold the failed build
# and the tests and benchmark of the torch and Triton paths (tests/test_gpu_check.py asserts the same and more).
.PHONY: gpu-check-dry
gpu-check-dry: deps
	rm -rf build/gpu-check-dry
	$(PYTHON) bench/gpu_check.py --dry-run --force-build-failure --out build/gpu-check-dry
	$(PYTHON) -c "import json, pathlib; (path,) = pathlib.Path('build/gpu-check-dry').glob('gpu-check-*.json'); \
		report = json.loads(path.read_text()); sections = report['sections']; \
		backends = {r['backend'] for r in sections['benchmark']['rows'] if 'seconds_median' in r}; \
		assert sections['build']['status'] == 'failed', sections['build']; \
		assert sections['tests']['status'] == 'ok', sections['tests']; \
		assert backends == {'torch', 'triton'}, backends; print(path, 'holds the failed build, tests and', backends)"

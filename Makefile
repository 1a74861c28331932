# The two set-up commands of the README: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3

.PHONY: deps install test fuzz demo bench cmake lint gpu-check gpu-compile

# torch 2.13.0 (CPU) is installed only where no torch is present, so that a CUDA build already on a
# GPU machine is used as it is; likewise triton (3.7.1 pairs with torch 2.13). The other packages do
# not depend on torch.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install triton==3.7.1
	@$(PYTHON) -c "import numpy, tqdm, sklearn, pytest, pytest_benchmark, matplotlib, mlxtend, hypothesis" 2>/dev/null || \
		$(PYTHON) -m pip install numpy tqdm scikit-learn pytest pytest-benchmark matplotlib mlxtend hypothesis

install: deps
	$(PYTHON) -m pip install -e . --no-build-isolation --no-deps

# Builds fastdal._C in place, so that the tests exercise the compiled backends.
test: install
	$(PYTHON) -m pytest -q

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

cmake: deps
	cmake -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DFASTDAL_PYTHON="$$($(PYTHON) -c 'import sys; print(sys.executable)')"
	cmake --build build/cmake

lint:
	$(PYTHON) -m ruff check fastdal kernels bench tests

# sm_90 (Hopper) compile of every Triton and CUDA kernel, no GPU needed: registers, spills and tensor-core
# instructions against the budgets stated in bench/sm90_compile.py, which writes bench/results/sm90-compile.json.
# nvcc (pip wheels) and Triton 3.6.0 (the GPU machine's) go once into private pip --target directories.
SM90 := build/sm90
SM90_CUDA := nvidia-cuda-nvcc==13.5.37 nvidia-cuda-runtime==13.5.37 nvidia-cuda-crt==13.5.37 nvidia-nvvm==13.5.37 \
	nvidia-cuda-cccl==13.3.5.0.6 nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37
gpu-compile: deps
	@test "$$(cat $(SM90)/cuda/.installed 2>/dev/null)" = "$(SM90_CUDA)" || { $(PYTHON) -m pip install -q --no-deps \
		--upgrade --target $(SM90)/cuda $(SM90_CUDA) && echo "$(SM90_CUDA)" > $(SM90)/cuda/.installed; }
	@test -f $(SM90)/triton-3.6.0/.installed || { $(PYTHON) -m pip install -q --no-deps --upgrade \
		--target $(SM90)/triton-3.6.0 triton==3.6.0 && touch $(SM90)/triton-3.6.0/.installed; }
	$(PYTHON) bench/sm90_compile.py --cuda-root $(SM90)/cuda --triton 3.6.0=$(SM90)/triton-3.6.0

# One GPU lease's checks (bench/gpu_check.py): builds fastdal._C against the torch already there (no deps:
# the GPU host has no package registry), runs the gpu tests and a time-boxed roofline benchmark. Without a
# GPU it is a dry run: CPU build, gpu tests skipped, tiny CPU shapes, JSON to $$OUT or a temporary folder.
gpu-check:
	$(PYTHON) bench/gpu_check.py

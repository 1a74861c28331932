# The two set-up commands of the README: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3

.PHONY: deps deps-integrations install test fuzz demo bench bench-peers bench-models cmake lint gpu-check gpu-compile

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
# for its notebooks only and is left out.)
INTEGRATIONS := baal==2.1.0 scikit-activeml==1.0.1 skorch==1.4.0 small-text==1.4.1 transformers==5.24.0 \
	huggingface-hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 torchmetrics==1.9.0 lightning-utilities==0.15.3
INTEGRATION_DEPS := "structlog>=22,<23" makefun tabulate dill pyyaml regex typer "click>=8.4.2" filelock fsspec \
	httpx2 packaging typing-extensions pillow joblib
deps-integrations: deps
	@$(PYTHON) -c "import baal, skactiveml, skorch, small_text, transformers" 2>/dev/null || { \
		before=$$($(PYTHON) -c "import torch; print(torch.__version__)") && \
		$(PYTHON) -m pip install --no-deps $(INTEGRATIONS) && $(PYTHON) -m pip install $(INTEGRATION_DEPS) && \
		test "$$($(PYTHON) -c 'import torch; print(torch.__version__)')" = "$$before"; }

install: deps
	$(PYTHON) -m pip install -e . --no-build-isolation --no-deps

# Builds fastdal._C in place, so that the tests exercise the compiled backends; the integration tests and
# the examples run against the real libraries.
test: install deps-integrations
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

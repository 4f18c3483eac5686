# Two commands: `make demo` and `make test`.  Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@# torch is a test-only reference (gradients are compared with its autograd).  It is taken only
	@# from a wheel pip already has on disk for this Python (a find-links folder), never downloaded:
	@# elsewhere those comparisons are skipped and every other test runs.
	@if $(BIN)/python -m pip install -q --no-index --no-deps torch==2.13.0 >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0; \
	else echo "torch: no local wheel for this Python; torch comparisons will be skipped"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/graphprune demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info

# The two commands a newcomer runs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; pinning it keeps pip from
# pulling a multi-GB CUDA build. The package itself asks only for torch>=2.4.
TORCH_PIN := torch==2.13.0
EXTRAS := test,demo

.PHONY: demo test lint venv clean browser

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/gradguard demo

# The report's browser tests load the generated HTML in Debian's headless chromium (we run as root).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver)

test: venv browser
	$(BIN)/python -m pytest
	$(BIN)/ruff check .

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs report.html

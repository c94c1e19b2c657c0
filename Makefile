# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to the builds this machine's pip serves from disk.
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev,viz,lite12,scale,export,cpu,adapt]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	rm -rf demo-store
	$(BIN)/cytostore encoders
	$(BIN)/cytostore ingest examples/chula-rbc12-sample/manifest.csv --store demo-store
	$(BIN)/cytostore info --store demo-store
	$(BIN)/cytostore index build --store demo-store
	$(BIN)/cytostore search --store demo-store --slide chula-1 --cell 594_95 -k 8 --exclude-same-slide --montage demo-store/neighbours.png
	$(BIN)/cytostore map --store demo-store --out demo-store/map.png
	@echo "demo-store/neighbours.png and demo-store/map.png show what the store holds"

test: setup
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf demo-store

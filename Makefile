# make demo  - the main job on the embedded default (reference model -> bundle -> answers -> benchmark)
# make test  - the test suite
# Both set everything up from nothing (.venv, pip installs) and are fast once set up.
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.edgevlm-ready

.PHONY: setup demo test bench clean

setup: $(READY)

$(READY): pyproject.toml scripts/setup-venv.sh
	bash scripts/setup-venv.sh
	touch $@

demo: $(READY)
	$(PY) -m edgevlm.demo

test: $(READY)
	$(PY) -m pytest -q -rs

bench: $(READY)
	bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

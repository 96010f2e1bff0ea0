# effjax: two entry points (README): `make demo` trains the default config, `make test` runs the tests.
# Both create ./.venv on first use and install effjax into it with its pinned minimum versions.

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/mnist1d_large_batch.py
WORKDIR ?= workdirs/mnist1d_large_batch
# Simulated CPU devices for the demo; ignored on GPU/TPU hosts.
DEVICES ?= 8

.PHONY: install demo test clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	XLA_FLAGS="--xla_force_host_platform_device_count=$(DEVICES) $$XLA_FLAGS" \
	  $(VENV)/bin/python -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR)

test: install
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadscope --durations=15 tests

clean:
	rm -rf $(VENV) workdirs *.egg-info

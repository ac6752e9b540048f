# The whole set-up is `make run` and `make test`: both create .venv when it is
# missing and install the project with the exact versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/default
CONFIG ?= configs/default.py
ARGS ?=

.PHONY: run test bench experiment install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m trainer --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

# Two workers (one per core); a module's tests stay on one worker, so its
# fixtures are built once.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadscope tests

# `make experiment NAME=warm_start_resize_head [ARGS=--tiny]`: one experiment of
# experiments/, written to experiments/<NAME>/results/.
experiment: $(STAMP)
	@test -n "$(NAME)" || { echo 'usage: make experiment NAME=<name> [ARGS=--tiny]; names: the packages in experiments/'; exit 2; }
	$(PY) -m experiments.$(NAME) $(ARGS)

# `make bench`: every benchmark of benchmarks/ (under 10 minutes on a 2-core
# CPU), written to benchmarks/results/<name>.json and benchmarks/results/README.md.
bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

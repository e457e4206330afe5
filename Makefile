# The two commands of the README's Quick start:
#   make serve   set up a virtual environment and run the node on its embedded defaults
#   make test    set up everything the tests need (system packages too) and run lint, types, tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb postgresql

.PHONY: serve test check system-deps venv bench

$(BIN)/shadowspot: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/shadowspot

# The tests also run the training code (one step, export, a run from a pack): PyTorch, the
# training-only extra (a CPU build on our machines). The node itself never imports it.
$(VENV)/.train-extra: $(BIN)/shadowspot
	$(BIN)/pip install --quiet -e '.[test,train]'
	touch $@

serve: venv
	$(BIN)/shadowspot serve

# Debian packages the tests use as independent peers: DCMTK, dciodvfy, Orthanc, PostgreSQL
# (Debian keeps its initdb and pg_ctl in /usr/lib/postgresql/<version>/bin, off PATH).
system-deps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc orthanc-dicomweb"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null \
	  || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@# The tests start Orthanc and PostgreSQL themselves; Debian's packages enable system
	@# services too. Turning them off is best effort: a machine without systemd as init (a
	@# container, CI) cannot, and needs not, since nothing starts the services there.
	@for service in orthanc postgresql; do \
	  if command -v systemctl >/dev/null && systemctl is-enabled $$service >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    if $$SUDO systemctl disable --now $$service >/dev/null 2>&1; then \
	      echo "system-deps: disabled the $$service.service that Debian's package enabled"; \
	    else \
	      echo "system-deps: left $$service.service alone (systemd is not running here)"; \
	    fi; \
	  fi; \
	done

# mypy checks the model lab too, which needs PyTorch's types: the training extra.
check: $(VENV)/.train-extra
	$(BIN)/ruff check node pipeline tests bench models/training
	$(BIN)/ruff format --check node pipeline tests bench models/training
	$(BIN)/mypy
	$(BIN)/lint-imports

test: system-deps check
	$(BIN)/pytest -q

bench: venv
	$(BIN)/python -m bench

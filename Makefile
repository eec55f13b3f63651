# Two commands do everything on a fresh machine:
#   make run   - set up, then run the whole chain on embedded defaults
#   make test  - set up, then run every test (unit and integration)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UNIREC := $(VENV)/bin/unirec
# A CPU build of torch lies on disk on our machines; elsewhere uv takes it from PyPI.
TORCH_WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(TORCH_WHEELS)/torch-*.whl),--find-links $(TORCH_WHEELS),)
# Debian packages the integration tests start for real.
SYSTEM_BINS := redis-server prometheus promtool

.PHONY: run test setup system-deps lock clean

setup: $(VENV)/.installed system-deps

# Then bytecode for everything installed: our machines set PYTHONDONTWRITEBYTECODE, so
# without .pyc files every process compiles its imports from source (Feast + Beam +
# torch: ~21 s per process start instead of ~10; the tests start dozens of processes).
# The one file skipped is Python 3.12 syntax inside torch's test helpers.
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q 'uv==0.13.9'
	$(VENV)/bin/uv pip install -q --python $(PY) $(FIND_LINKS) -c constraints.txt -e '.[test]'
	$(PY) -m compileall -qq -j 0 -x 'py312_intrinsics' "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	touch $@

system-deps:
	@missing=""; for b in $(SYSTEM_BINS); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends $$(echo $$missing | sed s/promtool/prometheus/) >/dev/null; \
	  else echo "missing:$$missing - install them: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi

run: setup
	$(UNIREC) run --fresh

test: setup
	$(PY) -m pytest -q

# Re-resolve the pinned versions after changing pyproject.toml dependencies.
lock:
	$(VENV)/bin/uv pip compile -q $(FIND_LINKS) --extra test pyproject.toml -o constraints.txt
	# pin the release, not the local +cpu tag, so machines without the CPU wheel still resolve
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' constraints.txt

clean:
	rm -rf $(VENV) .cache runs

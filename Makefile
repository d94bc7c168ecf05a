# The two commands of the README: `make demo` and `make test`.  Both install what they need
# first and are fast when everything is already there.
.PHONY: demo test setup system-packages lint typecheck check-firmware pytest clean

VENV := .venv

demo: setup
	@scripts/install-system-packages.sh demo
	$(VENV)/bin/palaute demo $(ARGS)

test: setup system-packages lint typecheck check-firmware pytest

setup:
	@scripts/setup-python.sh

system-packages:
	@scripts/install-system-packages.sh

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy

check-firmware: setup
	@scripts/check-firmware

pytest: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache

# The two commands of the README, and a few more. Run as root on a fresh machine.
.PHONY: setup demo test bench lint

setup:
	bash .ci/setup

# Installs what is needed, then runs the mesh demo in network namespaces.
demo: setup
	.venv/bin/appliance demo

# Installs what is needed, then runs every test (netns-tests need root; they skip otherwise).
test: setup
	.venv/bin/ruff check appliance init certs tests netns-tests bench
	.venv/bin/python -m pytest -q -p no:cacheprovider tests netns-tests bench

bench:
	APPLIANCE_BENCH=1 bash .ci/setup
	.venv/bin/python bench/run.py

lint:
	.venv/bin/ruff check appliance init certs tests netns-tests bench
	.venv/bin/mypy appliance init

# The two commands of the README:
#   make demo   installs what is needed and runs the main job (configs/demo.py)
#   make test   installs what is needed and runs the tests on 8 fake CPU devices
PY := .venv/bin/python

.PHONY: setup setup-test demo test bench

setup:
	bash setup.sh

setup-test:
	bash setup.sh test

demo: setup
	$(PY) main.py --workdir=runs/demo

test: setup-test
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q tests

# make demo | test | lint | bench — each creates .venv and installs the project on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; on a GPU machine use e.g. `make TORCH_SPEC=torch==2.13.0 ...` with a CUDA index.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install demo test lint bench slurm-packages

# Everything that changes the install: the package metadata (dependencies, entry points, package data), the build
# backend, and this file (TORCH_SPEC, the install commands).
$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) main.py fit

test: $(STAMP) slurm-packages
	$(PY) -m pytest

# The tests in tests/slurm start a single-node SLURM cluster from Debian's packages; this installs them when they
# are missing (as root, with apt-get) and does nothing when they are there. Without them those tests fail.
SLURM_COMMANDS := slurmctld slurmd sbatch munged
slurm-packages:
	@missing=; for c in $(SLURM_COMMANDS); do PATH="$$PATH:/usr/sbin:/sbin" command -v $$c >/dev/null || \
		missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing slurmctld slurmd slurm-client munge (for the tests in tests/slurm)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		timeout 600 apt-get update -qq && \
		timeout 900 apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; \
	else \
		echo "note: SLURM is not installed and this is not a root shell with apt-get; tests/slurm will fail"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --write

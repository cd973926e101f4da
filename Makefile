# rsmbench: every target creates .venv from the pinned requirements when it is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TASK   ?= aesthetic
PROFILE ?=
METHODS ?=
SEEDS  ?=
SWEEP  ?= estimators
PORT   ?= 5055
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: test lint bench tune claims equiv perf report sweep ui clean venv

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements.txt
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)  ## the test suite (benchmarks excluded)
	$(PY) -m pytest -q tests --ignore=tests/bench

lint: $(STAMP)  ## ruff (pyproject.toml [tool.ruff]); CI fails on any finding
	$(VENV)/bin/ruff check .

bench: $(STAMP)  ## compare the methods on TASK (PROFILE, METHODS, SEEDS optional)
	$(VENV)/bin/rsmbench bench --task $(TASK) $(if $(PROFILE),--profile $(PROFILE)) \
		$(if $(METHODS),--methods $(METHODS)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(model),model=$(model))

tune: $(STAMP)  ## tune every method's learning rate and strength on TASK (writes tasks/tuned/TASK.yaml)
	$(VENV)/bin/rsmbench tune --task $(TASK) $(if $(METHODS),--methods $(METHODS))

claims: $(STAMP)  ## the RSM paper's claims with verdicts (reports/claims/index.md); QUICK=1 for the short version
	$(VENV)/bin/rsmbench claims $(if $(QUICK),--quick)

equiv: $(STAMP)  ## gradient equivalence of every method's two formulations (float64)
	$(VENV)/bin/rsmbench equiv --json results/equiv.json

perf: $(STAMP)  ## speed and memory benchmarks (pytest-benchmark)
	$(PY) -m pytest -q tests/bench --benchmark-only --benchmark-columns=min,median,mean,rounds

sweep: $(STAMP)  ## run tasks/sweeps/$(SWEEP).yaml
	$(VENV)/bin/rsmbench sweep tasks/sweeps/$(SWEEP).yaml

report: $(STAMP)  ## paper-style report from the MLflow store
	$(VENV)/bin/rsmbench report

ui: $(STAMP)  ## MLflow UI on 127.0.0.1:$(PORT), one worker; first prints each experiment's runs-table URL
	@$(PY) -c 'from rsmbench.run import tracking; print(*tracking.ui_lines($(PORT)), sep="\n")'
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --workers 1 --host 127.0.0.1 \
		--port $(PORT) --backend-store-uri "$$($(PY) -c 'from rsmbench.run import tracking; print(tracking.tracking_uri())')"

clean:  ## remove generated files (keeps .venv and committed checkpoints)
	rm -rf results/mlflow.db results/runs results/equiv.json .pytest_cache .benchmarks
	find . -name __pycache__ -prune -not -path './.venv/*' -exec rm -rf {} +

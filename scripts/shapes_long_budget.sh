#!/bin/bash
# shapes at 10× the bench's budget (2100 reward queries), tuned by the bench's protocol at that budget.
#
#     bash scripts/shapes_long_budget.sh            # ~17 min on 2 cores (tune 7.6 min, bench 9.1 min)
#
# 1. `rsmbench tune` of DRaFT and PCPO-reweight (the diffusion twin's best first- and zeroth-order rows of the
#    default bench) over lr ∈ {1e-4, 3e-4, 1e-3} on tuning seed 1000, into a copy of tasks/ (RSMBENCH_TASKS), so
#    tasks/tuned/shapes.yaml keeps the values tuned at the default budget;
# 2. `rsmbench bench` of both on seeds 0–2 with those values.
# Runs go to their own MLflow store, results/shapes_long/ (the default report never mixes budgets), the summary
# to reports/shapes_long/summary.md, each run's before/after grid to results/shapes_long/runs/<hash>/.
set -euo pipefail
cd "$(dirname "$0")/.."
tasks_copy=$(mktemp -d)
trap 'rm -rf "$tasks_copy"' EXIT
cp -r tasks/. "$tasks_copy"
export HF_HUB_OFFLINE=1 RSMBENCH_RESULTS="$PWD/results/shapes_long" RSMBENCH_TASKS="$tasks_copy"
.venv/bin/rsmbench tune --task shapes --methods draft,pcpo_reweight --lr-grid 1e-4,3e-4,1e-3 --no-progress \
    budget.reward_queries=2100
.venv/bin/rsmbench bench --task shapes --methods draft,pcpo_reweight --no-progress \
    --report-dir reports/shapes_long budget.reward_queries=2100

#!/bin/bash
# shapes at 10× the bench's budget (2100 reward queries), tuned by the bench's protocol at that budget.
#
#     bash scripts/shapes_long_budget.sh            # ~17 min on 2 cores (tune 7.6 min, bench 9.1 min)
#     METHODS=pcpo_reweight,ddpo,grpo DRAWS=6 STORE=shapes_draws bash scripts/shapes_long_budget.sh
#
# 1. `rsmbench tune` of METHODS (default: DRaFT and PCPO-reweight, the diffusion twin's best first- and
#    zeroth-order rows of the default bench) over lr ∈ {1e-4, 3e-4, 1e-3} on tuning seed 1000, into a copy of tasks/
#    (RSMBENCH_TASKS), so tasks/tuned/shapes.yaml keeps the values tuned at the default budget;
# 2. `rsmbench bench` of them on seeds 0–2 with those values.
# DRAWS=k trains on k of all 22 train prompts drawn afresh each iteration (prompts.per_iteration) in place of the
# task's 6 fixed ones. Runs go to their own MLflow store, results/$STORE/ (default shapes_long; the default report
# never mixes budgets), the summary to reports/$STORE/summary.md, each run's before/after grid to
# results/$STORE/runs/<hash>/. Score a run's final network on 352 samples, by both detectors:
#     python -m rsmbench.run.shapes_eval --process diffusion --weights results/$STORE/runs/<hash>/net.safetensors
# and on the prompts it trained on (what it learnt, against what carries over to the held-out ones): add --on train.
set -euo pipefail
cd "$(dirname "$0")/.."
methods=${METHODS:-draft,pcpo_reweight}
store=${STORE:-shapes_long}
over=(budget.reward_queries=2100)
if [ -n "${DRAWS:-}" ]; then
    over+=("prompts.train=[$(seq -s, 0 21)]" "prompts.per_iteration=$DRAWS")
fi
tasks_copy=$(mktemp -d)
trap 'rm -rf "$tasks_copy"' EXIT
cp -r tasks/. "$tasks_copy"
export HF_HUB_OFFLINE=1 RSMBENCH_RESULTS="$PWD/results/$store" RSMBENCH_TASKS="$tasks_copy"
.venv/bin/rsmbench tune --task shapes --methods "$methods" --lr-grid 1e-4,3e-4,1e-3 --no-progress "${over[@]}"
.venv/bin/rsmbench bench --task shapes --methods "$methods" --no-progress --report-dir "reports/$store" "${over[@]}"

"""Matched reward-query budgets: every run of a matched comparison spends the same number of reward
queries, within 1 %.

A method's cost is measured, not declared: ``queries_per_sample`` runs one collection and the
training losses (``train.inner_updates`` times, forward only) of the run on one prompt group and
counts the reward queries, as the training loop counts them (``rsmbench.run.accounting``). Trees and
branches (one query per leaf), first-order methods' reward gradients per trained row and lookahead
calls all show up in it. Costs are linear in the number of samples (roots), so a run of budget B at
c queries per sample and n samples per iteration gets

    ⌊B / (c·n)⌋ full iterations and a last one cut to ⌊(B − spent)/c⌋ samples (whole prompt groups
    first, fewer prompts or roots),

which spends c·⌊B/c⌋ ∈ (B − c, B]. When that misses B by more than 1 % for some method (c > 1 % of
B), the plan is refused with the smallest budget ≥ B that every method of the plan can match.
"""
from __future__ import annotations

import hashlib
import json
import math

from rsmbench.core import method as registry
from rsmbench.core.method import Context, formulation_loss
from rsmbench.errors import UserError
from rsmbench.run import paths, setup
from rsmbench.run.accounting import Counters, CountingReward

TOLERANCE = 0.01  # |spent − budget| ≤ 1 % of the budget


def _cost_key(spec: dict) -> dict:
    return {k: spec[k] for k in spec if k not in ("seed", "budget", "eval")}


def queries_per_sample(spec: dict) -> float:
    """Reward queries per sample (root) of one training iteration of the run, measured once per
    configuration (the seed and the budget do not change it) and cached in ``results/cache/costs.json``
    under a fingerprint of the code that counts them, so a re-run plans in seconds."""
    return setup.shared("cost", _cost_key(spec), lambda: _cached(spec))


def code_fingerprint() -> str:
    """sha256 of the sources that decide a cost: the methods, the rewards and the core."""
    return paths.code_fingerprint(("methods", "rewards", "rsmbench/core"))


def _cached(spec: dict) -> float:
    key = hashlib.sha256(json.dumps(_cost_key(spec), sort_keys=True, default=str).encode()).hexdigest()[:20]
    fp = code_fingerprint()
    data = paths.read_cache("costs.json")
    if data.get("code") == fp and key in data.get("costs", {}):
        return float(data["costs"][key])
    cost = _probe(spec)
    if data.get("code") != fp:
        data = {"code": fp, "costs": {}}
    data["costs"][key] = cost
    paths.write_cache("costs.json", data)
    return cost


def _probe(spec: dict) -> float:
    m = registry.get(spec["method"])
    local = Counters()
    S = setup.build(spec, m, local, with_eval=False)
    ctx = Context(process=S.process, policy=S.policy, ref=S.ref, behaviour=S.new_behaviour(),
                  reward=CountingReward(S.reward, local), hp=dict(spec["hp"]), shape=S.shape)
    cond = S.cond(1)[: int(spec["train"]["batch_per_prompt"])]  # one prompt group
    S.policy.net.eval()
    batch = m.collect(ctx, cond, list(range(len(cond))))
    m.prepare(batch, ctx)
    for _ in range(int(spec["hp"].get("inner_updates", spec["train"]["inner_updates"]))):
        formulation_loss(m, spec["formulation"], batch, ctx)  # forward only: reward calls are counted
    return local.reward_queries / len(cond)


def schedule(budget: int, cost: float, samples_per_iteration: int, max_iterations: int) -> dict:
    """The iterations of a run of `budget` queries at `cost` queries per sample."""
    per_it = cost * samples_per_iteration
    full = min(int(budget // per_it), max_iterations)
    last = 0 if full == max_iterations else int((budget - full * per_it) // cost)
    return {"queries_per_sample": cost, "samples_per_iteration": samples_per_iteration,
            "iterations": full + (1 if last else 0), "last_samples": last or samples_per_iteration,
            "planned_queries": cost * (full * samples_per_iteration + last)}


def within(planned: float, budget: int) -> bool:
    return abs(planned - budget) <= TOLERANCE * budget


def smallest_matched_budget(costs, budget: int) -> int:
    """The smallest B' ≥ budget that every cost c of `costs` spends within 1 % (c·⌊B'/c⌋ ≥ 0.99·B')."""
    b = budget
    while not all(within(c * math.floor(b / c), b) for c in costs):
        b += 1
    return b


def comparison_budget(specs: list[dict]) -> int:
    """The budget of a comparison of planned matched specs: theirs if every one spends it within 1 %,
    else the smallest larger budget that all of them do (``smallest_matched_budget``)."""
    matched = [s for s in specs if s["budget"]["mode"] == "matched" and "schedule" in s["budget"]]
    budget = int(specs[0]["budget"]["reward_queries"])
    return smallest_matched_budget({s["budget"]["schedule"]["queries_per_sample"] for s in matched}, budget)


def samples_per_iteration(spec: dict) -> int:
    tr, prompts = spec["train"], spec["prompts"]
    groups = int(prompts.get("per_iteration") or len(prompts.get("train") or ()) or 1)  # as setup.prompt_draws
    return groups * int(tr["batch_per_prompt"])


def plan(specs: list[dict], check: bool = True) -> list[dict]:
    """Each tiny-profile spec with its ``budget.schedule`` (full scale: the loop schedules the run
    after its first iteration); ``check``: a matched plan that some method cannot spend within 1 % is a
    ``UserError`` naming the budget that works (``check_matched``)."""
    out = []
    for spec in specs:
        if spec["profile"] != "tiny":
            out.append(spec)
            continue
        sched = schedule(int(spec["budget"]["reward_queries"]), queries_per_sample(spec),
                         samples_per_iteration(spec), int(spec["train"]["max_iterations"]))
        out.append({**spec, "budget": {**spec["budget"], "schedule": sched}})
    if check:
        check_matched(out)
    return out


def check_matched(specs: list[dict]) -> None:
    """Every matched spec of a comparison (planned: with its schedule) spends its budget within 1 %,
    else a ``UserError`` naming the methods and the smallest budget that all of them match."""
    matched = [s for s in specs if s["budget"]["mode"] == "matched" and "schedule" in s["budget"]]
    misses = {s["method"]: s["budget"]["schedule"]["queries_per_sample"] for s in matched
              if not within(s["budget"]["schedule"]["planned_queries"], s["budget"]["reward_queries"])}
    if misses:
        budget = int(matched[0]["budget"]["reward_queries"])
        costs = {s["budget"]["schedule"]["queries_per_sample"] for s in matched}
        worst = ", ".join(f"{m} ({c:g} queries per sample)" for m, c in sorted(misses.items()))
        raise UserError(f"budget.reward_queries={budget} cannot be matched within 1 % by {worst}; "
                        f"use budget.reward_queries={smallest_matched_budget(costs, budget)} or more")

"""The training loop without MLflow: determinism, budget accounting, both formulations."""
import json

import pytest
import torch

from rsmbench.run import tasks
from rsmbench.run.evaluate import Evaluator, frechet
from rsmbench.run.runspec import eval_spec, run_spec
from rsmbench.run.setup import tiny_evaluator
from rsmbench.run.train import train_run
from tests.bench_helpers import tiny_overrides
from tests.helpers import tiny_policy


def _run(tmp_path, formulation="rsm", method="reinforce_kl", seed=0):
    cfg = tasks.load("gmm", tiny_overrides(tmp_path, iterations=4))
    rc = run_spec(cfg, method, formulation, "flow", seed)
    logs = []
    res = train_run(rc, lambda m, s: logs.append((s, m)))
    return res, logs


def _strip(logs):
    return [(s, {k: v for k, v in m.items() if k != "train/wall_time"}) for s, m in logs]


def test_same_seed_identical_metrics(tmp_path):
    res_a, a = _run(tmp_path)
    res_b, b = _run(tmp_path)
    assert [s for s, _ in a] == list(range(5)) and _strip(a) == _strip(b)  # bit-identical floats
    _, c = _run(tmp_path, seed=1)
    assert _strip(a)[1] != _strip(c)[1]  # another seed draws other samples


def test_budget_is_counted_in_reward_queries(tmp_path):
    res, logs = _run(tmp_path, formulation="original")
    assert res.counters.reward_queries == 32 and res.iterations == 4
    q = [m["train/reward_queries"] for s, m in logs if s > 0]
    assert q == [8, 16, 24, 32]
    nfe = [m["train/nfe"] for s, m in logs if s > 0]
    assert all(b > a for a, b in zip(nfe, nfe[1:])) and nfe[0] >= 8 * 10  # ≥ one NFE per sample and step


def test_frechet_distance_matches_gaussian_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    b = 2.0 * torch.randn(20000, 2, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0], dtype=torch.float64)
    # N(0, I) vs N((1, 0), 4I): ‖Δμ‖² + tr(I + 4I − 2·2I) = 1 + 2 = 3
    assert abs(frechet(a, b) - 3.0) < 0.1
    assert frechet(a, a) < 1e-9


def test_evaluator_is_shared_and_iteration_zero_reuses_the_base_samples(tmp_path):
    """The runs of one process share the evaluator (base samples computed once); at iteration 0 θ is
    the base model, so its eval equals evaluating the base policy afresh, bit for bit."""
    from rsmbench.core.models import Policy

    cfg = tasks.load("gmm", tiny_overrides(tmp_path))
    ev = tiny_evaluator(eval_spec(cfg, "flow"))
    assert tiny_evaluator(eval_spec(cfg, "flow")) is ev
    assert tiny_evaluator(run_spec(cfg, "grpo", "rsm", "flow", 3)) is ev  # every run spec of the task contains it
    other = tasks.load("gmm", tiny_overrides(tmp_path) + ["eval.seed_start=7"])
    assert tiny_evaluator(eval_spec(other, "flow")) is not ev
    fresh, x_fresh, r_fresh = ev(Policy(ev.ref.net, ev.process, ev.ref.cfg_scale))
    reused, x_reused, r_reused = ev(Policy(ev.ref.net, ev.process, ev.ref.cfg_scale), at_base=True)
    assert torch.equal(x_fresh, x_reused) and torch.equal(r_fresh, r_reused)
    assert fresh == reused and reused["eval/kl_ref"] == 0.0


def test_base_metrics_are_cached_on_disk_per_twin(tmp_path, monkeypatch):
    """The exact-task base metrics (J* over eval.jstar_samples base samples, SW floors) are built once per
    twin and read back by another process (here: a cleared memo), to the bit; another checkpoint is
    another key."""
    from rsmbench.run import setup

    monkeypatch.setenv("RSMBENCH_RESULTS", str(tmp_path / "results"))
    (tmp_path / "results").mkdir()
    cfg = tasks.load("gmm", tiny_overrides(tmp_path) + ["eval.jstar_samples=256"])
    monkeypatch.setattr(setup, "_SHARED", {})
    built = tiny_evaluator(eval_spec(cfg, "flow")).base_extra
    assert set(built) >= {"J_star_model", "J_ref", "sw_base_to_target"}
    cache = tmp_path / "results" / "cache" / "base_metrics.json"
    assert list(json.loads(cache.read_text()).values()) == [built]
    monkeypatch.setattr(setup, "_SHARED", {})
    monkeypatch.setattr(tasks.gmm.GroundTruth, "base_metrics", lambda *a: pytest.fail("recomputed"))
    assert tiny_evaluator(eval_spec(cfg, "flow")).base_extra == built  # JSON floats round-trip exactly
    monkeypatch.undo()
    monkeypatch.setenv("RSMBENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(setup, "_SHARED", {})
    tiny_evaluator(eval_spec(cfg, "diffusion"))
    assert len(json.loads(cache.read_text())) == 2


def test_method_state_is_checkpointed_and_restored_on_resume(tmp_path, monkeypatch):
    """DPOK's replay buffer and value network live on the method object: a run stopped after its
    checkpoint resumes with them (Method.state_dict / load_state_dict through the run checkpoint)."""
    from methods.dpok import DPOK
    from rsmbench.run.resume import load_state

    wide = ["divergence.reward=[-1e9,1e9]", "divergence.kl=1e12"]  # random-init nets: far from sane
    cfg = tasks.load("gmm", tiny_overrides(tmp_path, iterations=4) + ["bench.processes=[diffusion]", *wide])
    spec = run_spec(cfg, "dpok", "original", "diffusion", 0)
    ckpt = tmp_path / "run"
    train_run(spec, ckpt_dir=ckpt, stop_after=2)
    saved = load_state(ckpt)["method"]
    assert {"buffer", "value", "value_opt"} <= saved.keys() and len(saved["buffer"]["x"]) > 0
    seen = {}
    real = DPOK.load_state_dict

    def spy(self, state):
        seen["state"] = state
        return real(self, state)

    monkeypatch.setattr(DPOK, "load_state_dict", spy)
    res = train_run(spec, ckpt_dir=ckpt)
    assert res.iterations == 4 and seen["state"].keys() == saved.keys()


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_path_kl_is_the_same_however_many_steps_the_reference_sees_per_call(kind):
    """Evaluator.kl_to_ref batches (sample, step) states of several steps into one reference call
    (kl_rows); its value is Σ_i D·⟨(μ_θ − μ_ref)²⟩/(2σ_i²) written out step by step (float64, 1e-12),
    with CFG and per-sample prompts, whatever the chunk (as many states as one step has, a size that
    splits a sample's steps, everything at once), and over some of the samples only (eval.kl_samples: the
    first of every prompt)."""
    policy, ref = tiny_policy(kind, cfg_scale=3.0, num_steps=5)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ev = {"prompts": [0, 1], "num_samples": 6, "seed_start": 7, "sampler": "sde"}
    reward = lambda x, cond=None: -(x ** 2).sum(1)  # noqa: E731
    kls = []
    for rows in (None, 7, 1000):
        e = Evaluator(ev, policy.process, ref, reward, (2,), kl_rows=rows)
        ro = e._sample(policy)
        full = e.kl_to_ref(ro)
        kls.append(full)
        for index in ([0], [1, 2, 5], [3, 4, 5]):  # eval.kl_samples: those samples' KL, whatever the chunk
            got = full.clone()
            got[index] = e.kl_to_ref(ro, index)
            kls.append(got)
    proc, want = policy.process, torch.zeros(6, dtype=torch.float64)
    for j, i in enumerate(ro.steps.tolist()):
        x = ro.states[:, j]
        mu_ref = proc.mean(x, ref(x, i, ro.cond), i)
        want += 2 * ((ro.means[:, j] - mu_ref) ** 2).mean(1) / (2 * proc.std(i) ** 2)
    assert want.min() > 0
    for got in kls:
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
    # kl_samples 2 of 6 samples of 2 prompts (prompt-major: 0 0 0 1 1 1): the first of each prompt, samples 0 and 3
    two = Evaluator({**ev, "kl_samples": 2}, policy.process, ref, reward, (2,))
    assert two.kl_index == [0, 3]
    assert two(policy)[0]["eval/kl_ref"] == pytest.approx(want[[0, 3]].mean().item(), rel=1e-12)
    assert want[[0, 3]].mean() != want.mean()

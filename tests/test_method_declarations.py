"""Every fact about a method lives in its file (issue 12, step 4), and every hyperparameter is declared
with its type and range (issue 16).

- a toy first-order method, written to a temporary module (its own file and nothing else), runs
  through ``equiv``, a tiny ``bench`` and the influence figure's κ/h;
- the kind a run is tagged with is the kind of its configuration (unpruned VGG-Flow / ∇-DB:
  ``approximate``);
- every preset validates against its method's declarations; bad names, types and values do not;
- the clipper's and Adjoint Matching's cross-iteration state survive ``state_dict``.
"""
import importlib.util
import io
import math
import os
import textwrap

import pytest
import torch
from mlflow.tracking import MlflowClient

from rsmbench.cli import main
from rsmbench.core import method as registry
from rsmbench.errors import TaskError
from rsmbench.harness import equivalence, influence
from rsmbench.run import bench, tasks, tracking
from rsmbench.run.runspec import config_hash, run_spec
from tests.bench_helpers import tiny_overrides

TOY = '''
"""Toy first-order method: match the reference output shifted by the terminal reward gradient."""
import torch

from rsmbench.core.diffrollout import reward_and_grad
from rsmbench.core.method import Batch, Method, _dtype, register
from rsmbench.core.params import hp
from rsmbench.core.rollout import generators, sample
from rsmbench.core.rsm import RSMSpec, elementwise_mean


@register
class ToyFirstOrder(Method):
    id = "toy_fo"
    processes = ("flow", "diffusion")
    published_processes = ("flow",)
    order = "first"
    kind = "loss"
    kind_reason = "the same squared error in both formulations"
    defaults = {"reward_scale": hp(1.0, gt=0)}
    strength = "reward_scale"

    def collect(self, ctx, cond, seeds):
        ro = sample(ctx.behaviour, ctx.shape, generators(seeds), cond=cond, dtype=_dtype(ctx))
        r, g = reward_and_grad(ctx.reward, ro.final, cond)
        return Batch(rollout=ro, rows=ro.transitions(), rewards=r, cond=cond, extras={"terminal_grad": g})

    def original_loss(self, batch, ctx):
        rows = batch.rows
        out = ctx.policy(rows.x, rows.step, rows.cond)
        with torch.no_grad():
            ref = ctx.ref(rows.x, rows.step, rows.cond)
        g = batch.extras["terminal_grad"][rows.sample]
        return elementwise_mean((out - ref + ctx.hp["reward_scale"] * g) ** 2).mean()

    def rsm_spec(self, batch, ctx):
        rows, R = batch.rows, len(batch.rows)
        psi = -ctx.hp["reward_scale"] * batch.extras["terminal_grad"][rows.sample]
        return RSMSpec(rows=rows, psi=psi, gamma=torch.ones(R), c1=torch.ones(R), c2=torch.zeros(R), anchor="ref")
'''


@pytest.fixture
def toy_method(tmp_path):
    """Register the toy method from a module file in tmp_path; unregister it afterwards."""
    path = tmp_path / "toy_fo_method.py"
    path.write_text(textwrap.dedent(TOY))
    spec = importlib.util.spec_from_file_location("toy_fo_method", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    yield registry.REGISTRY["toy_fo"]
    registry.REGISTRY.pop("toy_fo", None)


def test_a_new_first_order_method_needs_only_its_own_file(toy_method, tmp_path, capsys):
    # equiv: both processes, exact (kind loss: gradients and loss values agree to 1e-9 in float64)
    recs = equivalence.run(["toy_fo"], offpolicy_steps=1)
    assert [(r.process, r.kind, r.passed) for r in recs] == [("diffusion", "loss", True), ("flow", "loss", True)]
    assert all(r.max_rel_err <= 1e-9 and r.loss_rel_err <= 1e-9 for r in recs)
    # the influence figure's data: κ(t), h(t) from the default signal (the terminal gradient)
    for kind in ("diffusion", "flow"):
        df = influence.kappa_profile("toy_fo", kind)
        assert df.preset.iloc[0] == "defaults" and math.isclose(df.h.sum(), 1.0, rel_tol=1e-12)
        assert (df.kappa > 0).all() and df.kappa.map(math.isfinite).all()
    # a tiny bench: its published process, both formulations, tagged with its kind
    argv = ["bench", "--task", "gmm", "--methods", "toy_fo", "--seeds", "1", "--formulation", "both", "--workers", "1",
            "--no-progress", "--report-dir", str(tmp_path / "report"), *tiny_overrides(tmp_path, iterations=2)]
    assert main([*argv, "bench.processes=published"]) == 0
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = c.search_runs([c.get_experiment_by_name("gmm").experiment_id])
    assert sorted((r.data.tags["formulation"], r.data.tags["process"], r.info.status) for r in runs) == \
        [("original", "flow", "FINISHED"), ("rsm", "flow", "FINISHED")]
    assert {r.data.tags["equivalence_kind"] for r in runs} == {"loss"}
    assert "toy_fo (rsm, flow)" in (tmp_path / "report" / "summary.md").read_text()


@pytest.mark.parametrize("method,kind,override", [("vgg_flow", "flow", "use_value_net"),
                                                  ("nabla_db", "diffusion", "use_flow_net")])
def test_unpruned_runs_are_tagged_approximate(method, kind, override, tmp_path):
    tracker = tracking.Tracker()
    exp = tracker.experiment("gmm")
    tags = {}
    for value in ("false", "true"):
        cfg = tasks.load("gmm", [*tiny_overrides(tmp_path), f"methods.{method}.{override}={value}"])
        rc = run_spec(cfg, method, "rsm", kind, 0)
        rec = bench._open_run(tracker, rc, config_hash(rc), {}, tmp_path / "results", bench._NoBar(), print,
                              experiment="gmm")
        tags[value] = tracker.get_run(rec["run_id"]).data.tags["equivalence_kind"]
        assert rec["status"] == "new" and exp
    assert tags == {"false": "loss", "true": "approximate"}
    # the class's own kind is untouched (no mutation by hparams)
    m = registry.get(method)
    m.hparams(**{override: True})
    assert m.kind == "loss" and m.equivalence_kind(m.hparams(**{override: True}))[0] == "approximate"


def test_every_declaration_is_complete_and_every_preset_validates():
    for mid, cls in registry.load_all().items():
        m = cls()
        assert set(cls.published_processes) <= set(cls.processes), mid
        assert cls.strength in cls.defaults, mid  # every method names the coefficient `rsmbench tune` grids
        for v in cls.strength_grid or ():
            m.hparams(**{cls.strength: v})
        assert set(cls.params) == set(cls.defaults), mid
        m.hparams()  # the defaults satisfy their own declarations
        for name in cls.presets:
            hp = m.hparams(name)
            assert m.validate_hparams(hp) == hp, (mid, name)
        for kind, name in cls.influence_preset.items():
            assert kind in cls.processes and name in cls.presets, (mid, kind)


@pytest.mark.parametrize("method,hp,needle", [
    ("grpo", {"betaa": 0.1}, "grpo: unknown hyperparameter 'betaa' (did you mean 'beta'?); valid hyperparameters: "),
    ("grpo", {"beta": "abc"}, "grpo.beta must be a number >= 0, got 'abc'"),
    ("grpo", {"beta": None}, "grpo.beta must be a number >= 0, got null"),
    ("grpo", {"clip_range": 0}, "grpo.clip_range must be a number > 0, got 0"),
    ("grpo", {"clip_range": float("nan")}, "must be a finite number"),
    ("vgg_flow", {"eta_mode": "qaud"}, "vgg_flow.eta_mode must be one of 'quad', 'linear', got 'qaud' (did you mean"),
    ("vgg_flow", {"use_value_net": 1}, "vgg_flow.use_value_net must be true or false, got 1"),
    ("rsm_zo", {"k": [3, -1]}, "rsm_zo.k[1] must be an integer >= 0, got -1"),
    ("rsm_zo", {"k": [0, 0]}, "rsm_zo: k must branch at some step"),
    ("branch_grpo", {"ks": [2]}, "need one k per split"),
    ("alignprop", {"k_min": 5, "k_max": 3}, "k_max 3 must be >= k_min 5"),
    ("refl", {"reward_target": None}, "reward_loss 'relu_margin' needs reward_target"),
    ("rsm_fo", {"clip": "fixed"}, "clip 'fixed' needs clip_threshold"),
    ("dpok", {"temporal": "snrr"}, "dpok.temporal must be one of 'own', "),
    ("grpo", {"inner_updates": 0}, "grpo.inner_updates must be null or an integer >= 1, got 0"),
])
def test_bad_hyperparameters_are_one_line(method, hp, needle):
    with pytest.raises(TaskError) as e:
        registry.get(method).hparams(**hp)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_values_are_converted_to_their_declared_type():
    m = registry.get("grpo")
    hp = m.hparams(beta="1e-3", clip_range=1, temporal="snr")  # PyYAML reads 1e-3 as a string
    assert hp["beta"] == 1e-3 and isinstance(hp["clip_range"], float) and hp["temporal"] == "snr"
    assert registry.get("alignprop").hparams(k_max=50.0)["k_max"] == 50


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_clipper_and_quantile_ema_state_survive_a_checkpoint():
    hp = registry.get("vgg_flow").hparams()
    for mid in ("vgg_flow", "rsm_fo"):
        m = registry.get(mid)
        clip = m.clipper(hp)
        clip(torch.randn(16, 2, generator=torch.Generator().manual_seed(0)))
        m.on_optimizer_step()  # τ ← the 0.8-quantile of the recorded norms
        clip(torch.randn(4, 2))  # recorded since the step
        m2 = registry.get(mid)
        m2.load_state_dict(_roundtrip(m.state_dict()))
        c2 = m2.clipper(hp)
        assert c2.threshold == clip.threshold != 1.0 and len(c2._norms) == 1
        assert torch.equal(c2._norms[0], clip._norms[0])
    am = registry.get("adjoint_matching")
    ema = am.threshold()
    for v in (1.0, 2.0, 5.0, 3.0, 4.0, 7.0, 2.5, 6.0, 1.5, 9.0, 8.0, 3.5):
        ema.update(v)
    am2 = registry.get("adjoint_matching")
    am2.load_state_dict(_roundtrip(am.state_dict()))
    assert (am2.threshold().value, am2.threshold().updates) == (ema.value, ema.updates)
    assert am2.threshold().update(2.0) == ema.update(2.0)
    assert registry.get("grpo").on_optimizer_step() is None  # declared on the base class

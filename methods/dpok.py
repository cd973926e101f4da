"""DPOK as its code runs: policy gradient on a replay buffer, one learned value baseline, ε-MSE regulariser.

Paper: Fan, Watkins, Du, Liu, Ryu, Boutilier, Abbeel, Ghavamzadeh, Lee, Lee 2023, "DPOK", arXiv
2305.16381, Eq. 8 (gradient of the KL-regularised objective α·r − β·Σ_t KL_t), Eq. 10 (per-step
Gaussian KL), Algorithm 1 (value function V(x_t, t, prompt) learned by MSE to the final reward and
subtracted as a baseline; importance ratio clamped to 1 ± ε).
Code: google-research/google-research ``dpok/train_online_pg.py``@1d49f2c, as this file follows it:
  - every sampled transition (x_t, x_{t−1}, step i, final reward, log-prob at sampling) is appended to
    ONE replay buffer that keeps the last ``buffer_size`` = 1000 transitions (``_collect_rollout``,
    ``_trim_buffer``);
  - ONE value network for the whole run (``ValueMulti``, ``torch.optim.AdamW(lr = v_lr)``): per sampling
    step, one optimizer step on the mean of ``v_step`` = 5 minibatch losses
    F.mse_loss(V(x_t, c, i), r), each on ``v_batch_size`` = 256 buffer transitions drawn without
    replacement (``_train_value_func``, ``main``'s ``for v_step in range(args.v_step)``);
  - the policy steps on transitions drawn from the buffer (``_train_policy_func``), stale log-probs
    included:  adv = r − V(x_t, c, i)  (``--v_flag 1``),  ratio = clamp(exp(log p_θ − log p_old), 1 ± ratio_clip),
        loss = mean(−reward_weight·adv·ratio) + kl_weight·mean((ε_θ − ε_ref)²)
    where ε are the CFG-combined outputs of θ and of the frozen pretrained copy ``unet_copy``
    (``pipeline_stable_diffusion_extended.py``@4c42994 ``forward_calculate_logprob``: an unweighted
    ε-MSE, not the per-step Gaussian KL (w_t²/2)·⟨Δε²⟩ of the paper's Eq. 10, which is ``kl_form="gaussian"``);
    log p is the per-element mean ``Normal(μ, σ).log_prob(x')`` (``scheduling_ddim_extended.py``@10270a5).
  README.md@83282e4 (single-prompt run): ``--reward_weight 10 --kl_weight 0.01``; argparse defaults
  ``--ratio_clip 1e-4 --buffer_size 1000 --v_batch_size 256 --v_step 5 --v_lr 1e-4``.
State: the buffer, V, V's optimizer and the buffer's random stream live on the method object, which
the training loop keeps for the whole run (``state_dict`` / ``load_state_dict`` carry them through a
checkpoint when the loop calls them).
Deliberate deviations: DPOK takes ``p_step`` = 5 optimizer steps per sampling step, each on
``gradient_accumulation_steps × p_batch_size`` = 12 × 2 freshly drawn transitions; here one draw of
``policy_rows`` transitions (default: as many as the batch sampled) is made per iteration and the
training loop's ``inner_updates`` steps all use it (the loop owns the step cadence). V is a small MLP
on the flattened state (``rsmbench.core.advantages.ValueMLP``), not DPOK's conv ``ValueMulti``.
Table 1 row: not a Table 1 row (derivations §8.11): REINFORCE + KL reg (§8.4) with a learned baseline.
Equivalence kind: ``approximate``. The RSM instance is §8.4 with the same per-row advantage
r − V(x_t) (a control variate: V does not depend on ξ) and the ε-MSE as a per-step KL weight:
kl_weight·⟨(ε_θ − ε_ref)²⟩ = β_t·(w_t²/2)·⟨Δε²⟩ with β_t = 2·kl_weight/w_t², so
    Ψ̂/a = −α·A·ξ/(β_t·w_t),  γ = 1,  C1·a² = β_t·w_t²/2 = kl_weight,  C2 = 0,  anchor s_ref.
On fresh rows (the first batch of a run, which is what ``rsmbench equiv`` sees) the two agree to
round-off. Rows replayed from earlier iterations are off-policy: their ratio against the current θ† is
not 1 and DPOK's clamp zeroes their policy gradient once |ρ − 1| > ratio_clip, while the RSM instance
(which has no clamp, and whose ξ is the stored one) keeps them: that is the gap, and it is why the kind
is ``approximate`` (measured in tests/conformance/test_dpok.py).
"""
from __future__ import annotations

from dataclasses import fields

import torch

from rsmbench.core import estimators, trust, weights
from rsmbench.core.advantages import ValueMLP
from rsmbench.core.method import Method, register
from rsmbench.core.params import hp
from rsmbench.core.rollout import Transitions
from rsmbench.core.rsm import RSMSpec, elementwise_mean
from rsmbench.core.tree import cat_rows

KL_FORMS = ("eps_mse", "gaussian")


@register
class DPOK(Method):
    id = "dpok"
    processes = ("diffusion",)
    published_processes = ("diffusion",)  # SD1.5 (arXiv 2305.16381 §5; google-research dpok/README.md)
    order = "zeroth"
    kind = "approximate"
    table_row = {"psi": '(σ/(βΩ))·(r − V(x_t))·ξ, learned value baseline', "gamma": '1', "c1": 'β·Ω²/(2σ²)',
                 "c2": '0 (ratio clamp)', "branching": False, "current_state": False}
    paper = "DPOK: Fan et al. 2023, arXiv 2305.16381, Eq. 8, Eq. 10, Algorithm 1; derivations §8.4, §8.11"
    table1 = "not a Table 1 row (derivations §8.11): REINFORCE + KL reg with a learned value baseline"
    kind_reason = ("replayed rows are off-policy: DPOK's clamp(ρ, 1 ± ratio_clip) zeroes their gradient once "
                   "|ρ − 1| > ratio_clip, the RSM instance keeps them; on fresh rows (a run's first batch, the "
                   "harness's) both use the same r − V(x_t) and agree to round-off")
    defaults = {"reward_weight": hp(10.0, gt=0), "beta": hp(0.01, gt=0),  # > 0: the RSM instance's Ψ̂ ∝ 1/β
                "ratio_clip": hp(1e-4, gt=0),
                "kl_form": hp("eps_mse", choices=KL_FORMS), "value_baseline": True, "kl_in_reward": False,
                "replay": True, "buffer_size": hp(1000, ge=1), "policy_rows": hp(None, type=int, ge=1),
                "v_batch_size": hp(256, ge=1), "v_steps": hp(5, ge=1), "v_lr": hp(1e-4, gt=0),
                "v_hidden": hp(64, ge=1), "v_seed": hp(0, ge=0)}
    strength = "beta"  # the KL weight
    influence_preset = {"diffusion": "dpok"}
    presets = {
        "dpok": {"reward_weight": 10.0, "beta": 0.01, "ratio_clip": 1e-4, "kl_form": "eps_mse",
                 "value_baseline": True, "replay": True, "buffer_size": 1000, "v_batch_size": 256,
                 "v_steps": 5, "v_lr": 1e-4,
                 "source": "google-research/google-research dpok/README.md@83282e4 (--reward_weight 10 "
                           "--kl_weight 0.01); dpok/train_online_pg.py@1d49f2c argparse (--ratio_clip 1e-4, "
                           "--v_flag 1, --buffer_size 1000, --v_batch_size 256, --v_step 5, --v_lr 1e-4)"},
    }

    def __init__(self):
        # persist across iterations, as in DPOK's main loop: the replay buffer, V and its optimizer
        self.buffer: Transitions | None = None
        self.buffer_reward: torch.Tensor | None = None
        self.value: ValueMLP | None = None
        self.value_opt: torch.optim.Optimizer | None = None
        self.gen: torch.Generator | None = None

    # ---- replay buffer and value baseline ---------------------------------------------------------
    def _push(self, rows: Transitions, reward: torch.Tensor, size: int) -> None:
        """Append the batch's transitions; keep the last `size` (``_trim_buffer``)."""
        rows = rows.select(torch.arange(len(rows)))  # a copy
        buf = rows if self.buffer is None else cat_rows([self.buffer, rows])
        rew = reward if self.buffer_reward is None else torch.cat([self.buffer_reward, reward])
        keep = torch.arange(max(0, len(buf) - int(size)), len(buf))
        self.buffer, self.buffer_reward = buf.select(keep), rew[keep]

    def _draw(self, n: int) -> torch.Tensor:
        """n buffer indices without replacement (``get_random_indices``)."""
        return torch.randperm(len(self.buffer), generator=self.gen)[: min(int(n), len(self.buffer))]

    def _v(self, rows: Transitions) -> torch.Tensor:
        return self.value(rows.x, rows.step, rows.cond)  # V(x_t, i, c): DPOK feeds the step index

    def _value_step(self, ctx) -> float:
        """One AdamW step on the mean of ``v_steps`` minibatch MSEs (``_train_value_func`` × v_step)."""
        hp, buf = ctx.hp, self.buffer
        if self.value is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(hp["v_seed"]))
                num_classes = getattr(ctx.policy.net, "num_classes", 0) or 0
                self.value = ValueMLP(buf.x[0].numel(), int(hp["v_hidden"]), num_classes=num_classes).to(buf.x.dtype)
            self.value_opt = torch.optim.AdamW(self.value.parameters(), lr=float(hp["v_lr"]))
        self.value_opt.zero_grad()
        total = 0.0
        for _ in range(int(hp["v_steps"])):
            idx = self._draw(hp["v_batch_size"])
            mb = buf.select(idx)
            loss = torch.nn.functional.mse_loss(self._v(mb), self.buffer_reward[idx]) / int(hp["v_steps"])
            loss.backward()
            total += loss.item()
        self.value_opt.step()
        return total

    # ---- the method ---------------------------------------------------------------------------------
    def collect(self, ctx, cond, seeds):
        batch = super().collect(ctx, cond, seeds)
        batch.extras["own_rewards"] = batch.rewards  # this process's (DDP's prepare sees the gathered ones)
        return batch

    def prepare(self, batch, ctx):
        hp, rows, p = ctx.hp, batch.rows, ctx.process
        if hp["kl_form"] not in KL_FORMS:
            raise ValueError(f"dpok: kl_form must be one of {KL_FORMS}, got {hp['kl_form']!r}")
        if self.gen is None:
            self.gen = torch.Generator().manual_seed(int(hp["v_seed"]) + 1)
        r = batch.extras.get("own_rewards", batch.rewards)  # no group statistics: each process its own rows
        if hp["kl_in_reward"]:  # return α·r − β·Σ_t KL_t(θ†‖ref) per sample, as a reward (paper objective)
            with torch.no_grad():
                mu_ref = p.mean(rows.x, ctx.ref(rows.x, rows.step, rows.cond), rows.step)
                kl = p.kl(rows.mean, mu_ref, rows.step)
            r = r - hp["beta"] / hp["reward_weight"] * torch.zeros_like(r).index_add(0, rows.sample, kl)
        self._push(rows, r[rows.sample].detach(), hp["buffer_size"])
        stats = {"buffer_rows": len(self.buffer)}
        if hp["value_baseline"]:
            stats["value_loss"] = self._value_step(ctx)
        if hp["replay"]:
            idx = self._draw(len(rows) if hp["policy_rows"] is None else hp["policy_rows"])
            train, ret = self.buffer.select(idx), self.buffer_reward[idx]
        else:
            train, ret = rows.select(torch.arange(len(rows))), r[rows.sample]
        with torch.no_grad():
            adv = ret - self._v(train) if hp["value_baseline"] else ret
        train.sample = torch.arange(len(train))  # one advantage per training row
        batch.rows = train
        batch.row_data["advantage"] = adv.detach()  # split with the rows (micro-batches, DDP)
        batch.extras["advantages"] = adv.detach()  # indexed by rows.sample (the influence harness reads it)
        batch.extras["replay_stats"] = stats

    def original_loss(self, batch, ctx):
        rows, p, hp = batch.rows, ctx.process, ctx.hp
        adv = batch.row_data["advantage"]
        out = ctx.policy(rows.x, rows.step, rows.cond)
        mu = p.mean(rows.x, out, rows.step)
        log_ratio = p.log_prob(rows.x_next, mu, rows.step) - rows.log_prob
        ratio = torch.clamp(torch.exp(log_ratio), 1.0 - hp["ratio_clip"], 1.0 + hp["ratio_clip"])
        with torch.no_grad():
            out_ref = ctx.ref(rows.x, rows.step, rows.cond)
        if hp["kl_form"] == "eps_mse":  # forward_calculate_logprob: (noise_pred − old_noise_pred)²
            kl = elementwise_mean((out - out_ref) ** 2)
        else:
            kl = p.kl(mu, p.mean(rows.x, out_ref, rows.step), rows.step)
        batch.extras["stats"] = {**trust.ppo_stats(log_ratio, hp["ratio_clip"]), **batch.extras.get("replay_stats", {})}
        return (-hp["reward_weight"] * adv * ratio).mean() + hp["beta"] * kl.mean()

    def rsm_spec(self, batch, ctx):
        rows, hp, p = batch.rows, ctx.hp, ctx.process
        A = hp["reward_weight"] * batch.row_data["advantage"]
        b = hp["beta"]
        if hp["kl_form"] == "eps_mse":  # kl_weight·⟨Δε²⟩ = β_t·(w_t²/2)·⟨Δε²⟩, β_t = 2·kl_weight/w_t²
            b = 2 * b / p.weight(rows.step).to(rows.x.dtype) ** 2
        return RSMSpec(rows=rows, psi=estimators.likelihood_ratio(p, rows, A, b),
                       gamma=torch.ones(len(rows)), c1=weights.kl_natural(p, rows, b),
                       c2=torch.zeros(len(rows)), anchor="ref")

    # ---- what a checkpoint must carry for a resumed run to continue DPOK's state ---------------------------
    def state_dict(self) -> dict:
        """Buffer, V, V's optimizer and the buffer's random stream (tensors and plain values only, so
        ``torch.load(weights_only=True)`` reads it back). Empty before the first batch."""
        if self.buffer is None:
            return {}
        st = {"buffer": {f.name: getattr(self.buffer, f.name) for f in fields(Transitions)
                         if getattr(self.buffer, f.name) is not None},
              "buffer_reward": self.buffer_reward, "gen": self.gen.get_state()}
        if self.value is not None:
            st.update(value=self.value.state_dict(), value_opt=self.value_opt.state_dict(),
                      value_shape=[self.value.net[0].in_features - self.value.temb, self.value.net[0].out_features,
                                   0 if self.value.cond is None else self.value.cond.num_embeddings - 1])
        return st

    def load_state_dict(self, st: dict) -> None:
        if not st:
            return
        self.buffer = Transitions(**{f.name: st["buffer"].get(f.name) for f in fields(Transitions)})
        self.buffer_reward = st["buffer_reward"]
        self.gen = torch.Generator()
        self.gen.set_state(st["gen"])
        if "value" in st:
            dim, hidden, num_classes = st["value_shape"]
            self.value = ValueMLP(dim, hidden, num_classes=num_classes).to(self.buffer.x.dtype)
            self.value.load_state_dict(st["value"])
            self.value_opt = torch.optim.AdamW(self.value.parameters())
            self.value_opt.load_state_dict(st["value_opt"])

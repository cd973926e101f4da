"""dpok's original against google-research/google-research dpok/ (train_online_pg.py@1d49f2c,
pipeline_stable_diffusion_extended.py@4c42994, scheduling_ddim_extended.py@10270a5, README.md@83282e4).
Tolerance 1e-10 relative (tests/conformance/zo_common.py)."""
import copy

import pytest
import torch

from rsmbench.core.method import get
from rsmbench.harness import equivalence
from tests.conformance.zo_common import REL, assert_pinned, assert_sensitive, ddim_step, harness_ddim, rel, toy

POLICY = {"reward_weight": 10.0, "kl_weight": 1000.0, "ratio_clip": 0.02}  # the toy rewards are O(1e3)


def dpok_policy_loss(ctx, rows, adv, C):
    """train_online_pg.py@1d49f2c ``_train_policy_func``: ratio = clamp(exp(log_prob − batch_log_prob),
    1 ± ratio_clip); loss = mean(−reward_weight·adv·ratio) + kl_weight·mean(kl_regularizer), with
    kl_regularizer = (noise_pred − old_noise_pred)², both CFG-combined, old = the frozen pretrained
    ``unet_copy`` (pipeline_stable_diffusion_extended.py@4c42994 ``forward_calculate_logprob``); log_prob
    = Normal(prev_sample, std_dev_t).log_prob(next_latents) averaged over the latent dims
    (scheduling_ddim_extended.py@10270a5 ``step_forward_logprob``)."""
    eps = ctx.policy(rows.x, rows.step, rows.cond)
    eps_old = ctx.ref(rows.x, rows.step, rows.cond)
    _, _, lp = ddim_step(harness_ddim(), rows.step, rows.x, eps, rows.x_next)
    ratio = torch.clamp(torch.exp(lp - rows.log_prob), 1 - C["ratio_clip"], 1 + C["ratio_clip"])
    return (-C["reward_weight"] * adv * ratio).mean() + C["kl_weight"] * ((eps - eps_old) ** 2).mean()


@pytest.fixture(scope="module")
def policy_case():
    hp = {"reward_weight": POLICY["reward_weight"], "beta": POLICY["kl_weight"], "ratio_clip": POLICY["ratio_clip"]}
    m, ctx, batch = toy("dpok", "diffusion", hp)
    with torch.no_grad():
        ours = m.original_loss(batch, ctx).item()
    return m, ctx, batch, ours


def test_policy_loss_conforms(policy_case):
    """_train_policy_func (train_online_pg.py@1d49f2c) on rows drawn from the replay buffer, with
    adv = final_reward − V(state, txt_emb, timestep) (``--v_flag 1``)."""
    m, ctx, batch, ours = policy_case
    rows, adv = batch.rows, batch.extras["advantages"]
    with torch.no_grad():
        ret = adv + m.value(rows.x, rows.step, rows.cond)  # adv + V is each row's final reward
        assert all((batch.rewards - r).abs().min() <= 1e-12 for r in ret)
        assert 0 < batch.extras["stats"]["clipfrac"] < 1
        assert rel(ours, dpok_policy_loss(ctx, rows, adv, POLICY)) <= REL


@pytest.mark.parametrize("key", list(POLICY))
def test_policy_loss_detects_a_changed_constant(policy_case, key):
    _, ctx, batch, ours = policy_case
    with torch.no_grad():
        assert_sensitive(ours, lambda C: dpok_policy_loss(ctx, batch.rows, batch.extras["advantages"], C), POLICY,
                         [key])


VALUE = {"v_lr": 1e-4, "weight_decay": 0.01, "v_step": 5.0}


def test_value_step_conforms():
    """train_online_pg.py@1d49f2c ``main``: value_optimizer = torch.optim.AdamW(V.parameters(), lr=v_lr)
    (weight decay: torch's default 0.01); per sampling step zero_grad, ``v_step`` = 5 calls of
    ``_train_value_func`` (backward of F.mse_loss(V(x_t, c, i), r)/v_step on ``v_batch_size`` buffer
    transitions drawn without replacement), then ONE optimizer step. The same V and optimizer on the
    next batch (they persist on the method object)."""
    m, ctx, batch = toy("dpok", "diffusion", {"v_batch_size": 16}, shift=0.0)
    V0, opt0, gen0 = copy.deepcopy(m.value), copy.deepcopy(m.value_opt), m.gen.get_state()
    loss = m._value_step(ctx)  # the second value step of the run: the same V and optimizer state

    def theirs(C):
        V = copy.deepcopy(V0)
        opt = torch.optim.AdamW(V.parameters(), lr=C["v_lr"], weight_decay=C["weight_decay"])
        opt.load_state_dict({**opt0.state_dict(), "param_groups": [
            {**opt0.state_dict()["param_groups"][0], "lr": C["v_lr"], "weight_decay": C["weight_decay"]}]})
        gen = torch.Generator()
        gen.set_state(gen0)
        opt.zero_grad()
        total = 0.0
        for _ in range(5):
            idx = torch.randperm(len(m.buffer), generator=gen)[:16]
            mb = m.buffer.select(idx)
            vl = torch.nn.functional.mse_loss(V(mb.x, mb.step, mb.cond), m.buffer_reward[idx]) / C["v_step"]
            vl.backward()
            total += vl.item()
        opt.step()
        return torch.cat([(p - q).reshape(-1) for p, q in zip(V.parameters(), V0.parameters())]), total

    ours_delta = torch.cat([(p - q).reshape(-1) for p, q in zip(m.value.parameters(), V0.parameters())]).detach()
    delta, total = theirs(VALUE)
    assert rel(ours_delta, delta) <= REL and rel(loss, total) <= REL
    for key in ("v_lr", "weight_decay"):  # Adam's update does not see a loss scale: 1/v_step shows in the loss
        assert rel(ours_delta, theirs({**VALUE, key: VALUE[key] * (1 + 1e-6)})[0]) > REL
    assert rel(loss, theirs({**VALUE, "v_step": 5 * (1 + 1e-6)})[1]) > REL


def test_replay_buffer_keeps_the_last_transitions_across_batches():
    """``_collect_rollout`` appends every transition; ``_trim_buffer`` keeps the last ``buffer_size``; the
    policy draws its rows from that buffer (``_train_policy_func`` ``get_random_indices``)."""
    m = get("dpok")
    ctx = equivalence.build_context(m, "diffusion", hp={"buffer_size": 20})
    cond = torch.arange(2).repeat_interleave(4)
    fresh = []
    for it in range(2):
        b = m.collect(ctx, cond, [it * 100 + k for k in range(8)])
        fresh.append(b.rows.select(torch.arange(len(b.rows))))
        m.prepare(b, ctx)
        assert len(b.rows) == min(len(fresh[-1]), len(m.buffer))  # one draw, as many rows as were sampled
    assert len(m.buffer) == 20 and torch.equal(m.buffer.x, fresh[1].x[-20:])
    assert torch.equal(m.buffer.log_prob, fresh[1].log_prob[-20:])  # the log-prob at sampling is kept
    st = m.state_dict()  # what a checkpoint must carry; restored, the next draw is the same
    m2 = get("dpok")
    m2.load_state_dict(copy.deepcopy(st))
    assert torch.equal(m._draw(7), m2._draw(7))
    assert all(torch.equal(p, q) for p, q in zip(m.value.parameters(), m2.value.parameters()))


def test_preset_is_the_published_run():
    """README.md@83282e4 (``--reward_weight 10 --kl_weight 0.01``); train_online_pg.py@1d49f2c argparse
    (``--ratio_clip 1e-4``, ``--buffer_size 1000``, ``--v_batch_size 256``, ``--v_step 5``, ``--v_lr 1e-4``)."""
    assert_pinned(get("dpok").hparams("dpok"), {"reward_weight": 10.0, "beta": 0.01, "ratio_clip": 1e-4,
                                                "kl_form": "eps_mse", "buffer_size": 1000, "v_batch_size": 256,
                                                "v_steps": 5, "v_lr": 1e-4, "replay": True, "value_baseline": True})

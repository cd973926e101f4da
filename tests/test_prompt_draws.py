"""Which prompts a run trains on (``setup.prompt_draws``): a fixed list, k distinct prompts of the train list drawn
afresh each iteration, or (full scale) uniform draws from the whole list; and the budget's samples per iteration."""
import torch

from rsmbench.run import budget
from rsmbench.run.setup import prompt_draws


def spec(train, per_iteration, seed=0, bpp=4):
    return {"seed": seed, "train": {"batch_per_prompt": bpp},
            "prompts": {"train": train, "per_iteration": per_iteration}}


def test_a_train_list_without_per_iteration_is_trained_every_iteration():
    cond = prompt_draws(spec([2, 4, 9], None), 44)
    for it in (1, 7):
        assert cond(it).tolist() == [2] * 4 + [4] * 4 + [9] * 4
    assert budget.samples_per_iteration(spec([2, 4, 9], None)) == 12


def test_per_iteration_draws_that_many_distinct_train_prompts_each_iteration():
    train = list(range(22))
    cond = prompt_draws(spec(train, 6), 44)
    draws = [cond(it) for it in range(1, 41)]
    for c in draws:
        ids = c.view(6, 4)
        assert (ids == ids[:, :1]).all()  # one group of batch_per_prompt samples per prompt
        assert len(set(ids[:, 0].tolist())) == 6 and set(ids[:, 0].tolist()) <= set(train)
    assert len({tuple(c.tolist()) for c in draws}) == 40  # afresh each iteration
    assert set(torch.cat(draws).tolist()) == set(train)  # every train prompt is trained on
    assert budget.samples_per_iteration(spec(train, 6)) == 24


def test_draws_are_fixed_by_run_seed_and_iteration():
    a, b, c = (prompt_draws(spec(list(range(22)), 6, seed=s), 44) for s in (0, 0, 1))
    assert torch.equal(a(5), b(5))  # a resumed run collects the prompts it would have
    assert not torch.equal(a(5), c(5))


def test_full_scale_draws_from_the_whole_list_with_replacement_as_ddpo():
    cond = prompt_draws(spec(None, 8, bpp=2), 45)
    ids = torch.stack([cond(it)[::2] for it in range(1, 201)])
    assert ids.shape == (200, 8) and ids.min() >= 0 and ids.max() < 45
    assert any(len(set(r.tolist())) < 8 for r in ids)  # with replacement: some iteration repeats a prompt
    assert budget.samples_per_iteration(spec(None, 8, bpp=2)) == 16

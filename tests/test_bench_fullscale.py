"""`rsmbench bench --profile sd15` end to end on a tiny random-init SD1.5-shaped pipeline saved with
``save_pretrained`` (CPU, offline, temporary MLflow store from tests/conftest.py): the full-scale
context (peft LoRA, reference = adapter disabled, θ† = LoRA snapshot) trains a zeroth-order method on
the JPEG compressibility reward and a first-order one on the LAION aesthetic reward (random CLIP
vision tower and head, saved locally); checkpoints hold the LoRA weights only. Missing weights are
one line and exit code 2; without --profile the bench picks sd15 only when its weights are found.
"""
import argparse
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from rsmbench.cli import main
from rsmbench.core import method as registry
from rsmbench.run import bench
from rsmbench.run import fullscale as fs

# 2 prompts × 2 samples per iteration, 2 steps at 8 px (4×4 latents), 2 iterations, evals at 0 and 2
TINY = ["fullscale.resolution=8", "fullscale.num_steps=2", "fullscale.eval_steps=2", "fullscale.precision=fp32",
        "fullscale.device=cpu", "prompts.per_iteration=2", "train.batch_per_prompt=2", "budget.reward_queries=8",
        "eval.points=1", "eval.num_samples=4", "train.micro_rows=3"]


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd15") / "pipe"
    fs.random_pipeline("diffusion", size="tiny", seed=0).save_pretrained(d)
    return d


@pytest.fixture()
def no_cached_sd(monkeypatch):
    """Default hub ids that are certainly not in the HF cache of the machine running the tests."""
    for name in ("sd15", "sd35"):
        monkeypatch.setitem(fs.PROFILES, name, replace(fs.PROFILES[name], model=f"rsmbench-test/absent-{name}"))


def _runs(task):
    c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name(task)
    return c, ([] if exp is None else c.search_runs([exp.experiment_id]))


def _bench(tmp_path, task, profile, methods, *overrides):
    return main(["bench", "--task", task, "--profile", profile, "--methods", methods, "--seeds", "1",
                 "--formulation", "rsm", "--no-progress", "--report-dir", str(tmp_path / "report"), *TINY, *overrides])


def test_sd15_zeroth_order_run_finishes_and_checkpoints_lora_only(tmp_path, sd15_dir, capsys):
    assert _bench(tmp_path, "compressibility", "sd15", "reinforce_kl", f"model={sd15_dir}") == 0
    c, runs = _runs("compressibility")
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED" and r.data.tags["profile"] == "sd15"
    p, m = r.data.params, r.data.metrics
    assert p["profile"] == "sd15" and p["model.name"] == str(sd15_dir) and p["fullscale.num_steps"] == "2"
    assert p["prompts.list"] == "imagenet_animals" and p["reward.name"] == "compressibility"
    for key in ("train/reward_mean", "train/loss", "train/grad_norm", "train/approx_kl", "eval/reward_mean",
                "eval/kl_ref", "eval/diversity", "eval/prior_frechet"):
        assert key in m and torch.isfinite(torch.tensor(m[key])), key
    hist = sorted(c.get_metric_history(r.info.run_id, "train/reward_queries"), key=lambda h: h.step)
    assert [h.value for h in hist] == [4.0, 8.0]  # 2 iterations × (2 prompts × 2 samples)
    assert m["train/grad_norm"] > 0 and m["eval/kl_ref"] > 0  # the LoRA moved away from the reference
    assert len(c.list_artifacts(r.info.run_id, "samples")) == 2  # the last eval, first vs last (iteration 0 beside it)
    # the run checkpoint holds the trainable LoRA tensors only, never the base UNet
    ckpt = Path(os.environ["RSMBENCH_RESULTS"]) / "runs" / r.data.tags["config_hash"] / "net.safetensors"
    saved = load_file(str(ckpt))
    assert saved and all("lora" in k for k in saved), list(saved)[:5]
    unet = load_file(str(next((sd15_dir / "unet").glob("*.safetensors"))))
    assert sum(v.numel() for v in saved.values()) < sum(v.numel() for v in unet.values())
    assert "sd15" in capsys.readouterr().out  # the summary names the profile's runs
    # a second invocation finds the FINISHED run and skips it
    assert _bench(tmp_path, "compressibility", "sd15", "reinforce_kl", f"model={sd15_dir}") == 0
    assert len(_runs("compressibility")[1]) == 1


def _random_laion(tmp_path) -> list[str]:
    """A random CLIP vision tower (768-d projection, like ViT-L/14) and LAION head, saved locally."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from rewards.aesthetic_tiny import LaionHead

    torch.manual_seed(0)
    clip = tmp_path / "clip"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=16, patch_size=8,
                                                   projection_dim=768)).save_pretrained(clip)
    head = tmp_path / "head.safetensors"
    save_file(LaionHead(768).state_dict(), str(head))
    return [f"reward.cfg.clip={clip}", f"reward.cfg.head={head}"]


def test_sd15_first_order_on_differentiable_laion_reward(tmp_path, sd15_dir):
    """DRaFT-1 (first-order) backpropagates the LAION reward through the VAE decode into the LoRA."""
    assert _bench(tmp_path, "aesthetic", "sd15", "draft", f"model={sd15_dir}", "methods.draft.k=1",
                  *_random_laion(tmp_path)) == 0
    _, runs = _runs("aesthetic")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["profile"] == "sd15"
    m = runs[0].data.metrics
    assert m["train/grad_norm"] > 0 and "eval/reward_mean" in m and runs[0].data.params["reward.name"] == "aesthetic"


@pytest.mark.parametrize("argv", [["--profile", "sd15", "model=/nonexistent"], ["model=/nonexistent"]],
                         ids=["explicit", "auto-with-model"])
def test_missing_model_one_line_exit_2_nothing_created(argv, capsys):
    assert main(["bench", "--task", "compressibility", "--methods", "reinforce_kl", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/nonexistent" in err and "model=" in err, err
    db = Path(os.environ["MLFLOW_TRACKING_URI"][len("sqlite:///"):])
    assert not db.exists() and not Path(os.environ["RSMBENCH_RESULTS"]).exists()


def test_missing_reward_weights_one_line_exit_2(tmp_path, sd15_dir, capsys):
    argv = ["bench", "--task", "aesthetic", "--profile", "sd15", "--methods", "draft", "--no-progress",
            f"model={sd15_dir}", f"reward.cfg.head={tmp_path / 'absent.pth'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.pth" in err and "reward.head" in err, err
    assert not Path(os.environ["RSMBENCH_RESULTS"]).exists()


def _args(*overrides, task="compressibility"):
    return argparse.Namespace(task=task, overrides=list(overrides), profile=None, formulation=None, seeds=None,
                              methods="reinforce_kl", budget=None)


def test_auto_profile_tiny_without_weights(no_cached_sd):
    args = _args()
    cfg, runs = bench.plan(args)
    assert args.profile == "tiny" and cfg.profile == "tiny" and {r["profile"] for r in runs} == {"tiny"}
    note = args.profile_note
    assert len(note.splitlines()) == 1 and note.startswith("profile: tiny (sd15 weights not found: ")
    assert "rsmbench-test/absent-sd15" in note and note.endswith("pass --profile sd15 model=PATH to use them)")
    m = registry.get("reinforce_kl")
    assert {r["process"] for r in runs} == set(bench.processes(m, cfg))  # the method's benched processes
    gmm = _args(task="gmm")
    bench.plan(gmm)
    assert gmm.profile == "tiny" and gmm.profile_note == "profile: tiny (task 'gmm' has no full-scale profile)"


def test_auto_profile_full_scale_when_weights_found(no_cached_sd, sd15_dir):
    args = _args(f"model={sd15_dir}")
    cfg, runs = bench.plan(args)
    assert args.profile == "sd15" and args.profile_note == f"profile: sd15 (weights found: {sd15_dir})"
    assert [(r["profile"], r["process"]) for r in runs] == [("sd15", "diffusion")]


def test_auto_profile_line_is_printed(no_cached_sd, capsys):
    """Without --profile the bench chooses tiny when no SD weights are cached, and says why in one line
    (printed before the runs); an empty bench.processes list is refused by the task schema first."""
    from rsmbench.run import bench

    prof, note = bench.choose_profile("compressibility", [])
    assert prof == "tiny" and note.startswith("profile: tiny (sd15 weights not found")
    assert main(["bench", "--task", "compressibility", "--no-progress", "bench.processes=[]"]) == 2
    out, err = capsys.readouterr()
    assert err.strip().startswith("task 'compressibility': bench.processes must be 'published' or a list of the "
                                  "task's processes") and len(err.splitlines()) == 1, err


def test_sd15_killed_run_resumes_from_lora_checkpoint(tmp_path, sd15_dir, monkeypatch):
    """Killed after the iteration-1 checkpoint (LoRA + optimizer) but before its metrics were logged: the
    re-run loads the LoRA weights back into the adapter and finishes with no gap or duplicate."""
    from rsmbench.run import fullscale, tracking

    real, state = tracking.Tracker.log_metrics, {"armed": True}

    def dying(self, run_id, metrics, step):
        if step == 1 and state["armed"]:
            state["armed"] = False
            raise KeyboardInterrupt
        return real(self, run_id, metrics, step)

    loaded = []
    real_load = fullscale.load_trainable_state
    monkeypatch.setattr(fullscale, "load_trainable_state", lambda net, sd: (loaded.append(len(sd)), real_load(net, sd)))
    monkeypatch.setattr(tracking.Tracker, "log_metrics", dying)
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path, "compressibility", "sd15", "reinforce_kl", f"model={sd15_dir}")
    c, runs = _runs("compressibility")
    assert len(runs) == 1 and runs[0].info.status == "RUNNING" and not loaded
    assert _bench(tmp_path, "compressibility", "sd15", "reinforce_kl", f"model={sd15_dir}") == 0
    c, runs = _runs("compressibility")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and len(loaded) == 1 and loaded[0] > 0
    steps = [m.step for m in c.get_metric_history(runs[0].info.run_id, "iteration")]
    assert sorted(steps) == [0, 1, 2]

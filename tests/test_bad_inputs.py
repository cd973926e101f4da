"""Issue 16: every bad value is rejected before anything runs. A table of bad inputs across the CLI,
dotted overrides, task files, method hyperparameters, checkpoints and sweep files; each must give exit
code 2, exactly one line on stderr (naming the key and what it accepts), and write nothing: no results
folder, no MLflow store, no report. The cases are cheap: validation fails before a model is trained.
The same table runs through ``python -m rsmbench`` too (one subprocess for all cases,
``test_the_table_through_python_dash_m``).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rsmbench.cli import main
from rsmbench.run import paths

GMM = ["bench", "--task", "gmm", "--no-progress"]
EQUIV = ["equiv", "--process", "flow"]

# Task files written to $RSMBENCH_TASKS (beside a copy of the shipped tasks): name -> YAML text.
TASK_FILES = {
    "lr_word": "base: gmm\ntrain: {lr: fast}\n",
    "procs_list": "base: gmm\nprocesses: [flow]\n",
    "unknown_section": "base: gmm\ntrian: {lr: 1.0e-3}\n",
    "list_file": "- name\n- train\n",
    "malformed": "name: x\ntrain: {lr: [1, \n",
    "loop_a": "base: loop_b\n",
    "loop_b": "base: loop_a\n",
    "bad_process": "base: gmm\nprocesses: {flow: {process: {num_steps: 10, noise_level: 1.0, shift: 1.0, sigma: 2}}}\n",
    "bad_method": "base: gmm\nmethods: {grpo: {betta: 1.0}}\n",
    "scalar_section": "base: gmm\neval: 3\n",
}

# Sweep files written to the test's folder: name -> YAML text (``{ckpt}`` overrides are added where needed).
SWEEPS = {
    "malformed": "name: s\ntasks: [gmm\n",
    "list": "- gmm\n- grpo\n",
    "no_axes": "name: s\ntasks: [gmm]\n",
    "unknown_key": "name: s\ntasks: [gmm]\nseed: [0]\naxes: {m: {a: {method: grpo}}}\n",
    "unknown_method": "name: s\ntasks: [gmm]\naxes: {m: {a: {method: grpoo}}}\n",
    "bad_hp": "name: s\ntasks: [gmm]\naxes: {m: {a: {method: grpo, hp: {beta: -1}}}}\n",
    "unknown_hp": "name: s\ntasks: [gmm]\naxes: {m: {a: {method: grpo, hp: {nonsense: 1}}}}\n",
    "unknown_preset": "name: s\ntasks: [gmm]\naxes: {m: {a: {method: ddpo, preset: nosuch}}}\n",
    "unknown_task": "name: s\ntasks: [gmmm]\naxes: {m: {a: {method: grpo}}}\n",
    "bad_override": "name: s\ntasks: [gmm]\noverrides: [train.lr=abc]\naxes: {m: {a: {method: grpo}}}\n",
    "bad_level_key": "name: s\ntasks: [gmm]\naxes: {m: {a: {method: grpo, hps: {beta: 1}}}}\n",
    "bad_formulation": "name: s\ntasks: [gmm]\nformulation: neither\naxes: {m: {a: {method: grpo}}}\n",
    "bad_seeds": "name: s\ntasks: [gmm]\nseeds: [-1]\naxes: {m: {a: {method: grpo}}}\n",
}

# (id, argv, what stderr must contain). "{tmp}" is the test's folder; "{sweep:<name>}" a file of SWEEPS.
CASES = [
    # ---- the cases listed in the issue ---------------------------------------------------------------
    ("lr_abc", [*GMM, "train.lr=abc"], ["train.lr", "a number > 0", "'abc'"]),
    ("lr_negative", [*GMM, "train.lr=-1"], ["train.lr", "a number > 0", "-1"]),
    ("lr_nan", [*GMM, "train.lr=nan"], ["train.lr", "finite number"]),
    ("pretrain_v_without_head", ["pretrain", "--task", "shapes", "processes.flow.pretrain.objective=v"],
     ["processes.flow.pretrain.objective 'v' needs a model.net.v_head"]),
    ("eval_every", [*GMM, "eval.every=0"], ["eval: unknown key 'every'", "valid keys: jstar_samples"]),
    ("batch_zero", [*GMM, "train.batch_per_prompt=0"], ["train.batch_per_prompt", "integer >= 1"]),
    ("task_lr_word", ["bench", "--task", "lr_word"], ["train.lr", "a number > 0", "'fast'"]),
    ("num_samples_negative", [*GMM, "eval.num_samples=-5"], ["eval.num_samples", "integer >= 2"]),
    ("kl_samples_negative", [*GMM, "eval.kl_samples=-1"], ["eval.kl_samples", "integer >= 0"]),
    ("num_steps_zero", [*GMM, "processes.flow.process.num_steps=0"],
     ["processes.flow.process.num_steps", "integer >= 1"]),
    ("eta_two", [*GMM, "processes.diffusion.process.eta=2"], ["processes.diffusion.process.eta", "<= 1"]),
    ("noise_negative", [*GMM, "processes.flow.process.noise_level=-1"],
     ["processes.flow.process.noise_level", "a number > 0"]),
    ("budget_zero", [*GMM, "budget.reward_queries=0"], ["budget.reward_queries", "integer >= 1"]),
    ("task_processes_list", ["bench", "--task", "procs_list"], ["processes", "mapping"]),
    ("equiv_hp_empty", [*EQUIV, "--methods", "grpo", "--hp", "beta="], ["grpo.beta", "a number >= 0", "null"]),
    ("equiv_hp_word", [*EQUIV, "--methods", "grpo", "--hp", "beta=abc"], ["grpo.beta", "a number >= 0", "'abc'"]),
    ("equiv_hp_unknown", [*EQUIV, "--hp", "nonsense=1"], ["nonsense", "no method has this hyperparameter"]),
    ("equiv_hp_unknown_for_method", [*EQUIV, "--methods", "grpo", "--hp", "nonsense=1"],
     ["unknown hyperparameter 'nonsense'", "valid hyperparameters"]),
    ("methods_unknown_hp", [*GMM, "methods.grpo.nonsense=1"],
     ["methods.grpo", "unknown hyperparameter 'nonsense'", "valid hyperparameters"]),
    ("set_alpha_to_one", [*GMM, "processes.diffusion.process.scheduler.set_alpha_to_one=true"],
     ["set_alpha_to_one", "false"]),
    # ---- more overrides ------------------------------------------------------------------------------------
    ("section_typo", [*GMM, "trian.lr=1"], ["trian", "did you mean 'train'"]),
    ("dtype", [*GMM, "train.dtype=float8"], ["train.dtype", "one of", "'float8'"]),
    ("sampler", [*GMM, "eval.sampler=sdee"], ["eval.sampler", "did you mean 'sde'"]),
    ("grad_clip_zero", [*GMM, "train.grad_clip=0"], ["train.grad_clip", "a number > 0"]),
    ("eval_points_zero", [*GMM, "eval.points=0"], ["eval.points", "integer >= 1"]),
    ("budget_mode", [*GMM, "budget.mode=fair"], ["budget.mode", "one of 'matched', 'published'"]),
    ("bench_processes", [*GMM, "bench.processes=[diffusionn]"], ["bench.processes", "'published' or a list"]),
    ("divergence_order", [*GMM, "divergence.reward=[5.0,1.0]"], ["divergence.reward", "low < high"]),
    ("prompt_negative", [*GMM, "eval.prompts=[-1]"], ["eval.prompts[0]", "integer >= 0"]),
    ("unknown_process", [*GMM, "processes.ode.process.num_steps=1"], ["ode"]),
    ("methods_bad_value", [*GMM, "methods.grpo.beta=abc"], ["methods.grpo.beta", "a number >= 0", "'abc'"]),
    ("methods_range", [*GMM, "methods.grpo.clip_range=0"], ["methods.grpo.clip_range", "a number > 0"]),
    ("methods_choice", [*GMM, "methods.vgg_flow.eta_mode=qaud"],
     ["methods.vgg_flow.eta_mode", "one of 'quad', 'linear'", "did you mean 'quad'"]),
    ("methods_unknown_method", [*GMM, "methods.grpoo.beta=1"], ["unknown method 'grpoo'", "did you mean 'grpo'"]),
    ("methods_relation", [*GMM, "methods.rsm_zo.k=[0,0]"], ["methods.rsm_zo", "k must branch"]),
    ("malformed_override", [*GMM, "train.lr"], ["malformed override 'train.lr'", "key=value"]),
    # ---- CLI options ------------------------------------------------------------------------------------------
    ("task_typo", ["bench", "--task", "gmmm"], ["unknown task 'gmmm'", "choose from"]),
    ("profile", ["bench", "--task", "gmm", "--profile", "huge"], ["unknown profile 'huge'", "tiny, sd15, sd35"]),
    ("profile_absent", ["bench", "--task", "gmm", "--profile", "sd15"], ["no 'sd15' profile", "choose from tiny"]),
    ("method_typo", [*GMM, "--methods", "grpoo"], ["unknown method 'grpoo'"]),
    ("formulation", [*GMM, "--formulation", "neither"], ["unknown formulation 'neither'"]),
    ("workers_zero", [*GMM, "--workers", "0"], ["--workers", ">= 1"]),
    ("seeds_zero", [*GMM, "--seeds", "0"], ["--seeds", ">= 1"]),
    ("seeds_word", [*GMM, "--seeds", "two"], ["--seeds", "invalid int value"]),
    ("unknown_option", [*GMM, "--bogus"], ["unrecognized arguments"]),
    ("subcommand", ["benhc"], ["invalid choice"]),
    ("equiv_method", [*EQUIV, "--methods", "grpoo"], ["unknown method 'grpoo'", "did you mean 'grpo'"]),
    ("equiv_preset", [*EQUIV, "--preset", "nosuch"], ["no method has the preset 'nosuch'"]),
    ("equiv_hp_list_item", [*EQUIV, "--methods", "rsm_zo", "--hp", "k=[3,-1]"], ["rsm_zo.k[1]", "integer >= 0"]),
    ("equiv_dtype", [*EQUIV, "--dtype", "float16"], ["invalid choice"]),
    ("tune_seeds", ["tune", "--task", "gmm", "--seeds", "0"], ["--seeds", ">= 1"]),
    ("tune_workers", ["tune", "--task", "gmm", "--workers", "0"], ["--workers", ">= 1"]),
    ("tune_lr_grid", ["tune", "--task", "gmm", "--lr-grid", "abc"], ["lr-grid"]),
    ("tune_override", ["tune", "--task", "gmm", "train.lr=-1"], ["train.lr", "a number > 0"]),
    ("pretrain_override", ["pretrain", "--task", "gmm", "processes.flow.pretrain.steps=0"],
     ["processes.flow.pretrain.steps", "integer >= 1"]),
    ("report_empty", ["report", "--task", "gmm", "--out", "{tmp}/out"], []),
    # ---- task files --------------------------------------------------------------------------------------------
    ("task_unknown_section", ["bench", "--task", "unknown_section"], ["trian", "did you mean 'train'"]),
    ("task_list_file", ["bench", "--task", "list_file"], ["a task file is a mapping"]),
    ("task_malformed", ["bench", "--task", "malformed"], ["cannot parse"]),
    ("task_base_loop", ["bench", "--task", "loop_a"], ["circular 'base' chain"]),
    ("task_process_key", ["bench", "--task", "bad_process"], ["processes.flow.process", "'sigma'", "valid keys"]),
    ("task_method_hp", ["bench", "--task", "bad_method"], ["methods.grpo", "'betta'", "did you mean 'beta'"]),
    ("task_scalar_section", ["bench", "--task", "scalar_section"], ["eval"]),
    # ---- checkpoints -------------------------------------------------------------------------------------------
    ("checkpoint_missing", [*GMM, "--methods", "grpo", "processes.flow.model.checkpoint={tmp}/none.safetensors"],
     ["missing base checkpoint", "rsmbench pretrain"]),
    ("checkpoint_wrong_kind", [*GMM, "--methods", "grpo",
                               "processes.flow.model.checkpoint=tasks/checkpoints/gmm_diffusion.safetensors"],
     ["'epsilon'-prediction", "'v'", "processes.flow.model.checkpoint"]),
    ("checkpoint_other_network", [*GMM, "--methods", "grpo", "processes.flow.model.net.hidden=64"],
     ["processes.flow.model.net.hidden is 64", "has 128", "rsmbench pretrain"]),
    ("tune_checkpoint_other_network", ["tune", "--task", "gmm", "--methods", "grpo", "processes.flow.model.arch=unet"],
     ["processes.flow.model.arch is 'unet'", "'mlp'"]),
    ("budget_buys_nothing", [*GMM, "--methods", "tempflow_grpo", "budget.reward_queries=5"],
     ["budget.reward_queries=5", "tempflow_grpo", "use budget.reward_queries=14"]),
    ("branch_schedule_too_long", [*GMM, "--methods", "rsm_zo", "methods.rsm_zo.k=[0,0,0,0,0,0,0,0,0,0,0,4]"],
     ["cannot run", "branch schedule", "at most 10"]),
    ("reward_unknown", [*GMM, "reward.name=nosuch"], ["unknown reward 'nosuch'", "choose from"]),
    ("prompts_empty", [*GMM, "prompts.train=[]"], ["prompts.train", "non-empty list"]),
    ("prompts_per_iteration", ["bench", "--task", "shapes", "--no-progress", "prompts.per_iteration=7"],
     ["prompts.per_iteration = 7", "the 6 of prompts.train"]),
    ("pretrain_process", ["pretrain", "--task", "gmm", "--process", "flw"], ["no process 'flw'", "choose from flow"]),
    ("equiv_method_preset", ["equiv", "--methods", "grpo", "--preset", "nosuch"], ["nosuch"]),
    ("equiv_hp_no_value", ["equiv", "--hp", "beta"], ["beta"]),
    ("checkpoint_bad_sidecar", [*GMM, "--methods", "grpo", "processes.flow.model.checkpoint={tmp}/bad.safetensors"],
     ["unreadable checkpoint sidecar"]),
    # ---- sweep files -----------------------------------------------------------------------------------------
    ("sweep_missing", ["sweep", "{tmp}/nofile.yaml"], ["no sweep file", "the shipped sweeps"]),
    ("sweep_malformed", ["sweep", "{sweep:malformed}"], ["malformed sweep file"]),
    ("sweep_list", ["sweep", "{sweep:list}"], ["a sweep file is a mapping"]),
    ("sweep_no_axes", ["sweep", "{sweep:no_axes}"], ["missing required key 'axes'"]),
    ("sweep_unknown_key", ["sweep", "{sweep:unknown_key}"], ["'seed'", "did you mean 'seeds'"]),
    ("sweep_unknown_method", ["sweep", "{sweep:unknown_method}"], ["unknown method 'grpoo'", "did you mean 'grpo'"]),
    ("sweep_bad_hp", ["sweep", "{sweep:bad_hp}"], ["hp.beta", "a number >= 0", "-1"]),
    ("sweep_unknown_hp", ["sweep", "{sweep:unknown_hp}"], ["unknown hyperparameter 'nonsense'"]),
    ("sweep_unknown_preset", ["sweep", "{sweep:unknown_preset}"], ["no preset 'nosuch'", "choose from"]),
    ("sweep_unknown_task", ["sweep", "{sweep:unknown_task}"], ["unknown task 'gmmm'"]),
    ("sweep_bad_override", ["sweep", "{sweep:bad_override}"], ["train.lr", "a number > 0"]),
    ("sweep_bad_level_key", ["sweep", "{sweep:bad_level_key}"], ["'hps'", "did you mean 'hp'"]),
    ("sweep_bad_formulation", ["sweep", "{sweep:bad_formulation}"], ["formulation", "one of 'rsm'"]),
    ("sweep_bad_seeds", ["sweep", "{sweep:bad_seeds}"], ["seeds[0]", "integer >= 0"]),
    ("sweep_workers", ["sweep", "{sweep:bad_hp}", "--workers", "0"], ["--workers", ">= 1"]),
    ("sweep_tasks_subset", ["sweep", "{tmp}/tasks/sweeps/example.yaml", "--tasks", "aesthetic"],
     ["not in the sweep's tasks"]),
]


def _setup(tmp: Path) -> None:
    """The task files, sweep files and a checkpoint with a corrupt sidecar the cases refer to."""
    tdir = tmp / "tasks"
    shutil.copytree(paths.ROOT / "tasks", tdir, ignore=shutil.ignore_patterns("checkpoints", "prompts"))
    for name, text in TASK_FILES.items():
        (tdir / f"{name}.yaml").write_text(text)
    for name, text in SWEEPS.items():
        (tmp / f"sweep_{name}.yaml").write_text(text)
    shutil.copy(paths.ROOT / "tasks" / "checkpoints" / "gmm_flow.safetensors", tmp / "bad.safetensors")
    (tmp / "bad.json").write_text("{not json")


def _argv(argv: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) if not a.startswith("{sweep:") else str(tmp / f"sweep_{a[7:-1]}.yaml")
            for a in argv]


def _env(tmp: Path) -> dict:
    return {"RSMBENCH_RESULTS": str(tmp / "results"), "RSMBENCH_REPORTS": str(tmp / "reports"),
            "RSMBENCH_TASKS": str(tmp / "tasks"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'results' / 'mlflow.db'}"}


def _written(tmp: Path, before: set) -> list[str]:
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p not in before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    _setup(tmp)
    return tmp


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(argv, needles, workdir, monkeypatch, capsys):
    for k, v in _env(workdir).items():
        monkeypatch.setenv(k, v)
    before = set(workdir.rglob("*"))
    rc = main(_argv(argv, workdir))
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]
    assert _written(workdir, before) == []


def test_the_table_through_python_dash_m(workdir):
    """Every case through ``python -m rsmbench`` (one interpreter: ``runpy`` per case, as ``-m`` does),
    from outside the repository: the same exit code, one line, nothing written."""
    script = (
        "import contextlib, io, json, runpy, sys\n"
        "out = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    sys.argv = ['rsmbench', *argv]\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            runpy.run_module('rsmbench', run_name='__main__', alter_sys=True)\n"
        "            rc = 0\n"
        "        except SystemExit as e:\n"
        "            rc = e.code\n"
        "    out.append([rc, err.getvalue()])\n"
        "print(json.dumps(out))\n")
    argvs = [_argv(c[1], workdir) for c in CASES]
    env = dict(os.environ, PYTHONPATH=str(paths.ROOT), **_env(workdir))
    before = set(workdir.rglob("*"))
    p = subprocess.run([sys.executable, "-c", script, json.dumps(argvs)], cwd=workdir, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for (name, _, needles), (rc, err) in zip(CASES, results):
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and all(n in lines[0] for n in needles), (name, rc, err[-2000:])
    assert _written(workdir, before) == []

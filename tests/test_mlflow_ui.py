"""The MLflow UI on a store written by the Tracker: its REST API serves the experiment (as model
training, with its description and saved runs view), the runs, their metric histories and a PNG
artifact; and, where Debian's chromium is installed, the pages render as model training, not as the
empty GenAI view.

The server is ``mlflow ui --workers 1`` with job execution off on a free loopback port, started in
its own session and stopped by killing that process group (it spawns a uvicorn child)."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from PIL import Image

from rsmbench.run import tracking

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what the GenAI view of MLflow 3.17 shows and the model-training view does not (its sidebar)
GENAI_MARKERS = ("Evaluation runs", "Judges", "Agent versions")
DESCRIPTION = "2-D Gaussian mixture, linear reward (exact optimum)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_store(root) -> dict:
    """One experiment, two seeds of one configuration, metrics over steps and a PNG per run."""
    t = tracking.Tracker(f"sqlite:///{root / 'mlflow.db'}")
    exp = t.experiment("gmm", description=DESCRIPTION)
    png = root / "samples_it0.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(png)
    runs, groups = {}, set()
    for seed in (0, 1):
        rc = {"task": "gmm", "profile": "tiny", "method": "reinforce_kl", "formulation": "rsm", "process": "flow",
              "seed": seed, "budget": {"mode": "matched", "reward_queries": 96}}
        name = f"reinforce_kl-rsm-flow-s{seed}"
        groups.add(tracking.config_group(rc))
        run = t.create_run(exp, name, {"seed": seed, "formulation": "rsm", "process": "flow",
                                       tracking.GROUP_TAG: tracking.config_group(rc)},
                           description=tracking.run_description(rc))
        for step in range(4):
            t.log_metrics(run, {"eval/reward_mean": 0.1 * step + seed, "eval/kl_ref": 0.01 * step,
                                "eval/J_gap": 1.0 - 0.2 * step, "train/reward_queries": 24.0 * step}, step)
        t.log_artifact(run, png, "samples")
        t.finish(run)
        runs[name] = run
    (group,) = groups
    return {"exp": exp, "runs": runs, "group": group}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_ui")
    with pytest.MonkeyPatch.context() as mp:  # artifacts under this store's folder
        mp.setenv("RSMBENCH_RESULTS", str(root))
        store = _write_store(root)
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--workers", "1", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=5).read() == b"OK":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow ui did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield {**store, "base": base, "port": port, "root": root}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def _api(ui, endpoint, body=None, **query):
    url = f"{ui['base']}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())


def test_rest_api_serves_experiment_runs_metrics_and_artifacts(ui):
    exps = {e["name"]: e for e in _api(ui, "experiments/search", {"max_results": 50})["experiments"]}
    tags = {t["key"]: t["value"] for t in exps["gmm"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # what the UI calls "Machine learning"
    assert tags["mlflow.note.content"] == DESCRIPTION
    state = json.loads(json.loads(tags["mlflow.sharedViewState.rsmbench"])["state"])
    assert "metrics.`eval/reward_mean`" in state["selectedColumns"]

    runs = _api(ui, "runs/search", {"experiment_ids": [ui["exp"]], "max_results": 10})["runs"]
    assert sorted(r["info"]["run_name"] for r in runs) == sorted(ui["runs"])
    groups = set()
    for r in runs:
        rtags = {t["key"]: t["value"] for t in r["data"]["tags"]}
        assert r["info"]["status"] == "FINISHED"
        assert rtags["mlflow.note.content"].startswith("**reinforce_kl**, rsm formulation")
        groups.add(rtags["config_group"])
        hist = _api(ui, "metrics/get-history", run_id=r["info"]["run_id"], metric_key="eval/reward_mean")
        assert [m["step"] for m in hist["metrics"]] == [0, 1, 2, 3]
        files = _api(ui, "artifacts/list", run_id=r["info"]["run_id"], path="samples")["files"]
        assert [f["path"] for f in files] == ["samples/samples_it0.png"]
        png = urllib.request.urlopen(f"{ui['base']}/get-artifact?" + urllib.parse.urlencode(
            {"path": "samples/samples_it0.png", "run_uuid": r["info"]["run_id"]}), timeout=60).read()
        assert Image.open(io.BytesIO(png)).size == (32, 32)
    assert groups == {ui["group"]}  # the two seeds are one configuration


def _render(url, out_png, tmp_path) -> str:
    """Chromium's DOM of `url` after the page has settled (its virtual clock run 15 s ahead, network
    waits included), with a 1400×900 screenshot to `out_png`; a fresh profile, so no stored
    GenAI / Model training choice."""
    profile = tmp_path / f"profile-{out_png.stem}"
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                        f"--screenshot={out_png}", "--window-size=1400,900", "--dump-dom", url],
                       capture_output=True, text=True, timeout=180, env=dict(os.environ, HOME=str(tmp_path)))
    assert p.returncode == 0 and out_png.is_file(), p.stderr[-2000:]
    with Image.open(out_png) as im:
        assert im.size == (1400, 900)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, "a blank screenshot"
    return p.stdout


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason="Debian's chromium is not installed (/usr/bin/chromium; `apt-get install chromium`)")
def test_pages_render_as_model_training(ui, tmp_path):
    """Checked on the DOM, not on pixels: the page must show this store's content (run name, its
    description, metric names, the seed group) and none of the GenAI sidebar's entries. The same run
    page without ``workflowType`` is the GenAI view in MLflow 3.17.2 (it ignores
    mlflow.experimentKind), which shows that the markers tell the two views apart."""
    name, run = next(iter(ui["runs"].items()))
    dom = _render(tracking.ui_url(ui["exp"], ui["port"], run_id=run), tmp_path / "run.png", tmp_path)
    assert name in dom and "reinforce_kl" in dom and "eval/reward_mean" in dom and "Model training" in dom
    assert not [m for m in GENAI_MARKERS if m in dom]

    dom = _render(tracking.ui_url(ui["exp"], ui["port"]), tmp_path / "runs.png", tmp_path)
    assert all(n in dom for n in ui["runs"]) and "eval/J_gap" in dom and "train/reward_queries" in dom
    assert f"Group: {ui['group']}" in dom  # the seeds are one row (metrics averaged) by config_group
    assert not [m for m in GENAI_MARKERS if m in dom]

    control = _render(f"{ui['base']}/#/experiments/{ui['exp']}/runs/{run}", tmp_path / "genai.png", tmp_path)
    assert name in control and [m for m in GENAI_MARKERS if m in control], \
        "MLflow now opens the experiment by its mlflow.experimentKind tag: ui_url's workflowType may go"

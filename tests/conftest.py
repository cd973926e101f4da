"""Test environment: offline hub, a temporary MLflow store, two torch threads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _mlflow_tmp(tmp_path, monkeypatch):
    """Never let a test write MLflow data outside its temporary directory."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RSMBENCH_RESULTS", str(tmp_path / "results"))

"""``mlflow models serve`` on a model ``mtcae train`` logged: one real request over loopback HTTP."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cache_fixture import TinyCache, write_tiny_cache
from videos import face_frames, write_frames

from orchestrator.cli import main
from orchestrator.tracking import make_client
from orchestrator.trial.packaging import MODEL_NAME, find_logged_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
READY_WAIT_S = 180  # an upper bound for the server to import torch and load the model, not a timing claim


@pytest.fixture(autouse=True)
def no_ambient_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, TinyCache]:
    """``mtcae train`` on a tiny generated cache; the store URI and the run's logged model id."""
    out = tmp_path_factory.mktemp("runs")
    cache = write_tiny_cache(out / "cache")
    sets = ["encoder=tiny", "decoder=official", "decoder_dim=16", "decoder_head_dim=8", "decoder_depth=1",
            "batch_size=4", "n_folds=3"]
    argv = ["train", "--cache", str(cache.root), "--arch", "cascaded_vit", "--epochs", "2", "--out", str(out),
            "--no-progress", *(a for s in sets for a in ("--set", s))]
    assert main(argv) == 0
    uri = f"sqlite:///{out.resolve()}/mlflow.db"
    client = make_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mtcae").experiment_id])
    return uri, find_logged_model(uri, run.info.run_id, MODEL_NAME).model_id, cache


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(trained: tuple[str, str, TinyCache], tmp_path: Path) -> Iterator[str]:
    """The served model's base URL; the server (its own process group) is stopped by its PID."""
    uri, model_id, _ = trained
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", f"models:/{model_id}", "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_ready(base, proc, tmp_path / "serve.log")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group is the server we started and its uvicorn worker
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _wait_until_ready(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer /ping:\n{log.read_text()[-3000:]}")


def test_served_model_answers_a_base64_video(server: str, trained: tuple[str, str, TinyCache],
                                             tmp_path: Path) -> None:
    _, _, cache = trained
    video = write_frames(tmp_path / "face.mp4", face_frames(num_frames=20, size=96))
    body = {"dataframe_split": {"columns": ["clip", "video_base64"],
                                "data": [["face.mp4", base64.b64encode(video.read_bytes()).decode("ascii")],
                                         ["broken.mp4", base64.b64encode(b"not a video").decode("ascii")]]}}
    request = urllib.request.Request(f"{server}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    good, bad = answer["predictions"]
    probs = [good[f"prob_{c}"] for c in cache.class_names]
    assert good["clip"] == "face.mp4" and good["status"] in ("ok", "no_face")
    assert np.isclose(sum(probs), 1.0, atol=1e-5) and good["label"] == cache.class_names[int(np.argmax(probs))]
    assert len(good["frame_index"]) == len(good["face_boxes"]) == len(good["pred_landmarks"]) == 16
    assert bad["clip"] == "broken.mp4" and bad["status"] == "failed" and bad["label"] is None

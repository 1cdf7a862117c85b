"""orchestrator/trial/predictor.py + packaging.py: the trained model as an MLflow model.

A real trial on a generated tiny cache logs its model to a real MLflow store under ``tmp_path``;
both flavours are loaded back and compared with the trial's own test predictions.
"""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from cache_fixture import TINY_TRIAL, TinyCache, write_tiny_cache

import vocab
from model import ModelConfig, build_model
from orchestrator.data.settings import PreprocessSettings
from orchestrator.tracking import make_client, mlflow_metric
from orchestrator.trial.config import TrialConfig
from orchestrator.trial.loop import MODEL_URI_TAG, run_trial
from orchestrator.trial.packaging import (
    ENCODER_FILE,
    MODEL_NAME,
    find_logged_model,
    load_package,
    log_model,
    register_best_model,
    registered_model_name,
    save_package,
    use_tracking_uri,
)
from orchestrator.trial.predictor import (
    EncoderMismatchError,
    Predictor,
    predictor_from_trial,
)

TINY = TINY_TRIAL


@pytest.fixture(autouse=True)
def no_ambient_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MTCAE_ENCODER_CHECKPOINT", raising=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> TinyCache:
    return write_tiny_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def trained(cache: TinyCache, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One finished trial logged to a fresh store: its URI, run id and test predictions."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    cfg = TrialConfig.from_flat({**TINY, "cache_dir": str(cache.root), "tracking_uri": uri})
    run_trial(cfg)
    client = make_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    local = client.download_artifacts(run.info.run_id, "predictions.csv", str(tmp_path_factory.mktemp("dl")))
    return {"uri": uri, "run": run, "cfg": cfg, "predictions": pd.read_csv(local)}


def tiny_predictor(arch: str = vocab.CASCADED_VIT, size: int = 32, seed: int = 0,
                   checkpoint: Path | None = None) -> Predictor:
    torch.manual_seed(seed)
    net = build_model(arch, ModelConfig(encoder="tiny", decoder="official", num_classes=3, img_size=size,
                                        encoder_checkpoint=str(checkpoint) if checkpoint else None))
    return predictor_from_trial(net, {}, ("a", "b", "c"), PreprocessSettings(size=size),
                                str(checkpoint) if checkpoint else None)


def clip_frames(cache: TinyCache, clip_id: str) -> np.ndarray:
    with np.load(cache.root / "clips" / f"{clip_id}.npz") as npz:
        return npz["frames"]


@pytest.mark.slow
def test_a_trial_logs_its_model_on_its_run(trained: dict) -> None:
    uri, run = trained["uri"], trained["run"]
    with use_tracking_uri(uri):
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [(m.name, m.source_run_id, m.status.to_proto()) for m in models] == [(MODEL_NAME, run.info.run_id, 2)]
    assert run.data.tags[MODEL_URI_TAG] == f"models:/{models[0].model_id}"
    assert models[0].params["arch"] == vocab.CASCADED_VIT  # the run's params travel with the model
    client = make_client(uri)
    outputs = client.get_run(run.info.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [models[0].model_id]
    for key in ("val_uar", "test_uar"):  # logging the model doubles no metric point
        steps = [m.step for m in client.get_metric_history(run.info.run_id, mlflow_metric(key))]
        assert steps == ([0, 1] if key == "val_uar" else [0]), key


@pytest.mark.slow
def test_both_flavours_give_the_trials_test_predictions(trained: dict, cache: TinyCache) -> None:
    """The PyTorch flavour, the pyfunc (on the cached clip files) and the trial's own test
    predictions (predictions.csv, computed from the feature cache's fp16 tokens) agree."""
    run_id, predictions = trained["run"].info.run_id, trained["predictions"]
    with use_tracking_uri(trained["uri"]):
        torch_model = mlflow.pytorch.load_model(f"runs:/{run_id}/{MODEL_NAME}")
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/{MODEL_NAME}")
    assert isinstance(torch_model, Predictor) and pyfunc.get_raw_model().class_names == cache.class_names
    clips = list(predictions["clip_id"])
    paths = [str(cache.root / "clips" / f"{c}.npz") for c in clips]
    out = pyfunc.predict(pd.DataFrame({"path": paths, "clip": clips}))
    probs = out[[f"prob_{c}" for c in cache.class_names]].to_numpy(dtype=float)
    assert list(out["status"]) == ["ok"] * len(clips)
    assert list(out["label"]) == list(predictions["pred_name"])  # the trial's own test predictions
    frames = torch.from_numpy(np.stack([clip_frames(cache, c) for c in clips]))
    np.testing.assert_allclose(torch_model(frames)["probabilities"].numpy(), probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    tokens = torch.from_numpy(np.stack([np.load(_token_file(cache, c)) for c in clips])).float()
    with torch.no_grad():
        from_tokens = torch_model.net.forward_tokens(tokens).logits.softmax(dim=1).numpy()
    np.testing.assert_allclose(from_tokens, probs, rtol=0, atol=5e-3)  # fp16 storage of the tokens


def _token_file(cache: TinyCache, clip_id: str) -> Path:
    (store,) = (cache.root / "features").iterdir()
    return store / f"{clip_id}.npy"


@pytest.mark.slow
def test_the_seeded_tiny_encoder_travels_inside_the_artifact(trained: dict, tmp_path: Path) -> None:
    run_id = trained["run"].info.run_id
    with use_tracking_uri(trained["uri"]):
        local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{MODEL_NAME}", dst_path=str(tmp_path)))
    assert (local / "mtcae" / ENCODER_FILE).is_file()
    assert {"pytorch", "python_function"} <= set(mlflow.models.Model.load(str(local)).flavors)
    assert (local / "input_example.json").is_file()
    spec = load_package(local).spec()
    assert spec["encoder"]["stored"] and spec["encoder"]["checkpoint_sha256"] is None


@pytest.mark.slow
def test_logging_twice_keeps_one_model(trained: dict, cache: TinyCache) -> None:
    run_id = trained["run"].info.run_id
    first = find_logged_model(trained["uri"], run_id)
    assert log_model(tiny_predictor(), trained["uri"], run_id) == f"models:/{first.model_id}"


@pytest.mark.slow
def test_register_best_model_names_tags_and_aliases_it(trained: dict, cache: TinyCache) -> None:
    run_id, uri = trained["run"].info.run_id, trained["uri"]
    version = register_best_model(uri, run_id, "smoke", vocab.DEMO, vocab.CASCADED_VIT, 0, "val_uar", 0.5)
    name = registered_model_name("smoke", vocab.DEMO, vocab.CASCADED_VIT)
    assert name == "mtcae-smoke-demo-cascaded_vit" and version.name == name
    assert version.tags == {"sweep": "smoke", "dataset": vocab.DEMO, "arch": vocab.CASCADED_VIT, "fold": "0",
                            "metric": "val_uar", "metric_value": "0.5", "run_id": run_id}
    again = register_best_model(uri, run_id, "smoke", vocab.DEMO, vocab.CASCADED_VIT, 0, "val_uar", 0.5)
    assert again.version == version.version
    with use_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(f"models:/{name}@best")
    path = str(cache.root / "clips" / f"{cache.clip_ids[0]}.npz")
    assert model.predict(pd.DataFrame({"path": [path]}))["status"].tolist() == ["ok"]


@pytest.mark.slow
def test_register_refuses_a_run_without_a_model(trained: dict) -> None:
    client = make_client(trained["uri"])
    other = client.create_run(trained["run"].info.experiment_id).info.run_id
    with pytest.raises(LookupError, match=f"run {other} has no logged model"):
        register_best_model(trained["uri"], other, "smoke", vocab.DEMO, vocab.STL, 0, "val_uar")


@pytest.mark.slow
def test_pyfunc_reports_bad_rows_one_by_one(trained: dict, cache: TinyCache, tmp_path: Path) -> None:
    with use_tracking_uri(trained["uri"]):
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{trained['run'].info.run_id}/{MODEL_NAME}")
    good = str(cache.root / "clips" / f"{cache.clip_ids[0]}.npz")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 10)
    request = pd.DataFrame({"clip": ["good", "missing", "text", "b64", "neither"],
                            "path": [good, str(tmp_path / "gone.mp4"), str(text), None, None],
                            "video_base64": [None, None, None, "%%%not base64", None]})
    out = pyfunc.predict(request)
    assert list(out["clip"]) == ["good", "missing", "text", "b64", "neither"]
    assert list(out["status"]) == ["ok", "failed", "failed", "failed", "failed"]
    assert "file not found" in out["reason"][1] and "cannot open as a video" in out["reason"][2]
    assert "not base64" in out["reason"][3] and "exactly one of 'path'" in out["reason"][4]
    assert out["label"][1:].isna().all() and out["label"][0] in cache.class_names


@pytest.mark.parametrize("arch", vocab.ARCHITECTURES)
def test_package_and_pickle_round_trips_give_the_same_outputs(arch: str, tmp_path: Path) -> None:
    predictor = tiny_predictor(arch)
    frames = torch.randint(0, 255, (2, 16, 32, 32, 3), dtype=torch.uint8)
    expected = predictor(frames)
    buffer = io.BytesIO()
    torch.save(predictor, buffer)  # what the PyTorch flavour writes
    buffer.seek(0)
    for loaded in (load_package(save_package(predictor, tmp_path / "pkg")),
                   torch.load(buffer, weights_only=False)):
        got = loaded(frames)
        torch.testing.assert_close(got["probabilities"], expected["probabilities"])
        assert (got["boxes"] is None) == (arch == vocab.STL) == (expected["boxes"] is None)


def test_a_referenced_encoder_checkpoint_is_checked_by_its_hash(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    encoder = build_model(vocab.STL, ModelConfig(encoder="tiny", num_classes=3, img_size=32)).encoder
    ckpt = tmp_path / "encoder.pth"
    torch.save(encoder.state_dict(), ckpt)
    predictor = tiny_predictor(checkpoint=ckpt)
    package = save_package(predictor, tmp_path / "pkg")
    assert not (package / ENCODER_FILE).exists()  # referenced, not copied
    frames = torch.randint(0, 255, (1, 16, 32, 32, 3), dtype=torch.uint8)
    torch.testing.assert_close(load_package(package)(frames)["probabilities"], predictor(frames)["probabilities"])
    moved = tmp_path / "elsewhere.pth"
    ckpt.rename(moved)
    with pytest.raises(EncoderMismatchError, match="encoder.pth: the encoder checkpoint .* is not there"):
        load_package(package)
    assert load_package(package, encoder_checkpoint=moved).spec()["encoder"]["stored"] is False
    monkeypatch.setenv("MTCAE_ENCODER_CHECKPOINT", str(moved))  # the same file, mounted elsewhere
    torch.testing.assert_close(load_package(package)(frames)["probabilities"], predictor(frames)["probabilities"])
    monkeypatch.delenv("MTCAE_ENCODER_CHECKPOINT")
    torch.manual_seed(2)
    other = build_model(vocab.STL, ModelConfig(encoder="tiny", num_classes=3, img_size=32)).encoder
    torch.save(other.state_dict(), ckpt)
    expected = predictor.spec()["encoder"]["checkpoint_sha256"]
    with pytest.raises(EncoderMismatchError) as err:
        load_package(package)
    assert str(ckpt) in str(err.value) and expected in str(err.value)
    assert _sha256(ckpt) in str(err.value)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_input_example_is_a_decodable_base64_video() -> None:
    from orchestrator.trial.packaging import input_example

    example = input_example()
    data = base64.b64decode(example["video_base64"][0])
    assert list(example.columns) == ["clip", "video_base64"] and len(data) > 100


def test_saving_a_model_warns_nothing(tmp_path: Path) -> None:
    """Every trial saves a model: no warning of ours or MLflow's, under ``-W always`` too."""
    from orchestrator.trial.packaging import save_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_model(str(tmp_path / "model"), predictor=tiny_predictor())
    assert (tmp_path / "model" / "MLmodel").is_file()
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []

"""A trained model as an MLflow model: the PyTorch flavour and a video-in pyfunc in one artifact.

Every finished trial (and ``mtcae train``) logs its tested weights (the selected epoch's) as one
MLflow 3 *logged model* named ``model`` on the trial's run (``runs:/<run_id>/model`` or
``models:/<model_id>``). The artifact has two flavours::

    MLmodel                      flavours pytorch + python_function, signature, input example
    data/model.pth               pytorch: the orchestrator.trial.predictor.Predictor (pickled as spec + tensors)
    mtcae/spec.json              architecture, config, class names, preprocessing settings, encoder source
    mtcae/weights.safetensors    every weight but the encoder's
    mtcae/encoder.safetensors    the encoder, unless referenced by its checkpoint's SHA-256
    requirements.txt, python_env.yaml, conda.yaml   (explicit; no environment inference)

* ``mlflow.pytorch.load_model(uri)`` gives the :class:`~orchestrator.trial.predictor.Predictor`
  (``predictor(frames uint8 (B, T, S, S, 3))["probabilities"]``; ``predictor.net`` is the network).
* ``mlflow.pyfunc.load_model(uri).predict(df)`` reads the safetensors only (no pickle) and takes a
  DataFrame with one clip per row: ``path`` (a video, or a cache's ``.npz`` clip, on the model's
  host) or ``video_base64`` (the video file's bytes, base64: what a remote client sends to
  ``mlflow models serve``), and an optional ``clip`` name. It returns one row per clip: ``clip``,
  ``status`` (``ok``/``no_face``/``failed``), ``reason``, ``label``, ``prob_<class>`` per class, and
  per sampled frame ``frame_index``, ``face_found``, MTCNN ``face_boxes`` (x1, y1, x2, y2) and
  ``face_landmarks`` (5 x (x, y)), and the model's ``pred_boxes``/``pred_landmarks``, in source pixels
  (None where no face was found). Decoding and MTCNN are the preprocessing's
  (:mod:`orchestrator.trial.inference`).

Serving needs this project installed where the model is served (the pyfunc's loader module is
``orchestrator.trial.packaging``): ``mlflow models serve -m models:/<id> --env-manager local``.

Registry: :func:`register_best_model` registers a sweep's best model per (dataset, arch) as
``mtcae-<sweep>-<dataset>-<arch>`` (:func:`registered_model_name`) with alias ``best`` and tags
``sweep``, ``dataset``, ``arch``, ``fold``, ``metric``, ``metric_value``, ``run_id``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.tracking import make_client
from orchestrator.trial.inference import ClipResult, predict_clips
from orchestrator.trial.predictor import Predictor, build_predictor

logger = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name on a trial run: runs:/<run_id>/model
DATA_DIR = "mtcae"
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.safetensors"
ENCODER_FILE = "encoder.safetensors"
BEST_ALIAS = "best"
PROB_PREFIX = "prob_"
INPUT_COLUMNS = ("clip", "path", "video_base64")
FRAME_COLUMNS = ("frame_index", "face_found", "face_boxes", "face_landmarks", "pred_boxes", "pred_landmarks")
DEFAULT_BATCH_SIZE = 4
# What loading and serving import (the project itself must be installed too; it is not on PyPI).
PIP_REQUIREMENTS = ("torch", "timm", "safetensors", "numpy", "pandas", "pillow", "decord", "av",
                    "facenet-pytorch", "mlflow")


# ---------------------------------------------------------------- files


def save_package(predictor: Predictor, directory: Path) -> Path:
    """Write :data:`SPEC_FILE` and the weights (safetensors) of ``predictor`` into ``directory``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPEC_FILE).write_text(json.dumps(predictor.spec(), indent=2, sort_keys=True))
    trained, encoder = predictor.weights()
    save_file(trained, str(directory / WEIGHTS_FILE))
    if encoder is not None:
        save_file(encoder, str(directory / ENCODER_FILE))
    return directory


def load_package(directory: Path | str, encoder_checkpoint: Path | str | None = None) -> Predictor:
    """Read :func:`save_package` output (no pickle).

    Args:
        directory: The package folder (``<model>/mtcae``) or an MLflow model folder holding one.
        encoder_checkpoint: Where a referenced encoder checkpoint is, if not where it was.

    Raises:
        FileNotFoundError: No package there.
        orchestrator.trial.predictor.EncoderMismatchError: The referenced encoder is missing or differs.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / SPEC_FILE).is_file() and (directory / DATA_DIR / SPEC_FILE).is_file():
        directory = directory / DATA_DIR
    if not (directory / SPEC_FILE).is_file():
        raise FileNotFoundError(f"{directory}: not an mtcae model (no {SPEC_FILE}, nor {DATA_DIR}/{SPEC_FILE})")
    spec = json.loads((directory / SPEC_FILE).read_text())
    encoder = load_file(str(directory / ENCODER_FILE)) if (directory / ENCODER_FILE).is_file() else None
    return build_predictor(spec, load_file(str(directory / WEIGHTS_FILE)), encoder, encoder_checkpoint)


# ---------------------------------------------------------------- the MLflow flavour


def save_model(path: str, mlflow_model: Any = None, predictor: Predictor | None = None,
               source_run_id: str | None = None, **_: Any) -> None:
    """Write ``predictor`` as an MLflow model at ``path`` (the ``flavor.save_model`` of ``Model.log``).

    The PyTorch flavour first (``mlflow.pytorch.save_model``, pickle format: no ``torch.export``
    tracing), then :data:`DATA_DIR` and the ``python_function`` flavour pointing at this module,
    the video signature and input example.
    """
    import mlflow.pytorch
    from mlflow.models import Model
    from mlflow.models.utils import _save_example
    from mlflow.pyfunc import add_to_model

    mlflow_model = mlflow_model or Model()
    if source_run_id:
        mlflow_model.run_id = source_run_id
    with _quiet("mlflow.pytorch"):  # its pickle warning: the pyfunc flavour reads no pickle
        mlflow.pytorch.save_model(predictor, path, mlflow_model=mlflow_model, serialization_format="pickle",
                                  pip_requirements=list(PIP_REQUIREMENTS))
    save_package(predictor, Path(path) / DATA_DIR)
    add_to_model(mlflow_model, loader_module=__name__, data=DATA_DIR, conda_env="conda.yaml",
                 python_env="python_env.yaml")
    mlflow_model.signature = model_signature(predictor.class_names)
    with warnings.catch_warnings():  # MLflow compares the example's columns with a range (a pandas 3 deprecation)
        warnings.filterwarnings("ignore", message="Operation with range is deprecated", module="mlflow")
        _save_example(mlflow_model, input_example(), path)
    mlflow_model.save(str(Path(path) / "MLmodel"))


def model_signature(class_names: tuple[str, ...]) -> Any:
    """The pyfunc's signature: clips in (path or base64 video), one row of predictions per clip out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import (
        Array,
        ColSpec,
        DataType,
        ParamSchema,
        ParamSpec,
        Schema,
    )

    inputs = Schema([ColSpec(DataType.string, c, required=False) for c in INPUT_COLUMNS])
    points = Array(Array(DataType.double))
    outputs = Schema([
        ColSpec(DataType.string, "clip"), ColSpec(DataType.string, "status"), ColSpec(DataType.string, "reason"),
        ColSpec(DataType.string, "label", required=False),
        *(ColSpec(DataType.double, probability_column(c), required=False) for c in class_names),
        ColSpec(Array(DataType.long), "frame_index"), ColSpec(Array(DataType.boolean), "face_found"),
        ColSpec(points, "face_boxes"), ColSpec(Array(points), "face_landmarks"),
        ColSpec(points, "pred_boxes", required=False), ColSpec(Array(points), "pred_landmarks", required=False),
    ])
    params = ParamSchema([ParamSpec("batch_size", DataType.long, DEFAULT_BATCH_SIZE)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def probability_column(class_name: str) -> str:
    """``prob_<class>``: the probability column of one class."""
    return PROB_PREFIX + str(class_name)


def input_example() -> Any:
    """A one-row request: a 16-frame 32 px generated video (no face: it shows the format)."""
    import pandas as pd

    from orchestrator.data.demo import write_video

    frames = np.zeros((16, 32, 32, 3), np.uint8)
    for t in range(16):
        frames[t, 8:24, t:t + 16] = 200
    with tempfile.TemporaryDirectory(prefix="mtcae_example_") as tmp:
        file = Path(tmp) / "example.mp4"
        write_video(file, frames, fps=25)
        data = base64.b64encode(file.read_bytes()).decode("ascii")
    return pd.DataFrame({"clip": ["example.mp4"], "video_base64": [data]})


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ---------------------------------------------------------------- the pyfunc


class VideoModel:
    """The ``python_function`` flavour: a DataFrame of clips in, a DataFrame of predictions out."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def get_raw_model(self) -> Predictor:
        """The :class:`~orchestrator.trial.predictor.Predictor` (``PyFuncModel.get_raw_model()``)."""
        return self.predictor

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> Any:
        """One row of predictions per row of ``model_input`` (columns ``clip``, ``path``, ``video_base64``).

        A row that names no video, or whose video cannot be read, is a ``failed`` row with the reason.
        """
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        batch_size = int((params or {}).get("batch_size") or DEFAULT_BATCH_SIZE)
        with tempfile.TemporaryDirectory(prefix="mtcae_request_") as tmp:
            clips, bad = _request_clips(frame, Path(tmp))
            found = iter(predict_clips(self.predictor, clips, batch_size=batch_size))
            results = [bad[i] if i in bad else next(found) for i in range(len(frame))]
        return results_frame(results, self.predictor.class_names)


def _load_pyfunc(data_path: str) -> VideoModel:
    """MLflow's hook for the ``python_function`` flavour (``loader_module``); on CUDA when available."""
    from orchestrator.data.faces import resolve_device

    return VideoModel(load_package(data_path).to(resolve_device("auto")))


def _request_clips(frame: Any, tmp: Path) -> tuple[list[tuple[str, Path]], dict[int, ClipResult]]:
    """``(name, file)`` of every usable row (base64 videos written under ``tmp``); the others failed."""
    clips, bad = [], {}
    for i, row in enumerate(frame.to_dict(orient="records")):
        path, data = _text(row.get("path")), _text(row.get("video_base64"))
        name = _text(row.get("clip")) or path or f"clip{i}"
        if bool(path) == bool(data):
            bad[i] = ClipResult(name, "failed", "give exactly one of 'path' (a video file on the model's host) "
                                                "or 'video_base64' (the video file's bytes, base64)")
            continue
        if path:
            clips.append((name, Path(path)))
            continue
        try:
            content = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as error:
            bad[i] = ClipResult(name, "failed", f"video_base64 is not base64: {error}")
            continue
        file = tmp / f"{i}.video"
        file.write_bytes(content)
        clips.append((name, file))
    return clips, bad


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def results_frame(results: list[ClipResult], class_names: tuple[str, ...]) -> Any:
    """The pyfunc's output: one row per clip (see the module docstring)."""
    import pandas as pd

    rows = []
    for r in results:
        probs = r.probabilities
        row = {"clip": r.clip, "status": r.status, "reason": r.reason, "label": r.label}
        row |= {probability_column(c): (None if probs is None else float(probs[k])) for k, c in enumerate(class_names)}
        row |= {"frame_index": r.frame_index.tolist(), "face_found": r.face_found.tolist(),
                "face_boxes": _nested(r.face_boxes), "face_landmarks": _nested(r.face_landmarks),
                "pred_boxes": _nested(r.pred_boxes), "pred_landmarks": _nested(r.pred_landmarks)}
        rows.append(row)
    columns = ["clip", "status", "reason", "label", *(probability_column(c) for c in class_names), *FRAME_COLUMNS]
    return pd.DataFrame(rows, columns=columns, dtype=object)  # None stays None (JSON null, never NaN)


def _nested(values: np.ndarray | None) -> list | None:
    """Nested lists of floats, NaN as None (JSON has no NaN)."""
    if values is None:
        return None
    return np.where(np.isnan(values), None, np.round(values, 3)).tolist()


# ---------------------------------------------------------------- logging and the registry


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URI set to ``uri``, then restored exactly.

    ``Model.log``, ``load_model`` and the registry's ``models:/`` resolution read the globals;
    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, and restoring through it would
    pin the default store (or drop the user's variable), so the module globals and both
    environment variables are saved and put back as they were.
    """
    import os

    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")})
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _client(tracking_uri: str) -> Any:
    """A client whose registry is the tracking store (never a global registry URI)."""
    from mlflow import MlflowClient

    make_client(tracking_uri)  # creates a fresh SQLite store safely
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def find_logged_model(tracking_uri: str, run_id: str, name: str = MODEL_NAME) -> Any | None:
    """The finished logged model ``name`` whose source run is ``run_id`` (the newest), or None."""
    client = make_client(tracking_uri)
    run = client.get_run(run_id)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    matching = [m for m in models if m.name == name and str(m.status) == "READY"]  # not a failed upload
    return max(matching, key=lambda m: m.creation_timestamp) if matching else None


def log_model(predictor: Predictor, tracking_uri: str, run_id: str, name: str = MODEL_NAME,
              tags: Mapping[str, Any] | None = None, step: int = 0) -> str:
    """Log ``predictor`` as the logged model ``name`` of run ``run_id``; its ``models:/<id>`` URI.

    Idempotent: a run that already has a model of that name (a resumed trial) keeps it.

    Args:
        predictor: The model.
        tracking_uri: MLflow tracking URI.
        run_id: The run the model comes from (its params are copied onto the model).
        name: The logged model's name.
        tags: Tags of the logged model.
        step: The run's step the model belongs to (a trial: its selected epoch).
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    existing = find_logged_model(tracking_uri, run_id, name)
    if existing is not None:
        return f"models:/{existing.model_id}"
    client = make_client(tracking_uri)
    run = client.get_run(run_id)
    # Created here, in the run's experiment: Model.log would put it in the active (default) one.
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       tags={str(k): str(v) for k, v in (tags or {}).items()},
                                       params=dict(run.data.params))
    # run_id=None: Model.log would copy the run's step-0 metrics onto the model, doubling points in
    # the run's metric history; the run -> model link (the run page's "Logged models") is set below.
    with use_tracking_uri(tracking_uri):
        Model.log(artifact_path=None, flavor=sys.modules[__name__], name=name, run_id=None,
                  model_id=model.model_id, predictor=predictor, source_run_id=run_id,
                  validate_serving_input=False)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    return f"models:/{model.model_id}"


def registered_model_name(sweep: str, dataset: str, arch: str) -> str:
    """``mtcae-<sweep>-<dataset>-<arch>``: where a sweep's best model of a group is registered."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"mtcae-{sweep}-{dataset}-{arch}")


def register_best_model(tracking_uri: str, run_id: str, sweep: str, dataset: str, arch: str, fold: int,
                        metric: str, value: float | None = None, name: str | None = None) -> Any:
    """Register the logged model of trial run ``run_id`` as the best of its (dataset, arch) group.

    The version gets tags ``sweep``, ``dataset``, ``arch``, ``fold``, ``metric``, ``metric_value``
    and ``run_id``, and the registered model's alias ``best`` moves to it. Registering the same
    model again returns its existing version.

    Args:
        tracking_uri: MLflow tracking (and registry) URI.
        run_id: The trial run whose logged model :data:`MODEL_NAME` is registered.
        sweep: Sweep name.
        dataset: Dataset.
        arch: Architecture.
        fold: The fold the run tested.
        metric: The selection metric (e.g. ``val_uar``).
        value: Its value for this run.
        name: Registered model name (default :func:`registered_model_name`).

    Returns:
        The ``ModelVersion``.

    Raises:
        LookupError: The run has no logged model.
    """
    from mlflow.exceptions import MlflowException

    model = find_logged_model(tracking_uri, run_id)
    if model is None:
        raise LookupError(f"run {run_id} has no logged model {MODEL_NAME!r} to register")
    name = name or registered_model_name(sweep, dataset, arch)
    client = _client(tracking_uri)
    with contextlib.suppress(MlflowException):  # already registered
        client.create_registered_model(name, description=f"best {arch} on {dataset} of sweep {sweep} ({metric})")
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.run_id == run_id and getattr(version, "model_id", None) in (None, model.model_id):
            client.set_registered_model_alias(name, BEST_ALIAS, version.version)
            return version
    tags = {"sweep": sweep, "dataset": dataset, "arch": arch, "fold": str(fold), "metric": metric,
            "metric_value": "" if value is None else f"{value:.6g}", "run_id": run_id}
    with use_tracking_uri(tracking_uri):  # the registry resolves models:/ sources through the global store
        version = client.create_model_version(name, f"models:/{model.model_id}", run_id=run_id, tags=tags,
                                              model_id=model.model_id)
    client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    return version

"""Shared pytest fixtures. Each group lives in its own module; import its fixtures here."""

import pytest  # noqa: E402
from videos import face_video, real_videos, video_factory  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def no_ambient_mlflow(monkeypatch: pytest.MonkeyPatch):
    """Every test starts without $MLFLOW_TRACKING_URI, and a test that points MLflow's global state
    at a store (``mlflow.set_tracking_uri`` exports the variable too) cannot leak it into the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    import sys

    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)

"""Shared pytest fixtures. Each group lives in its own module; import its fixtures here."""

from videos import face_video, real_videos, video_factory  # noqa: F401  (fixtures)

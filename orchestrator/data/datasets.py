"""Dataset adapters: file-name conventions -> clip records (path, label, subject).

Each adapter knows one corpus's layout and its **fixed class order** (class ids never come from a
directory listing; the official code's unsorted ``os.listdir`` order is a known bug, see
``docs/design.md``). ``scan(root)`` walks a dataset root and returns one :class:`ClipRecord` per
usable video file; files with video extensions whose names do not fit the convention are collected
and reported in **one** warning (or one :class:`DatasetLayoutError` when nothing parses), never a
traceback per file.

Class orders (index = label id):

* RAVDESS, 7 classes (default, the paper's protocol: calm merged into neutral; emotion-code order
  with calm removed): neutral, happy, sad, angry, fearful, disgust, surprised.
* RAVDESS, 8 classes (MAE-DFER's protocol, label = emotion code - 1): neutral, calm, happy, sad,
  angry, fearful, disgust, surprised.
* CREMA-D (alphabetical, as MAE-DFER's split files): ANG, DIS, FEA, HAP, NEU, SAD.
* MEAD (alphabetical): angry, contempt, disgusted, fear, happy, neutral, sad, surprised.

``demo`` is the RAVDESS adapter (7 classes) under another name: ``mtcae demo-data`` writes the
RAVDESS layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

import vocab

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".flv", ".avi", ".mov", ".mkv", ".webm", ".m4v")

RAVDESS_EMOTIONS_8 = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
RAVDESS_EMOTIONS_7 = ("neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised")
CREMA_D_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
MEAD_EMOTIONS = ("angry", "contempt", "disgusted", "fear", "happy", "neutral", "sad", "surprised")

_MAX_LISTED = 20


class DatasetLayoutError(ValueError):
    """A dataset root holds no clip that fits the adapter's naming convention."""


@dataclass(frozen=True)
class ClipRecord:
    """One source video.

    Attributes:
        path: Path relative to the dataset root, with ``/`` separators.
        label: Class id in the adapter's fixed order.
        label_name: Class name.
        subject: Subject (actor) id; folds never split a subject.
    """

    path: str
    label: int
    label_name: str
    subject: str


@dataclass(frozen=True)
class DatasetAdapter:
    """Base class: walk a root, parse each video name, report the ones that do not parse."""

    name: ClassVar[str] = ""
    convention: ClassVar[str] = ""

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names, index = label id."""
        raise NotImplementedError

    @property
    def label_protocol(self) -> str:
        """Short name of the label set (part of the preprocessing settings hash)."""
        return f"{len(self.class_names)}class"

    def parse(self, rel_path: str) -> ClipRecord | None:
        """Record for one video path (relative to the root), ``None`` if the name does not fit.

        Raises:
            SkipClip: The name fits but the clip is deliberately excluded (e.g. audio-only).
        """
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Everything about the adapter that changes labels or clip selection (hashed)."""
        options = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"dataset": self.name, "label_protocol": self.label_protocol,
                "class_names": list(self.class_names), "dataset_options": options}

    def scan(self, root: str | os.PathLike[str], strict: bool = False) -> list[ClipRecord]:
        """All clips under ``root``, sorted by path.

        Args:
            root: Dataset root directory.
            strict: Raise instead of warning when some video names do not fit the convention.

        Raises:
            FileNotFoundError: ``root`` is not a directory.
            DatasetLayoutError: No video fits the convention (or, with ``strict``, some do not).
        """
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {root} is not a directory")
        records, bad, skipped = [], [], 0
        for rel in _video_files(root):
            try:
                record = self.parse(rel)
            except SkipClip:
                skipped += 1
                continue
            if record is None:
                bad.append(rel)
            else:
                records.append(record)
        records = self._select(records)
        self._report(root, records, bad, skipped, strict)
        return records

    def _select(self, records: list[ClipRecord]) -> list[ClipRecord]:
        """Hook to drop duplicate recordings; the default keeps everything."""
        return records

    def _report(self, root: Path, records: list[ClipRecord], bad: list[str], skipped: int,
                strict: bool) -> None:
        if bad:
            listed = "\n  ".join(bad[:_MAX_LISTED])
            more = f"\n  ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
            message = (f"{len(bad)} video file(s) under {root} do not fit the {self.name} naming "
                       f"convention ({self.convention}) and are ignored:\n  {listed}{more}")
            if strict or not records:
                raise DatasetLayoutError(message)
            log.warning(message)
        if not records:
            raise DatasetLayoutError(f"no {self.name} clips found under {root}: expected "
                                     f"{self.convention} with extension in {VIDEO_EXTENSIONS}")
        log.info("%s: %d clips, %d subjects, %d skipped by selection, under %s", self.name,
                 len(records), len({r.subject for r in records}), skipped, root)


class SkipClip(Exception):
    """A well-named clip that the adapter's options exclude (not reported as a bad name)."""


@dataclass(frozen=True)
class Ravdess(DatasetAdapter):
    """RAVDESS: ``Actor_XX/MM-VV-EE-II-SS-RR-AA.mp4``.

    Fields: modality (01 audio-video, 02 video-only, 03 audio-only), vocal channel (01 speech,
    02 song), emotion (01-08), intensity, statement, repetition, actor. A suffix after the seventh
    field (``..._1.mp4``, seen in re-distributed copies) is tolerated.

    Attributes:
        num_classes: 7 (calm merged into neutral, the paper's protocol) or 8 (code - 1).
        vocal_channels: Which vocal channels to keep; speech only by default (1440 clips).
        modalities: Video-bearing modalities in order of preference. RAVDESS ships each recording
            twice (01 with audio, 02 without; identical video), so only the first available
            modality of each recording is kept.
    """

    name: ClassVar[str] = vocab.RAVDESS
    convention: ClassVar[str] = "Actor_XX/MM-VV-EE-II-SS-RR-AA.mp4"
    _PATTERN: ClassVar[re.Pattern[str]] = re.compile(
        r"^(?P<modality>\d{2})-(?P<vocal>\d{2})-(?P<emotion>\d{2})-(?P<intensity>\d{2})-"
        r"(?P<statement>\d{2})-(?P<repetition>\d{2})-(?P<actor>\d{2})(?:[_\-. ].*)?$")

    num_classes: int = 7
    vocal_channels: tuple[str, ...] = ("01",)
    modalities: tuple[str, ...] = ("02", "01")

    def __post_init__(self) -> None:
        if self.num_classes not in (7, 8):
            raise ValueError(f"RAVDESS num_classes must be 7 or 8, got {self.num_classes}")
        if not set(self.modalities) <= {"01", "02"}:
            raise ValueError(f"RAVDESS modalities must be video-bearing ('01', '02'), "
                             f"got {self.modalities}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return RAVDESS_EMOTIONS_7 if self.num_classes == 7 else RAVDESS_EMOTIONS_8

    def parse(self, rel_path: str) -> ClipRecord | None:
        match = self._PATTERN.match(PurePosixPath(rel_path).stem)
        if match is None or not 1 <= int(match["emotion"]) <= 8:
            return None
        if match["modality"] not in self.modalities or match["vocal"] not in self.vocal_channels:
            raise SkipClip(rel_path)
        code = int(match["emotion"])
        label = (0 if code <= 2 else code - 2) if self.num_classes == 7 else code - 1
        return ClipRecord(rel_path, label, self.class_names[label], match["actor"])

    def _select(self, records: list[ClipRecord]) -> list[ClipRecord]:
        best: dict[str, tuple[int, ClipRecord]] = {}
        for record in records:
            stem = PurePosixPath(record.path).stem
            key = stem[3:20]  # every field but the modality
            rank = self.modalities.index(stem[:2])
            if key not in best or rank < best[key][0]:
                best[key] = (rank, record)
        dropped = len(records) - len(best)
        if dropped:
            log.info("ravdess: %d duplicate recording(s) in a less preferred modality dropped",
                     dropped)
        return sorted((r for _, r in best.values()), key=lambda r: r.path)


@dataclass(frozen=True)
class CremaD(DatasetAdapter):
    """CREMA-D: ``ActorID_Sentence_Emotion_Level.flv`` (or ``.mp4``), e.g. 1001_DFA_ANG_XX.flv."""

    name: ClassVar[str] = vocab.CREMA_D
    convention: ClassVar[str] = "ActorID_Sentence_Emotion_Level.flv, e.g. 1001_DFA_ANG_XX.flv"
    _PATTERN: ClassVar[re.Pattern[str]] = re.compile(
        r"^(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]{1,2})"
        r"(?:[_\-. ].*)?$")

    @property
    def class_names(self) -> tuple[str, ...]:
        return CREMA_D_EMOTIONS

    def parse(self, rel_path: str) -> ClipRecord | None:
        match = self._PATTERN.match(PurePosixPath(rel_path).stem)
        if match is None or match["emotion"] not in CREMA_D_EMOTIONS:
            return None
        label = CREMA_D_EMOTIONS.index(match["emotion"])
        return ClipRecord(rel_path, label, match["emotion"], match["actor"])


@dataclass(frozen=True)
class Mead(DatasetAdapter):
    """MEAD: ``<actor>/video/<view>/<emotion>/level_<n>/<clip>.mp4`` as released, or flattened
    ``<actor>_<view>_<emotion>_level<n>_<clip>.mp4`` (``level_<n>`` also accepted).

    Attributes:
        view: Camera view to keep (``front``, ``down``, ``top``, ``left_30``, ``left_60``,
            ``right_30``, ``right_60``); clips of other views are skipped.
    """

    name: ClassVar[str] = vocab.MEAD
    convention: ClassVar[str] = ("<actor>/video/<view>/<emotion>/level_<n>/<clip>.mp4 or "
                                 "<actor>_<view>_<emotion>_level<n>_<clip>.mp4")
    _NESTED: ClassVar[re.Pattern[str]] = re.compile(
        r"(?:^|/)(?P<actor>[^/]+)/video/(?P<view>[^/]+)/(?P<emotion>[^/]+)/level_?(?P<level>\d+)/"
        r"(?P<clip>[^/]+)$")
    _FLAT: ClassVar[re.Pattern[str]] = re.compile(
        r"^(?P<actor>[A-Za-z]+\d+)_(?P<view>[a-z]+(?:_\d+)?)_(?P<emotion>[a-z]+)_level_?"
        r"(?P<level>\d+)_(?P<clip>\w+)$")

    view: str = "front"

    @property
    def class_names(self) -> tuple[str, ...]:
        return MEAD_EMOTIONS

    def parse(self, rel_path: str) -> ClipRecord | None:
        posix = PurePosixPath(rel_path)
        match = (self._NESTED.search(str(posix.with_suffix("")))
                 or self._FLAT.match(posix.stem))
        if match is None or match["emotion"] not in MEAD_EMOTIONS:
            return None
        if match["view"] != self.view:
            raise SkipClip(rel_path)
        label = MEAD_EMOTIONS.index(match["emotion"])
        return ClipRecord(rel_path, label, match["emotion"], match["actor"])


@dataclass(frozen=True)
class Demo(Ravdess):
    """The synthetic dataset of ``mtcae demo-data``: RAVDESS layout, 7 classes."""

    name: ClassVar[str] = vocab.DEMO


DATASETS: dict[str, DatasetAdapter] = {
    adapter.name: adapter for adapter in (Ravdess(), CremaD(), Mead(), Demo())
}
assert tuple(DATASETS) == vocab.DATASETS, "every dataset in vocab has exactly one adapter"


def get_dataset(name: str, **options: Any) -> DatasetAdapter:
    """The adapter registered as ``name``, with ``options`` overriding its defaults.

    Raises:
        ValueError: Unknown dataset name or an option the adapter does not have.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    adapter = DATASETS[name]
    known = {f.name for f in dataclasses.fields(adapter)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"dataset {name!r} has no option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(adapter, **options)


def records_to_frame(records: list[ClipRecord]) -> pd.DataFrame:
    """Clip records as a DataFrame with columns ``path, label, label_name, subject``."""
    import pandas as pd

    columns = [f.name for f in dataclasses.fields(ClipRecord)]
    return pd.DataFrame([dataclasses.astuple(r) for r in records], columns=columns)


def _video_files(root: Path) -> list[str]:
    """Relative POSIX paths of every file with a video extension under ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in filenames
                     if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith("."))
    return sorted(found)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value

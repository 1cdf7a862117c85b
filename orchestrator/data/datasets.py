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
        """Hook to drop duplicate recordings or cap classes; the default keeps everything."""
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
        log.info("%s: %d clips (%s), %d subjects, %d skipped by selection, under %s", self.name,
                 len(records), format_class_counts(class_counts(records, self.class_names)),
                 len({r.subject for r in records}), skipped, root)


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


MEAD_VIEWS = ("front", "down", "top", "left_30", "left_60", "right_30", "right_60")
MEAD_LEVELS = (1, 2, 3)
MEAD_NEUTRAL = "neutral"
MEAD_SELECTIONS = ("paper", "all")
# Section 4.1: "we used data from 48 actors, comprising a total of 6,568 video clips. Among these,
# 380 clips depict neutral emotions, while each of the other emotions has 884 clips."
PAPER_MEAD_ACTORS = 48
PAPER_MEAD_CLIPS = {name: 380 if name == MEAD_NEUTRAL else 884 for name in MEAD_EMOTIONS}
# The actors of MEAD's public release as listed by the works that use it (e.g. EMOTE's 32/7/8
# split): 47 ids. The paper counts 48; which further actor it had is not recoverable.
MEAD_PUBLIC_ACTORS = (
    "M003", "M005", "M007", "M009", "M011", "M012", "M013", "M019", "M022", "M023", "M024",
    "M025", "M026", "M027", "M028", "M029", "M030", "M031", "M032", "M033", "M034", "M035",
    "M037", "M039", "M040", "M041", "M042", "W009", "W011", "W014", "W015", "W016", "W018",
    "W019", "W021", "W023", "W024", "W025", "W026", "W028", "W029", "W033", "W035", "W036",
    "W037", "W038", "W040")


@dataclass(frozen=True)
class MeadName:
    """The fields of one MEAD file name (``view`` is None in the authors' layouts, which hold one
    view's clips only)."""

    actor: str
    view: str | None
    emotion: str
    level: int
    clip: str


@dataclass(frozen=True)
class Mead(DatasetAdapter):
    """MEAD, in any of four layouts:

    * as released: ``<actor>/video/<view>/<emotion>/level_<n>/<clip>.mp4``;
    * flattened: ``<actor>_<view>_<emotion>_level<n>_<clip>.mp4`` (``level_<n>`` also accepted);
    * the authors' raw copy (``MEAD_RAW`` in their ``Tool.py``): ``<actor>/<emotion>/level_<n>/
      <clip>.mp4``;
    * the authors' renamed copy (``Tool.rename``):
      ``<emotion>/<actor>_<emotion>_level_<n>_<clip>.mp4`` (``level<n>`` or a bare ``<n>`` also
      accepted).

    The authors' two layouts carry no view: they hold the clips of one view, taken to be ``front``
    (a ``view`` other than front skips them).

    **Selection.** ``view``, ``actors`` and ``levels`` filter clips; a per-class cap then keeps at
    most that many clips of each class, spread evenly over actors and levels: round-robin over the
    (level, actor) groups of the class, lowest clip numbers first, so every actor keeps about
    ``cap / actors`` clips of the class and every level a third. MEAD records neutral at level 1
    only, so ``levels`` does not filter neutral clips.

    **The ``paper`` preset** (default) caps the classes at section 4.1's counts: 380 neutral and
    884 of every other emotion (6,568 clips), front view, all three levels, every actor on disk.
    How it was derived: the works that use MEAD's public release list 47 actors
    (:data:`MEAD_PUBLIC_ACTORS`; the paper says 48) with, per actor and view, 30 clips per emotion
    and level (90 per emotion) and 40 neutral clips at level 1: 670 front clips an actor, about
    31,500 in all, five times the paper's 6,568. The paper's counts are not any uniform per-actor
    rule: 884 = 2^2 x 13 x 17 is neither a multiple of 48 actors nor of 3 levels, and 380 is not a
    multiple of 48. Per actor they come to 18.4 clips of each emotion (6.1 per level) and 7.9
    neutral clips: about a fifth of every folder, so the nearest uniform rule, 6 clips per emotion
    and level and 8 neutral per actor, gives 864 / 384 / 6,432 with 48 actors (98% of the total).
    The preset keeps the paper's exact class totals instead and spreads them as evenly as that
    rule: with the 47 public actors every actor keeps 18 or 19 clips of each emotion and 8 or 9
    neutral clips, and the counts are exactly 380 / 884 x 7 = 6,568 whenever every class has that
    many clips on disk (a smaller download falls short, and the scan log and ``mtcae preprocess``
    print the counts it got). Which clips the authors kept is not published, so the subset matches
    the paper's sizes and balance, not its clip list.

    Attributes:
        view: Camera view to keep (one of :data:`MEAD_VIEWS`); clips of other views are skipped.
        actors: Actor ids to keep (e.g. ``("M003", "W009")``); empty keeps every actor on disk.
        levels: Intensity levels to keep for the seven non-neutral emotions (1 to 3).
        clips_per_class: Cap on the clips of every class (None: no cap); not with ``paper``.
        selection: ``paper`` (section 4.1's class counts as caps) or ``all`` (no preset cap).
    """

    name: ClassVar[str] = vocab.MEAD
    convention: ClassVar[str] = ("<actor>/video/<view>/<emotion>/level_<n>/<clip>.mp4, "
                                 "<actor>_<view>_<emotion>_level<n>_<clip>.mp4, "
                                 "<actor>/<emotion>/level_<n>/<clip>.mp4 or "
                                 "<actor>_<emotion>_level_<n>_<clip>.mp4")
    _NESTED: ClassVar[re.Pattern[str]] = re.compile(
        r"(?:^|/)(?P<actor>[^/]+)/video/(?P<view>[^/]+)/(?P<emotion>[^/]+)/level_?(?P<level>\d+)/"
        r"(?P<clip>[^/]+)$")
    _RAW: ClassVar[re.Pattern[str]] = re.compile(
        r"(?:^|/)(?P<actor>[A-Z]+\d+)/(?P<emotion>[a-z]+)/level_?(?P<level>\d+)/(?P<clip>[^/]+)$")
    _FLAT: ClassVar[re.Pattern[str]] = re.compile(
        r"^(?P<actor>[A-Za-z]+\d+)_(?P<view>[a-z]+(?:_\d+)?)_(?P<emotion>[a-z]+)_level_?"
        r"(?P<level>\d+)_(?P<clip>\w+)$")
    _RENAMED: ClassVar[re.Pattern[str]] = re.compile(
        r"^(?P<actor>[A-Za-z]+\d+)_(?P<emotion>[a-z]+)_(?:level_?)?(?P<level>\d+)_(?P<clip>\w+)$")

    view: str = "front"
    actors: tuple[str, ...] = ()
    levels: tuple[int, ...] = MEAD_LEVELS
    clips_per_class: int | None = None
    selection: str = "paper"

    def __post_init__(self) -> None:
        problems = []
        if self.view not in MEAD_VIEWS:
            problems.append(f"view must be one of {MEAD_VIEWS}, got {self.view!r}")
        if not self.levels or not set(self.levels) <= set(MEAD_LEVELS):
            problems.append(f"levels must be a non-empty subset of {MEAD_LEVELS}, got "
                            f"{self.levels}")
        if self.selection not in MEAD_SELECTIONS:
            problems.append(f"selection must be one of {MEAD_SELECTIONS}, got {self.selection!r}")
        if self.clips_per_class is not None and self.clips_per_class < 1:
            problems.append(f"clips_per_class must be >= 1, got {self.clips_per_class}")
        if self.clips_per_class is not None and self.selection == "paper":
            problems.append("clips_per_class replaces the paper preset's caps: pass "
                            "selection='all' with it")
        if problems:
            raise ValueError("MEAD options: " + "; ".join(problems))
        object.__setattr__(self, "actors", tuple(self.actors))
        object.__setattr__(self, "levels", tuple(sorted(int(level) for level in self.levels)))

    @property
    def class_names(self) -> tuple[str, ...]:
        return MEAD_EMOTIONS

    @property
    def class_caps(self) -> dict[str, int]:
        """Most clips kept per class (a class without an entry is not capped)."""
        if self.selection == "paper":
            return dict(PAPER_MEAD_CLIPS)
        if self.clips_per_class is None:
            return {}
        return {name: self.clips_per_class for name in MEAD_EMOTIONS}

    def parse_name(self, rel_path: str) -> MeadName | None:
        """The name fields of one path in any of the four layouts, ``None`` if none fits."""
        posix = PurePosixPath(rel_path)
        stem = str(posix.with_suffix(""))
        match = (self._NESTED.search(stem) or self._RAW.search(stem)
                 or self._FLAT.match(posix.stem) or self._RENAMED.match(posix.stem))
        if match is None or match["emotion"] not in MEAD_EMOTIONS:
            return None
        view = match.groupdict().get("view")
        return MeadName(match["actor"], view, match["emotion"], int(match["level"]), match["clip"])

    def parse(self, rel_path: str) -> ClipRecord | None:
        name = self.parse_name(rel_path)
        if name is None:
            return None
        if (name.view or "front") != self.view or (self.actors and name.actor not in self.actors):
            raise SkipClip(rel_path)
        if name.emotion != MEAD_NEUTRAL and name.level not in self.levels:
            raise SkipClip(rel_path)
        label = MEAD_EMOTIONS.index(name.emotion)
        return ClipRecord(rel_path, label, name.emotion, name.actor)

    def _select(self, records: list[ClipRecord]) -> list[ClipRecord]:
        missing = sorted(set(self.actors) - {r.subject for r in records})
        if missing:
            log.warning("mead: actor(s) %s not found", missing)
        caps, names = self.class_caps, {r.path: self.parse_name(r.path) for r in records}
        kept, short = [], []
        for label_name in MEAD_EMOTIONS:
            of_class = [r for r in records if r.label_name == label_name]
            kept += _spread(of_class, caps.get(label_name), names)
            if label_name in caps and len(of_class) < caps[label_name]:
                short.append(f"{label_name} {len(of_class)} < {caps[label_name]}")
        if short and records:
            log.warning("mead: fewer clips on disk than the selection's caps: %s", ", ".join(short))
        if self.selection == "paper" and kept:
            actors = len({r.subject for r in kept})
            log.log(logging.INFO if actors == PAPER_MEAD_ACTORS else logging.WARNING,
                    "mead: paper selection from %d actors (the paper: %d) -> %d clips (the paper: "
                    "%d)", actors, PAPER_MEAD_ACTORS, len(kept), sum(PAPER_MEAD_CLIPS.values()))
        return sorted(kept, key=lambda r: r.path)


def _spread(records: list[ClipRecord], cap: int | None,
            names: dict[str, MeadName]) -> list[ClipRecord]:
    """At most ``cap`` records, round-robin over (level, actor) groups, lowest clip first."""
    if cap is None or len(records) <= cap:
        return records
    groups: dict[tuple[int, str], list[ClipRecord]] = {}
    for record in records:
        name = names[record.path]
        groups.setdefault((name.level, name.actor), []).append(record)
    queues = [sorted(groups[key], key=lambda r: (_clip_key(names[r.path].clip), r.path))
              for key in sorted(groups)]
    kept: list[ClipRecord] = []
    for rank in range(max(len(q) for q in queues)):
        kept += [q[rank] for q in queues if rank < len(q)]
        if len(kept) >= cap:
            break
    return kept[:cap]


def _clip_key(clip: str) -> tuple[int, str]:
    """Clips in numeric order (``2`` before ``10``), non-numeric names after, by name."""
    return (int(clip), clip) if clip.isdigit() else (1 << 30, clip)


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


def class_counts(records: list[ClipRecord], class_names: tuple[str, ...]) -> dict[str, int]:
    """Clips per class name, in class order (classes without a clip count 0)."""
    counts = dict.fromkeys(class_names, 0)
    for record in records:
        counts[record.label_name] = counts.get(record.label_name, 0) + 1
    return counts


def format_class_counts(counts: dict[str, int]) -> str:
    """``neutral 288, happy 192, ...`` on one line."""
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def records_to_frame(records: list[ClipRecord]) -> pd.DataFrame:
    """Clip records as a DataFrame with columns ``path, label, label_name, subject``."""
    import pandas as pd

    columns = [f.name for f in dataclasses.fields(ClipRecord)]
    return pd.DataFrame([dataclasses.astuple(r) for r in records], columns=columns)


def _video_files(root: Path) -> list[str]:
    """Relative POSIX paths of every file with a video extension under ``root``, sorted.

    Folder links are followed, each real folder at most once: a link back to a folder already
    walked (a loop, or a second link to the same data) is skipped with one warning, so the walk is
    finite and no clip is listed twice.
    """
    found, seen = [], {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".")
                       and _first_visit(Path(dirpath) / d, root, seen)]
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in filenames
                     if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith("."))
    return sorted(found)


def _first_visit(folder: Path, root: Path, seen: set[str]) -> bool:
    """Whether ``folder`` is a real folder not walked yet (recording it); warns on a repeat."""
    real = os.path.realpath(folder)
    if real in seen:
        log.warning("skipping %s: it leads to %s, which is already walked (a folder link loop or a "
                    "second link to the same folder)", folder.relative_to(root).as_posix(), real)
        return False
    seen.add(real)
    return True


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value

"""The ``mtcae`` command: one subcommand per pipeline stage.

Each subcommand only parses its arguments and calls one function of its stage module; the stage
modules are imported lazily so ``mtcae --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import vocab

Handler = Callable[[argparse.Namespace], int]

_EPILOG = """\
pipeline:  demo-data -> preprocess -> train / sweep -> table; predict (a trained model on videos)
quick start (one CPU machine, a few minutes):  mtcae demo
"""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one subparser per stage."""
    parser = argparse.ArgumentParser(
        prog="mtcae",
        description="MTCAE-DFER: multi-task cascaded autoencoders for dynamic facial expression "
        "recognition, with Ray Tune + Optuna sweeps and MLflow tracking.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def subcommand(add: Callable[[argparse._SubParsersAction], None]):
    """Register a function that adds one subparser (and sets its ``handler``)."""
    _SUBCOMMANDS.append(add)
    return add


_TABLE_EPILOG = """\
what it prints and writes:
  Table 1   six structure strategies x datasets: test UAR/WAR mean +- std over folds, folds done,
            the paper's value and the difference (best values in bold)
  Table 2-4 per dataset: the paper's literature rows ("reported") with the measured rows, ranked
  recall   per-class test recall per architecture
  compare  (--compare A B) paired t-test / Wilcoxon of A vs B over the folds both completed
  A missing or failed fold is listed under the table, never averaged away. Files go to
  --export-dir (default <out>/tables/<sweep|all>) and, when the sweep has a parent run
  (tags stage=sweep, sweep=<name>), to that run's MLflow artifacts under tables/.

examples:
  mtcae table                                   # embedded store ./mtcae_runs/mlflow.db
  mtcae table --sweep paper --format all        # md + csv + LaTeX + PNG
  mtcae table --compare cascaded_vit nonshared_vit
  mtcae table --tracking-uri http://head:5000 --experiment mtcae --stage cv
"""


@subcommand
def _add_table(sub: argparse._SubParsersAction) -> None:
    """``mtcae table``: result tables and figures from the MLflow runs."""
    p = sub.add_parser(
        "table",
        help="result tables (paper Table 1-4 shape), per-class recall, paired comparison",
        description="Aggregate trial runs from MLflow over folds and print/export tables next to "
        "the paper's reported numbers.",
        epilog=_TABLE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("mtcae_runs"),
                   help="project output folder holding the embedded store mlflow.db (default: %(default)s)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db)")
    p.add_argument("--experiment", action="append", default=None, metavar="NAME",
                   help="MLflow experiment name (repeatable; default: every experiment)")
    p.add_argument("--sweep", default=None, help="only runs tagged sweep=NAME; also selects the "
                   "parent run the files are attached to")
    p.add_argument("--stage", default="auto", choices=["auto", *vocab.STAGES, "any"],
                   help="which trial runs: cv (cross-validation), search (HPO), any, or auto = the "
                   "trials nested selection chose if any, else cv, else any (default: %(default)s)")
    p.add_argument("--n-folds", type=int, default=None,
                   help="expected folds per dataset/arch (default: the runs' n_folds param, else 5)")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="folder for the exported files (default: <out>/tables/<sweep or all>)")
    p.add_argument("--format", default="md",
                   help="comma-separated subset of md,csv,latex,png,pdf,svg, or all (default: %(default)s; "
                   "markdown is always printed)")
    p.add_argument("--compare", nargs=2, metavar=("ARCH_A", "ARCH_B"), default=None,
                   help="paired comparison of two architectures across folds")
    p.add_argument("--no-log-artifacts", action="store_true",
                   help="do not attach the files to the sweep's parent MLflow run")
    p.set_defaults(handler=_run_table)


def _run_table(args: argparse.Namespace) -> int:
    from orchestrator.report.export import make_tables
    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, args.out)
    export_dir = args.export_dir or args.out / "tables" / (args.sweep or "all")
    try:
        report = make_tables(
            uri,
            experiment=args.experiment,
            sweep=args.sweep,
            stage=None if args.stage == "any" else args.stage,
            export_dir=export_dir,
            formats=args.format,
            compare=tuple(args.compare) if args.compare else None,
            n_folds=args.n_folds,
            log_artifacts=not args.no_log_artifacts,
        )
    except (FileNotFoundError, LookupError, ValueError) as err:
        print(f"mtcae table: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"wrote {len(report.files)} file(s) to {export_dir}"
          + (f"; logged to parent run {report.parent_run_id}" if report.parent_run_id else ""))
    return 0


_TRAIN_EPILOG = """\
one fold of one configuration, without Ray (for debugging a configuration):
  the latest checkpoint is kept in <out>/checkpoints/<run name>/state.pt (--resume continues it);
  metrics go to MLflow (default: the embedded store sqlite:///<out>/mlflow.db).

examples (the cache exists after `mtcae demo`):
  mtcae train --cache mtcae_runs/cache/demo --arch cascaded_vit --fold 0 --epochs 5 --set encoder=tiny
  mtcae train --cache mtcae_runs/cache/demo --arch shared_vit --fold 1 --set encoder=tiny --set lr=3e-4
  mtcae train --cache mtcae_runs/cache/ravdess --arch cascaded_vit --set decoder=official \\
      --set encoder_checkpoint=/ckpt/videomae_large_k400.pth        # the paper's model, on a GPU

architectures (--arch, Table 1):
{archs}

--set KEY=VALUE keys (default in brackets; docs/design.md "Trial config" says what each does):
{keys}

sizing: the default encoder (vit_large, 1568 tokens per clip) is a GPU workload; on a CPU the
trial logs an estimate of its time and memory first. encoder=tiny or vit_small runs in seconds to
minutes on a laptop. Standard PyTorch switches apply: OMP_NUM_THREADS / torch threads, and
--set precision=bf16 on CPUs with AVX512-BF16 or AMX.
"""


def _train_epilog() -> str:
    """The train epilog with the architectures and settable keys read from their definitions."""
    from orchestrator.trial.config import SETTABLE_KEYS, TrialConfig

    archs = "\n".join(f"  {a.name:<14} {a.mtl_type}, {a.decoder_label}" for a in vocab.ARCHITECTURE_NAMES)
    defaults = TrialConfig()
    shown = {k: getattr(defaults, k) for k in SETTABLE_KEYS}
    items = [f"{k} [{'preset' if v is None and k.startswith('decoder_') else v}]" for k, v in shown.items()]
    lines, line = [], " "
    for item in items:
        if len(line) + len(item) > 96:
            lines.append(line)
            line = " "
        line += f" {item},"
    keys = "\n".join([*lines, line.rstrip(",")])
    return _TRAIN_EPILOG.format(archs=archs, keys=keys)


@subcommand
def _add_train(sub: argparse._SubParsersAction) -> None:
    """``mtcae train``: one trial (one fold) without Ray."""
    p = sub.add_parser(
        "train",
        help="train and test one architecture on one fold (no Ray)",
        description="Run one trial of the training loop on a preprocessing cache: train, validate "
        "every epoch, test with the best validation epoch's weights, log to MLflow.",
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cache", type=Path, required=True, help="preprocessing cache (mtcae preprocess --out)")
    p.add_argument("--arch", default=vocab.CASCADED_VIT, choices=vocab.ARCHITECTURES,
                   help="architecture, one of Table 1's six (default: %(default)s, the paper's model)")
    p.add_argument("--fold", type=int, default=0, help="test fold index (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget (default: 100, the paper's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="any other trial config key (repeatable), e.g. --set lr=3e-4 --set encoder=tiny")
    p.add_argument("--out", type=Path, default=Path("mtcae_runs"),
                   help="output folder: embedded MLflow store and checkpoints (default: %(default)s)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--split-file", type=Path, default=None,
                   help="a published subject split (MAE-DFER's splitNN/ folders, `subject fold` lines or "
                   "JSON): its folds replace the computed ones (stored in <out>/folds/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from orchestrator.trial.entrypoints import train_one_fold

    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"mtcae train: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = value.strip()
    try:
        final = train_one_fold(args.cache, args.arch, args.fold, epochs=args.epochs, overrides=overrides,
                               out=args.out, tracking_uri=args.tracking_uri, resume=args.resume,
                               progress=not args.no_progress, split_file=args.split_file)
    except (FileNotFoundError, ValueError) as err:
        print(f"mtcae train: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an --out (or MLflow store) that cannot be written: the path and the operation
        where = f" {err.filename}" if err.filename else ""
        print(f"mtcae train: cannot write{where} ({err.strerror or err}); pass --out to a writable folder",
              file=sys.stderr)
        return 2
    print(f"best epoch {final['best_epoch']:.0f}: val_uar {final['best_val_uar']:.4f}  "
          f"test_uar {final['test_uar']:.4f}  test_war {final['test_war']:.4f}")
    return 0


_PREDICT_EPILOG = """\
what it writes (under --out):
  frames.csv   one row per sampled frame: clip, frame, frame_index (in the source), face_found,
               MTCNN box_x1 box_y1 box_x2 box_y2 and 5 landmarks (<point>_x/_y), the model's
               pred_box_* and pred_<point>_*, in source pixels
  clips.csv    one row per clip: status (ok | no_face | failed), reason, label, prob_<class>
  overlays/    (--overlay) one MP4 per clip: MTCNN box/points (green), the model's (orange), the label
  Decoding and MTCNN are the preprocessing's, with the model's training settings; a file that cannot
  be read, or a clip without a face, is reported and the run goes on.

examples:
  mtcae predict clip.mp4 --model runs:/<run_id>/model                  # a trial's logged model
  mtcae predict videos/ --model models:/mtcae-smoke-demo-cascaded_vit@best --format parquet --overlay
  mtcae predict clip.flv --model ./downloaded_model --out preds        # an MLflow model folder
"""


@subcommand
def _add_predict(sub: argparse._SubParsersAction) -> None:
    """``mtcae predict``: a trained model on new videos -> frame and clip tables."""
    p = sub.add_parser(
        "predict",
        help="run a trained model on videos: per-frame faces and per-clip expression probabilities",
        description="Decode each video as preprocessing does, find faces with MTCNN, run the model and "
        "write one row per frame and one per clip (CSV or Parquet), optionally overlay videos.",
        epilog=_PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, help="a video file, or a folder searched recursively for videos")
    p.add_argument("--model", required=True,
                   help="runs:/<run_id>/model, models:/<model_id>, models:/<name>/<version|@alias>, or a folder")
    p.add_argument("--out", type=Path, default=Path("mtcae_predictions"),
                   help="output folder (default: %(default)s)")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv", help="table format (default: csv)")
    p.add_argument("--overlay", action="store_true", help="also write an overlay MP4 per clip")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store of runs:/ and models:/ URIs (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///mtcae_runs/mlflow.db)")
    p.add_argument("--encoder-checkpoint", type=Path, default=None,
                   help="where the model's encoder checkpoint is, if it moved (its sha256 is checked)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per MTCNN call and forward (default: 4)")
    p.add_argument("--device", default="auto", help="MTCNN and model device: auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from orchestrator.predict import PredictError, predict_videos

    tracking_uri = args.tracking_uri
    if tracking_uri is None and ":/" in args.model and not Path(args.model).exists():
        from orchestrator.tracking import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(None, Path("mtcae_runs"))
    try:
        report = predict_videos(args.source, args.model, args.out, fmt=args.format, overlay=args.overlay,
                                tracking_uri=tracking_uri, batch_size=args.batch_size, device=args.device,
                                progress=not args.no_progress, encoder_checkpoint=args.encoder_checkpoint)
    except (PredictError, ValueError) as err:
        print(f"mtcae predict: {err}", file=sys.stderr)
        return 2
    for clip, label in report.labels:
        print(f"{clip}: {label}")
    for clip, status, reason in report.problems:
        print(f"  {status}: {clip}: {reason}", file=sys.stderr)
    print(f"{report.clips} clip(s), {len(report.problems)} with problems; wrote "
          + ", ".join(str(f) for f in report.files[:2]) + (f" and {len(report.files) - 2} overlay(s)"
                                                           if len(report.files) > 2 else ""))
    return 0 if len(report.labels) else 1


_SWEEP_EPILOG = """\
protocol (the space's `selection:`, README "Protocol"):
  nested  (default) one Optuna study per (dataset, arch, outer fold), trained on that fold's
          training subjects only (validation carved from them); the trial it chooses on validation
          is the fold's result, tagged selected=true in MLflow. Nothing is trained twice.
  pooled  one study per (dataset, arch) scored over search.folds, then stage cv tests the choice
          on every fold; optimistic, and the tables say so.
  a space that searches nothing runs stage cv only: one trial per (dataset, arch, fold).
stages: search (every study at once, in one Tune run), cv (the grid dataset x arch x fold).
resuming: re-run the same command, or `mtcae sweep --resume NAME`; finished stages and trials are
  not re-run, failed trials restart from their last checkpoint, MLflow runs are reused.
everything goes under --out (default ./mtcae_runs): cache/, ray_results/, sweeps/<name>/, mlflow.db,
  tables/<name>/.

examples:
  mtcae sweep smoke --data-root data                 # shipped search_spaces/smoke.yaml
  mtcae sweep search_spaces/paper.yaml --cache /mnt/efs/cache --storage s3://bucket/ray_results \\
      --tracking-uri http://127.0.0.1:5000 --gpus-per-trial 1      # on the cluster head (ray job submit)
  mtcae sweep --resume paper
"""


@subcommand
def _add_sweep(sub: argparse._SubParsersAction) -> None:
    """``mtcae sweep``: a Ray Tune + Optuna sweep over a search space file."""
    p = sub.add_parser(
        "sweep",
        help="run (or resume) a sweep: Optuna search with nested selection, or a cross-validation",
        description="Run a search space (search_spaces/*.yaml) on Ray Tune: Optuna studies per "
        "(dataset, arch, outer fold) whose chosen trials are the results (nested selection), or the "
        "dataset x arch x fold cross-validation of a fixed configuration, logged to MLflow.",
        epilog=_SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("space", nargs="?", default=None,
                   help="search space YAML, or the name of a shipped one (smoke, paper, official, "
                   "loss_weights, decoder_shape)")
    p.add_argument("--out", type=Path, default=Path("mtcae_runs"),
                   help="output folder for everything below (default: %(default)s)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="raw videos, one folder per dataset; missing caches are built from them")
    p.add_argument("--cache", type=Path, default=None,
                   help="root of the per-dataset preprocessing caches (default: <out>/cache)")
    p.add_argument("--storage", default=None, metavar="PATH_OR_URI",
                   help="Tune storage: local/NFS path or s3://bucket/prefix (default: <out>/ray_results)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the sweep name)")
    p.add_argument("--name", default=None, help="sweep name (default: the space file's stem)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="NAME",
                   help="continue an existing sweep (SPACE may then be omitted)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="override the space's resources.gpu (e.g. 1, or 0.5 to pack two small trials)")
    p.add_argument("--stage", choices=["all", *vocab.STAGES], default="all",
                   help="run only one stage of the space's protocol (default: %(default)s)")
    p.add_argument("--no-tables", action="store_true", help="do not write the result tables at the end")
    p.add_argument("--force-unlock", action="store_true",
                   help="take the sweep's driver lock even if another driver seems to hold it (warned; "
                   "only when that driver is gone and its lock was not released)")
    p.add_argument("--trainable", default=None, metavar="MODULE:FUNCTION",
                   help="the trial function, importable on every node (default: "
                   "orchestrator.trial.entrypoints:train_trial); for tests and custom trainables")
    p.set_defaults(handler=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from orchestrator.pipeline import sweep_and_tables
    from orchestrator.sweep.errors import SweepError, SweepInterrupted
    from orchestrator.sweep.space import SearchSpaceError

    name = args.resume if isinstance(args.resume, str) else args.name
    stages = None if args.stage == "all" else (args.stage,)
    try:
        result = sweep_and_tables(
            args.space, out=args.out, name=name, resume=bool(args.resume), storage=args.storage,
            cache=args.cache, data_root=args.data_root, tracking_uri=args.tracking_uri,
            experiment=args.experiment, address=args.address, num_cpus=args.num_cpus,
            gpus_per_trial=args.gpus_per_trial, stages=stages, write_tables=not args.no_tables,
            force_unlock=args.force_unlock,
            trainable=args.trainable,
        )
    except SweepInterrupted as err:  # Ctrl+C, SIGTERM, `ray job stop`: 128 + the signal, as a shell
        print(f"mtcae sweep: {err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:  # outside Tune's own handling (pre-flight, building caches, between stages)
        print("mtcae sweep: stopped; what finished is kept, run the same command again to continue",
              file=sys.stderr)
        return 130
    except (SearchSpaceError, SweepError) as err:
        print(f"mtcae sweep: {err}", file=sys.stderr)
        return 2
    if result.tables_markdown:
        print(result.tables_markdown)
    print(result.summary())
    return 0 if result.complete or args.stage == vocab.STAGE_SEARCH else 1


@subcommand
def _add_demo(sub: argparse._SubParsersAction) -> None:
    """``mtcae demo``: the embedded default, end to end on one machine."""
    p = sub.add_parser(
        "demo",  # the command's name, not the dataset's
        help="the whole pipeline on synthetic data, locally, in a few minutes",
        description="Generate the synthetic demo dataset, preprocess it, run search_spaces/smoke.yaml "
        "on a local Ray instance, log to the local MLflow store and print the table.",
    )
    p.add_argument("--out", type=Path, default=Path("mtcae_runs"),
                   help="output folder (default: %(default)s)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for Ray (default: all)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from orchestrator.pipeline import run_demo
    from orchestrator.sweep.errors import SweepError, SweepInterrupted

    try:
        result = run_demo(args.out, num_cpus=args.num_cpus)
    except SweepError as err:
        print(f"mtcae demo: {err}", file=sys.stderr)
        return 128 + err.signum if isinstance(err, SweepInterrupted) else 2
    if result.tables_markdown:
        print(result.tables_markdown)
    print(result.summary())
    return 0 if result.complete else 1


@subcommand
def _add_bench(sub: argparse._SubParsersAction) -> None:
    """``mtcae bench``: the benchmark suite (same as ``python -m benchmarks``)."""
    p = sub.add_parser(
        "bench",
        help="run the benchmarks (each a ratio against a baseline) and write benchmarks/report.md",
        description="Run every benchmark under benchmarks/ against its baseline measured in the same "
        "run and write report.json + report.md. --quick fits a 2-core CPU in under 10 minutes; the "
        "full run is for a GPU machine.",
    )
    p.add_argument("--quick", action="store_true", help="few-minute settings for a 2-core CPU")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these benchmarks (preprocess, encoder, decoder_step, trial, sweep)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for report.json and report.md (default: the benchmarks package)")
    p.add_argument("--merge", action="store_true",
                   help="keep the results of the existing report.json that this run does not measure")
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from benchmarks import DEFAULT_OUT, any_errors, run_all, summary_lines

    try:
        report = run_all(quick=args.quick, only=args.only, out_dir=args.out or DEFAULT_OUT,
                         merge=args.merge)
    except ValueError as err:
        print(f"mtcae bench: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(report)))
    return 1 if any_errors(report) else 0


@subcommand
def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    """``mtcae preprocess``: raw videos -> 16-frame clips + MTCNN labels (the cache)."""
    from orchestrator.data.settings import RESIZE_MODES, SAMPLING_MODES

    p = sub.add_parser(
        "preprocess",
        help="sample 16 frames per video, detect faces (MTCNN), write the training cache",
        description="Read only the sampled frames of every video (decord), resize them, run MTCNN "
        "batched over each clip's frames, and write <out>/clips/*.npz, <out>/manifest.csv and "
        "<out>/settings.json. Re-running resumes; bad videos are recorded in the manifest. Exits "
        "non-zero only if no usable clip came out.",
    )
    p.add_argument("--dataset", required=True, choices=vocab.DATASETS, help="dataset layout")
    p.add_argument("--root", required=True, type=Path, help="dataset root directory")
    p.add_argument("--out", required=True, type=Path, help="cache directory")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: min(4, CPUs); 0 = in this process)")
    p.add_argument("--device", default="auto", help="MTCNN device: auto, cpu, cuda, cuda:N")
    p.add_argument("--ray", action="store_true",
                   help="run as Ray tasks (default: only when Ray is already initialised)")
    p.add_argument("--size", type=int, default=224, help="output frame side (default: 224)")
    p.add_argument("--num-frames", type=int, default=16, help="frames per clip (default: 16)")
    p.add_argument("--sampling", choices=SAMPLING_MODES, default="official",
                   help="official: stride floor(T/16) from frame 0 (authors); uniform: centred")
    p.add_argument("--resize", choices=RESIZE_MODES, default="squash",
                   help="squash the whole frame (authors) or keep the aspect ratio")
    p.add_argument("--min-face-size", type=int, default=20, help="MTCNN minimum face (pixels)")
    p.add_argument("--thresholds", type=float, nargs=3, default=(0.6, 0.7, 0.7),
                   metavar=("P", "R", "O"), help="MTCNN stage thresholds")
    p.add_argument("--keep-faceless", action="store_true",
                   help="keep clips with no face at all (all frames invalid) instead of failing them")
    p.add_argument("--classes", type=int, choices=(7, 8), default=None,
                   help="RAVDESS/demo label protocol: 7 (calm merged into neutral, default) or 8")
    p.add_argument("--include-song", action="store_true", help="RAVDESS: also the song clips")
    p.add_argument("--view", default=None, help="MEAD camera view (default: front)")
    p.add_argument("--mead-selection", choices=("paper", "all"), default=None,
                   help="MEAD: 'paper' (default) keeps section 4.1's 380 neutral and 884 clips per other "
                   "emotion, spread over actors and levels; 'all' keeps every selected clip")
    p.add_argument("--actors", nargs="+", default=None, metavar="ID", help="MEAD: only these actors (e.g. M003 W009)")
    p.add_argument("--levels", nargs="+", type=int, default=None, choices=(1, 2, 3),
                   help="MEAD: intensity levels of the non-neutral emotions (default: all three)")
    p.add_argument("--clips-per-class", type=int, default=None,
                   help="MEAD: cap on the clips of every class (with --mead-selection all)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing cache at --out (e.g. built with other settings)")
    p.add_argument("--retry-failed", action="store_true", help="re-process clips that failed before")
    p.add_argument("--clips-per-task", type=int, default=4,
                   help="clips whose frames share one MTCNN call (default: 4)")
    p.add_argument("--limit", type=int, default=None, help="only the first N clips (smoke test)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_preprocess)


def _run_preprocess(args: argparse.Namespace) -> int:
    from orchestrator.data.cache import CacheSettingsError, CacheWriteError
    from orchestrator.data.datasets import DatasetLayoutError, get_dataset
    from orchestrator.data.preprocess import run_preprocess
    from orchestrator.data.settings import PreprocessSettings

    options: dict = {}
    if args.classes is not None:
        options["num_classes"] = args.classes
    if args.include_song:
        options["vocal_channels"] = ("01", "02")
    mead = {"view": args.view, "selection": args.mead_selection, "levels": args.levels,
            "clips_per_class": args.clips_per_class,
            "actors": tuple(args.actors) if args.actors else None}
    options |= {k: tuple(v) if isinstance(v, list) else v for k, v in mead.items() if v is not None}
    try:
        adapter = get_dataset(args.dataset, **options)
        settings = PreprocessSettings(
            num_frames=args.num_frames, size=args.size, sampling=args.sampling, resize=args.resize,
            min_face_size=args.min_face_size, thresholds=tuple(args.thresholds),
            keep_faceless=args.keep_faceless)
        summary = run_preprocess(
            adapter, args.root, args.out, settings, workers=args.workers, device=args.device,
            use_ray=True if args.ray else None, overwrite=args.overwrite,
            retry_failed=args.retry_failed, clips_per_task=args.clips_per_task, limit=args.limit,
            progress=not args.no_progress)
    except (CacheSettingsError, CacheWriteError, DatasetLayoutError,
            FileNotFoundError, ValueError) as err:
        print(f"mtcae preprocess: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtcae preprocess: stopped; every finished clip is kept in {args.out}, run the same "
              f"command again to continue", file=sys.stderr)
        return 130
    print(summary.format())
    return 0 if summary.usable > 0 else 1


@subcommand
def _add_demo_data(sub: argparse._SubParsersAction) -> None:
    """``mtcae demo-data``: the synthetic RAVDESS-layout dataset."""
    p = sub.add_parser(
        "demo-data",
        help="write a small synthetic dataset in the RAVDESS layout (astronaut face, 7 classes)",
        description="Synthetic clips of skimage's astronaut photo with class-dependent head motion, "
        "several synthetic actors, in RAVDESS naming (Actor_XX/02-01-EE-II-SS-RR-AA.mp4). For "
        "running the pipeline without RAVDESS; not real emotion data.",
    )
    p.add_argument("--out", required=True, type=Path, help="dataset root to write")
    p.add_argument("--actors", type=int, default=20, help="synthetic actors (default: 20)")
    p.add_argument("--clips-per-class", type=int, default=1,
                   help="clips per actor and class (default: 1)")
    p.add_argument("--size", type=int, default=224, help="frame side in pixels, even (default: 224)")
    p.add_argument("--frames", type=int, default=40, help="frames per video (default: 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(handler=_run_demo_data)


def _run_demo_data(args: argparse.Namespace) -> int:
    from orchestrator.data.demo import generate_demo_dataset

    try:
        paths = generate_demo_dataset(args.out, actors=args.actors,
                                      clips_per_class=args.clips_per_class, size=args.size,
                                      num_frames=args.frames, seed=args.seed)
    except ValueError as err:
        print(f"mtcae demo-data: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # read-only, full, or a file where a folder must go
        print(f"mtcae demo-data: cannot write the demo dataset at {err.filename or args.out}: "
              f"{err.strerror or err}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} synthetic clips ({args.actors} actors) to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mtcae`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Handler = args.handler
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""orchestrator/trial/loop.py on a generated tiny cache: config, loop, resume, feature cache, MLflow, Tune."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_fixture import TINY_TRIAL, TinyCache, write_tiny_cache

import vocab
from orchestrator.cli import main
from orchestrator.tracking import mlflow_metric
from orchestrator.trial import checkpoint as ckpt_io
from orchestrator.trial import data as td
from orchestrator.trial.config import (
    SETTABLE_KEYS,
    TrialConfig,
    TrialConfigError,
)
from orchestrator.trial.device import resolve_precision
from orchestrator.trial.entrypoints import train_trial
from orchestrator.trial.loop import (
    EPOCH_METRICS,
    FINAL_METRICS,
    EarlyStopping,
    Trial,
    model_config,
    run_trial,
)

TINY = TINY_TRIAL
NONDETERMINISTIC = {"epoch_time_s"}


@pytest.fixture(autouse=True)
def no_ambient_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials without a tracking_uri fall back to $MLFLOW_TRACKING_URI: keep tests off any ambient store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> TinyCache:
    return write_tiny_cache(tmp_path_factory.mktemp("cache"))


def config(cache: TinyCache, **kw) -> TrialConfig:
    return TrialConfig.from_flat({**TINY, "cache_dir": str(cache.root), **kw})


class Collect:
    """A reporter that keeps every report and checks the checkpoint it is handed."""

    def __init__(self) -> None:
        self.reports: list[dict[str, float]] = []
        self.last_state: dict | None = None

    def __call__(self, metrics: dict[str, float], checkpoint: Path) -> None:
        assert (checkpoint / ckpt_io.CHECKPOINT_FILE).is_file()
        self.reports.append(dict(metrics))
        self.last_state = ckpt_io.load_checkpoint(checkpoint)


def deterministic(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in NONDETERMINISTIC}


# --------------------------------------------------------------------------------------------
# Config


def test_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(TrialConfigError, match="learning_rate: unknown key"):
        TrialConfig.from_flat({"learning_rate": 0.1})


def test_every_problem_of_a_config_is_reported_at_once() -> None:
    with pytest.raises(TrialConfigError) as err:
        TrialConfig.from_flat({"arch": "resnet", "lr": -1, "epochs": 0, "decoder_depth": 0, "bogus": 1})
    assert [key for key, _ in err.value.problems] == ["arch", "decoder_depth", "lr", "epochs", "bogus"]
    assert "5 problem(s)" in str(err.value) and "greater than 0 (got -1)" in str(err.value)


def test_defaults_follow_the_paper_and_the_released_code() -> None:
    cfg = TrialConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (1e-3, 1e-3, 16, 100)
    assert (cfg.w_box, cfg.w_landmark, cfg.w_expr) == (0.5, 0.5, 1.5)
    assert (cfg.lr_factor, cfg.lr_patience, cfg.early_stop_patience) == (0.1, 10, 50)
    assert cfg.freeze_encoder and cfg.uses_feature_cache and cfg.encoder == "vit_large"


def test_from_flat_coerces_command_line_and_numpy_values() -> None:
    cfg = TrialConfig.from_flat({"lr": "3e-4", "epochs": np.int64(7), "freeze_encoder": "false",
                                 "feature_cache": False, "decoder_depth": "none", "batch_size": 8.0})
    assert (cfg.lr, cfg.epochs, cfg.freeze_encoder, cfg.feature_cache) == (3e-4, 7, False, "off")
    assert cfg.decoder_depth is None and cfg.batch_size == 8 and not cfg.uses_feature_cache


@pytest.mark.parametrize("flat, key", [
    ({"arch": "resnet"}, "arch"), ({"precision": "fp8"}, "precision"), ({"fold": 5}, "fold"),
    ({"epochs": 2.5}, "epochs"), ({"feature_cache": "on", "freeze_encoder": False}, "feature_cache"),
    ({"lr_factor": 1.0}, "lr_factor"),
])
def test_invalid_values_name_the_key(flat: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        TrialConfig.from_flat(flat)


def test_config_hash_ignores_fold_and_runtime_keys() -> None:
    a = TrialConfig.from_flat({"fold": 0, "cache_dir": "/a", "tracking_uri": "sqlite:///x.db"})
    b = TrialConfig.from_flat({"fold": 3, "cache_dir": "/b", "num_workers": 4, "trial_key": "k"})
    assert a.config_hash == b.config_hash
    assert TrialConfig.from_flat({"lr": 1e-4}).config_hash != a.config_hash
    assert a.resolved_trial_key.endswith(f"/{a.config_hash}/f0") and b.resolved_trial_key == "k"


def test_model_config_applies_decoder_overrides() -> None:
    cfg = TrialConfig.from_flat({"decoder": "official", "decoder_depth": 2, "decoder_dropout": 0.1})
    dec = model_config(cfg, 7, 16, 224).decoder_cfg()
    assert (dec.depth, dec.embed_dim, dec.drop_rate, dec.attn_drop, dec.input_dropout) == (2, 256, 0.1, 0.1, 0.1)


def test_official_fidelity_switches_reach_the_model() -> None:
    cfg = TrialConfig.from_flat({"head_order": "pool_norm", "normalization": "official", "use_pos_embed": False})
    mcfg = model_config(cfg, num_classes=7, num_frames=16, img_size=224)
    assert (mcfg.head_order, mcfg.use_pos_embed) == ("pool_norm", False)
    assert mcfg.norm_stats()[1] == (0.225, 0.225, 0.225)
    with pytest.raises(ValueError, match="normalization"):
        TrialConfig.from_flat({"normalization": "kinetics"})


def test_fp16_needs_cuda() -> None:
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(native: bool, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level("WARNING", logger="orchestrator.trial.loop"):
        assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
        resolve_precision("fp32", torch.device("cpu"))
    assert ("AVX512-BF16" in caplog.text) is not native


# --------------------------------------------------------------------------------------------
# Schedules


def test_early_stopping_follows_keras_semantics() -> None:
    stop = EarlyStopping(patience=2)
    assert [stop.update(v, e) for e, v in enumerate([0.5, 0.6, 0.6, 0.55])] == [True, True, False, False]
    assert stop.stopped and (stop.best, stop.best_epoch) == (0.6, 1), "ties keep the first best epoch"


def test_lr_drops_after_lr_patience_bad_epochs(cache: TinyCache) -> None:
    trial = Trial(config(cache, lr_patience=2, feature_cache="off"), td.load_trial_data(config(cache)))
    lrs = []
    for loss in [1.0, 1.0, 1.0, 1.0, 1.0]:
        trial.scheduler.step(loss)
        lrs.append(trial.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5]), "Keras: drop after `patience` bad epochs"


def test_epoch_batches_depend_only_on_seed_and_epoch() -> None:
    a = td.epoch_batches(10, 4, seed=0, epoch=3)
    assert a == td.epoch_batches(10, 4, seed=0, epoch=3)
    assert a != td.epoch_batches(10, 4, seed=0, epoch=4)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [4, 4, 2]


# --------------------------------------------------------------------------------------------
# The loop


def test_one_epoch_reports_every_metric(cache: TinyCache) -> None:
    collect = Collect()
    final = run_trial(config(cache, epochs=1), collect)
    assert len(collect.reports) == 1 and collect.reports[0] == final
    recalls = {k for k in final if k.startswith("test_recall_")}
    assert set(final) == set(EPOCH_METRICS) | set(FINAL_METRICS) | recalls
    assert recalls == {f"test_recall_{n}" for n in cache.class_names}
    assert all(math.isfinite(v) for v in final.values())
    assert final["epoch"] == 0 and final["best_epoch"] == 0 and final["lr"] == pytest.approx(1e-3)
    for name in ("val_uar", "val_war", "test_uar", "test_war"):
        assert 0.0 <= final[name] <= 1.0


def test_bf16_on_cpu_trains(cache: TinyCache) -> None:
    final = run_trial(config(cache, epochs=1, precision="bf16", decoder_dropout=0.0))
    assert all(math.isfinite(v) for v in final.values())


@pytest.mark.parametrize("arch", ["stl", "shared_mlp"])
def test_other_architectures_train(cache: TinyCache, arch: str) -> None:
    final = run_trial(config(cache, arch=arch, epochs=1))
    assert math.isfinite(final["test_uar"])
    if arch == "stl":
        assert final["train_loss_box"] == 0.0 and final["train_loss_landmark"] == 0.0


def test_expression_loss_falls(cache: TinyCache) -> None:
    collect = Collect()
    run_trial(config(cache, epochs=4), collect)
    losses = [r["train_loss_expr"] for r in collect.reports]
    assert len(losses) == 4
    assert losses[-1] < 0.8 * losses[0], f"expression loss did not fall: {losses}"


@pytest.mark.parametrize("settings", [
    {"lr": 1e-3},  # learning: weights, Adam moments and dropout streams must continue exactly
    {"lr": 1e-8, "lr_patience": 1, "early_stop_patience": 2},  # plateau: LR drop and early stop span the cut
], ids=["learning", "plateau"])
def test_resumed_run_ends_with_the_same_metrics(cache: TinyCache, tmp_path: Path, settings: dict) -> None:
    cfg = config(cache, epochs=4, **settings)
    uninterrupted = Collect()
    run_trial(cfg, uninterrupted)

    class Interrupted(Exception):
        pass

    def crash_after_epoch_1(metrics: dict[str, float], checkpoint: Path) -> None:
        shutil.copytree(checkpoint, tmp_path / "ckpt", dirs_exist_ok=True)
        if metrics["epoch"] == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_trial(cfg, crash_after_epoch_1)
    resumed = Collect()
    run_trial(cfg, resumed, resume=tmp_path / "ckpt")
    assert [deterministic(r) for r in resumed.reports] == [deterministic(r) for r in uninterrupted.reports[2:]]
    if settings["lr"] == 1e-3:
        assert [r["epoch"] for r in resumed.reports] == [2, 3]
    else:
        assert [r["epoch"] for r in resumed.reports] == [2], "early stopping (patience 2) must fire at epoch 2"
        assert resumed.reports[-1]["lr"] == pytest.approx(1e-9), "the LR must have dropped after epoch 1"


def test_resume_refuses_another_config(cache: TinyCache, tmp_path: Path) -> None:
    run_trial(config(cache, epochs=1), ckpt_io.directory_reporter(tmp_path))
    with pytest.raises(ValueError, match="lr"):
        run_trial(config(cache, epochs=1, lr=0.1), resume=tmp_path)


def test_early_stopping_ends_the_trial_and_test_uses_the_best_epoch(cache: TinyCache) -> None:
    collect = Collect()
    final = run_trial(config(cache, epochs=30, early_stop_patience=1, lr=1e-6), collect)
    assert final["epoch"] < 29, "patience 1 with a frozen LR must stop early"
    assert final["epoch"] == final["best_epoch"] + 1
    assert "test_uar" in final and all("test_uar" not in r for r in collect.reports[:-1])


def test_cached_and_end_to_end_paths_agree(cache: TinyCache) -> None:
    cached, e2e = Collect(), Collect()
    run_trial(config(cache, feature_cache="on"), cached)
    run_trial(config(cache, feature_cache="off"), e2e)
    for a, b in zip(cached.reports, e2e.reports):
        for key in set(a) - NONDETERMINISTIC:
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), key  # fp16 storage rounding only


def test_same_weights_give_the_same_predictions_on_both_paths(cache: TinyCache) -> None:
    data = td.load_trial_data(config(cache))
    cached = Trial(config(cache, feature_cache="on"), data)
    e2e = Trial(config(cache, feature_cache="off"), data)
    assert isinstance(cached.source, td.TokenSource) and isinstance(e2e.source, td.VideoSource)
    a, b = cached.evaluate("test"), e2e.evaluate("test")
    assert a.clip_ids == b.clip_ids and a.y_pred == b.y_pred
    assert a.losses() == pytest.approx(b.losses(), rel=1e-3)


def test_feature_cache_is_shared_across_trials_and_keyed_by_encoder(tmp_path: Path) -> None:
    small = write_tiny_cache(tmp_path / "cache", num_subjects=3, clips_per_cell=1)
    for arch in ("cascaded_vit", "shared_mlp"):
        Trial(config(small, arch=arch), td.load_trial_data(config(small)))
    keys = list((small.root / "features").iterdir())
    assert len(keys) == 1, "same frozen encoder and cache -> one token set"
    assert len(list(keys[0].glob("*.npy"))) == len(small.clip_ids)
    Trial(config(small, seed=1), td.load_trial_data(config(small)))
    assert len(list((small.root / "features").iterdir())) == 2, "another random encoder -> another key"


# --------------------------------------------------------------------------------------------
# MLflow and Ray Tune


@pytest.mark.slow
def test_mlflow_run_holds_exactly_the_expected_record(cache: TinyCache, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config(cache, epochs=2, tracking_uri=uri, experiment="exp", sweep="s1", stage="cv")
    run_trial(cfg, ckpt_io.directory_reporter(tmp_path / "ckpt"))
    run_trial(cfg, resume=tmp_path / "ckpt")  # a resumed, already finished trial
    run_trial(cfg)  # a re-run from scratch of the same trial
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri exports it; restored afterwards
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["exp"])
    finally:
        mlflow.set_tracking_uri(None)
    assert len(runs) == 1, "resuming or re-running must not create another run"
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    expected_tags = {"dataset": "demo", "arch": "cascaded_vit", "fold": "0", "sweep": "s1", "stage": "cv",
                     "config_hash": cfg.config_hash, "trial_key": cfg.resolved_trial_key}
    assert {k: run[f"tags.{k}"] for k in expected_tags} == expected_tags
    params = {c[len("params."):] for c in runs.columns if c.startswith("params.")}
    # the hyperparameters actually used: no runtime paths or worker counts, no None for a preset value
    assert params == set(cfg.hparams()) - {"encoder_checkpoint"}
    assert not {"cache_dir", "folds_file", "num_workers", "sweep", "stage"} & params
    assert run["params.lr"] == "0.001" and run["params.n_folds"] == "3"
    assert run["params.decoder_heads"] == "3" and run["params.decoder_dropout"] == "0.3"  # official preset
    assert run["tags.runtime.cache_dir"] == str(cache.root) and run["tags.runtime.num_workers"] == "0"
    metrics = {c[len("metrics."):] for c in runs.columns if c.startswith("metrics.")}
    recalls = {f"test_recall_{n}" for n in cache.class_names}
    flat = (set(EPOCH_METRICS) - {"epoch"}) | set(FINAL_METRICS) | recalls
    assert metrics == {mlflow_metric(m) for m in flat}
    assert all(m.split("/")[0] in ("train", "val", "test", "time") for m in metrics), sorted(metrics)
    client = MlflowClient(uri)
    for key in ("val_uar", "train_loss", "lr"):
        assert [m.step for m in client.get_metric_history(run["run_id"], mlflow_metric(key))] == [0, 1], key
    assert [m.step for m in client.get_metric_history(run["run_id"], mlflow_metric("test_uar"))] == [0]
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert artifacts == {"confusion_matrix.png", "per_class_recall.csv", "predictions.csv"}


@pytest.mark.slow
def test_train_trial_runs_inside_ray_tune(cache: TinyCache, tmp_path: Path) -> None:
    import ray
    from ray import tune

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            train_trial,
            param_space={**TINY, "cache_dir": str(cache.root), "epochs": 2},
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="t", verbose=0),
        )
        result = tuner.fit()[0]
    finally:
        ray.shutdown()
    assert result.error is None, result.error
    assert result.metrics["epoch"] == 1 and "test_uar" in result.metrics
    assert result.metrics["training_iteration"] == 2, "one report per epoch, the last one carries the test"
    with result.checkpoint.as_directory() as directory:
        state = ckpt_io.load_checkpoint(directory)
    assert state["epoch"] == 1 and not any(k.startswith("encoder.") for k in state["model"])


def test_cli_train_runs_one_fold(cache: TinyCache, tmp_path: Path) -> None:
    from orchestrator.cli import main

    out = tmp_path / "out"
    args = ["train", "--cache", str(cache.root), "--arch", "stl", "--fold", "1", "--epochs", "1", "--set",
            "encoder=tiny", "--set", "n_folds=3", "--set", "batch_size=4", "--out", str(out), "--no-progress"]
    code = main(args)
    assert code == 0
    assert (out / "mlflow.db").is_file()
    assert list(out.glob(f"checkpoints/*/{ckpt_io.CHECKPOINT_FILE}"))
    assert main(args + ["--resume"]) == 0, "resuming a finished fold re-reports its test results"
    assert main(args + ["--set", "lr=0.5", "--resume"]) == 2, "a checkpoint of another config is refused"
    assert main(["train", "--cache", str(cache.root), "--set", "learning_rate=1", "--out", str(out)]) == 2


def test_cli_train_runs_one_fold_on_the_lgi_former(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    small = write_tiny_cache(tmp_path / "cache", num_subjects=3, clips_per_cell=1)
    args = ["train", "--cache", str(small.root), "--arch", "cascaded_vit", "--epochs", "1", "--set",
            "encoder=lgi_former_tiny", "--set", "n_folds=3", "--set", "batch_size=4", "--set", "decoder_depth=1",
            "--set", "decoder_dim=16", "--set", "decoder_head_dim=8", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0 and "test_uar" in capsys.readouterr().out
    (key,) = (small.root / "features").iterdir()
    tokens = [np.load(f) for f in key.glob("*.npy")]
    assert len(tokens) == len(small.clip_ids)
    assert {t.shape for t in tokens} == {(8 * 2 * 2, 32)}  # 16 frames x 32 px -> 8x2x2 local tokens of 32
    assert "region_size" in (key / "meta.json").read_text(), "the key holds the LGI-Former's geometry"


# --------------------------------------------------------------------------------------------
# benchmarks/trial.py (toy sizes: it runs, and its FLOP bookkeeping is right)


def test_trial_benchmark_runs_at_toy_size() -> None:
    from benchmarks import trial as bench

    shrink = (("decoder_dim", 16), ("decoder_head_dim", 8), ("decoder_depth", 1))
    setting = bench.EpochSetting(encoder="tiny", img_size=32, train_clips=8, val_clips=4, batch_size=4, rounds=1,
                                 overrides=shrink)
    results = bench.run(True, torch.device("cpu"), setting)
    names = [r["name"] for r in results]
    assert len(results) == 3 and "cache" in names[0]
    for r in results:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["target"] > 0
    assert results[0]["feature_build_clips"] == 8 + 4 + 1
    assert results[0]["analytic_flops"]["ratio"] > 1


def test_grid_flops_count_encoder_passes() -> None:
    from benchmarks import trial as bench

    grid = bench.grid_flops(datasets={"x": 10}, n_folds=5, epochs=3, val_fraction=0.25)
    # per fold: 2 test clips, 2 val, 6 train; 6 archs x 5 folds x (3 epochs x 8 + 2) encoder passes
    assert grid["encoder_passes_without_cache"] == pytest.approx(6 * 5 * (3 * 8 + 2))
    assert grid["encoder_passes_with_cache"] == 10
    enc = grid["encoder_forward_per_clip"]
    assert grid["flops_without_cache"] - grid["flops_with_cache"] == pytest.approx(enc * (6 * 5 * 26 - 10))
    stl = grid["per_clip"]["stl"]
    assert stl["decoder_step"] == 3 * stl["decoder_forward"], "STL has no projection: heads only"


@pytest.mark.parametrize("encoder, warned", [("vit_base", True), ("tiny", False), ("lgi_former_tiny", False)])
def test_a_gpu_sized_encoder_on_a_cpu_warns_with_an_estimate(cache: TinyCache, encoder: str, warned: bool,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(cache, encoder=encoder, epochs=1)
    with caplog.at_level("WARNING", logger="orchestrator.trial.sizing"):
        Trial(cfg, td.load_trial_data(cfg), torch.device("cpu"))
    messages = [r.getMessage() for r in caplog.records if r.name == "orchestrator.trial.sizing"]
    assert bool(messages) is warned
    if warned:
        assert f"encoder={encoder} on a CPU" in messages[0] and "TFLOP" in messages[0] and "GB" in messages[0]


def test_cost_estimate_scales_with_epochs_and_clips(cache: TinyCache) -> None:
    from orchestrator.trial.sizing import estimate_cost

    net = Trial(config(cache), td.load_trial_data(config(cache)), torch.device("cpu")).model
    one = estimate_cost(net, {"train": 8, "val": 2, "test": 2}, 1, 4, feature_cache=False, rate=1e9)
    two = estimate_cost(net, {"train": 8, "val": 2, "test": 2}, 2, 4, feature_cache=False, rate=1e9)
    cached = estimate_cost(net, {"train": 8, "val": 2, "test": 2}, 2, 4, feature_cache=True, rate=1e9)
    assert two.flops == pytest.approx(2 * one.flops) and cached.flops < two.flops
    assert one.seconds == pytest.approx(one.flops / 1e9) and one.peak_bytes > 0


def test_train_help_lists_the_architectures_and_every_settable_key() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for arch in vocab.ARCHITECTURE_NAMES:
        assert f"{arch.name:<14} {arch.mtl_type}, {arch.decoder_label}" in out
    for key in SETTABLE_KEYS:
        assert f"{key} [" in out, key
    assert "mtcae_runs/cache/demo" in out, "examples use the cache `mtcae demo` leaves behind"


class Payload:
    """Pickles as a call to ``open(marker, "w")``: what a poisoned checkpoint would run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_poisoned_checkpoint_runs_nothing_on_resume(cache: TinyCache, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out, marker = tmp_path / "out", tmp_path / "pwned"
    args = ["train", "--cache", str(cache.root), "--arch", "stl", "--epochs", "1", "--set", "encoder=tiny",
            "--set", "n_folds=3", "--set", "batch_size=4", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    (state,) = out.glob(f"checkpoints/*/{ckpt_io.CHECKPOINT_FILE}")
    torch.save({"format": ckpt_io.CHECKPOINT_FORMAT, "model": Payload(marker)}, state)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    assert not marker.exists(), "loading the checkpoint executed its payload"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(state) in err and "delete it to start the trial over" in err


@pytest.mark.parametrize("damage", ["pickle", "truncated", "garbage", "other_format"])
def test_every_bad_checkpoint_is_named_in_one_error(tmp_path: Path, damage: str) -> None:
    """What ``train_trial`` reads from ``tune.get_checkpoint().as_directory()`` on a Tune restore."""
    directory, marker = tmp_path / "ckpt", tmp_path / "pwned"
    good = {"format": ckpt_io.CHECKPOINT_FORMAT, "model": {"w": torch.ones(64)}, "rng": {"x": np.float64(1.5)}}
    file = ckpt_io.save_checkpoint_file(good, directory)
    assert ckpt_io.load_checkpoint(directory)["rng"] == {"x": 1.5}
    if damage == "pickle":
        torch.save({"format": ckpt_io.CHECKPOINT_FORMAT, "x": Payload(marker)}, file)
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:200])
    elif damage == "garbage":
        file.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"format": 1, "model": {}}, file)
    with pytest.raises(ckpt_io.TrialCheckpointError, match=str(file)):
        ckpt_io.load_checkpoint(directory)
    assert not marker.exists()


@pytest.mark.parametrize("metric", ["val_loss", "val_uar"])
def test_the_selection_metric_picks_the_tested_epoch(cache: TinyCache, metric: str) -> None:
    collect = Collect()
    final = run_trial(config(cache, epochs=6, early_stop_patience=10, lr=0.02, select_metric=metric), collect)
    history = [r[metric] for r in collect.reports]
    direction = vocab.SELECTION_METRICS[metric]
    best = min(history) if direction == "min" else max(history)
    assert final["best_epoch"] == history.index(best) and final[f"best_{metric}"] == best
    trial = Trial(config(cache, epochs=6, select_metric=metric), td.load_trial_data(config(cache)))
    ckpt_io.load_trainable_state(trial.model, collect.last_state["best_state"])
    tested = trial.evaluate("test").summary(len(trial.data.class_names))
    assert tested["uar"] == pytest.approx(final["test_uar"]) and tested["loss"] == pytest.approx(final["test_loss"])


def test_cli_train_uses_a_published_split(cache: TinyCache, tmp_path: Path) -> None:
    import json

    from orchestrator.data.cache import load_manifest
    from orchestrator.data.folds import read_folds

    manifest = load_manifest(cache.root)
    subjects = sorted(manifest["subject"].unique())
    split = tmp_path / "split.json"
    split.write_text(json.dumps({s: i % 3 for i, s in enumerate(subjects)}))  # subject -> test fold
    out = tmp_path / "out"
    args = ["train", "--cache", str(cache.root), "--arch", "stl", "--fold", "1", "--epochs", "1",
            "--set", "encoder=tiny", "--set", "batch_size=4", "--split-file", str(split), "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    (stored,) = out.glob("folds/*.json")
    folds = read_folds(stored, manifest)
    assert sorted(folds[1].subjects["test"]) == [s for i, s in enumerate(subjects) if i % 3 == 1]
    split.write_text(json.dumps({"nobody": 0, **{s: i % 3 for i, s in enumerate(subjects)}}))
    assert main(args) == 2, "a split naming a subject the cache does not have is refused"


def test_the_tested_weights_are_the_selected_epochs_not_the_last(cache: TinyCache) -> None:
    from orchestrator.trial.checkpoint import load_trainable_state, trainable_state_dict

    cfg = config(cache, epochs=6, early_stop_patience=6, lr=1e-2, select_metric="val_uar")
    trial = Trial(cfg, td.load_trial_data(cfg))
    weights = []
    for epoch in range(cfg.epochs):
        trial.run_epoch(epoch)
        weights.append({k: v.clone() for k, v in trainable_state_dict(trial.model).items()})
    best = trial.state.stopper.best_epoch
    assert best != cfg.epochs - 1, "the setting must select an epoch other than the last to tell them apart"
    metrics, _ = trial.test()

    def test_loss(state: dict) -> float:
        load_trainable_state(trial.model, state)
        return trial.evaluate("test").losses()["loss"]

    assert metrics["test_loss"] == pytest.approx(test_loss(weights[best]), rel=1e-6)
    assert metrics["test_loss"] != pytest.approx(test_loss(weights[-1]), rel=1e-6)


def test_cli_train_into_an_unwritable_out_is_one_sentence(cache: TinyCache, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a path under a regular file cannot be created, even by root
    args = ["train", "--cache", str(cache.root), "--arch", "stl", "--epochs", "1", "--set", "encoder=tiny",
            "--set", "n_folds=3", "--set", "batch_size=4", "--out", str(blocker / "out"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write" in err and str(blocker) in err

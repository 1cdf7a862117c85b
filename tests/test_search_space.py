"""Search space files: loading, validation errors, and conversion to Optuna / fixed configs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest

from orchestrator import search_space as ss
from orchestrator.search_space import SearchSpaceError, find_search_space, load_search_space

SHIPPED = ("paper", "official", "loss_weights", "decoder_shape", "smoke")

VALID = """\
datasets: [demo]
archs: [stl, cascaded_vit]
n_folds: 2
fixed: {encoder: tiny, epochs: 3}
search:
  num_samples: 2
  params:
    lr: {type: loguniform, low: 1e-4, high: 1.0e-2}
    decoder_depth: {type: int, low: 1, high: 4}
    decoder_heads: {type: choice, values: [1, 2], when: {arch: [cascaded_vit]}}
    decoder_head_dim: {type: choice, values: [16, 32], when: {decoder_heads: 2}}
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_file_loads_with_defaults(tmp_path: Path) -> None:
    space = load_search_space(write(tmp_path, VALID))
    assert space.name == "space"
    assert space.groups() == [("demo", "stl"), ("demo", "cascaded_vit")]
    assert space.folds == (0, 1) and space.metric == "val_uar" and space.mode == "max"
    assert space.search is not None and space.search.folds == (0, 1)
    lr = space.search.params[0]
    assert (lr.kind, lr.low, lr.high) == ("loguniform", 1e-4, 1e-2)  # "1e-4" (a YAML string) parsed
    assert space.fixed_config("demo", "stl") == {"encoder": "tiny", "epochs": 3}
    assert space.resources.gpu == "auto" and space.max_failures == 2


def test_group_params_drop_parameters_conditioned_on_other_archs(tmp_path: Path) -> None:
    space = load_search_space(write(tmp_path, VALID))
    assert [p.name for p in space.group_params("demo", "stl")] == ["lr", "decoder_depth", "decoder_head_dim"]
    assert [p.name for p in space.group_params("demo", "cascaded_vit")] == [
        "lr", "decoder_depth", "decoder_heads", "decoder_head_dim"]


def test_define_by_run_samples_conditional_parameters_with_optuna(tmp_path: Path) -> None:
    space = load_search_space(write(tmp_path, VALID))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    stl, vit = space.define_by_run("demo", "stl"), space.define_by_run("demo", "cascaded_vit")
    for _ in range(3):
        sampled = stl(study.ask())
        assert set(sampled) == {"lr", "decoder_depth"}  # head_dim needs decoder_heads == 2
        assert 1e-4 <= sampled["lr"] <= 1e-2 and 1 <= sampled["decoder_depth"] <= 4
    seen = [vit(study.ask()) for _ in range(12)]
    for sampled in seen:
        assert ("decoder_head_dim" in sampled) == (sampled["decoder_heads"] == 2)
    assert {s["decoder_heads"] for s in seen} == {1, 2}


def test_shipped_spaces_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTCAE_ENCODER_CHECKPOINT", "/ckpt/videomae_large.pth")
    spaces = {name: load_search_space(find_search_space(name)) for name in SHIPPED}
    assert len(spaces["paper"].groups()) * len(spaces["paper"].folds) == 90
    assert spaces["paper"].search is None and spaces["paper"].fixed["decoder"] == "paper"
    assert spaces["paper"].fixed["encoder_checkpoint"] == "/ckpt/videomae_large.pth"
    assert spaces["official"].fixed["decoder"] == "official"
    assert {p.name for p in spaces["loss_weights"].search.params} == {"w_box", "w_landmark", "w_expr"}
    shape = spaces["decoder_shape"]
    assert [p.name for p in shape.group_params("mead", "shared_mlp")] == [
        "decoder_depth", "decoder_dim", "decoder_dropout"]
    assert "decoder_head_dim" in [p.name for p in shape.group_params("mead", "cascaded_vit")]
    smoke = spaces["smoke"]
    assert smoke.datasets == ("demo",) and len(smoke.archs) == 2 and smoke.n_folds == 2
    assert smoke.search.num_samples == 2 and smoke.fixed["encoder"] == "tiny"


def test_find_search_space_accepts_names_and_paths(tmp_path: Path) -> None:
    assert find_search_space("smoke") == ss.SHIPPED_DIR / "smoke.yaml"
    assert find_search_space("smoke.yaml") == ss.SHIPPED_DIR / "smoke.yaml"
    own = write(tmp_path, VALID)
    assert find_search_space(own) == own
    with pytest.raises(SearchSpaceError, match="shipped spaces: .*smoke"):
        find_search_space("nonexistent")


def test_names_match_the_model_registry() -> None:
    from model.architectures import ARCHITECTURES
    from model.decoder import DECODER_PRESETS
    from model.encoder import ENCODER_PRESETS
    from orchestrator.trainable import FEATURE_CACHE_MODES, PRECISIONS, TrialConfig

    assert ss.ARCHITECTURES == tuple(ARCHITECTURES)
    assert set(ss.ENCODERS) == set(ENCODER_PRESETS)
    assert set(ss.DECODER_PRESETS) == set(DECODER_PRESETS)
    assert ss.PRECISIONS == PRECISIONS and ss.FEATURE_CACHE_MODES == FEATURE_CACHE_MODES
    trial_keys = set(TrialConfig.__dataclass_fields__)
    assert set(ss.SETTABLE_KEYS) | ss.SWEEP_KEYS == trial_keys


# Each malformed file: (text, key named in the message, fragment of the problem or hint).
MALFORMED = {
    "unknown top-level key": (
        VALID.replace("archs:", "arch:"), "arch", "did you mean 'archs'"),
    "missing required key": (
        VALID.replace("n_folds: 2\n", ""), "n_folds", "required key is missing"),
    "unknown dataset": (
        VALID.replace("[demo]", "[ravdes]"), "datasets[0]", "did you mean 'ravdess'"),
    "unknown architecture": (
        VALID.replace("[stl, cascaded_vit]", "[stl, cascade_vit]"), "archs[1]", "did you mean 'cascaded_vit'"),
    "unknown fixed setting": (
        VALID.replace("encoder: tiny", "encodr: tiny"), "fixed.encodr", "did you mean 'encoder'"),
    "sweep-owned key in fixed": (
        VALID.replace("encoder: tiny", "fold: 1"), "fixed.fold", "set by the sweep"),
    "bad encoder value": (
        VALID.replace("encoder: tiny", "encoder: vit_huge"), "fixed.encoder", "unknown value 'vit_huge'"),
    "wrong value type": (
        VALID.replace("epochs: 3", "epochs: three"), "fixed.epochs", "expected int"),
    "unknown distribution": (
        VALID.replace("type: loguniform", "type: lognormal"), "search.params.lr.type", "unknown distribution"),
    "empty range": (
        VALID.replace("low: 1, high: 4", "low: 4, high: 4"), "search.params.decoder_depth", "empty range"),
    "inverted range": (
        VALID.replace("low: 1e-4, high: 1.0e-2", "low: 1.0e-2, high: 1e-4"), "search.params.lr", "empty range"),
    "log scale from zero": (
        VALID.replace("low: 1e-4", "low: 0.0"), "search.params.lr.low", "log scale needs low > 0"),
    "float distribution on an int key": (
        VALID.replace("decoder_depth: {type: int", "decoder_depth: {type: uniform"),
        "search.params.decoder_depth.type", "use type: int"),
    "empty choice": (
        VALID.replace("values: [1, 2]", "values: []"), "search.params.decoder_heads.values", "non-empty list"),
    "unknown key in a distribution": (
        VALID.replace("low: 1, high: 4", "low: 1, hihg: 4"), "search.params.decoder_depth.hihg", "did you mean 'high'"),
    "searched and fixed": (
        VALID.replace("epochs: 3", "epochs: 3, lr: 0.001"), "search.params.lr", "both fixed and searched"),
    "condition on an unknown key": (
        VALID.replace("when: {arch:", "when: {archh:"), "search.params.decoder_heads.when.archh",
        "can only test dataset, arch"),
    "condition on an unknown architecture": (
        VALID.replace("when: {arch: [cascaded_vit]}", "when: {arch: [vit]}"),
        "search.params.decoder_heads.when.arch", "unknown value 'vit'"),
    "fold out of range": (
        VALID.replace("n_folds: 2\n", "n_folds: 2\nfolds: [0, 2]\n"), "folds[1]", "not in 0..1"),
    "test metric": (
        VALID.replace("n_folds: 2\n", "n_folds: 2\nmetric: test_uar\n"), "metric", "never on test metrics"),
    "ASHA over several folds": (
        VALID.replace("  num_samples: 2\n", "  num_samples: 2\n  scheduler: {type: asha}\n"),
        "search.scheduler", "exactly one search fold"),
    "negative dropout": (
        VALID.replace("encoder: tiny", "decoder_dropout: -0.1"), "fixed.decoder_dropout", "[0, 1)"),
    "fractional GPUs above one": (
        VALID + "resources: {gpu: 1.5}\n", "resources.gpu", "whole number"),
    "unknown failure key": (
        VALID + "failure: {max_failure: 2}\n", "failure.max_failure", "did you mean 'max_failures'"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_file_names_file_key_and_hint(tmp_path: Path, case: str) -> None:
    text, key, fragment = MALFORMED[case]
    path = write(tmp_path, text, "broken.yaml")
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(path)
    message = str(info.value)
    assert str(path) in message and key in message and fragment in message, message
    assert info.value.key == key and info.value.path == path


def test_unset_environment_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MTCAE_TEST_CKPT", raising=False)
    path = write(tmp_path, VALID.replace("encoder: tiny", "encoder_checkpoint: '${MTCAE_TEST_CKPT}'"))
    with pytest.raises(SearchSpaceError, match="MTCAE_TEST_CKPT is not set"):
        load_search_space(path)
    monkeypatch.setenv("MTCAE_TEST_CKPT", "/weights.pth")
    assert load_search_space(path).fixed["encoder_checkpoint"] == "/weights.pth"


@pytest.mark.parametrize("text, fragment", [
    ("datasets: [demo\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
])
def test_unreadable_files(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(SearchSpaceError, match=fragment):
        load_search_space(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SearchSpaceError, match="no such file"):
        load_search_space(tmp_path / "absent.yaml")

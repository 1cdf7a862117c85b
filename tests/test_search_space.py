"""Search space files: loading, validation errors, and conversion to Optuna / fixed configs."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Annotated, Any

import optuna
import pytest
from pydantic import Field

import orchestrator.sweep.space as ss
from orchestrator.sweep import space_file
from orchestrator.sweep.space import SearchSpaceError, find_search_space
from orchestrator.sweep.space_file import load_search_space
from orchestrator.trial import config
from orchestrator.trial.config import (
    SETTABLE_KEYS,
    SWEEP_KEYS,
    TrialConfig,
    TrialConfigError,
)

SHIPPED = ("paper", "official", "loss_weights", "decoder_shape", "smoke", "paper_maedfer")

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


@pytest.mark.parametrize("path", sorted(ss.SHIPPED_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_loads_into_valid_trial_configs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTCAE_ENCODER_CHECKPOINT", "/ckpt/videomae_large.pth")
    monkeypatch.setenv("MTCAE_LGI_FORMER_CHECKPOINT", "/ckpt/mae_dfer.pth")
    space = load_search_space(path)
    for dataset, arch in space.groups():
        drawn = {p.name: p.values[0] if p.kind == "choice" else p.low for p in space.group_params(dataset, arch)}
        TrialConfig.from_flat({**space.fixed_config(dataset, arch), **drawn, "dataset": dataset, "arch": arch})


def test_shipped_dir_is_the_repositorys_search_spaces() -> None:
    assert ss.SHIPPED_DIR == Path(__file__).resolve().parents[1] / "search_spaces"


def test_shipped_spaces_load(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {p.stem for p in ss.SHIPPED_DIR.glob("*.yaml")} == set(SHIPPED)
    monkeypatch.setenv("MTCAE_ENCODER_CHECKPOINT", "/ckpt/videomae_large.pth")
    monkeypatch.setenv("MTCAE_LGI_FORMER_CHECKPOINT", "/ckpt/mae_dfer.pth")
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
    maedfer = spaces["paper_maedfer"]
    assert maedfer.fixed["encoder"] == "lgi_former_base" and maedfer.preprocess["size"] == 160
    assert maedfer.groups() == spaces["paper"].groups()
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


# Each malformed file, with one problem: (text, key named in the message, fragment of the message).
MALFORMED = {
    "unknown top-level key": (
        VALID + "descripton: a typo\n", "descripton", "did you mean 'description'"),
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
        VALID.replace("encoder: tiny", "encoder: vit_huge"), "fixed.encoder", "(got 'vit_huge')"),
    "wrong value type": (
        VALID.replace("epochs: 3", "epochs: three"), "fixed.epochs", "valid integer"),
    "unknown distribution": (
        VALID.replace("type: loguniform", "type: lognormal"), "search.params.lr.type", "unknown distribution"),
    "empty range": (
        VALID.replace("low: 1, high: 4", "low: 4, high: 4"), "search.params.decoder_depth", "empty range"),
    "inverted range": (
        VALID.replace("low: 1e-4, high: 1.0e-2", "low: 1.0e-2, high: 1e-4"), "search.params.lr", "empty range"),
    "log scale from zero": (
        VALID.replace("lr: {type: loguniform, low: 1e-4", "w_box: {type: loguniform, low: 0.0"),
        "search.params.w_box", "log scale needs low > 0"),
    "float distribution on an int key": (
        VALID.replace("decoder_depth: {type: int", "decoder_depth: {type: uniform"),
        "search.params.decoder_depth.type", "use type: int"),
    "int distribution on a string key": (
        VALID.replace("decoder_depth: {type: int", "encoder_checkpoint: {type: int"),
        "search.params.encoder_checkpoint.type", "use type: choice"),
    "empty choice": (
        VALID.replace("values: [1, 2]", "values: []"), "search.params.decoder_heads.values", "at least 1 item"),
    "duplicate choice": (
        VALID.replace("values: [1, 2]", "values: [1, 1]"), "search.params.decoder_heads", "duplicate"),
    "choice value out of the trial field's bounds": (
        VALID.replace("values: [1, 2]", "values: [0, 2]"), "search.params.decoder_heads.values[0]",
        "greater than or equal to 1 (got 0)"),
    "unknown key in a distribution": (
        VALID.replace("low: 1, high: 4", "low: 1, high: 4, steps: 1"), "search.params.decoder_depth.steps",
        "did you mean 'step'"),
    "searched and fixed": (
        VALID.replace("epochs: 3", "epochs: 3, lr: 0.001"), "search.params.lr", "both fixed and searched"),
    "condition on an unknown key": (
        VALID.replace("when: {arch:", "when: {archh:"), "search.params.decoder_heads.when.archh",
        "can only test dataset, arch"),
    "condition on an unknown architecture": (
        VALID.replace("when: {arch: [cascaded_vit]}", "when: {arch: [vit]}"),
        "search.params.decoder_heads.when.arch", "(got 'vit')"),
    "condition on a bad value of an earlier parameter": (
        VALID.replace("when: {decoder_heads: 2}", "when: {decoder_heads: -2}"),
        "search.params.decoder_head_dim.when.decoder_heads", "greater than or equal to 1"),
    "fold out of range": (
        VALID.replace("n_folds: 2\n", "n_folds: 2\nfolds: [0, 2]\n"), "folds[1]", "not in 0..1"),
    "search fold out of range": (
        VALID.replace("  num_samples: 2\n", "  num_samples: 2\n  folds: [5]\n"), "search.folds[0]", "not in 0..1"),
    "test metric": (
        VALID.replace("n_folds: 2\n", "n_folds: 2\nmetric: test_uar\n"), "metric", "selection never sees the test fold"),
    "unknown metric": (
        VALID.replace("n_folds: 2\n", "n_folds: 2\nmetric: val_f1\n"), "metric", "not a metric the trainable selects on"),
    "mode against metric": (
        VALID.replace("n_folds: 2\n", "n_folds: 2\nmetric: val_loss\nmode: max\n"), "mode",
        "contradicts metric 'val_loss'"),
    "pooled ASHA over several folds": (
        VALID.replace("n_folds: 2\n", "n_folds: 2\nselection: pooled\n").replace(
            "  num_samples: 2\n", "  num_samples: 2\n  scheduler: {type: asha}\n"),
        "search.scheduler", "exactly one search fold"),
    "search folds with nested selection": (
        VALID.replace("  num_samples: 2\n", "  num_samples: 2\n  folds: [0]\n"),
        "search.folds", "only with `selection: pooled`"),
    "an unknown selection": (VALID.replace("n_folds: 2\n", "n_folds: 2\nselection: nestled\n"),
                             "selection", "'nested' or 'pooled'"),
    "ASHA without a fixed epoch budget": (
        VALID.replace(", epochs: 3", "").replace("  num_samples: 2\n", "  num_samples: 2\n"
                                                  "  scheduler: {type: asha}\n"),
        "search.scheduler", "fixed epoch budget"),
    "negative dropout": (
        VALID.replace("encoder: tiny", "decoder_dropout: -0.1"), "fixed.decoder_dropout",
        "greater than or equal to 0"),
    "fractional GPUs above one": (
        VALID + "resources: {gpu: 1.5}\n", "resources.gpu", "whole number"),
    "unknown failure key": (
        VALID + "failure: {max_failure: 2}\n", "failure.max_failure", "did you mean 'max_failures'"),
    "preprocess size below 16": (
        VALID + "preprocess: {size: 8}\n", "preprocess.size", "greater than or equal to 16"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_file_names_file_key_and_hint(tmp_path: Path, case: str) -> None:
    text, key, fragment = MALFORMED[case]
    path = write(tmp_path, text, "broken.yaml")
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: ") and fragment in message, message
    assert info.value.problems == [(key, message.removeprefix(f"{path}: {key}: "))]
    assert info.value.key == key and info.value.path == path and isinstance(info.value, ValueError)


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    text = (VALID.replace("archs: [stl, cascaded_vit]", "archs: [stl, cascade_vit]")
            .replace("epochs: 3", "epochs: 0")
            .replace("low: 1, high: 4", "low: 5, high: 4")
            .replace("decoder_heads: {type: choice, values: [1, 2]", "decoder_heads: {type: int, low: 0, high: 2")
            + "descripton: a typo\n")
    path = write(tmp_path, text, "broken.yaml")
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(path)
    keys = [key for key, _ in info.value.problems]
    assert keys == ["archs[1]", "fixed.epochs", "search.params.decoder_depth",
                    "search.params.decoder_heads.low", "descripton"]  # in file order
    message = str(info.value)
    assert message.splitlines()[0] == f"{path}: 5 problems"
    for line, (key, problem) in zip(message.splitlines()[1:], info.value.problems, strict=True):
        assert line == f"  {key}: {problem}"
    assert "empty range: low (5) must be below high (4)" in message
    assert "did you mean 'description'" in message and "did you mean 'cascaded_vit'" in message
    assert info.value.key == "archs[1]"


def _trial_config_problem(key: str, value: Any) -> str:
    with pytest.raises(TrialConfigError) as info:
        TrialConfig.from_flat({key: value})
    [(path, message)] = info.value.problems
    assert path == key
    return message


# Values TrialConfig rejects, one per kind of rule (bound, open bound, type, vocabulary).
REJECTED = [("decoder_dropout", 1.0), ("lr", 0.0), ("batch_size", 0), ("weight_decay", -1.0),
            ("lr_factor", 1.0), ("decoder_depth", 2.5), ("encoder", "vit_huge"), ("precision", "fp8")]


@pytest.mark.parametrize("key, value", REJECTED, ids=[k for k, _ in REJECTED])
def test_values_are_checked_by_the_trial_config_itself(tmp_path: Path, key: str, value: Any) -> None:
    expected = _trial_config_problem(key, value)
    base = "datasets: [demo]\narchs: [stl]\nn_folds: 2\n"
    fixed = write(tmp_path, base + f"fixed: {{{key}: {value!r}}}\n", "fixed.yaml")
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(fixed)
    assert info.value.problems == [(f"fixed.{key}", expected)]
    choice = f"search: {{num_samples: 1, params: {{{key}: {{type: choice, values: [{value!r}]}}}}}}\n"
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(write(tmp_path, base + choice, "choice.yaml"))
    assert info.value.problems == [(f"search.params.{key}.values[0]", expected)]


@pytest.mark.parametrize("key, low, high", [("decoder_dropout", -0.1, 0.5), ("lr", -1.0, 1.0),
                                            ("batch_size", 0, 8), ("epochs", -3, 5)])
def test_bounds_are_checked_as_trial_config_values(tmp_path: Path, key: str, low: float, high: float) -> None:
    kind = "int" if isinstance(low, int) else "uniform"
    text = (f"datasets: [demo]\narchs: [stl]\nn_folds: 2\nsearch:\n  num_samples: 1\n  params:\n"
            f"    {key}: {{type: {kind}, low: {low}, high: {high}}}\n")
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(write(tmp_path, text))
    assert info.value.problems == [(f"search.params.{key}.low", _trial_config_problem(key, low))]


def test_accepted_keys_are_exactly_the_trial_configs_settable_fields(tmp_path: Path) -> None:
    defaults = TrialConfig().to_flat()
    assert set(SETTABLE_KEYS) == set(TrialConfig.model_fields) - SWEEP_KEYS
    fixed = "".join(f"  {key}: {'null' if defaults[key] is None else repr(defaults[key])}\n"
                    for key in SETTABLE_KEYS)
    space = load_search_space(write(tmp_path, "datasets: [demo]\narchs: [stl]\nn_folds: 2\nfixed:\n" + fixed))
    assert space.fixed == {key: defaults[key] for key in SETTABLE_KEYS}
    for key in sorted(SWEEP_KEYS) + ["not_a_trial_key"]:
        path = write(tmp_path, f"datasets: [demo]\narchs: [stl]\nn_folds: 2\nfixed: {{{key}: 1}}\n")
        with pytest.raises(SearchSpaceError) as info:
            load_search_space(path)
        assert info.value.key == f"fixed.{key}"


def test_a_changed_trial_bound_changes_what_a_space_accepts(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    text = "datasets: [demo]\narchs: [stl]\nn_folds: 2\nfixed: {epochs: 20}\n"
    assert load_search_space(write(tmp_path, text)).fixed == {"epochs": 20}

    class ShortTrials(TrialConfig):
        epochs: Annotated[int, Field(ge=1, le=10)] = 5

    monkeypatch.setattr(config, "TrialConfig", ShortTrials)  # what field_problems validates against
    monkeypatch.setattr(space_file, "TrialConfig", ShortTrials)
    with pytest.raises(SearchSpaceError, match=r"fixed.epochs: Input should be less than or equal to 10"):
        load_search_space(write(tmp_path, text))
    searched = text.replace("fixed: {epochs: 20}", "search: {num_samples: 1, params: "
                                                   "{epochs: {type: int, low: 2, high: 20}}}")
    with pytest.raises(SearchSpaceError, match=r"search.params.epochs.high: Input should be less than"):
        load_search_space(write(tmp_path, searched))


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

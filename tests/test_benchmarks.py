"""benchmarks/: every benchmark runs at a toy size and yields well-formed results (never how fast)."""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import time
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import benchmarks
from benchmarks import common
from benchmarks import decoder_step as ds
from benchmarks import encoder as be
from model.decoder import CrossAttention, DecoderConfig
from model.encoder import EncoderConfig, VideoMAEEncoder
from model.encoders import any_encoder_flops, build_encoder, resolve_encoder_config
from orchestrator.cli import main as cli_main

CPU = torch.device("cpu")
PEAK_SIZE = 64  # toy matmul "peak": the number is meaningless, the code path is the real one


def toy_step(**kw) -> ds.StepSetting:
    dec = DecoderConfig(embed_dim=16, depth=2, num_heads=2, head_dim=8)
    base = {"decoder": dec, "batch_size": 2, "encoder_dim": 32, "num_frames": 4, "img_size": 32, "rounds": 2}
    return ds.StepSetting(**{**base, **kw})


def toy_encoder() -> EncoderConfig:
    return EncoderConfig(embed_dim=32, depth=2, num_heads=2, num_frames=4, img_size=32)


def assert_well_formed(result: dict) -> None:
    assert isinstance(result["name"], str) and result["name"]
    for key in ("ratio", "target"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] >= 0
    assert result["passed"] is (result["ratio"] >= result["target"])
    json.dumps(result)  # the report must be able to hold it


def finite_numbers(obj: object) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in finite_numbers(v)]
    if isinstance(obj, list | tuple):
        return [x for v in obj for x in finite_numbers(v)]
    if isinstance(obj, float | int) and not isinstance(obj, bool):
        assert math.isfinite(obj), obj
        return [float(obj)]
    return []


@pytest.mark.parametrize("attn_drop", [None, 0.0])
def test_decoder_step_runs_and_reports(attn_drop: float | None) -> None:
    setting = toy_step(attn_drop=attn_drop)
    results = ds.run(quick=False, device=CPU, settings=[setting], peak_size=PEAK_SIZE)
    speed = results[0]
    for r in results:
        assert_well_formed(r)
    drop = 0.3 if attn_drop is None else 0.0
    assert speed["name"] == setting.label(CPU) == f"decoder_step/custom/b2/fp32/attn_drop{drop:g}"
    assert speed["target"] == ds.TARGET_SPEEDUP == 1.0
    for side in ("system", "baseline"):
        raw = speed[side]
        assert len(raw["samples_s"]) == 2 and raw["best_s"] == min(raw["samples_s"]) > 0
        assert raw["clips_per_s"] == pytest.approx(2 / raw["best_s"])
    assert speed["ratio"] == pytest.approx(speed["baseline"]["best_s"] / speed["system"]["best_s"])
    assert speed["achieved_flop_per_s"] == pytest.approx(speed["step_flops"] / speed["system"]["best_s"])
    fraction = speed["achieved_flop_per_s"] / speed["matmul_peak_flop_per_s"]
    assert speed["fraction_of_peak"] == pytest.approx(fraction)
    assert speed["peak_dtype"] == "float32" and speed["setting"]["device"] == "cpu"
    if len(results) == 2:  # memory is measurable here (glibc or /proc)
        memory = results[1]
        assert memory["name"] == speed["name"] + "/memory" and memory["target"] == ds.TARGET_MEMORY
        assert memory["ratio"] == pytest.approx(memory["baseline_peak_bytes"] / memory["system_peak_bytes"])
    assert finite_numbers(results)


def test_baseline_is_the_same_model_with_eager_attention() -> None:
    """Same weights, same function; only the attention path differs."""
    _, models = ds.build_steps(toy_step(), CPU)
    system, baseline = models["system"], models["baseline"]
    assert all(m.fused_attn for m in system.modules() if isinstance(m, CrossAttention))
    assert not any(m.fused_attn for m in baseline.modules() if isinstance(m, CrossAttention))
    for a, b in zip(system.state_dict().values(), baseline.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    tokens = torch.randn(2, system.encoder.cfg.num_tokens, 32)
    with torch.no_grad():
        real, eager = system.eval().forward_tokens(tokens), baseline.eval().forward_tokens(tokens)
    for a, b in ((real.logits, eager.logits), (real.boxes, eager.boxes), (real.landmarks, eager.landmarks)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_step_flops_match_a_flop_counter() -> None:
    """The eager step's matmuls, as PyTorch counts them (it cannot see into the fused CPU backward)."""
    steps, models = ds.build_steps(toy_step(), CPU)
    with FlopCounterMode(display=False) as counter:
        steps["baseline"]()
    assert counter.get_total_flops() == ds.step_flops(models["baseline"], batch_size=2)


def test_step_updates_every_trainable_parameter() -> None:
    steps, models = ds.build_steps(toy_step(), CPU)
    for side, model in models.items():
        before = [p.detach().clone() for p in model.trainable_parameters()]
        steps[side]()
        assert all(not torch.equal(b, p) for b, p in zip(before, model.trainable_parameters(), strict=True))


def test_a_setting_that_fails_is_an_error_entry_not_an_abort(monkeypatch: pytest.MonkeyPatch) -> None:
    real = ds.run_setting

    def failing(setting: ds.StepSetting, device: torch.device, peak_size: int | None = None) -> list[dict]:
        if setting.batch_size == 4096:
            raise RuntimeError("out of memory")
        return real(setting, device, peak_size)

    monkeypatch.setattr(ds, "run_setting", failing)
    settings = [toy_step(batch_size=4096), toy_step()]
    results = ds.run(quick=False, device=CPU, settings=settings, peak_size=PEAK_SIZE)
    assert results[0]["name"] == "decoder_step/custom/b4096/fp32/attn_drop0.3"
    assert "out of memory" in results[0]["error"] and results[0]["passed"] is False
    assert results[1]["name"] == "decoder_step/custom/b2/fp32/attn_drop0.3"
    normalized = common.normalize_result(results[0], "decoder_step")
    assert normalized["ratio"] is None and normalized["passed"] is False


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_settings_measure_both_presets_at_the_targets_shape(device: str) -> None:
    full = ds.full_settings(torch.device(device))
    assert {(s.decoder, s.batch_size) for s in full} == {("official", 16), ("paper", 16)}
    assert {s.decoder_cfg().attn_drop for s in full} == {0.0, 0.3}  # fused and as trained
    assert {s.decoder for s in ds.QUICK} == {"official", "paper"} and all(s.rounds >= 2 for s in ds.QUICK)
    precision = "bf16" if device == "cuda" else "fp32"  # CUDA runs both sides under bf16 autocast
    assert ds.QUICK[0].label(torch.device(device)) == f"decoder_step/official/b2/{precision}/attn_drop0.3"
    cfg = ds.QUICK[0].model_config().encoder_cfg()
    assert (cfg.num_tokens, cfg.embed_dim) == (1568, 1024)


def test_encoder_runs_and_matches_its_baseline() -> None:
    (result,) = be.run(quick=False, device=CPU, settings=[be.EncoderSetting(toy_encoder())], peak_size=PEAK_SIZE)
    assert_well_formed(result)
    assert result["name"].startswith("encoder/") and 0 < result["fraction_of_peak"]
    assert finite_numbers(result)
    common.add_run_best_fractions([result], common.recorded_peaks())  # what run_all does at the end
    best = max(p["flop_per_s"] for p in common.recorded_peaks() if p["dtype"] == "float32")
    assert result["fraction_of_run_best_peak"] == pytest.approx(result["achieved_flop_per_s"] / best)
    enc = VideoMAEEncoder(toy_encoder()).freeze()
    video = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(video), be.baseline_encode(enc, video), rtol=1e-5, atol=1e-5)


def test_lgi_former_row_reports_its_flops_against_vit_large() -> None:
    (result,) = be.run(quick=False, device=CPU, settings=[be.EncoderSetting("lgi_former_tiny")], peak_size=PEAK_SIZE)
    assert_well_formed(result)
    assert finite_numbers(result)
    tiny = any_encoder_flops(resolve_encoder_config("lgi_former_tiny"))
    assert result["flops_per_clip"] == tiny and result["flops_ratio_to_vit_large"] == pytest.approx(tiny / be.VIT_LARGE_FLOPS)
    base = any_encoder_flops(resolve_encoder_config("lgi_former_base")) / be.VIT_LARGE_FLOPS
    assert 0.07 < base < 0.09, "MAE-DFER's base LGI-Former is about 8% of ViT-L at 16 x 224 px"
    assert "lgi_former_base" in [s.encoder for s in be.quick_settings()]


def test_textbook_attention_is_what_sdpa_computes() -> None:
    enc = build_encoder(resolve_encoder_config("lgi_former_tiny")).freeze()
    video = torch.randn(2, 3, 4, 32, 32)
    fused_kernel = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        fused = enc(video)
        with be.textbook_attention():
            textbook = enc(video)
    torch.testing.assert_close(fused, textbook, rtol=1e-5, atol=1e-5)
    assert torch.nn.functional.scaled_dot_product_attention is fused_kernel, "restored after the block"
    assert fused.shape == (2, 8, 32)


def test_peak_memory_sees_a_large_allocation() -> None:
    for _ in range(2):  # the second time, malloc may already hold the pages
        with common.PeakMemory(CPU) as probe:
            block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            time.sleep(0.05)  # a step's activation peak lasts far longer than the sampling interval
            del block
        if probe.method == "none":
            pytest.skip("no way to read process memory on this platform")
        assert 60 * 2**20 <= probe.peak_bytes < 80 * 2**20


def test_normalize_result_rejects_malformed() -> None:
    ok = common.normalize_result({"name": "x", "ratio": 2, "target": 1}, "mod")
    assert ok["passed"] is True and ok["source"] == "mod" and ok["ratio"] == 2.0
    with pytest.raises(ValueError, match="without"):
        common.normalize_result({"name": "x", "ratio": 2.0}, "mod")
    with pytest.raises(ValueError, match="finite"):
        common.normalize_result({"name": "x", "ratio": float("nan"), "target": 1.0}, "mod")


def _fake_module(name: str, run) -> types.ModuleType:
    module = types.ModuleType(f"benchmarks.{name}")
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, loader=None)
    module.run = run
    return module


@pytest.fixture
def fake_suite(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Two fake benchmarks (one raises, one returns) in place of the real ones; records quick flags."""
    seen: list[bool] = []

    def good(quick: bool) -> list[dict]:
        seen.append(quick)
        return [{"name": "fake/ok", "ratio": 3.0, "target": 2.0, "clips_per_s": 1.5}]

    def bad(quick: bool) -> list[dict]:
        raise RuntimeError("boom")

    monkeypatch.setitem(sys.modules, "benchmarks.fake_bad", _fake_module("fake_bad", bad))
    ok = _fake_module("fake_ok", good)
    ok.NOTES = ("read me",)
    monkeypatch.setitem(sys.modules, "benchmarks.fake_ok", ok)
    monkeypatch.setattr(benchmarks, "BENCHMARKS", ("fake_bad", "fake_ok", "fake_absent"))
    return seen


def test_run_all_records_errors_and_goes_on(fake_suite: list[bool], tmp_path) -> None:
    report = benchmarks.run_all(quick=True, out_dir=tmp_path)
    assert fake_suite == [True]
    by_name = {r["name"]: r for r in report["results"]}
    assert by_name["fake_bad"]["error"] == "RuntimeError: boom" and by_name["fake_bad"]["passed"] is False
    assert by_name["fake/ok"]["passed"] is True and by_name["fake/ok"]["source"] == "fake_ok"
    assert report["benchmarks"]["fake_absent"] == {"status": "absent"}
    assert report["benchmarks"]["fake_bad"]["status"] == "error" and "fake_ok: read me" in report["notes"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert [r["name"] for r in on_disk["results"]] == ["fake_bad", "fake/ok"]
    md = (tmp_path / "report.md").read_text()
    assert "| fake/ok | 3 | 2 | yes |" in md and "RuntimeError: boom" in md
    assert on_disk["machine"]["torch_threads"] >= 1 and on_disk["machine"]["versions"]["torch"]


def test_fractions_are_also_given_against_the_best_probe_of_the_run() -> None:
    peaks = [{"device": "cpu", "dtype": "float32", "flop_per_s": 200e9, "min_flop_per_s": 150e9, "samples": 3},
             {"device": "cpu", "dtype": "bfloat16", "flop_per_s": 400e9, "min_flop_per_s": 380e9, "samples": 2}]
    rows = [
        {"name": "a", "summary": "150.0 of 160.0 float32 GFLOP/s", "achieved_flop_per_s": 150e9,
         "peak_dtype": "float32", "setting": {"device": "cpu"}},
        {"name": "b", "achieved_flop_per_s": 100e9, "peak_dtype": "bfloat16", "setting": {"device": "cpu"}},
        {"name": "c", "achieved_flop_per_s": 100e9, "peak_dtype": "bfloat16", "setting": {"device": "cuda:0"}},
        {"name": "d", "ratio": 2.0},
    ]
    common.add_run_best_fractions(rows, peaks)
    a, b, c, d = rows
    assert a["fraction_of_run_best_peak"] == pytest.approx(0.75)
    assert a["summary"] == "150.0 of 160.0 float32 GFLOP/s; 0.75 of the run's best float32 probe"
    assert b["fraction_of_run_best_peak"] == pytest.approx(0.25) and b["summary"].startswith("0.25 of")
    assert "fraction_of_run_best_peak" not in c and "summary" not in c  # no cuda probe in this run
    assert d == {"name": "d", "ratio": 2.0}


def test_run_all_rejects_unknown_names(fake_suite: list[bool]) -> None:
    with pytest.raises(ValueError, match="unknown benchmark"):
        benchmarks.run_all(only=["nope"], out_dir=None)


def test_cli_bench_and_module_entry_point_share_run_all(fake_suite: list[bool], tmp_path, capsys) -> None:
    from benchmarks.__main__ import main as module_main

    assert cli_main(["bench", "--quick", "--only", "fake_ok", "--out", str(tmp_path / "a")]) == 0
    assert "pass   fake/ok: ratio 3" in capsys.readouterr().out
    assert module_main(["--only", "fake_bad", "--out", str(tmp_path / "b")]) == 1
    assert "ERROR  fake_bad" in capsys.readouterr().out
    assert fake_suite == [True]
    assert cli_main(["bench", "--only", "nope", "--out", str(tmp_path)]) == 2


def test_merge_keeps_the_results_a_run_did_not_measure_again(fake_suite: list[bool], tmp_path) -> None:
    from benchmarks.__main__ import main as module_main

    assert module_main(["--only", "fake_bad", "fake_ok", "--out", str(tmp_path)]) == 1
    assert module_main(["--only", "fake_ok", "--out", str(tmp_path), "--merge"]) == 0
    merged = json.loads((tmp_path / "report.json").read_text())
    assert [r["name"] for r in merged["results"]] == ["fake_bad", "fake/ok"]  # fake_bad kept, fake/ok new
    assert merged["command"].endswith("--only fake_ok --merge")
    assert any(n.startswith("Merged report: fake/ok measured by") for n in merged["notes"])
    assert module_main(["--only", "fake_ok", "--out", str(tmp_path)]) == 0  # without --merge: replaced
    assert [r["name"] for r in json.loads((tmp_path / "report.json").read_text())["results"]] == ["fake/ok"]

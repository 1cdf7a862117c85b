"""benchmarks/: every benchmark runs at a toy size and yields well-formed results (never how fast)."""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import time
import types
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import benchmarks
from benchmarks import common
from benchmarks import decoder_step as ds
from benchmarks import encoder as be
from model.decoder import DecoderConfig
from model.encoder import EncoderConfig, VideoMAEEncoder
from orchestrator.cli import main as cli_main

CPU = torch.device("cpu")
PEAK_SIZE = 64  # toy matmul "peak": the number is meaningless, the code path is the real one


def toy_step(**kw) -> ds.StepSetting:
    dec = DecoderConfig(embed_dim=16, depth=2, num_heads=2, head_dim=8)
    base = dict(decoder=dec, batch_size=2, encoder_dim=32, num_frames=4, img_size=32, rounds=1)
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


@pytest.mark.parametrize(("attn_drop", "precision", "retain_heap", "warmup"),
                         [(None, "fp32", None, True), (0.0, "fp32", None, False), (0.0, "bf16", False, True),
                          (0.0, "fp32", True, False)])
def test_decoder_step_runs_and_reports(attn_drop: float | None, precision: str, retain_heap: bool | None,
                                       warmup: bool) -> None:
    setting = toy_step(attn_drop=attn_drop, precision=precision, retain_heap=retain_heap, warmup=warmup)
    results = ds.run(quick=False, device=CPU, settings=[setting], peak_size=PEAK_SIZE)
    speed, fraction = results
    for r in results:
        assert_well_formed(r)
    assert speed["name"].startswith("decoder_step/") and fraction["name"] == speed["name"] + "/fraction_of_peak"
    assert speed["target"] == ds.TARGET_SPEEDUP["cpu"] and fraction["target"] == ds.TARGET_FRACTION_OF_PEAK
    for side in ("system", "baseline"):
        raw = speed[side]
        assert raw["best_s"] > 0 and raw["clips_per_s"] == pytest.approx(2 / raw["best_s"])
        assert raw["peak_memory_bytes"] is None or isinstance(raw["peak_memory_bytes"], int)
        assert math.isfinite(raw["loss"])
    assert speed["ratio"] == pytest.approx(speed["baseline"]["best_s"] / speed["system"]["best_s"])
    assert fraction["ratio"] == pytest.approx(fraction["achieved_flop_per_s"] / fraction["matmul_peak_flop_per_s"])
    chunked = speed["setting"]["attn_drop_effective"] > 0 or precision == "bf16"
    assert ("ChunkedAttention" in speed["attention_path"]) == chunked
    # None: each side as it runs for real (the system retains its heap, as the trainable does).
    assert speed["system"]["retained_heap"] is (retain_heap is not False)
    assert speed["baseline"]["retained_heap"] is (retain_heap is True)
    assert speed["name"] == f"decoder_step/{setting.label}"
    if retain_heap is None:
        assert "heap" not in speed["name"]
    else:
        assert speed["name"].endswith("/both_retained_heap" if retain_heap else "/default_heap")
    assert finite_numbers(results)


def test_system_only_setting_reports_its_fraction_of_peak() -> None:
    setting = toy_step(attn_drop=0.0, retain_heap=False, warmup=False, sides=("system",))
    (result,) = ds.run(quick=False, device=CPU, settings=[setting], peak_size=PEAK_SIZE)
    assert_well_formed(result)
    assert result["name"].endswith("/default_heap/fraction_of_peak") and not result["system"]["retained_heap"]
    assert result["ratio"] == pytest.approx(result["achieved_flop_per_s"] / result["matmul_peak_flop_per_s"])


def test_a_bf16_row_shares_the_float32_rows_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    baseline_steps = []
    real_step = ds.Side.step

    def counting_step(self: ds.Side, device: torch.device, record: bool = True) -> None:
        if not self.retain_heap:  # the baseline side (glibc's default heap)
            baseline_steps.append(record)
        real_step(self, device, record)

    monkeypatch.setattr(ds.Side, "step", counting_step)
    fp32 = toy_step(attn_drop=0.0, rounds=2, warmup=False)
    settings = [fp32, replace(fp32, precision="bf16", rounds=1), replace(fp32, attn_drop=0.3, rounds=1)]
    results = ds.run(quick=False, device=CPU, settings=settings, peak_size=PEAK_SIZE)
    speed32, frac32, speed16, frac16, other, _ = results
    # 2 rounds of the fp32 row, none for the bf16 row, 1 for the row with another baseline key.
    assert baseline_steps == [True, True, True]
    assert frac32["matmul_peak_samples"] == 3 and frac16["matmul_peak_samples"] == 2  # before, between, after
    assert "shared" not in speed32["baseline"] and "shared" in speed16["baseline"]
    assert speed16["baseline"]["best_s"] == speed32["baseline"]["best_s"]
    assert speed16["ratio"] == pytest.approx(speed32["baseline"]["best_s"] / speed16["system"]["best_s"])
    assert "shared" not in other["baseline"]
    assert (frac32["peak_dtype"], frac16["peak_dtype"]) == ("float32", "bfloat16")
    for r in results:
        assert_well_formed(r)
    for row in (frac32, frac16):
        assert "eager baseline at" in row["summary"]
    fraction = speed32["baseline"]["fraction_of_fp32_peak"]
    assert fraction == pytest.approx(speed32["baseline"]["flop_per_s"] / frac32["matmul_peak_flop_per_s"])


def test_a_bracketed_setting_divides_each_baseline_step_by_the_system_steps_around_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    order = []
    real_step = ds.Side.step

    def logging_step(self: ds.Side, device: torch.device, record: bool = True) -> None:
        order.append("S" if self.retain_heap else "B")
        real_step(self, device, record)

    monkeypatch.setattr(ds.Side, "step", logging_step)
    setting = toy_step(attn_drop=0.0, rounds=2, bracket=True, warmup=False, sides=("baseline", "system"))
    speed, fraction = ds.run(quick=False, device=CPU, settings=[setting], peak_size=PEAK_SIZE)
    assert "".join(order) == "SBSBS"
    s, b = speed["system"]["samples_s"], speed["baseline"]["samples_s"]
    ratios = [b[0] / ((s[0] + s[1]) / 2), b[1] / ((s[1] + s[2]) / 2)]
    assert speed["ratio"] == pytest.approx(sum(ratios) / 2) and "mean of the system steps" in speed["speedup_method"]
    assert fraction["achieved_flop_per_s"] == pytest.approx(speed["step_flops"] / min(s))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_full_settings_measure_both_presets_at_batch_16_and_share_float32_baselines(device: str) -> None:
    settings = ds.full_settings(torch.device(device))
    assert {(s.decoder, s.batch_size) for s in settings} == {("official", 16), ("paper", 16)}
    assert {s.decoder_cfg().attn_drop for s in settings} == {0.0, 0.3}  # fused and as trained
    assert all(s.bracket and s.rounds >= 2 for s in settings)
    if device == "cuda":  # the CUDA target is bf16 against the eager float32 baseline
        assert {s.precision for s in settings} == {"bf16"} and all(s.retain_heap is None for s in settings)
        return
    seen: set = set()
    for s in settings:  # every bf16 row comes after a float32 row whose baseline it can reuse
        if s.precision == "fp32":
            seen.add(s.baseline_key())
        else:
            assert s.baseline_key() in seen, s.label
    assert {s.retain_heap for s in settings} == {None, True, False}


def test_quick_settings_measure_the_targets_shape_as_the_system_runs() -> None:
    first = ds.quick_settings()[0]
    assert (first.decoder, first.batch_size, first.decoder_cfg().attn_drop) == ("official", 16, 0.0)
    assert first.side_retains_heap("system") and not first.side_retains_heap("baseline")
    assert set(first.sides) == {"system", "baseline"}


def test_baseline_decoder_computes_the_same_function() -> None:
    system, _, model, _ = ds.build_runners(toy_step(), CPU)
    model.eval()
    with torch.no_grad():
        real = model.forward_tokens(system.tokens)
        eager = ds.baseline_forward_tokens(model, system.tokens)
    for a, b in ((real.logits, eager.logits), (real.boxes, eager.boxes), (real.landmarks, eager.landmarks)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ("system", 0.0) takes the CPU flash kernel, whose backward FlopCounterMode does not count.
@pytest.mark.parametrize(("side", "attn_drop"), [("baseline", 0.0), ("baseline", 0.3), ("system", 0.3)])
def test_step_flops_match_a_flop_counter(side: str, attn_drop: float) -> None:
    setting = toy_step(attn_drop=attn_drop)
    system, baseline, model, num_tokens = ds.build_runners(setting, CPU)
    runner = system if side == "system" else baseline
    with FlopCounterMode(display=False) as counter:
        runner.loss_fn(runner.forward(runner.tokens), runner.batch)["loss"].backward()
    expected = ds.step_flops(model, num_tokens, batch_size=2)
    if side == "system" and attn_drop > 0:  # chunked attention (CPU dropout) recomputes Q K^T in backward
        cfg = setting.decoder_cfg()
        expected += 3 * cfg.depth * 2 * 2 * cfg.num_heads * num_tokens**2 * cfg.inner_dim // cfg.num_heads
    assert counter.get_total_flops() == expected


def test_step_updates_every_trainable_parameter() -> None:
    system, _, model, _ = ds.build_runners(toy_step(), CPU)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    system.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.trainable_parameters(), strict=True))


def test_a_setting_too_big_for_the_machine_is_an_error_entry_not_an_abort() -> None:
    too_big = ds.StepSetting("paper", batch_size=4096)
    with pytest.raises(MemoryError, match="GiB"):
        ds.run_setting(too_big, CPU)
    results = ds.run(quick=False, device=CPU, settings=[too_big, toy_step()], peak_size=PEAK_SIZE)
    assert [r["name"] for r in results] == ["decoder_step/paper/b4096/fp32/attn_drop0.3",
                                            "decoder_step/custom/b2/fp32/attn_drop0.3",
                                            "decoder_step/custom/b2/fp32/attn_drop0.3/fraction_of_peak"]
    assert "MemoryError" in results[0]["error"] and results[0]["passed"] is False
    normalized = common.normalize_result(results[0], "decoder_step")
    assert normalized["ratio"] is None and normalized["passed"] is False


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


@pytest.mark.parametrize("retain", [False, True])
def test_peak_memory_sees_a_large_allocation_whatever_the_heap_policy(retain: bool) -> None:
    common.heap_retention(retain)
    try:
        for _ in range(2):  # the second time, a retained heap already holds the pages
            with common.PeakMemory(CPU) as probe:
                block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
                time.sleep(0.05)  # a step's activation peak lasts far longer than the sampling interval
                del block
            if probe.method == "none":
                pytest.skip("no way to read process memory on this platform")
            assert 60 * 2**20 <= probe.peak_bytes < 80 * 2**20
    finally:
        common.heap_retention(False)
        common.release_heap()


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


# The performance changes in model/ must not change what the model computes.


def test_fast_cpu_dropout_has_dropout_semantics() -> None:
    from model.decoder import Dropout
    from model.dropout import drop_threshold

    torch.manual_seed(0)
    drop = Dropout(0.3)
    _, p_used = drop_threshold(0.3)
    assert abs(p_used - 0.3) < 2**-16
    x = (torch.rand(1_000_000) + 1.0).requires_grad_()
    y = drop(x)
    kept = y != 0
    assert abs(1.0 - kept.float().mean().item() - 0.3) < 0.003
    torch.testing.assert_close(y[kept], x[kept] / (1 - p_used))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / (1 - p_used))
    xb = x.detach().bfloat16().requires_grad_()
    yb = drop(xb)
    assert yb.dtype == torch.bfloat16
    kept = yb != 0
    assert abs(1.0 - kept.float().mean().item() - 0.3) < 0.003
    torch.testing.assert_close(yb[kept], (xb[kept].float() / (1 - p_used)).bfloat16())  # scaled, rounded once
    yb.backward(torch.ones_like(yb))
    assert xb.grad.dtype == torch.bfloat16
    assert drop.eval()(x) is x
    inplace = Dropout(0.5, inplace=True).train()
    z = torch.ones(1000)
    assert inplace(z) is z and set(z.unique().tolist()) <= {0.0, 2.0}


def test_model_gradients_equal_the_eager_baselines_without_dropout() -> None:
    dec = DecoderConfig(embed_dim=16, depth=2, num_heads=2, head_dim=8, drop_rate=0.0, attn_drop=0.0,
                        input_dropout=0.0)
    system, baseline, model, _ = ds.build_runners(toy_step(decoder=dec), CPU)
    grads = []
    for runner in (system, baseline):
        runner.model.heads.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
        runner.loss_fn(runner.forward(runner.tokens), runner.batch)["loss"].backward()
        grads.append({n: p.grad for n, p in runner.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_quick_mode_keeps_the_targets_shape() -> None:
    first = ds.quick_settings()[0]
    assert first.sides == ("system", "baseline") and not first.retain_heap
    cfg = first.model_config()
    assert (first.decoder, first.batch_size, cfg.encoder_cfg().num_tokens, cfg.encoder_cfg().embed_dim) == (
        "official", 16, 1568, 1024)
    assert {s.decoder for s in ds.quick_settings()} == {"official", "paper"}

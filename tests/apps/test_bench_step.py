"""`dkto bench step`: the worker measures the real trainer step; ratios and targets are computed as documented."""
import pytest

from diffusion_kto.apps import bench_step as bench
from diffusion_kto.config import ConfigError, load_config


def test_mode_overrides_load_and_differ_only_in_adapter_and_loss(tmp_path):
    s = bench.BenchSettings(model="some/model", batch_size=2, steps=5, warmup=1)
    a = bench.mode_overrides(s, "lora", "sft", tmp_path / "d.jsonl", tmp_path / "o", 16)
    b = bench.mode_overrides(s, "full", "kto_mismatched", tmp_path / "d.jsonl", tmp_path / "o", 16)
    cfg = load_config(None, b)
    assert cfg.train.mixed_precision == "no" and cfg.optim.lr == pytest.approx(1e-5) and cfg.lora.rank == 0
    assert cfg.loss.name == "kto" and cfg.loss.reference_point == "mismatched" and cfg.train.max_steps == 6
    assert {x.split("=")[0] for x in set(a) ^ set(b)} == {"lora.rank", "loss.name", "loss.reference_point"}


def test_worker_times_real_trainer_steps(tiny_sd, tmp_path):
    data = bench.write_feedback(tmp_path / "data", 16, n=6)
    s = bench.BenchSettings(model=str(tiny_sd), batch_size=2)
    out = bench.run_worker(bench.mode_overrides(s, "lora", "kto_matched", data, tmp_path / "o", 16), 1, 2, threads=1)
    assert len(out["step_ms"]) == 2 and all(t > 0 for t in out["step_ms"])
    assert out["trainable_params"] > 0 and out["weights_mb"] > 0 and out["peak_mb"] >= out["weights_mb"] * 0.5
    assert out["skipped_steps"] == 0
    sft = bench.run_worker(bench.mode_overrides(s, "lora", "sft", data, tmp_path / "s", 16), 0, 1, threads=1)
    # FLOPs of one counted step: KTO runs the reference forward too (no backward), so more than SFT, less than twice
    assert 0 < sft["step_flops"] < out["step_flops"] < 2 * sft["step_flops"]


@pytest.mark.parametrize("loss", ["kto_mismatched", "dpo"])
def test_worker_times_sdxl_steps_and_dpo_counts_pairs(tiny_sdxl, tmp_path, loss):
    """bench step runs on SDXL too; a DPO mode takes half as many pairs as the others take images."""
    data = bench.write_feedback(tmp_path / "data", 16, n=6)
    bench.write_pairs_data(data)
    s = bench.BenchSettings(model=str(tiny_sdxl), batch_size=4, losses=("sft", loss))
    overrides = bench.mode_overrides(s, "lora", loss, data, tmp_path / "o", 16)
    assert load_config(None, overrides).train.batch_size == (2 if loss == "dpo" else 4)
    out = bench.run_worker(overrides, 1, 2, threads=1)
    assert len(out["step_ms"]) == 2 and out["skipped_steps"] == 0 and out["trainable_params"] > 0


def test_dpo_mode_trains_the_pairs_of_the_same_feedback_on_the_same_images_a_step(tiny_sd, tmp_path):
    """The dpo mode reads the pairs.jsonl formed from the benchmark's feedback (as `dkto convert to-pairs` writes it),
    batch_size / 2 pairs a step, and its worker times real DPO steps."""
    data = bench.write_feedback(tmp_path / "data", 16, n=6)
    pairs = bench.write_pairs_data(data)
    s = bench.BenchSettings(model=str(tiny_sd), batch_size=4)
    cfg = load_config(None, bench.mode_overrides(s, "lora", "dpo", data, tmp_path / "o", 16))
    assert cfg.loss.name == "dpo" and cfg.train.batch_size == 2 and cfg.data.path == str(pairs)
    assert bench.paired("dpo") and not bench.paired("kto_matched")
    out = bench.run_worker(bench.mode_overrides(s, "lora", "dpo", data, tmp_path / "o2", 16), 1, 2, threads=1)
    assert len(out["step_ms"]) == 2 and out["skipped_steps"] == 0


def _mode(ms, peak, train=10.0):
    return {"step_ms_median": ms, "peak_mb": peak, "train_mb": train}


def test_ratios_and_targets():
    results = {"lora": {"sft": _mode(100, 50), "kto_matched": _mode(130, 52), "kto_mismatched": _mode(210, 60)}}
    rat = bench.ratios(results)
    assert rat["lora"]["kto_matched"] == {"time": 1.3, "peak_mem": 1.04, "train_mem": 1.0}
    checks = bench.check_targets(bench.ratios({"lora": {**results["lora"], "dpo": _mode(120, 70)}}))
    assert "lora.peak_mem.dpo" not in checks  # the targets are KTO's; DPO is reported beside them
    assert checks["lora.time.kto_matched"]["met"] and not checks["lora.time.kto_mismatched"]["met"]
    assert checks["lora.peak_mem.kto_matched"]["met"] and not checks["lora.peak_mem.kto_mismatched"]["met"]


def test_amortized_times_combine_dear_and_cheap_steps():
    """Every 4th step is dear (10 ms), the others cheap (1 ms): per-step cost (10 + 3 x 1) / 4 = 3.25 ms, whatever
    spikes hit single steps; the warm-up shifts which timed steps are dear."""
    memory = {"peak_mb": 1, "train_mb": 1, "weights_mb": 1, "peak_rss_reset": True, "trainable_params": 1}
    timed = [{"step_ms": [10, 1, 1, 1] * 3, "skipped_steps": 0}]
    assert bench._summary(timed, memory, every=4)["step_ms_median"] == 3.25
    assert bench._summary(timed, memory)["step_ms_median"] == 1
    shifted = [{"step_ms": [1, 1, 1, 10] * 3, "skipped_steps": 0}]  # 1 warm-up step: timed step 3 is micro-step 4
    assert bench._summary(shifted, memory, every=4, first=1)["step_ms_median"] == 3.25


def test_end_to_end_reports_images_per_second_with_and_without_cache(tiny_sd):
    s = bench.BenchSettings(model=str(tiny_sd), batch_size=2, steps=4, warmup=0, threads=1, official=())
    report = bench.bench_end_to_end(s, rows=6)
    for mode in ("no_cache", "cache"):
        assert report[mode]["images_per_s"] > 0 and report[mode]["command_images_per_s"] > 0
        assert 0 <= report[mode]["data_wait_share"] < 1
    assert report["images_per_run"] == 8 and report["cache_build_s"] > 0 and report["cache_speedup"] > 0
    assert "official" not in report


def _fake_summary(images_per_s: float, parts: bool) -> dict:
    summary = {"images_per_second": images_per_s, "seconds": 8 / images_per_s, "wall_s": 10.0,
               "data_wait_share": 0.01, "data_wait_seconds": 0.01}
    if parts:
        summary.update(images_per_second_after_warmup=images_per_s, step_ms_median=250.0,
                       parts_ms={"vae_encode": 10.0, "text_encode": 2.0, "swap": 3.0, "reference": 50.0})
    return summary


def test_end_to_end_times_the_official_design_beside_ours_in_rotated_rounds(tiny_sd, monkeypatch):
    """Every mode runs once per round, each round starting one mode later; ours / official is taken from the
    medians of loop images per second, and the target (OFFICIAL_TARGET) is ours cached >= 3x the official design."""
    speed = {"official": 10.0, "train": 12.0, "train-cached": 35.0}
    calls = []

    def fake_run(runner, overrides, out, threads, warmup):
        cached = any(o.startswith("data.cache=") for o in overrides)
        calls.append(out.name)
        return _fake_summary(speed[runner + ("-cached" if cached else "")], runner == "official")

    monkeypatch.setattr(bench, "_spawn_run", fake_run)
    s = bench.BenchSettings(model=str(tiny_sd), batch_size=2, steps=4, warmup=0, repeats=2)
    report = bench.bench_end_to_end(s, rows=6)
    assert calls[:5] == ["no_cache-0", "cache-0", "official.full-0", "ours.full.no_cache-0", "ours.full.cache-0"]
    assert calls[5:] == ["cache-1", "official.full-1", "ours.full.no_cache-1", "ours.full.cache-1", "no_cache-1"]
    official = report["official"]
    assert official["loss"] == "kto_matched" and official["target_min"] == 3.0 and set(official) == {"loss", "target_min", "full"}
    full = official["full"]
    assert full["ours_over_official"] == {"no_cache": 1.2, "cache": 3.5} and full["met"]
    assert full["official"]["parts_ms"]["swap"] == 3.0 and full["official"]["rounds"] == 2
    assert "parts_ms" not in full["ours_cache"]


@pytest.mark.slow
def test_end_to_end_runs_the_official_worker(tiny_sd):
    s = bench.BenchSettings(model=str(tiny_sd), batch_size=2, steps=4, warmup=1, threads=1)
    full = bench.bench_end_to_end(s, rows=6)["official"]["full"]
    assert full["official"]["images_per_s"] > 0 and full["official"]["parts_ms"]["swap"] > 0
    assert full["ours_over_official"]["cache"] > 0


def test_e2e_modes_compare_the_official_design_on_its_objective():
    modes = bench.e2e_modes("lora", "kto_mismatched", ("full",))
    assert modes["no_cache"] == ("train", "lora", "kto_mismatched", False)
    assert modes["official.full"] == ("official", "full", "kto_matched", False)
    assert modes["ours.full.cache"] == ("train", "full", "kto_matched", True)
    assert set(bench.e2e_modes("lora", "sft", ())) == {"no_cache", "cache"}


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="adapters"):
        bench.bench_step(bench.BenchSettings(model="x", adapters=("qlora",)))
    with pytest.raises(ConfigError, match="official"):
        bench.bench_step(bench.BenchSettings(model="x", official=("qlora",)))
    with pytest.raises(ConfigError, match="steps"):
        bench.bench_step(bench.BenchSettings(model="x", steps=0))
    with pytest.raises(ConfigError, match="include sft"):
        bench.bench_step(bench.BenchSettings(model="x", losses=("kto_matched", "dpo")))
    with pytest.raises(ConfigError, match="must be even"):
        bench.bench_step(bench.BenchSettings(model="x", batch_size=3))


@pytest.mark.slow
def test_bench_step_end_to_end(tiny_sd):
    report = bench.bench_step(bench.BenchSettings(model=str(tiny_sd), adapters=("lora",), steps=4, warmup=1, threads=1,
                                                  losses=tuple(bench.LOSSES)))
    assert set(report["results"]["lora"]) == {"sft", "kto_matched", "kto_mismatched", "kto_amortized", "dpo"}
    assert set(report["targets"]) == {f"lora.{kind}.kto_{mode}" for kind in ("time", "peak_mem")
                                      for mode in ("matched", "mismatched", "amortized")}


def test_cached_modes_train_without_vae_or_text_encoder(tiny_sd, tmp_path):
    """--cached: the feedback's `dkto cache` is built once, and a mode then loads the UNet alone (less weight held)."""
    s = bench.BenchSettings(model=str(tiny_sd), batch_size=2, cached=True)
    data = bench.write_feedback(tmp_path / "data", 16, n=6)
    bench.write_cache(bench.mode_overrides(bench.replace(s, cached=False), "lora", "sft", data, tmp_path / "c", 16),
                      data)
    assert (bench.cache_path(data) / "manifest.json").is_file()
    overrides = bench.mode_overrides(s, "lora", "kto_matched", data, tmp_path / "o", 16)
    assert f"data.cache={bench._yaml_scalar(str(bench.cache_path(data)))}" in overrides
    cached = bench.run_worker(overrides, 0, 1, threads=1)
    plain = bench.run_worker(bench.mode_overrides(bench.replace(s, cached=False), "lora", "kto_matched", data,
                                                  tmp_path / "p", 16), 0, 1, threads=1)
    assert 0 < cached["weights_mb"] < plain["weights_mb"] and cached["skipped_steps"] == 0
    with pytest.raises(bench.ConfigError, match="--cached: .* leave it out of --losses"):
        bench.bench_step(bench.replace(s, losses=("sft", "dpo")))

"""`dkto bench step`: the worker measures the real trainer step; ratios and targets are computed as documented."""
import pytest

from diffusion_kto import bench
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


def _mode(ms, peak, train=10.0):
    return {"step_ms_median": ms, "peak_mb": peak, "train_mb": train}


def test_ratios_and_targets():
    results = {"lora": {"sft": _mode(100, 50), "kto_matched": _mode(130, 52), "kto_mismatched": _mode(210, 60)}}
    rat = bench.ratios(results)
    assert rat["lora"]["kto_matched"] == {"time": 1.3, "peak_mem": 1.04, "train_mem": 1.0}
    checks = bench.check_targets(rat)
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
    s = bench.BenchSettings(model=str(tiny_sd), batch_size=2, steps=4, warmup=0, threads=1)
    report = bench.bench_end_to_end(s, rows=6)
    for mode in ("no_cache", "cache"):
        assert report[mode]["images_per_s"] > 0 and report[mode]["command_images_per_s"] > 0
        assert 0 <= report[mode]["data_wait_share"] < 1
    assert report["images_per_run"] == 8 and report["cache_build_s"] > 0 and report["cache_speedup"] > 0


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="adapters"):
        bench.bench_step(bench.BenchSettings(model="x", adapters=("qlora",)))
    with pytest.raises(ConfigError, match="steps"):
        bench.bench_step(bench.BenchSettings(model="x", steps=0))


@pytest.mark.slow
def test_bench_step_end_to_end(tiny_sd):
    report = bench.bench_step(bench.BenchSettings(model=str(tiny_sd), adapters=("lora",), steps=4, warmup=1, threads=1))
    assert set(report["results"]["lora"]) == {"sft", "kto_matched", "kto_mismatched", "kto_amortized"}
    assert set(report["targets"]) == {f"lora.{kind}.kto_{mode}" for kind in ("time", "peak_mem")
                                      for mode in ("matched", "mismatched", "amortized")}

"""The in-training loader benchmark: real engine sessions per loader, the auto check, the in-loop clocks."""

from __future__ import annotations

from benchmarks.bench_train_loaders import QUICK, TrainLoaderBenchmark
from benchmarks.harness import BENCHMARKS


def test_train_loaders_is_registered():
    import benchmarks.bench_train_loaders  # noqa: F401

    assert BENCHMARKS.get("train_loaders") is TrainLoaderBenchmark


def test_each_variant_is_a_training_session_and_auto_is_checked():
    bench = TrainLoaderBenchmark()
    bench.notes = {}
    bench.setup({**QUICK, "images": 24, "device": "cpu"})
    try:
        for variant in ("naive_w2", "resident", "auto"):
            run = bench.prepare(variant)
            run.recording = True
            run()
            assert 0 <= bench.metrics(variant)["data_wait_share"] <= 1
        assert bench.notes["naive_w2"] == "naive, 2 worker(s)"
        assert bench.notes["auto"].startswith("resident")  # 24 small images fit in memory
        times = {"naive_w2": 3.0, "resident": 1.0, "auto": 1.05}
        derived = bench.derived({"variants": {k: {"best_median_s": v} for k, v in times.items()}})
        assert derived["fastest"] == "resident"
        assert derived["targets"][0]["passed"]  # within AUTO_TOLERANCE of the fastest
    finally:
        bench.teardown()

"""Log records and plain log lines carry throughput, peak GPU memory (CUDA) and the ETA."""

from __future__ import annotations

from kfac_train.app import train
from kfac_train.engine.outputs import read_metrics
from kfac_train.loggers.console import format_duration, format_record

from .conftest import FAST, compose_config


def test_train_records_have_samples_per_second_and_an_eta(tmp_path):
    train(
        compose_config(
            [*FAST, "trainer.max_steps=4", "trainer.log_every=2", f"output_dir={tmp_path}"]
        )
    )
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        # 2 steps of batch 64 in the window
        expected = 64 / record["step_time"]
        assert abs(record["samples_per_s"] - expected) < 1e-6 * expected
        assert "peak_memory_gib" not in record  # CPU run
    assert records[0]["eta_s"] > 0 and records[1]["eta_s"] == 0


def test_the_plain_line_shows_throughput_memory_and_eta():
    line = format_record(
        {
            "step": 120,
            "total_steps": 500,
            "epoch": 1.85,
            "loss": 0.312,
            "lr": 0.0912,
            "step_time": 0.011,
            "tokens_per_s": 5818.2,
            "peak_memory_gib": 3.2,
            "eta_s": 3725.0,
        }
    )
    assert line.endswith("0.011 s/step | 5818 tokens/s | mem 3.20 GiB | ETA 1h02m")
    assert [format_duration(s) for s in (4.9, 425, 190000)] == ["4s", "7m05s", "2d04h"]

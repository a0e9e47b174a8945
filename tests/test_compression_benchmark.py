"""``python -m benchmarks.codecs`` runs end to end and writes the fields issue 2 asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELDS = (
    "operator",
    "params",
    "d",
    "encode_mb_s",
    "decode_mb_s",
    "roundtrip_mb_s",
    "copy_mb_s",
    "bits_per_coord_measured",
    "bits_per_coord_predicted",
    "bits_per_coord_limit",
    "peak_extra_bytes",
    "break_even_gbit_s",
    "dense_float_bytes",
    "size_ratio_vs_dense_float",
)


@pytest.mark.slow
def test_codecs_benchmark_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "codecs.json"
    specs = ["qsgd:s=1,bucket=4096,norm=l2", "topk:k=30"]
    args = ["--quick", "--sizes", "3000", "--budget", "0.05", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.codecs", *args, "--operators", *specs],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "measured bytes within 2%" in proc.stdout
    records = json.loads(out.read_text())
    assert [(r["spec"], r["d"]) for r in records] == [(s, 3000) for s in specs]
    for r in records:
        for name in FIELDS:
            assert name in r, name
        d = r["d"]
        assert r["bits_per_coord_measured"] == pytest.approx(8 * r["bytes"] / d)
        assert r["within_2pct_of_predicted"]
        assert r["bits_per_coord_limit"] <= r["bits_per_coord_measured"]
        assert r["dense_float_bytes"] == 4 * d
        assert r["size_ratio_vs_dense_float"] == pytest.approx(4 * d / r["bytes"])
        assert r["encode_mb_s"] > 0 and r["decode_mb_s"] > 0 and r["copy_mb_s"] > 0
        ratio = 4 * d / r["bytes"]
        assert r["break_even_gbit_s"] == pytest.approx(r["roundtrip_mb_s"] * 8e-3 * (1 - 1 / ratio))
        assert isinstance(r["peak_extra_bytes"], int) and r["peak_extra_bytes"] >= 0
    qsgd = records[0]
    assert qsgd["dense_code_symbol_bits_per_coord"] == pytest.approx(
        8 * ((3000 + 4) // 5) / 3000, abs=64 * 8 / 3000
    )


def test_codecs_benchmark_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.codecs", "--operators", "gzip", "--no-memory"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown compressor" in proc.stderr

"""benchmarks/bench_family.py --quick runs and prints its markdown tables with ratios to Mamba (a smoke test of
the script at tiny sizes; its figures are not read)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_family  # noqa: E402


def test_quick_run_prints_both_tables_with_ratios_to_mamba(tmp_path, capsys):
    out = tmp_path / "family.json"
    assert bench_family.main(["--quick", "--threads", "1", "--mixers", "mamba", "rwkv7", "hyena",
                              "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| mixer | L | forward ms | vs Mamba | forward MB | fwd+bwd ms | vs Mamba | fwd+bwd MB |" in text
    assert "| mixer | decode ms/token | vs Mamba |" in text
    for mixer in ("mamba", "rwkv7", "hyena"):
        assert f"| {mixer} | 64 |" in text and f"| {mixer} | 128 |" in text
    assert "| mamba | 64 | " in text and "1.00x" in text
    assert out.exists()

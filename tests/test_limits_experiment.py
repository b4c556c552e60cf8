"""experiments/limits.py --needle --quick runs from its command and writes the table, JSON and plot it promises
(issue 17, item 1c). The full sweep is minutes of training per point and is run by hand, not here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a subprocess that trains three small models (about a minute on one shared core)
def test_needle_quick_run_writes_its_results(tmp_path):
    out = tmp_path / "needle.json"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "limits.py"), "--needle", "--quick",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["experiment"] == "limits_needle" and result["quick"] is True
    assert result["lengths"] == [64] and result["depths"] == [0.0, 1.0]
    assert set(result["needle"]) == {"mamba", "transformer", "hybrid"}
    for name, by_length in result["needle"].items():
        point = by_length["64"]
        assert set(point["by_depth"]) == {"0.0", "1.0"}
        for scores in point["by_depth"].values():
            assert 0.0 <= scores["exact_match"] <= scores["accuracy"] <= 1.0  # a whole value right: each digit right
        assert point["steps"] >= 20 and point["params"] > 0
    for table in ("exact_match", "digit_accuracy", "by_depth"):
        assert "| hybrid |" in result["tables"][table]
        assert result["tables"][table] in proc.stdout  # the printed table is the recorded one
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert out.with_suffix(".png").stat().st_size > 0

"""experiments/limits.py --needle --quick runs from its command and writes the table, JSON and plot it promises
(issue 17, item 1c). The full sweep is minutes of training per point and is run by hand, not here."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace
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


def _limits_module(monkeypatch):
    # experiments/ and benchmarks/ each have a module named "common": drop whichever another test imported
    # (monkeypatch puts it back afterwards), so that limits.py gets the experiments' one
    for name in ("common", "limits"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import limits

    return limits


def test_every_point_trains_on_the_requested_device_for_the_requested_steps(monkeypatch):
    limits = _limits_module(monkeypatch)
    seen = {}

    def fake_train(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")  # only the arguments matter

    monkeypatch.setattr(limits, "train_for_budget", fake_train)
    args = SimpleNamespace(budget=5.0, batch_size=64, threads=1, seed=0, device="cuda", steps=4000)
    with pytest.raises(RuntimeError, match="stop here"):
        limits.one_point("mqar_kv4_mamba", "mqar", {}, limits.model_spec("mamba"), args)
    assert (seen["device"], seen["steps"], seen["batch_size"]) == ("cuda", 4000, 64)


def test_per_point_names_fixed_steps_or_the_time_budget(monkeypatch):
    limits = _limits_module(monkeypatch)
    assert limits.per_point({"steps_per_point": 4000, "batch_size": 64, "budget_per_point_s": None}) \
        == "4000 steps of batch 64 per point"
    assert limits.per_point({"steps_per_point": None, "budget_per_point_s": 90.0}) == "90.0 s per point"

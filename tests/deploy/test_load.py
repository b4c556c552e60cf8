"""A bounded localhost load test: concurrent streaming clients against the server (benchmarks/bench_serve.py's
client), every request answered in full, and the figures the benchmark reports are computed."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from ssmkit import ModelConfig, from_config  # noqa: E402
from ssmkit.deploy.serve import BackgroundServer, create_app  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_serve import run_load  # noqa: E402


@pytest.mark.parametrize("clients", [1, 8])
def test_concurrent_streaming_clients(tmp_path, clients):
    model = from_config(ModelConfig(d_model=32, n_layers=2, vocab_size=256, mixer="mamba",
                                    mixer_kwargs={"d_state": 8})).eval()
    app = create_app(model, tmp_path)
    with BackgroundServer(app) as server:
        row = run_load(server.url, clients, requests=2, prompt=list(b"load test"), max_tokens=6, time_limit_s=60)
    assert row["n_errors"] == 0, row["errors"]
    assert row["tokens"] == clients * 2 * 6
    assert row["tokens_per_s"] > 0 and row["ttft_p50_ms"] <= row["ttft_p99_ms"]
    assert row["itl_p50_ms"] <= row["itl_p99_ms"]


# Whole module: subprocesses, exports or many drawn cases (tens of seconds); `make test` and CI run it,
# `make test-fast` does not.
pytestmark = pytest.mark.slow

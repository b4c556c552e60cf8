"""`ssmkit export` and `ssmkit serve` end to end, as the README's Deploy section runs them."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssmkit import ModelConfig, from_config
from ssmkit.cli import main
from ssmkit.deploy.export import ExportedRecurrence


@pytest.fixture
def checkpoint(tmp_path):
    config = ModelConfig(d_model=32, n_layers=2, vocab_size=256, mixer="MD",
                         mixer_kwargs={"mamba": {"d_state": 8}, "mamba2": {"d_state": 16, "headdim": 16}})
    model = from_config(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def test_export_command(checkpoint, tmp_path, capsys):
    fmt = "pt2"  # the ONNX path of export_recurrence is held to eager in test_export.py
    path, model = checkpoint
    assert main(["export", "--checkpoint", str(path), "--format", fmt, "--prefill-chunk", "4", str(tmp_path / fmt)]) == 0
    assert "manifest.json" in capsys.readouterr().out
    prompt = torch.tensor([list(b"abcdefg")])
    tokens, _ = ExportedRecurrence(tmp_path / fmt).generate(prompt, 10)
    assert torch.equal(tokens, model.generate(prompt, 10).new_tokens)


def test_export_command_refuses_attention(tmp_path, capsys):
    from_config(ModelConfig(d_model=16, n_layers=1, vocab_size=10, mixer="attention")).save_pretrained(tmp_path / "a")
    assert main(["export", "--checkpoint", str(tmp_path / "a"), "--format", "pt2", str(tmp_path / "out")]) == 2
    assert "grows with the sequence" in capsys.readouterr().err


def test_serve_command(checkpoint, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    path, model = checkpoint
    with socket.socket() as s:  # a free port (the server binds it a moment later)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "ssmkit", "serve", "--checkpoint", str(path), "--port", str(port),
                             "--session-dir", str(tmp_path / "sessions"), "--threads", "1"], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        # the README's curl call, as written there
        readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
        body = json.loads(re.search(r"curl -s localhost:8000/v1/completions .* -d '(\{.*?\})'", readme).group(1))
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        prompt = torch.tensor([list(body["prompt"].encode())])
        expected = model.generate(prompt, body["max_tokens"]).new_tokens[0].tolist()
        assert r.json()["choices"][0]["token_ids"] == expected
        assert (tmp_path / "sessions" / f"{body['session_id']}.safetensors").exists()
        assert json.loads(httpx.get(url + "/health", timeout=5).text)["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(60)

"""The completions server on a free 127.0.0.1 port: answers, streaming, batching, sessions across restarts,
crash-safe session files, and 4xx (never 500) for bad requests."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from ssmkit import ModelConfig, from_config  # noqa: E402
from ssmkit.deploy.serve import BackgroundServer, ServerLimits, create_app  # noqa: E402
from ssmkit.deploy.sessions import SessionStore, model_fingerprint  # noqa: E402

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_layers=2, vocab_size=256, mixer="MS",
                         mixer_kwargs={"mamba": {"d_state": 8}, "s4d": {"d_state": 16}})
    return from_config(config).eval()


def complete(server, **body):
    return httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT)


def stream(server, **body):
    tokens, finish = [], None
    with httpx.stream("POST", server.url + "/v1/completions", json=dict(body, stream=True), timeout=TIMEOUT) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[len("data: "):])["choices"][0]
        tokens += choice["token_ids"]
        finish = choice["finish_reason"] or finish
    return tokens, finish


def test_completion_matches_generate(model, tmp_path):
    prompt = list(b"hello there")
    expected = model.generate(torch.tensor([prompt]), 12).new_tokens[0].tolist()
    with BackgroundServer(create_app(model, tmp_path)) as server:
        r = complete(server, prompt="hello there", max_tokens=12, temperature=0)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == expected
        assert choice["finish_reason"] == "length"
        assert r.json()["usage"] == {"prompt_tokens": 11, "completion_tokens": 12, "total_tokens": 23}
        assert stream(server, prompt=prompt, max_tokens=12, temperature=0) == (expected, "length")
        # sampling with a seed is reproducible and equals generate's draw for that seed
        sampled = complete(server, prompt=prompt, max_tokens=8, temperature=0.9, top_p=0.9, seed=3).json()
        reference = model.generate(torch.tensor([prompt]), 8, do_sample=True, temperature=0.9, top_p=0.9, seed=3)
        assert sampled["choices"][0]["token_ids"] == reference.new_tokens[0].tolist()


def test_concurrent_requests_share_decode_steps(model, tmp_path):
    """8 streams at once: each gets exactly what it gets alone, and they were decoded in shared steps."""
    prompts = [list(f"prompt number {i}".encode()) for i in range(8)]
    expected = [model.generate(torch.tensor([p]), 10).new_tokens[0].tolist() for p in prompts]
    results = [None] * 8
    app = create_app(model, tmp_path)
    with BackgroundServer(app) as server:
        def client(i):
            results[i] = stream(server, prompt=prompts[i], max_tokens=10, temperature=0)[0]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        steps = app.state.engine.steps
    assert results == expected
    assert steps < 8 * 10, f"{steps} decode steps for 8 requests of 10 tokens: no batching happened"


def test_session_continues_across_restart(model, tmp_path):
    """A session continued after a restart gives exactly the tokens it gives without one (and that the
    library gives when the state is carried by hand)."""
    first, second = list(b"The cat"), list(b" sat on")
    out = model.generate(torch.tensor([first]), 6, return_state=True)
    expected = model.generate(torch.tensor([second]), 6, state=out.state).new_tokens[0].tolist()

    with BackgroundServer(create_app(model, tmp_path / "a")) as server:
        assert complete(server, prompt=first, max_tokens=6, temperature=0, session_id="s1").status_code == 200
        unbroken = complete(server, prompt=second, max_tokens=6, temperature=0, session_id="s1").json()
    with BackgroundServer(create_app(model, tmp_path / "b")) as server:
        assert complete(server, prompt=first, max_tokens=6, temperature=0, session_id="s1").status_code == 200
    with BackgroundServer(create_app(model, tmp_path / "b", ServerLimits(max_sessions_in_memory=1))) as server:
        resumed = complete(server, prompt=second, max_tokens=6, temperature=0, session_id="s1").json()
    assert unbroken["choices"][0]["token_ids"] == expected
    assert resumed["choices"][0]["token_ids"] == expected


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": [1, 256]}).encode(), 400, "vocab_size=256"),
    (json.dumps({"prompt": [-1]}).encode(), 400, "vocab_size=256"),
    (json.dumps({"prompt": []}).encode(), 400, "prompt is empty"),
    (json.dumps({"prompt": "x", "max_tokens": 10_000}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "n": 2}).encode(), 400, "unknown fields"),
    (json.dumps({"prompt": "x", "session_id": "../etc"}).encode(), 400, "session_id"),
    (json.dumps({"prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"prompt": {"a": 1}}).encode(), 400, "prompt must be"),
    (json.dumps({"prompt": "x" * 5000}).encode(), 413, "max_request_bytes"),
]


@pytest.mark.parametrize("raw,status,message", BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_a_message(model, tmp_path, raw, status, message):
    limits = ServerLimits(max_new_tokens=64, max_request_bytes=4096)
    with BackgroundServer(create_app(model, tmp_path, limits)) as server:
        r = httpx.post(server.url + "/v1/completions", content=raw, timeout=TIMEOUT,
                       headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert message in r.json()["error"]["message"]
        assert complete(server, prompt="ok", max_tokens=2).status_code == 200  # and the server still works


def test_session_limit_and_unknown_route(model, tmp_path):
    with BackgroundServer(create_app(model, tmp_path, ServerLimits(max_sessions=1))) as server:
        assert complete(server, prompt="a", max_tokens=1, session_id="one").status_code == 200
        r = complete(server, prompt="a", max_tokens=1, session_id="two")
        assert r.status_code == 429 and "max_sessions=1" in r.json()["error"]["message"]
        assert complete(server, prompt="a", max_tokens=1, session_id="one").status_code == 200
        assert httpx.get(server.url + "/v1/nothing", timeout=TIMEOUT).status_code == 404


def test_request_timeout_is_408_and_keeps_the_previous_session(model, tmp_path):
    with BackgroundServer(create_app(model, tmp_path, ServerLimits(request_timeout_s=0.0))) as server:
        r = complete(server, prompt="a", max_tokens=50, session_id="slow")
        assert r.status_code == 408 and "request_timeout_s" in r.json()["error"]["message"]
    assert not (tmp_path / "slow.safetensors").exists()  # nothing half-done was committed


# ----------------------------------------------------------------------------------------------------
def _state(value, n_layers=2):
    return [{"mamba.ssm": torch.full((1, 64, 8), float(value)), "s4d.h": torch.full((1, 32, 8), complex(value, -value))}
            for _ in range(n_layers)]


def test_store_roundtrip_and_memory_cap(tmp_path):
    store = SessionStore(tmp_path, "fp", max_in_memory=2)
    for i in range(4):
        store.commit(f"s{i}", _state(i))
    assert len(store._memory) == 2 and store.count() == 4
    again = SessionStore(tmp_path, "fp").get("s0")
    assert torch.equal(again[1]["s4d.h"], _state(0)[1]["s4d.h"]) and again[1]["s4d.h"].dtype == torch.complex64
    with pytest.raises(ValueError, match="another model"):
        SessionStore(tmp_path, "other").get("s0")


def test_failed_write_keeps_the_previous_version(tmp_path, monkeypatch):
    store = SessionStore(tmp_path, "fp")
    store.commit("s", _state(1))

    def crash(*args):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.commit("s", _state(2))
    monkeypatch.undo()
    reopened = SessionStore(tmp_path, "fp")  # a new process: leftovers of the interrupted write are removed
    assert not list(tmp_path.glob("*.tmp"))
    assert float(reopened.get("s")[0]["mamba.ssm"][0, 0, 0]) == 1.0


WRITER = textwrap.dedent("""
    import builtins, sys, time, torch
    from ssmkit.deploy import sessions

    class SlowFile:  # says when it is half-way through a write, and waits there to be killed
        def __init__(self, f):
            self.f = f
        def write(self, data):
            half = len(data) // 2
            self.f.write(data[:half])
            self.f.flush()
            print("writing", flush=True)
            time.sleep(0.01 if version < 3 else 60)
            self.f.write(data[half:])
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()

    sessions.open = lambda *args, **kwargs: SlowFile(builtins.open(*args, **kwargs))
    store = sessions.SessionStore(sys.argv[1], "fp")
    version = 0
    while True:
        version += 1
        store.commit("s", [{"big": torch.full((1, 1024, 1024), float(version))}])  # 4 MB per write
        print(version, flush=True)
""")


def test_killed_mid_spill_loses_no_committed_session(tmp_path):
    """SIGKILL a process half-way through rewriting a session: what is on disk is the last committed version,
    whole (with a write in place instead of temp file + rename this fails: the file is half new, half cut)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        committed = 0
        while True:
            line = proc.stdout.readline().strip()
            assert line, "the writer died"
            if line == "writing" and committed >= 2:
                break  # half of version 3 is written: kill it now
            if line != "writing":
                committed = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
    state = SessionStore(tmp_path, "fp").get("s")
    values = state[0]["big"].unique()
    assert values.numel() == 1 and int(values) == committed == 2


# Whole module: subprocesses, exports or many drawn cases (tens of seconds); `make test` and CI run it,
# `make test-fast` does not.
pytestmark = pytest.mark.slow

"""Load on ``ssmkit serve`` (localhost only, bounded in count and time) and transformers' Mamba as a reference.

N concurrent streaming clients (default N = 1, 8, 32) each send ``--requests`` completions of ``--max-tokens``
tokens one after the other to a server started here on a free 127.0.0.1 port (``python -m ssmkit serve``, a
subprocess, so clients and server do not share an interpreter). Reported per N: aggregate tokens/s over the
wall time, p50/p99 time to first token, p50/p99 inter-token latency, and errors.

Reference: the same model's weights in transformers' MambaForCausalLM, generating N streams as one batch in a
plain ``generate`` loop (greedy, same prompt and token counts): its tokens/s is what a server without
continuous batching could do at best with N streams that arrive together.

    python benchmarks/bench_serve.py                                  # 10m bytes Mamba, N = 1 8 32
    python benchmarks/bench_serve.py --shape tiny --clients 1 8 --requests 2 --max-tokens 8   # correctness run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

SHAPES = {"10m": dict(d_model=384, n_layers=10, vocab_size=256), "tiny": dict(d_model=32, n_layers=2, vocab_size=256)}


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def _one_client(client, url, prompt, max_tokens, requests, record, deadline):
    for _ in range(requests):
        if time.monotonic() > deadline:
            return
        start = time.perf_counter()
        arrivals = []
        try:
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
            async with client.stream("POST", url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    record["errors"].append(f"HTTP {response.status_code}")
                    continue
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choice = json.loads(line[6:]).get("choices", [{}])[0]
                        if choice.get("token_ids"):
                            arrivals.append(time.perf_counter())
        except Exception as error:  # noqa: BLE001 - a load test counts failures
            record["errors"].append(repr(error))
            continue
        if arrivals:
            record["ttft"].append(arrivals[0] - start)
            record["itl"].extend(b - a for a, b in zip(arrivals, arrivals[1:]))
            record["tokens"] += len(arrivals)


def run_load(url: str, clients: int, requests: int, prompt, max_tokens: int, time_limit_s: float = 120.0) -> dict:
    """``clients`` concurrent streaming clients, ``requests`` each, against ``url`` (bounded by time_limit_s)."""
    import httpx

    async def main():
        record = {"ttft": [], "itl": [], "tokens": 0, "errors": []}
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        deadline = time.monotonic() + time_limit_s
        async with httpx.AsyncClient(timeout=time_limit_s, limits=limits) as client:
            start = time.perf_counter()
            await asyncio.gather(*(_one_client(client, url, prompt, max_tokens, requests, record, deadline)
                                   for _ in range(clients)))
            wall = time.perf_counter() - start
        return record, wall

    record, wall = asyncio.run(main())
    return {"clients": clients, "requests": clients * requests, "tokens": record["tokens"], "wall_s": wall,
            "tokens_per_s": record["tokens"] / wall if wall > 0 else 0.0,
            "ttft_p50_ms": percentile(record["ttft"], 50) * 1e3, "ttft_p99_ms": percentile(record["ttft"], 99) * 1e3,
            "itl_p50_ms": percentile(record["itl"], 50) * 1e3, "itl_p99_ms": percentile(record["itl"], 99) * 1e3,
            "errors": record["errors"][:5], "n_errors": len(record["errors"])}


def start_server(checkpoint: Path, session_dir: Path, threads: int, max_batch: int):
    """``python -m ssmkit serve`` on a free 127.0.0.1 port; returns (process, url) once /health answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "ssmkit", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), "--session-dir", str(session_dir), "--threads", str(threads),
                             "--max-batch", str(max_batch)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


@torch.no_grad()
def reference_hf(model, clients: int, prompt_ids, max_tokens: int) -> dict:
    """transformers' Mamba with the same weights: N streams as one batch through ``generate``."""
    import transformers

    cfg = model.config
    hf_config = transformers.MambaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                                         state_size=cfg.kwargs_for("mamba").get("d_state", 16),
                                         num_hidden_layers=cfg.n_layers, use_mambapy=False, tie_word_embeddings=True)
    hf = transformers.MambaForCausalLM(hf_config).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    ids = torch.tensor([prompt_ids] * clients)
    mask = torch.ones_like(ids)
    hf.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    wall = time.perf_counter() - start
    return {"clients": clients, "tokens": clients * max_tokens, "wall_s": wall, "tokens_per_s": clients * max_tokens / wall}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="10m", choices=list(SHAPES))
    parser.add_argument("--checkpoint", default=None, help="serve this bytes LM instead of random weights")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-bytes", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server (and the reference)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per N, at most")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers' Mamba")
    parser.add_argument("--out", default="outputs/bench_serve.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ssmkit import ModelConfig, from_config, from_pretrained

    if args.checkpoint:
        model = from_pretrained(args.checkpoint).eval()
    else:
        torch.manual_seed(0)
        model = from_config(ModelConfig(mixer="mamba", **SHAPES[args.shape])).eval()
    prompt = (Path(__file__).resolve().parents[1] / "README.md").read_bytes()[: args.prompt_bytes]
    prompt_ids = list(prompt)
    rows, reference = [], []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "model"
        if not args.checkpoint:
            model.save_pretrained(checkpoint)
        proc, url = start_server(checkpoint, Path(tmp) / "sessions", args.threads, max(args.clients))
        try:
            run_load(url, 1, 1, prompt_ids, 4, args.time_limit)  # warm-up
            for n in args.clients:
                row = run_load(url, n, args.requests, prompt_ids, args.max_tokens, args.time_limit)
                rows.append(row)
                print(f"  ssmkit serve  N={n:3}: {row['tokens_per_s']:8.1f} tok/s, TTFT p50/p99 "
                      f"{row['ttft_p50_ms']:7.1f}/{row['ttft_p99_ms']:7.1f} ms, inter-token p50/p99 "
                      f"{row['itl_p50_ms']:6.1f}/{row['itl_p99_ms']:6.1f} ms, errors {row['n_errors']}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    if not args.no_reference and model.config.layer_mixers() == ["mamba"] * model.config.n_layers:
        for n in args.clients:
            ref = reference_hf(model, n, prompt_ids, args.max_tokens)
            reference.append(ref)
            print(f"  transformers Mamba, batch {n:3}: {ref['tokens_per_s']:8.1f} tok/s", flush=True)
    write_json(args.out, dict(machine=machine_info(args.threads), args=vars(args), rows=rows, reference=reference))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

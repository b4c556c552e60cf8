"""``ssmkit bench``: time every registered mixer here, parallel pass and recurrent step, same sizes.

A quick look at this machine; the comparisons against other libraries live in ``benchmarks/`` (they need
the peers installed and build them on the same weights in one process).
"""

from __future__ import annotations

import statistics
import time
from typing import List, Optional

import torch

from .layers import MIXERS, build_mixer

# Sizes that give each mixer its usual shape at a given d_model
_KWARGS = {"mamba2": dict(headdim=32, d_state=64), "attention": dict(n_heads=8), "linear_attention": dict(n_heads=8)}


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_bench(mixers: Optional[List[str]] = None, d_model: int = 256, length: int = 2048, batch: int = 1,
              threads: Optional[int] = None) -> list:
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    names = mixers or sorted(MIXERS)
    unknown = [n for n in names if n not in MIXERS]
    if unknown:
        raise ValueError(f"unknown mixers {unknown}; known: {sorted(MIXERS)}")
    print(f"d_model {d_model}, length {length}, batch {batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'mixer':18} {'params':>9} {'forward ms':>11} {'us/token':>9} {'fwd+bwd ms':>11} {'step ms':>8}")
    rows = []
    for name in names:
        torch.manual_seed(0)
        layer = build_mixer(name, d_model, **_KWARGS.get(name, {}))
        x = torch.randn(batch, length, d_model)
        with torch.no_grad():
            fwd = _median_seconds(lambda: layer(x))

        def fwd_bwd():
            layer(x.requires_grad_(True)).sum().backward()
            layer.zero_grad(set_to_none=True)

        both = _median_seconds(fwd_bwd)
        with torch.no_grad():
            state = layer(x[:, :64], return_state=True)[1]
            x_t = x[:, 0]
            step = _median_seconds(lambda: layer.step(x_t, state), repeats=20)
        params = sum(p.numel() for p in layer.parameters())
        rows.append(dict(mixer=name, params=params, forward_ms=fwd * 1e3, fwd_bwd_ms=both * 1e3, step_ms=step * 1e3))
        print(f"{name:18} {params:>9} {fwd * 1e3:>11.1f} {fwd / (batch * length) * 1e6:>9.2f} {both * 1e3:>11.1f} "
              f"{step * 1e3:>8.3f}")
    return rows


def run_decode_bench(mixers: Optional[List[str]] = None, d_model: int = 256, n_layers: int = 4, vocab: int = 256,
                     batch: int = 1, quantize: Optional[str] = None, threads: Optional[int] = None,
                     steps: int = 20) -> list:
    """ms per generated token of a small language model, through ``model.step`` and the fused decoder
    (float32, and the int8-quantised model when ``quantize="int8"``); the fused rows need the C++ kernels."""
    import copy

    from .models import ModelConfig, SSMModel
    from .models.decoding import FusedDecoder
    from .models.quantization import quantize as quantize_model

    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    names = mixers or ["mamba", "mamba2"]
    print(f"decoding: d_model {d_model}, {n_layers} layers, vocab {vocab}, batch {batch}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'mixer':10} {'path':18} {'ms/token':>9}")
    rows = []
    for name in names:
        if name not in ("mamba", "mamba2"):
            raise ValueError(f"decoding benchmark covers mamba and mamba2; got {name!r}")
        torch.manual_seed(0)
        kwargs = {"mamba2": dict(headdim=32, d_state=64)} if name == "mamba2" else {}
        model = SSMModel(ModelConfig(d_model=d_model, n_layers=n_layers, vocab_size=vocab, mixer=name,
                                     mixer_kwargs=kwargs)).eval()
        paths = [("module fp32", model.step), ("fused fp32", FusedDecoder(model).step)]
        if quantize:
            quantized = quantize_model(copy.deepcopy(model), quantize)
            paths += [(f"module {quantize}", quantized.step), (f"fused {quantize}", FusedDecoder(quantized).step)]
        state = model.init_state(batch)
        token = torch.zeros(batch, dtype=torch.long)

        def run(step):
            s = state
            for _ in range(steps):
                _, s = step(token, s)

        for path, step in paths:
            with torch.no_grad():
                seconds = _median_seconds(lambda: run(step)) / steps
            rows.append(dict(mixer=name, path=path, ms_per_token=seconds * 1e3))
            print(f"{name:10} {path:18} {seconds * 1e3:>9.3f}")
    return rows

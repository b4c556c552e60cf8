"""ssmkit's GPU paths vs the kernels a GPU user would otherwise install, on the same inputs and weights.

Peers (built on the device from their sources, see ../shared/gpu-peers/README.md; never part of ssmkit):
  selective scan   mamba_ssm's CUDA ``selective_scan_fn``        vs ssmkit ``selective_scan(backend="triton")``
  SSD              mamba_ssm's Triton ``mamba_chunk_scan_combined`` vs ssmkit ``ssd(backend="triton")``
  causal conv1d    causal_conv1d's CUDA ``causal_conv1d_fn``    vs ssmkit ``causal_conv1d(backend="triton")``
  layers           mamba_ssm's ``Mamba`` / ``Mamba2`` modules    vs ssmkit ``Mamba`` / ``Mamba2`` (same weights)
  generation       mamba_ssm's ``MambaLMHeadModel.generate(cg=True)`` and a Transformer vs ``model.generate()``

Every pair is checked numerically (relative error of the output) before it is timed; times are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed), bf16 inputs, forward and forward+backward. The ratio
printed is peer time / ssmkit time: above 1 means ssmkit is faster.

    python benchmarks/gpu_peers.py --peers .peers --out $OUT            # all sections
    python benchmarks/gpu_peers.py --sections scan --lengths 2048 8192 --batches 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEV, BF16 = "cuda", torch.bfloat16


def add_peers(peers: Path) -> None:
    for p in ("/tmp/ext/ss", "/tmp/ext/cc", str(peers / "mamba"), str(peers / "causal_conv1d")):
        if p not in sys.path:
            sys.path.insert(0, p)


def bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median")


def rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def time_pair(name, row, ours, theirs, inputs, results):
    """Check ours(*inputs) against theirs(*inputs), then time both forward and forward+backward."""
    with torch.no_grad():
        err = rel(ours(*inputs), theirs(*inputs))
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    with torch.no_grad():
        grad = torch.randn_like(ours(*inputs))
    out = {"section": name, **row, "rel_err": err}
    for label, fn in (("ours", ours), ("peer", theirs)):
        with torch.no_grad():
            out[f"{label}_fwd_ms"] = bench(lambda: fn(*inputs))

        def fwd_bwd():
            fn(*inputs).backward(grad)
        out[f"{label}_fwdbwd_ms"] = bench(fwd_bwd, grad_to_none=leaves)
    out["ratio_fwd"] = out["peer_fwd_ms"] / out["ours_fwd_ms"]
    out["ratio_fwdbwd"] = out["peer_fwdbwd_ms"] / out["ours_fwdbwd_ms"]
    results.append(out)
    shape = " ".join(f"{k}={v}" for k, v in row.items())
    print(f"{name:8} {shape:32} err {err:.1e} | fwd {out['ours_fwd_ms']:8.3f} vs {out['peer_fwd_ms']:8.3f} ms "
          f"({out['ratio_fwd']:.2f}x) | fwd+bwd {out['ours_fwdbwd_ms']:8.3f} vs {out['peer_fwdbwd_ms']:8.3f} ms "
          f"({out['ratio_fwdbwd']:.2f}x)", flush=True)
    torch.cuda.empty_cache()


def leaf(*shape, scale=1.0, dtype=BF16):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype).requires_grad_()


def section_scan(args, results):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    from ssmkit.ops import selective_scan

    N = 16
    for dim in args.dims:
        for batch in args.batches:
            for L in args.lengths:
                A = (-torch.arange(1, N + 1, device=DEV, dtype=torch.float32).repeat(dim, 1)).requires_grad_()
                inputs = [leaf(batch, dim, L), leaf(batch, dim, L, scale=0.5), A, leaf(batch, N, L),
                          leaf(batch, N, L), leaf(dim, dtype=torch.float32), leaf(batch, dim, L),
                          (torch.randn(dim, device=DEV) * 0.5 - 3.0).requires_grad_()]

                def ours(u, d, A, B, C, D, z, bias):
                    return selective_scan(u, d, A, B, C, D, z, bias, delta_softplus=True, backend="triton")

                def theirs(u, d, A, B, C, D, z, bias):
                    return selective_scan_fn(u, d, A, B, C, D, z, bias, delta_softplus=True)
                time_pair("scan", dict(dim=dim, batch=batch, L=L), ours, theirs, inputs, results)


def section_ssd(args, results):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    from ssmkit.ops import ssd

    heads, hd = 32, 64
    for N in (64, 128):
        for batch in args.batches:
            for L in args.lengths:
                inputs = [leaf(batch, L, heads, hd), leaf(batch, L, heads, scale=0.5),
                          (-torch.rand(heads, device=DEV) * 15 - 1).requires_grad_(), leaf(batch, L, 1, N),
                          leaf(batch, L, 1, N), torch.ones(heads, device=DEV, requires_grad=True),
                          (torch.randn(heads, device=DEV) * 0.5 - 3.0).requires_grad_()]

                def ours(x, dt, A, B, C, D, dt_bias):
                    return ssd(x, dt, A, B, C, 256, D=D, dt_bias=dt_bias, dt_softplus=True, backend="triton")

                def theirs(x, dt, A, B, C, D, dt_bias):
                    return mamba_chunk_scan_combined(x, dt, A, B, C, 256, D=D, dt_bias=dt_bias, dt_softplus=True)
                time_pair("ssd", dict(N=N, batch=batch, L=L), ours, theirs, inputs, results)


def section_conv(args, results):
    from causal_conv1d import causal_conv1d_fn

    from ssmkit.ops.conv1d import causal_conv1d

    dim, width = 4096, 4
    for batch in args.batches:
        for L in args.lengths:
            inputs = [leaf(batch, dim, L), leaf(dim, width), leaf(dim)]

            def ours(x, w, b):
                return causal_conv1d(x, w, b, activation="silu", backend="triton")

            def theirs(x, w, b):
                return causal_conv1d_fn(x, w, b, activation="silu")
            time_pair("conv1d", dict(dim=dim, batch=batch, L=L), ours, theirs, inputs, results)


def section_layers(args, results):
    from mamba_ssm.modules.mamba2 import Mamba2 as TheirMamba2
    from mamba_ssm.modules.mamba_simple import Mamba as TheirMamba

    from ssmkit.layers import Mamba, Mamba2

    for kind, theirs_cls, ours_cls, kw in (("mamba", TheirMamba, Mamba, dict(d_state=16)),
                                            ("mamba2", TheirMamba2, Mamba2, dict(d_state=128, headdim=64))):
        for d_model in args.d_models:
            for L in args.layer_lengths:
                torch.manual_seed(0)
                theirs = theirs_cls(d_model, **kw).to(DEV)
                ours = ours_cls(d_model, **kw).to(DEV)
                ours.load_state_dict(theirs.state_dict())
                ours.backend = "triton"
                x = leaf(args.layer_batch, L, d_model, dtype=torch.float32)

                def run(module):
                    def f(x):
                        with torch.autocast("cuda", dtype=BF16):
                            return module(x)
                    return f
                time_pair(kind, dict(d_model=d_model, batch=args.layer_batch, L=L), run(ours), run(theirs), [x],
                          results)
                del theirs, ours


def _timed(fn):
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def section_generation(args, results):
    """``model.generate()`` (ssmkit's library call: CUDA-graph decoding by default on a GPU) vs mamba_ssm's
    ``MambaLMHeadModel.generate(..., cg=True)`` on the same weights (written by mamba_ssm, read back by
    ``ssmkit.from_pretrained``), and vs a same-size Transformer (static KV cache, flash attention for the
    prompt, one CUDA graph per step: ``benchmarks/gpu_bench.py``). Greedy, bf16. "decode" = generation time
    minus the prompt pass, timed separately for each model."""
    import tempfile

    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    import ssmkit

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_bench

    vocab, P, new = 50277, args.prompt, args.new_tokens
    shapes = {"130m": (768, 24, dict(d_model=768, n_layers=12, heads=12)),
              "1.4b": (2048, 48, dict(d_model=2048, n_layers=24, heads=16))}
    for size in args.gen_sizes:
        d_model, n_layer, tcfg = shapes[size]
        torch.manual_seed(0)
        cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg={}, rms_norm=True,
                          residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)
        theirs = MambaLMHeadModel(cfg, device=DEV, dtype=BF16).eval()
        with tempfile.TemporaryDirectory() as tmp:
            theirs.save_pretrained(tmp)
            ours = ssmkit.from_pretrained(tmp).to(device=DEV, dtype=BF16).eval()
        with torch.device(DEV):
            transformer = gpu_bench.TransformerLM(vocab=50280, **tcfg).to(BF16).eval()
        for batch in args.gen_batches:
            prompt = torch.randint(0, vocab, (batch, P), device=DEV)
            row = dict(section="generation", size=size, batch=batch, prompt=P, new_tokens=new)
            with torch.no_grad():
                err = rel(ours(prompt[:, :256]).logits[..., :vocab], theirs(prompt[:, :256]).logits[..., :vocab])
            row["rel_err_logits"] = err
            try:
                # warm-up calls compile the kernels and record the graphs of this batch size
                ours.generate(prompt, new)
                theirs.generate(prompt, max_length=P + new, cg=True, top_k=1)
                out_ours, t_ours = _timed(lambda: ours.generate(prompt, new))
                assert ours.last_decode_backend == "cuda_graph", ours.last_decode_backend_reason
                out_theirs, t_theirs = _timed(lambda: theirs.generate(prompt, max_length=P + new, cg=True, top_k=1))
                with torch.no_grad():
                    _, pre_ours = _timed(lambda: ours.prefill(list(prompt)))
                    _, pre_theirs = _timed(lambda: theirs(prompt, num_last_tokens=1))
                theirs_new = out_theirs[:, P:] if isinstance(out_theirs, torch.Tensor) else out_theirs.sequences[:, P:]
                agree = (out_ours.new_tokens[:, :8] == theirs_new[:, :8]).float().mean().item()
                gpu_bench.generate(transformer, "transformer", prompt[:, :64], 4)
                _, pre_t, dec_t = gpu_bench.generate(transformer, "transformer", prompt, new)
                row.update(ours_s=t_ours, theirs_s=t_theirs, ours_prefill_s=pre_ours, theirs_prefill_s=pre_theirs,
                           transformer_prefill_s=pre_t, transformer_decode_s=dec_t,
                           first8_token_agreement=agree)
                tok = batch * new
                row["ours_tok_s"], row["theirs_tok_s"] = tok / t_ours, tok / t_theirs
                row["transformer_tok_s"] = tok / (pre_t + dec_t)
                row["ours_decode_tok_s"] = tok / max(t_ours - pre_ours, 1e-9)
                row["theirs_decode_tok_s"] = tok / max(t_theirs - pre_theirs, 1e-9)
                row["transformer_decode_tok_s"] = tok / dec_t
                print(f"gen {size} b{batch}: err {err:.1e} agree8 {agree:.2f} | e2e tok/s ours {row['ours_tok_s']:.0f} "
                      f"mamba_ssm {row['theirs_tok_s']:.0f} transformer {row['transformer_tok_s']:.0f} | decode tok/s "
                      f"ours {row['ours_decode_tok_s']:.0f} mamba_ssm {row['theirs_decode_tok_s']:.0f} transformer "
                      f"{row['transformer_decode_tok_s']:.0f} | prefill s ours {pre_ours:.3f} mamba_ssm "
                      f"{pre_theirs:.3f} transformer {pre_t:.3f}", flush=True)
            except torch.cuda.OutOfMemoryError:
                row["skipped"] = "out of memory"
                print(f"gen {size} b{batch}: out of memory", flush=True)
            results.append(row)
            torch.cuda.empty_cache()
        del theirs, ours, transformer
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, default=ROOT / ".peers", help="folder with the peers' sources")
    parser.add_argument("--sections", nargs="+", default=["scan", "ssd", "conv", "layers"])
    parser.add_argument("--dims", nargs="+", type=int, default=[2048, 5120])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192, 32768])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--d-models", nargs="+", type=int, default=[1024])
    parser.add_argument("--layer-lengths", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--layer-batch", type=int, default=8)
    parser.add_argument("--gen-sizes", nargs="+", default=["130m", "1.4b"], choices=["130m", "1.4b"])
    parser.add_argument("--gen-batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    add_peers(args.peers)
    import triton

    print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    results = []
    sections = {"scan": section_scan, "ssd": section_ssd, "conv": section_conv, "layers": section_layers,
                "generation": section_generation}
    for name in args.sections:
        try:
            sections[name](args, results)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other sections
            import traceback

            traceback.print_exc()
            print(f"section {name} failed: {type(exc).__name__}: {exc}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_peers.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Mamba / Mamba-2 on the CPU: ssmkit vs transformers (torch path) vs mambapy, same weights, one process.

Every peer is built with the same configuration and loaded with ssmkit's weights (the script checks that
the logits agree before timing), then timed in turn; peak memory is the resident-set growth during the call.

    python benchmarks/bench_mamba.py                      # all sections, 2 threads (about 10 minutes)
    python benchmarks/bench_mamba.py --sections layer --threads 1
    python benchmarks/bench_mamba.py --sections mamba --peers mambapy --lengths 1024 4096

Sections:
  mamba    Mamba 130M shape (d_model 768, 24 layers, vocab 50280): forward and forward+backward
  mamba2   Mamba-2 130M shape (d_model 768, 24 layers, d_state 128, headdim 64): the same
  scaling  ssmkit forward time per token at L = 1k, 4k, 16k (both models)
  layer    one Mamba layer vs its own four matrix products (the floor), forward and forward+backward;
           one Mamba-2 layer vs its in_proj and out_proj (--layer-mixers picks; min of --repeats, >= 5)
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, machine_info, setup, time_call, write_json  # noqa: E402

import ssmkit  # noqa: E402
from ssmkit.models import ModelConfig, SSMModel  # noqa: E402

VOCAB = 50280


def ssmkit_model(kind: str, n_layers: int, backend: str, chunk_size: int = 64) -> SSMModel:
    if kind == "mamba":
        kwargs = {"mamba": dict(d_state=16)}
    else:
        # chunk_size only changes how SSD is computed, not its result: 64 is the fastest on CPUs
        kwargs = {"mamba2": dict(d_state=128, headdim=64, chunk_size=chunk_size)}
    config = ModelConfig(d_model=768, n_layers=n_layers, vocab_size=VOCAB, mixer=kind, mixer_kwargs=kwargs,
                         tie_embeddings=True)
    model = SSMModel(config).eval()
    for layer in model.backbone.layers:  # execution, not architecture: set on the layers, never in the config
        layer.mixer.backend = backend
    return model


def transformers_model(kind: str, ours: SSMModel):
    import transformers

    n_layers = ours.config.n_layers
    if kind == "mamba":
        cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=768, state_size=16, num_hidden_layers=n_layers,
                                       expand=2, conv_kernel=4, use_mambapy=False, tie_word_embeddings=True)
        model = transformers.MambaForCausalLM(cfg)
    else:
        cfg = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=768, state_size=128, num_hidden_layers=n_layers,
                                        expand=2, conv_kernel=4, head_dim=64, num_heads=24, n_groups=1,
                                        chunk_size=256, tie_word_embeddings=True)
        model = transformers.Mamba2ForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def mambapy_model(ours: SSMModel):
    """mambapy's Mamba (its pscan path) inside the same embedding / final norm / tied head as ssmkit's.

    mambapy.lm also imports its Mamba-2 (which needs einops), so the LM shell is built here instead.
    """
    from mambapy.mamba import Mamba, MambaConfig, RMSNorm

    class MambapyLM(torch.nn.Module):
        def __init__(self, n_layers):
            super().__init__()
            cfg = MambaConfig(d_model=768, n_layers=n_layers, d_state=16, expand_factor=2, d_conv=4)
            self.embedding = torch.nn.Embedding(VOCAB, 768)
            self.mamba = Mamba(cfg)
            self.norm_f = RMSNorm(768)
            self.lm_head = torch.nn.Linear(768, VOCAB, bias=False)
            self.lm_head.weight = self.embedding.weight

        def forward(self, ids):
            return self.lm_head(self.norm_f(self.mamba(self.embedding(ids))))

    model = MambapyLM(ours.config.n_layers)
    renamed = {}
    for key, value in ours.state_dict().items():
        key = key.replace("backbone.embeddings.", "embedding.").replace("backbone.layers.", "mamba.layers.")
        key = key.replace("backbone.norm_f.", "norm_f.")
        renamed[key] = value
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def logits_of(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def measure(model, ids, backward: bool, repeats: int):
    """(seconds, peak MB) of one forward (or forward+backward) over ``ids``: a short warm-up call first
    (one-time initialisation, the C++ scan's first load), then ``repeats`` timed calls, the memory sampled
    during the first of them; the median time is returned."""
    import statistics
    import time

    targets = torch.roll(ids, -1, dims=1)

    def run(x, y):
        if backward:
            logits = logits_of(model, x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                logits_of(model, x)

    run(ids[:, :64], targets[:, :64])
    times, peak = [], 0.0
    for i in range(max(1, repeats)):
        gc.collect()
        with PeakMemory() as mem:
            start = time.perf_counter()
            run(ids, targets)
            times.append(time.perf_counter() - start)
        peak = peak or mem.peak_mb
    return statistics.median(times), peak


def section_models(kind, args, results):
    peers = ["ssmkit"] + [p for p in args.peers if not (kind == "mamba2" and p == "mambapy")]
    ours = ssmkit_model(kind, args.layers, args.backend, args.mamba2_chunk)
    models = {"ssmkit": ours}
    if "transformers" in peers:
        models["transformers"] = transformers_model(kind, ours)
    if "mambapy" in peers:
        models["mambapy"] = mambapy_model(ours)
    check = torch.randint(0, VOCAB, (1, 64))
    with torch.no_grad():
        ref = logits_of(ours, check)
        for name, model in models.items():
            diff = (logits_of(model, check)[..., :VOCAB] - ref[..., :VOCAB]).abs().max().item()
            print(f"  [{kind}] {name:12} max |logits - ssmkit| = {diff:.2e} (same weights)")
    for length in args.lengths:
        ids = torch.randint(0, VOCAB, (1, length))
        for backward in (False, True):
            what = "fwd+bwd" if backward else "forward"
            row = {}
            for name, model in models.items():
                if name == "transformers" and backward and length > args.max_transformers_bwd:
                    print(f"  [{kind}] {name:12} {what} L={length}: skipped (--max-transformers-bwd)")
                    continue
                gc.collect()
                seconds, peak = measure(model, ids, backward, args.repeats)
                row[name] = (seconds, peak)
                results.append(dict(section=kind, peer=name, pass_=what, length=length, seconds=seconds,
                                    peak_mb=peak, backend=getattr(ours.backbone.layers[0].mixer, "backend", None)))
            base = row["ssmkit"][0]
            cells = "  ".join(f"{n} {s:7.2f} s {m:6.0f} MB ({s / base:4.1f}x)" for n, (s, m) in row.items())
            print(f"  [{kind}] L={length:5} {what:8} {cells}")


def section_scaling(args, results):
    for kind in ("mamba", "mamba2"):
        model = ssmkit_model(kind, args.layers, args.backend, args.mamba2_chunk)
        base = None
        for length in (1024, 4096, 16384):
            ids = torch.randint(0, VOCAB, (1, length))
            seconds, peak = measure(model, ids, False, 1)
            per_token = seconds / length * 1e6
            base = base or per_token
            results.append(dict(section="scaling", peer="ssmkit", model=kind, length=length, seconds=seconds,
                                us_per_token=per_token, ratio_to_1k=per_token / base, peak_mb=peak))
            print(f"  [scaling] {kind:7} L={length:6} forward {seconds:6.2f} s  {per_token:7.1f} us/token "
                  f"({per_token / base:4.2f}x of 1k)  peak {peak:6.0f} MB")


def layer_and_projections(kind: str, backend: str, d_model: int = 768):
    """One layer of the 130M shape and its own projections as (weight, input of the shape the layer feeds it)
    pairs: in_proj, x_proj, dt_proj, out_proj for Mamba; in_proj, out_proj for Mamba-2 (its SSD's batched
    chunk products are not counted: they are part of the scan)."""
    if kind == "mamba":
        layer = ssmkit.build_mixer("mamba", d_model, backend=backend)
        shapes = [(layer.in_proj, d_model), (layer.x_proj, layer.d_inner), (layer.dt_proj, layer.dt_rank),
                  (layer.out_proj, layer.d_inner)]
    else:
        layer = ssmkit.build_mixer("mamba2", d_model, d_state=128, headdim=64, chunk_size=64, backend=backend)
        shapes = [(layer.in_proj, d_model), (layer.out_proj, layer.d_inner)]
    return layer, [(linear.weight, width) for linear, width in shapes]


def section_layer(args, results):
    """The layer against its own matrix products, timed in the same run (the floor of issue 12, item 3): the
    ratio is what counts, so both are timed alternately, ``repeats`` times each, and the minimum is kept."""
    import time

    length = 1024
    for kind in args.layer_mixers:
        layer, projections = layer_and_projections(kind, args.backend)
        x = torch.randn(1, length, layer.d_model)
        inputs = [torch.randn(1, length, width) for _, width in projections]
        weights = [w for w, _ in projections]

        def matmuls(backward):
            ins = [t.detach().requires_grad_(backward) for t in inputs]
            outs = [F.linear(i, w) for i, w in zip(ins, weights)]
            if backward:
                sum(o.sum() for o in outs).backward()
                for w in weights:
                    w.grad = None

        def full(backward):
            xi = x.detach().requires_grad_(backward)
            if backward:
                layer(xi).sum().backward()
                layer.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    layer(xi)

        for backward in (False, True):
            what = "fwd+bwd" if backward else "forward"
            for _ in range(2):
                full(backward), matmuls(backward)
            t_layer, t_mm = [], []
            for _ in range(max(5, args.repeats)):
                for fn, times in ((full, t_layer), (matmuls, t_mm)):
                    start = time.perf_counter()
                    fn(backward)
                    times.append(time.perf_counter() - start)
            t_layer, t_mm = min(t_layer), min(t_mm)
            flops = 2 * length * sum(w.numel() for w in weights) * (3 if backward else 1)
            results.append(dict(section="layer", mixer=kind, pass_=what, layer_ms=t_layer * 1e3,
                                matmul_ms=t_mm * 1e3, ratio=t_layer / t_mm, matmul_gflops=flops / t_mm / 1e9,
                                backend=layer.last_backend))
            print(f"  [layer] {kind:6} {what:8} layer {t_layer * 1e3:6.1f} ms; its {len(weights)} matmuls "
                  f"{t_mm * 1e3:6.1f} ms ({flops / t_mm / 1e9:5.0f} GFLOP/s); ratio {t_layer / t_mm:4.2f} "
                  f"(min of {max(5, args.repeats)}; backend {layer.last_backend})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["layer", "mamba", "mamba2", "scaling"])
    parser.add_argument("--peers", nargs="*", default=["transformers", "mambapy"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--backend", default="auto", help="ssmkit scan backend (auto, cpp, torch)")
    parser.add_argument("--layer-mixers", nargs="+", default=["mamba", "mamba2"], choices=["mamba", "mamba2"],
                        help="mixers of the 'layer' section")
    parser.add_argument("--mamba2-chunk", type=int, default=64,
                        help="ssmkit Mamba2 SSD chunk size (execution only; transformers keeps its 256)")
    parser.add_argument("--max-transformers-bwd", type=int, default=1024,
                        help="skip transformers' fwd+bwd above this length (it needs minutes and >10 GB)")
    parser.add_argument("--out", default="outputs/bench_mamba.json")
    args = parser.parse_args(argv)
    setup(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, sections {args.sections}")
    results = []
    for section in args.sections:
        if section in ("mamba", "mamba2"):
            section_models(section, args, results)
        elif section == "scaling":
            section_scaling(args, results)
        elif section == "layer":
            section_layer(args, results)
        else:
            raise SystemExit(f"unknown section {section!r}; choose from mamba, mamba2, scaling, layer")
    write_json(args.out, dict(machine=machine_info(args.threads), args=vars(args), results=results))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

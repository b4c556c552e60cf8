"""Decoding on the CPU at the memory-bandwidth floor: ssmkit's fused step (fp32, int8) against its own module
step and transformers' Mamba, all in one process on the same weights.

Peers (all of the 130M shape by default: d_model 768, 24 layers, vocab 50280, tied LM head):
  hf              transformers MambaForCausalLM / Mamba2ForCausalLM (torch path), same weights
  module          ssmkit ``model.step`` (each layer's PyTorch step)
  fused-fp32      ssmkit FusedDecoder (one C++ call per layer), float32 weights
  fused-int8      ssmkit FusedDecoder on ``ssmkit.quantize(model, "int8")`` (per-channel int8 weights)

The prompt is read once; every peer then decodes ``--new-tokens`` greedy tokens from the same state, repeated
``--repeats`` times (the minimum is reported: the figure least disturbed by other work). The tokens of every
float32 peer must equal the module step's (the check is printed; int8 reports its agreement). The floor is the
bytes of weights one token reads divided by a bandwidth measured in this run: ``torch.mv`` over a matrix far
larger than the caches (the gemv floor) and a large copy (read + write bytes / time).

    python benchmarks/bench_decode.py --threads 2                                  # Mamba, batch 1 and 16
    python benchmarks/bench_decode.py --threads 2 --mixer mamba2 --prompt 512
    python benchmarks/bench_decode.py --threads 2 --prompt 16384 --batch 1 --peers module fused-fp32 fused-int8
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, setup, write_json  # noqa: E402

import ssmkit  # noqa: E402
from ssmkit.models import ModelConfig, SSMModel  # noqa: E402
from ssmkit.models.decoding import FusedDecoder  # noqa: E402

PEERS = ("hf", "module", "fused-fp32", "fused-int8")


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    """The options every decoding benchmark shares: the model shape (130M by default) and the run."""
    parser.add_argument("--mixer", choices=["mamba", "mamba2"], default="mamba")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=50280)


def build_ssmkit(mixer: str, d_model: int, layers: int, vocab: int) -> SSMModel:
    kwargs = {"mamba2": {"headdim": 64, "d_state": 128}} if mixer == "mamba2" else {}
    torch.manual_seed(0)
    return SSMModel(ModelConfig(d_model=d_model, n_layers=layers, vocab_size=vocab, mixer=mixer,
                                mixer_kwargs=kwargs)).eval()


def build_hf(model: SSMModel):
    import transformers

    cfg = model.config
    if cfg.mixer == "mamba":
        hf_cfg = transformers.MambaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, state_size=16,
                                          num_hidden_layers=cfg.n_layers, use_mambapy=False, tie_word_embeddings=True)
        hf = transformers.MambaForCausalLM(hf_cfg)
    else:
        m = model.backbone.layers[0].mixer
        hf_cfg = transformers.Mamba2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, state_size=m.d_state,
                                           num_hidden_layers=cfg.n_layers, head_dim=m.headdim, num_heads=m.nheads,
                                           n_groups=m.ngroups, expand=2, tie_word_embeddings=True)
        hf = transformers.Mamba2ForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers' model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return hf.eval()


def weight_bytes_per_token(model: SSMModel) -> int:
    """Bytes of every matrix a decoding step reads: all linear maps of the layers and the LM head."""
    total = 0
    for name, module in model.named_modules():
        if hasattr(module, "weight_int8"):
            total += module.weight_int8.numel() + 4 * module.weight_scale.numel()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def measure_bandwidth(repeats: int) -> dict:
    """GB/s of torch.mv over a 256 MB matrix and of copying 256 MB (bytes read + written), best of repeats."""
    w = torch.randn(16384 * 4, 1024)
    x = torch.randn(1024)
    y = torch.empty(w.shape[0])
    src, dst = torch.randn(64 * 2 ** 20), torch.empty(64 * 2 ** 20)
    best_mv = best_copy = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.mv(w, x, out=y)
        best_mv = min(best_mv, time.perf_counter() - start)
        start = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - start)
    return dict(gemv_gb_s=w.numel() * 4 / best_mv / 1e9, copy_gb_s=2 * src.numel() * 4 / best_copy / 1e9)


@torch.no_grad()
def decode(step, first_token, state, new_tokens):
    """Greedy tokens (B, new_tokens) and seconds per token for ``new_tokens`` steps from ``state``."""
    token, tokens = first_token, []
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, state = step(token, state)
        token = logits.argmax(-1)
        tokens.append(token.clone())
    return torch.stack(tokens, 1), (time.perf_counter() - start) / new_tokens


@torch.no_grad()
def hf_decoder(hf, ids):
    """A (step, first token, state) triple for transformers' model, its cache filled by the prompt."""
    out = hf(ids, use_cache=True)
    length = ids.shape[1]
    position = [length]

    def step(token, cache):
        out = hf(token[:, None], cache_params=cache, use_cache=True,
                 cache_position=torch.full((1,), position[0], dtype=torch.long))
        position[0] += 1
        return out.logits[:, -1], out.cache_params

    first = out.logits[:, -1].argmax(-1)
    return step, first, out.cache_params, copy.deepcopy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_args(parser)
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--out", default="outputs/bench_decode.json")
    args = parser.parse_args(argv)
    setup(args.threads)
    model = build_ssmkit(args.mixer, args.d_model, args.layers, args.vocab)
    quantized = ssmkit.quantize(copy.deepcopy(model), "int8") if "fused-int8" in args.peers else None
    bandwidth = measure_bandwidth(args.repeats)
    bytes_fp32 = weight_bytes_per_token(model)
    bytes_int8 = weight_bytes_per_token(quantized) if quantized is not None else None
    print(f"{args.mixer}, d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}; {args.threads} threads; "
          f"prompt {args.prompt}, {args.new_tokens} new tokens, best of {args.repeats}; torch {torch.__version__}")
    print(f"weights read per token: fp32 {bytes_fp32 / 1e9:.3f} GB" +
          (f", int8 {bytes_int8 / 1e9:.3f} GB" if bytes_int8 else "") +
          f"; measured gemv {bandwidth['gemv_gb_s']:.1f} GB/s, copy {bandwidth['copy_gb_s']:.1f} GB/s")
    hf = None
    if "hf" in args.peers:
        try:
            hf = build_hf(model)
        except Exception as err:  # noqa: BLE001 - a missing peer is reported, not fatal
            print(f"  hf: skipped ({type(err).__name__}: {err})")
    rows = []
    for batch in args.batch:
        ids = torch.randint(0, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        logits, state = model.prefill(list(ids), chunk_size=2048)
        first = logits.argmax(-1)
        _, state_q = quantized.prefill(list(ids), chunk_size=2048) if quantized is not None else (None, None)
        runs = {}
        if "module" in args.peers:
            runs["module"] = (model.step, state, bytes_fp32)
        if "fused-fp32" in args.peers:
            runs["fused-fp32"] = (FusedDecoder(model).step, state, bytes_fp32)
        if "fused-int8" in args.peers:
            runs["fused-int8"] = (FusedDecoder(quantized).step, state_q, bytes_int8)
        results = {}
        if hf is not None:
            step, hf_first, cache, clone = hf_decoder(hf, ids)
            best, tokens = float("inf"), None
            for _ in range(args.repeats):
                tokens, seconds = decode(step, hf_first, clone(cache), args.new_tokens)
                best = min(best, seconds)
            results["hf"] = (tokens, best, bytes_fp32)
        for name, (step, start_state, nbytes) in runs.items():
            decode(step, first, start_state, 2)  # warm-up: first-call costs, buffer allocation
            best, tokens = float("inf"), None
            for _ in range(args.repeats):
                tokens, seconds = decode(step, first, start_state, args.new_tokens)
                best = min(best, seconds)
            results[name] = (tokens, best, nbytes)
        reference = results.get("module", next(iter(results.values())))[0]
        base_ms = results["module"][1] * 1e3 if "module" in results else None
        for name, (tokens, seconds, nbytes) in results.items():
            agree = (tokens == reference).float().mean().item()
            floor_ms = nbytes / (bandwidth["gemv_gb_s"] * 1e9) * 1e3
            copy_floor_ms = nbytes / (bandwidth["copy_gb_s"] / 2 * 1e9) * 1e3  # reading at half the copy bytes/s
            row = dict(mixer=args.mixer, peer=name, batch=batch, prompt=args.prompt, ms_per_token=seconds * 1e3,
                       tokens_per_s=batch / seconds, gemv_floor_ms=floor_ms, copy_floor_ms=copy_floor_ms,
                       greedy_agreement=agree)
            rows.append(row)
            speedup = f", {base_ms / row['ms_per_token']:5.2f}x module" if base_ms else ""
            print(f"  batch {batch:3} {name:11} {row['ms_per_token']:8.2f} ms/step {row['tokens_per_s']:8.1f} tok/s  "
                  f"{row['ms_per_token'] / floor_ms:5.2f}x gemv floor ({floor_ms:.1f} ms), "
                  f"{row['ms_per_token'] / copy_floor_ms:5.2f}x copy floor{speedup}; greedy tokens = module: "
                  f"{agree:.0%}", flush=True)
    by = {(r["peer"], r["batch"]): r for r in rows}
    for peer in ("fused-fp32", "fused-int8"):
        if (peer, 1) in by and (peer, 16) in by:
            print(f"  {peer}: batch 16 decodes {by[(peer, 16)]['tokens_per_s'] / by[(peer, 1)]['tokens_per_s']:.1f}x "
                  f"the tokens/s of batch 1")
    write_json(args.out, dict(machine=machine_info(args.threads), args=vars(args), bandwidth=bandwidth, rows=rows))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

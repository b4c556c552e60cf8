"""Generation on the CPU: ssmkit Mamba vs transformers' Mamba vs Transformers with a KV cache.

Models of the 130M shape, random weights (shared where the architecture is the same):
  ssmkit-mamba        ssmkit SSMModel, 24 Mamba layers, d_model 768, vocab 50280 (module step: generate()'s
                      default on a CPU)
  ssmkit-mamba-fused  the same model and weights, decoded by the fused C++ step (generate(decode_backend="auto"))
  hf-mamba            transformers MambaForCausalLM (torch path), same weights
  ssmkit-transformer  ssmkit SSMModel, 12 attention layers + gated MLPs, d_model 768 (about the same size)
  hf-gpt2             transformers GPT2LMHeadModel, 12 layers, d_model 768 (124M), KV cache

For each prompt length: prefill tokens/s (reading the prompt), decode ms/token (greedy, ``--new-tokens``
tokens), and the peak resident memory growth of the whole generation.

    python benchmarks/bench_generate.py                          # batch 1, prompts 512 4096 16384
    python benchmarks/bench_generate.py --batch 16 --prompts 512 4096 --models ssmkit-mamba hf-mamba
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, machine_info, setup, write_json  # noqa: E402

from ssmkit.models import ModelConfig, SSMModel  # noqa: E402
from ssmkit.models.decoding import fused_decoder  # noqa: E402

VOCAB = 50280


def build(name: str, mamba: SSMModel | None):
    import transformers

    if name == "ssmkit-mamba":
        return SSMModel(ModelConfig(d_model=768, n_layers=24, vocab_size=VOCAB, mixer="mamba")).eval()
    if name == "hf-mamba":
        cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=768, state_size=16, num_hidden_layers=24,
                                       use_mambapy=False, tie_word_embeddings=True)
        model = transformers.MambaForCausalLM(cfg)
        model.load_state_dict(mamba.state_dict(), strict=False)
        return model.eval()
    if name == "ssmkit-transformer":
        return SSMModel(ModelConfig(d_model=768, n_layers=12, vocab_size=VOCAB, mixer="attention",
                                    mixer_kwargs={"attention": {"n_heads": 12}}, mlp="gated", mlp_hidden=2048)).eval()
    if name == "hf-gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32768, n_embd=768, n_layer=12, n_head=12)
        return transformers.GPT2LMHeadModel(cfg).eval()
    raise SystemExit(f"unknown model {name!r}")


@torch.no_grad()
def run_ssmkit(model: SSMModel, ids: torch.Tensor, new_tokens: int, chunk: int, fused: bool = False):
    start = time.perf_counter()
    logits, state = model.prefill(list(ids), chunk_size=chunk)
    prefill = time.perf_counter() - start
    token = logits.argmax(-1)
    step = fused_decoder(model).step if fused else model.step  # the decoder generate(decode_backend="auto") uses
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, state = step(token, state)
        token = logits.argmax(-1)
    return prefill, (time.perf_counter() - start) / new_tokens


def run_ssmkit_fused(model: SSMModel, ids: torch.Tensor, new_tokens: int, chunk: int):
    return run_ssmkit(model, ids, new_tokens, chunk, fused=True)


@torch.no_grad()
def run_hf(model, ids: torch.Tensor, new_tokens: int, chunk: int):
    is_mamba = type(model).__name__.startswith("Mamba")
    start = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill = time.perf_counter() - start
    cache = out.cache_params if is_mamba else out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    length = ids.shape[1]
    start = time.perf_counter()
    for i in range(new_tokens):
        if is_mamba:
            out = model(token, cache_params=cache, use_cache=True,
                        cache_position=torch.full((1,), length + i, dtype=torch.long))
            cache = out.cache_params
        else:
            out = model(token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, (time.perf_counter() - start) / new_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ssmkit-mamba", "ssmkit-mamba-fused", "hf-mamba",
                                                        "ssmkit-transformer", "hf-gpt2"])
    parser.add_argument("--prompts", nargs="+", type=int, default=[512, 4096, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=2048, help="ssmkit prefill chunk (bounded activation memory)")
    parser.add_argument("--max-prompt", nargs="*", default=["hf-mamba=4096", "hf-gpt2=4096"],
                        help="skip longer prompts for these models (MODEL=LENGTH): minutes or >10 GB otherwise")
    parser.add_argument("--out", default="outputs/bench_generate.json")
    parser.add_argument("--plot", default="outputs/decode_vs_context.png")
    args = parser.parse_args(argv)
    setup(args.threads)
    limits = {k: int(v) for k, v in (item.split("=") for item in args.max_prompt)}
    print(f"threads {args.threads}, batch {args.batch}, {args.new_tokens} new tokens, torch {torch.__version__}")
    shares_mamba = {"ssmkit-mamba", "ssmkit-mamba-fused", "hf-mamba"}
    mamba = build("ssmkit-mamba", None) if shares_mamba & set(args.models) else None
    rows = []
    for name in args.models:
        model = mamba if name in ("ssmkit-mamba", "ssmkit-mamba-fused") else build(name, mamba)
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        runner = (run_ssmkit_fused if name == "ssmkit-mamba-fused" else
                  run_ssmkit if name.startswith("ssmkit") else run_hf)
        runner(model, torch.randint(0, VOCAB, (args.batch, 32)), 4, args.chunk)  # warm-up (first-call costs)
        for length in args.prompts:
            if length > limits.get(name, 1 << 30):
                print(f"  {name:19} prompt {length:6}: skipped (--max-prompt {name}={limits[name]})")
                continue
            ids = torch.randint(0, VOCAB, (args.batch, length), generator=torch.Generator().manual_seed(length))
            with PeakMemory() as mem:
                prefill, decode = runner(model, ids, args.new_tokens, args.chunk)
            row = dict(model=name, params=params, prompt=length, batch=args.batch,
                       prefill_tok_s=args.batch * length / prefill, decode_ms=decode * 1e3, peak_mb=mem.peak_mb)
            rows.append(row)
            print(f"  {name:19} prompt {length:6}: prefill {row['prefill_tok_s']:8.0f} tok/s, decode "
                  f"{row['decode_ms']:7.1f} ms/token, peak +{row['peak_mb']:6.0f} MB", flush=True)
        if model is not mamba:
            del model
    write_json(args.out, dict(machine=machine_info(args.threads), args=vars(args), rows=rows))
    _plot(rows, args.plot)
    print(f"written {args.out} and {args.plot}")


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [(r["prompt"], r["decode_ms"]) for r in rows if r["model"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("decode ms/token")
    ax.set_title("Decode time per token vs context (CPU)")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()

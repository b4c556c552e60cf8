"""Released hybrid formats on the CPU: ssmkit vs transformers on the same weights (issue 14).

Three transformers model types at a realistic width with fewer layers, random weights made by transformers
and saved to a temporary directory, which ssmkit then reads with ``ssmkit.from_pretrained`` (so both run the
very same tensors, through ssmkit's converters):

  jamba       d_model 2048, 8 layers: Mamba with dt/B/C norms, attention in layer 4, a mixture of 4 experts
              (top 2) every other layer
  bamba       d_model 2048, 8 layers: Mamba-2 (64 heads of 64, 2 groups, N 128), attention in layers 3 and 7
              (partial rotary), SwiGLU MLPs
  nemotron_h  d_model 2048, 8 layers "M-M*M-M-": Mamba-2 (64 heads of 64, 8 groups, N 128), one attention
              layer, relu^2 MLP-only layers

Sides: transformers; ssmkit's ``generate`` with its default step on a CPU (each layer's PyTorch step); and
``ssmkit-packed``, the same step with every linear map on the C++ matrix-vector kernel
(``decode_backend="packed"``, what ``"auto"`` picks for these models). For each prompt length and each side,
one greedy generation of 1 + N tokens through the side's own
``generate`` with a streamer that stamps each token: prefill tokens/s from the time to the first token (the
prompt pass keeps the state or cache and computes the last position's logits only), decode ms/token from the
gaps between the following tokens, and the peak resident memory growth of that generation.
The greedy tokens of both sides are compared and a mismatch is reported. Run it on a quiet machine:

    python benchmarks/bench_hybrids.py                           # 2 threads, prompts 512 8192, 64 new tokens
    python benchmarks/bench_hybrids.py --quick                   # tiny models, a smoke test of the script
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, machine_info, setup, write_json  # noqa: E402

import ssmkit  # noqa: E402

TYPES = ("jamba", "bamba", "nemotron_h")


def hf_config(model_type: str, d_model: int, layers: int, vocab: int, quick: bool):
    """A transformers config of ``model_type`` at this width (quick: tiny heads and states)."""
    import transformers

    heads = 4 if quick else d_model // 128
    mamba_heads = 4 if quick else d_model * 2 // 64
    state = 8 if quick else 128
    if model_type == "jamba":
        return transformers.JambaConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=(2 if quick else 11) * d_model // 4,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
            num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
            attn_layer_period=layers, attn_layer_offset=layers // 2, mamba_d_state=16, tie_word_embeddings=False)
    if model_type == "bamba":
        return transformers.BambaConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=(2 if quick else 11) * d_model // 4,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
            attn_layer_indices=[i for i in range(layers) if i % 4 == 3], mamba_n_heads=mamba_heads,
            mamba_n_groups=2, mamba_d_state=state, mamba_chunk_size=256, tie_word_embeddings=False)
    if model_type == "nemotron_h":
        pattern = ("M-M*M-M-" * layers)[:layers]
        kinds = {"M": "mamba", "*": "attention", "-": "mlp"}
        return transformers.NemotronHConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=(2 if quick else 4) * d_model,
            layers_block_type=[kinds[c] for c in pattern], num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4), head_dim=d_model // heads, mamba_num_heads=mamba_heads,
            mamba_head_dim=d_model * 2 // mamba_heads, n_groups=2 if quick else 8, ssm_state_size=state,
            chunk_size=128, tie_word_embeddings=False)
    raise SystemExit(f"unknown model type {model_type!r}; choose from {TYPES}")


class _Stamps:
    """A streamer (transformers' ``put``/``end`` protocol, which ssmkit's ``generate`` also accepts) that
    records when each new token arrives. transformers first puts the prompt: that call is skipped."""

    def __init__(self, skip_first: bool):
        self.skip, self.times, self.tokens = skip_first, [], []

    def put(self, tokens):
        if self.skip:
            self.skip = False
            return
        self.times.append(time.perf_counter())
        self.tokens.append(tokens.reshape(-1).clone())

    def end(self):
        pass


def runners(ours, hf) -> dict:
    """side -> generate(ids, n, streamer): n greedy tokens, each handed to the streamer as it is made."""
    return {
        "ssmkit": lambda ids, n, streamer: ours.generate(ids, max_new_tokens=n, streamer=streamer),
        # the same model, every linear map of the step on the C++ matrix-vector kernel (decode_backend="auto")
        "ssmkit-packed": lambda ids, n, streamer: ours.generate(ids, max_new_tokens=n, streamer=streamer,
                                                                decode_backend="packed"),
        "transformers": lambda ids, n, streamer: hf.generate(ids, max_new_tokens=n, min_new_tokens=n,
                                                             do_sample=False, streamer=streamer),
    }


@torch.no_grad()
def time_side(side: str, generate, ids: torch.Tensor, new_tokens: int):
    """(prefill seconds, decode seconds per token, peak MB, the 1 + new_tokens greedy tokens).

    One generation per side and length: the prefill time is the time to the first new token (the prompt
    pass keeps the state or cache and computes the last position's logits only, on both sides), the decode
    time the mean gap between the following tokens, so each side's own generation loop is what is timed."""
    stamps = _Stamps(skip_first=side == "transformers")
    with PeakMemory() as mem:
        start = time.perf_counter()
        generate(ids, 1 + new_tokens, stamps)
    prefill = stamps.times[0] - start
    decode = (stamps.times[-1] - stamps.times[0]) / new_tokens
    return prefill, decode, mem.peak_mb, torch.stack(stamps.tokens, dim=-1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", nargs="+", type=int, default=[512, 8192])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: d_model 64, 4 layers, vocab 256, prompts 32 64, 4 new tokens")
    parser.add_argument("--out", default="outputs/bench_hybrids.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.vocab, args.prompts, args.new_tokens = 64, 4, 256, [32, 64], 4
    setup(args.threads)
    import transformers

    print(f"threads {args.threads}, d_model {args.d_model}, {args.layers} layers, {args.new_tokens} new tokens, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    rows, mismatches = [], []
    for model_type in args.types:
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(
            hf_config(model_type, args.d_model, args.layers, args.vocab, args.quick)).eval()
        hf.generation_config.eos_token_id = None  # both sides generate exactly the tokens asked for
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            ours = ssmkit.from_pretrained(tmp)
        params = sum(p.numel() for p in ours.parameters())
        sides = runners(ours, hf)
        warm = torch.randint(0, args.vocab, (1, 16))
        for side, generate in sides.items():  # first-call costs (extension loading, allocator) out of the way
            generate(warm, 2, _Stamps(skip_first=side == "transformers"))
        for length in args.prompts:
            ids = torch.randint(0, args.vocab, (1, length), generator=torch.Generator().manual_seed(length))
            tokens = {}
            for side, generate in sides.items():
                prefill, decode, peak, tokens[side] = time_side(side, generate, ids, args.new_tokens)
                row = dict(type=model_type, side=side, params=params, prompt=length, prefill_tok_s=length / prefill,
                           decode_ms=decode * 1e3, peak_mb=peak)
                rows.append(row)
                print(f"  {model_type:11} {side:13} prompt {length:6}: prefill {row['prefill_tok_s']:8.0f} tok/s, "
                      f"decode {row['decode_ms']:7.1f} ms/token, peak +{peak:6.0f} MB", flush=True)
            for side in ("ssmkit", "ssmkit-packed"):
                if not torch.equal(tokens[side], tokens["transformers"]):
                    mismatches.append(f"{model_type} {side} prompt {length}")
                    print(f"  {model_type:11} prompt {length}: greedy tokens differ: {side} {tokens[side].tolist()} "
                          f"vs {tokens['transformers'].tolist()}", flush=True)
        del hf, ours, sides  # free this type's models before the next is built
    write_json(args.out, dict(machine=machine_info(args.threads), args=vars(args), rows=rows, mismatches=mismatches))
    print(f"written {args.out}" + (f"; greedy tokens differ for {mismatches}" if mismatches else
                                   "; greedy tokens agree everywhere"))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())

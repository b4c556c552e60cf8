"""The ``ssmkit`` command: train, eval, generate, compare, bench, convert, export, serve, info.

    ssmkit compare                                   # the main job: architectures side by side on one task
    ssmkit train --config configs/induction.yaml train.steps=500 model.mixer=mamba2
    ssmkit eval --checkpoint outputs/induction/final --length 512
    ssmkit generate --checkpoint outputs/bytes_mamba/final --prompt "def " --max-new-tokens 200 --temperature 0.8
    ssmkit convert outputs/bytes_mamba/final outputs/hf --to hf      # a directory transformers loads
    ssmkit export --checkpoint outputs/bytes_mamba/final --format onnx outputs/onnx   # step + prefill programs
    ssmkit serve --checkpoint outputs/bytes_mamba/final --port 8000                   # /v1/completions
    ssmkit info                                      # versions, backends, threads, which decode path runs
    ssmkit viz --checkpoint outputs/ucr_gunpoint/final   # kernels, states, selectivity, task PNGs beside the run
    ssmkit build                                     # compile the C++ kernels now (else: at first use)
    torchrun --nproc-per-node 2 -m ssmkit train --config configs/bytes_mamba.yaml

Configs are YAML or JSON; ``key.sub=value`` arguments override them (type-checked; an unknown key is an
error that names the closest known one).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import List, Optional

import torch


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-3 model.mixer=mamba2")


def cmd_train(args) -> int:
    from .train import OutputDirError, TrainingDiverged, load_run_config, train

    run = load_run_config(args.config, args.overrides)
    try:
        result = train(run, resume=args.resume)
    except TrainingDiverged as err:
        print(f"ssmkit train: {err}", file=sys.stderr)
        return 3
    except OutputDirError as err:  # found before step 1: one line, no traceback
        print(f"ssmkit train: {err}", file=sys.stderr)
        return 2
    if result is not None and getattr(result, "final_metrics", None):
        print(json.dumps(result.final_metrics, indent=2))
    return 0


def cmd_eval(args) -> int:
    from .train import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, split=args.split, batches=args.batches, length=args.length)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_generate(args) -> int:
    from .models import from_pretrained

    torch.set_flush_denormal(True)
    model = from_pretrained(args.checkpoint)
    if args.quantize and getattr(model, "quantization", None) is None:
        from .models.quantization import quantize

        quantize(model, args.quantize)
    vocab = model.config.vocab_size
    stream = None
    if args.ids is not None:
        ids = [int(t) for t in args.ids.split(",") if t.strip()]
    else:
        from .text import TextStream, load_tokenizer

        try:  # the directory's own tokenizer.json, or bytes for a byte-level model
            tokenizer = load_tokenizer(args.checkpoint, vocab)
        except FileNotFoundError as err:
            raise SystemExit(f"ssmkit generate: --prompt text needs the checkpoint's tokenizer.json or a byte-level "
                             f"model (vocab 256): {err}; or pass token ids with --ids 1,2,3") from None
        except ImportError as err:
            raise SystemExit(f"ssmkit generate: {err}") from None
        ids = tokenizer.encode(args.prompt)
        stream = TextStream(tokenizer)
    if not ids:
        raise SystemExit("ssmkit generate: the prompt is empty; give at least one token")
    prompt = torch.tensor([ids])

    def show(token: torch.Tensor) -> None:
        sys.stdout.write(stream.push(int(token[0])) if stream is not None else f"{int(token[0])} ")
        sys.stdout.flush()

    if stream is not None:
        sys.stdout.write(args.prompt)
    model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0 and not args.greedy,
                   temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k, top_p=args.top_p,
                   min_p=args.min_p, repetition_penalty=args.repetition_penalty, eos_token_id=args.eos,
                   seed=args.seed, streamer=show, decode_backend=args.decode_backend)
    sys.stdout.write((stream.finish() if stream is not None else "") + "\n")
    print(f"[decoding: {model.last_decode_backend} ({model.last_decode_backend_reason})]", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from .compare import run_compare

    run_compare(task=args.task, models=args.models, length=args.length, budget=args.budget, out=args.out,
                threads=args.threads, seed=args.seed, eval_lengths=args.eval_lengths, overrides=args.overrides)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    if args.decode or args.quantize:
        from .bench import run_decode_bench

        run_decode_bench(mixers=args.mixers, d_model=args.d_model, batch=args.batch, quantize=args.quantize,
                         threads=args.threads)
        return 0
    run_bench(mixers=args.mixers, d_model=args.d_model, length=args.length, batch=args.batch, threads=args.threads)
    return 0


def cmd_viz(args) -> int:
    from .viz import write_checkpoint_figures

    backend = None if args.backend == "auto" else args.backend
    written = write_checkpoint_figures(args.checkpoint, out_dir=args.out, split=args.split, length=args.length,
                                       backend=backend)
    for name, path in written.items():
        print(f"{name:12} {path}")
    print(f"[ops backend: {args.backend}]", file=sys.stderr)
    return 0


def cmd_build(args) -> int:
    """Compile (or load from the cache) every C++ extension now, saying where and how long it took."""
    import time

    from .ops.decode import cpp as decode_cpp
    from .ops.mamba import cpp as scan_cpp

    failed = 0
    for title, module in (("selective scan", scan_cpp), ("decoding kernels", decode_cpp)):
        start = time.perf_counter()
        print(f"ssmkit build: {title} ... ", end="", flush=True)
        if module.is_available():
            print(f"ready ({time.perf_counter() - start:.0f} s; cached in {scan_cpp.build_directory()})")
        else:
            failed += 1
            print(f"FAILED: {module.build_error()}")
    if failed:
        print("ssmkit build: without these, ssmkit runs its PyTorch paths (backend='torch', "
              "decode_backend='module'); install a C++ compiler (g++ or clang++) and ninja to get the fast ones.",
              file=sys.stderr)
    return 1 if failed else 0


def cmd_convert(args) -> int:
    from .models import from_pretrained
    from .models.interop import save_transformers

    model = from_pretrained(args.source)
    if args.to == "hf":
        try:
            path, name = save_transformers(model, args.dest)
        except ValueError as err:
            raise SystemExit(f"ssmkit convert: {err}") from None
        print(f"wrote transformers checkpoint (model_type {name}) to {path}")
    else:
        path = model.save_pretrained(args.dest)
        print(f"wrote {args.to} checkpoint to {path}")
    return 0


def cmd_export(args) -> int:
    from .deploy.export import export_recurrence
    from .models import from_pretrained

    model = from_pretrained(args.checkpoint)
    manifest = export_recurrence(model, args.out, format=args.format, batch_size=args.batch_size,
                                 prefill_chunk=args.prefill_chunk)
    print(f"wrote {', '.join(manifest['programs'])} ({args.format}) and manifest.json to {args.out}")
    return 0


def cmd_serve(args) -> int:
    from .deploy.serve import ServerLimits, serve

    limits = ServerLimits(max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                          max_sessions=args.max_sessions, max_sessions_in_memory=args.max_sessions_in_memory,
                          request_timeout_s=args.timeout)
    serve(args.checkpoint, host=args.host, port=args.port, session_dir=args.session_dir, limits=limits,
          eos_token_id=args.eos, threads=args.threads)
    return 0


def info() -> dict:
    import numpy

    from . import __version__
    from .layers import MIXERS

    backends = {}
    try:
        from .ops import mamba

        backends["selective_scan"] = mamba.available_backends()
    except Exception as err:  # noqa: BLE001 - info reports, never fails
        backends["selective_scan"] = f"unavailable: {err}"
    try:
        from .ops import mamba2

        backends["ssd"] = mamba2.available_backends()
    except Exception as err:  # noqa: BLE001
        backends["ssd"] = f"unavailable: {err}"
    try:
        from .ops.decode import cpp as decode_cpp

        backends["decoding"] = ("fused (C++ kernels built) for float32 Mamba/Mamba-2 language models on the CPU "
                                "with generate(decode_backend='auto' or 'fused'); 'module' otherwise"
                                if decode_cpp.is_available() else
                                f"module (the C++ decoding kernels could not be built: {decode_cpp.build_error()})")
    except Exception as err:  # noqa: BLE001
        backends["decoding"] = f"unavailable: {err}"
    try:
        from .ops._triton import triton_available

        backends["triton"] = triton_available()
    except Exception as err:  # noqa: BLE001
        backends["triton"] = f"unavailable: {err}"
    return {
        "ssmkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "mixers": sorted(MIXERS),
        "backends": backends,
    }


def cmd_info(args) -> int:
    for key, value in info().items():
        print(f"{key:10} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssmkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on a task from a config")
    _add_run_args(p)
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="resume from the latest checkpoint in train.out_dir (or from the given checkpoint)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a training checkpoint on its task")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--length", type=int, default=None, help="evaluate at another sequence length")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample from a language-model checkpoint")
    p.add_argument("--checkpoint", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt, read with the checkpoint's tokenizer.json (or as bytes by a "
                                      "byte-level model)")
    src.add_argument("--ids", help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--eos", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="quantise the weights before generating (per-channel int8; see ssmkit.quantize)")
    p.add_argument("--decode-backend", choices=["auto", "fused", "packed", "module"], default="auto",
                   help="how each new token runs: fused C++ layer steps (Mamba, Mamba-2), packed (the module "
                        "step with every linear map on the C++ kernel: any model), the PyTorch module step, or "
                        "auto (fused, else packed, where supported; the choice is printed on stderr)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="the main job: train several architectures on one task and compare them")
    p.add_argument("--task", default=None, help="task name or a limits preset (limits_mqar_few_keys, "
                   "limits_mqar_many_keys, limits_copy_short, limits_copy_long, limits_needle_short, "
                   "limits_needle_long); default: induction_heads")
    p.add_argument("--models", nargs="+", default=None,
                   help="model presets (transformer s4d mamba mamba2 hybrid griffin), any registered mixer name, "
                        "or a run config file such as configs/jamba.yaml (its model section)")
    p.add_argument("--length", type=int, default=None, help="training sequence length")
    p.add_argument("--budget", type=float, default=None, help="training seconds per model")
    p.add_argument("--eval-lengths", type=int, nargs="+", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/compare")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every model's run config")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="time every mixer's parallel pass and recurrent step here")
    p.add_argument("--mixers", nargs="+", default=None)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--decode", action="store_true",
                   help="time token-by-token decoding of a small LM instead: module step vs fused C++ step")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="with --decode (implied): also time the int8-quantised model")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("convert", help="convert a checkpoint (ssmkit, transformers, state-spaces) to another format")
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--to", choices=["hf", "ssmkit"], required=True)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="export the one-token step and the chunked prefill (ONNX or torch.export)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prefill-chunk", type=int, default=64, help="tokens the prefill program reads at once")
    p.add_argument("out", help="output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve a language model: OpenAI-style /v1/completions with sessions")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--session-dir", default=None, help="where session states are kept (default: CHECKPOINT-sessions)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-sessions", type=int, default=10_000)
    p.add_argument("--max-sessions-in-memory", type=int, default=64)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take")
    p.add_argument("--eos", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("viz", help="draw a checkpoint's pictures (kernels, states, selectivity, forecast or "
                                   "confusion matrix, curves) next to its run's reports")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default=None, help="folder for the PNGs (default: the run's output folder)")
    p.add_argument("--split", default="test", help="split whose first example (and whole set) is drawn")
    p.add_argument("--length", type=int, default=256, help="kernel lags to draw (at most the task's length)")
    p.add_argument("--backend", default="torch",
                   help="ops backend for the model's passes (default torch: no kernel build; auto: the ops' choice)")
    p.set_defaults(func=cmd_viz)

    p = sub.add_parser("build", help="compile the C++ kernels now (otherwise they compile at first use)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("info", help="versions, available backends, threads")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; user errors (bad config, missing files, refused resumes) print one line and return 2.

    Set SSMKIT_DEBUG=1 to get the traceback instead.
    """
    import os

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as err:
        if os.environ.get("SSMKIT_DEBUG"):
            raise
        print(f"ssmkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""ssmkit's CPU decoding against llama.cpp on the same weights (issue 12).

llama.cpp is what people use for fast CPU inference of Mamba today (GGUF files, f32 / q8_0 / q4_0 weights).
This script builds one random model of the 130M shape (as benchmarks/bench_decode.py: d_model 768, 24 layers,
vocab 50280, tied head, seed 0), writes it as a transformers directory, converts that to GGUF with
llama.cpp's own ``convert_hf_to_gguf.py``, quantises it with ``llama-quantize``, and then, in this one process,
decodes the same prompt greedily with llama.cpp (through llama-cpp-python's ctypes bindings over the
``libllama`` built below) and with ssmkit's fused decoder (float32 and int8). It prints ms/token, the ratio
to llama.cpp at the matching precision and the greedy agreement with ssmkit's float32 tokens (llama.cpp f32
must agree; quantised types report theirs).

llama.cpp is not a dependency and nothing here downloads: build it once from the llama-cpp-python source
distribution, which vendors llama.cpp (pip's own cache or a local index serves it), outside the repository:

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llsrc
    tar xzf /tmp/llsrc/llama_cpp_python-*.tar.gz -C /tmp/llsrc
    cd /tmp/llsrc/llama_cpp_python-*/vendor/llama.cpp
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build -j 2 --target llama llama-quantize

    python benchmarks/bench_llamacpp.py --llama-cpp /tmp/llsrc/llama_cpp_python-*/vendor/llama.cpp --threads 2

``--bindings`` defaults to the llama-cpp-python source directory two levels above ``--llama-cpp``; its Python
package needs ``numpy``, ``jinja2`` and ``diskcache`` importable (``pip install diskcache``). llama.cpp cannot roll
a recurrent state back, so each repeat reads the prompt again (untimed) before the timed greedy tokens.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import add_decode_args, build_ssmkit, decode, weight_bytes_per_token  # noqa: E402
from common import machine_info, setup, write_json  # noqa: E402

import ssmkit  # noqa: E402
from ssmkit.models.decoding import FusedDecoder  # noqa: E402
from ssmkit.models.interop import save_transformers  # noqa: E402

TYPES = ("f32", "q8_0", "q4_0")
SSMKIT_PEER = {"f32": "fused-fp32", "q8_0": "fused-int8", "q4_0": "fused-int8"}


def make_ggufs(model, llama_cpp: Path, workdir: Path, types) -> dict:
    """GGUF files of ``model`` for each type: f32 from convert_hf_to_gguf.py, the others by llama-quantize."""
    hf_dir = workdir / "hf"
    save_transformers(model, hf_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama_cpp / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    files = {"f32": workdir / "model-f32.gguf"}
    subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32",
                    "--outfile", str(files["f32"])], env=env, check=True, capture_output=True, text=True)
    quantize = llama_cpp / "build" / "bin" / "llama-quantize"
    for kind in types:
        if kind != "f32":
            files[kind] = workdir / f"model-{kind}.gguf"
            subprocess.run([str(quantize), str(files["f32"]), str(files[kind]), kind], check=True,
                           capture_output=True, text=True)
    return files


def llama_decoder(llama_cpp_module, path: Path, prompt: list, threads: int, n_ctx: int):
    """(decode(first, n) -> (tokens, seconds), first greedy token, read_prompt() -> seconds, llm) for one GGUF
    file."""
    import numpy as np

    llm = llama_cpp_module.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                 n_threads_batch=threads, logits_all=True, verbose=False)
    def read_prompt() -> int:
        # a recurrent state cannot be rolled back to the end of the prompt: clear it and read the prompt again
        llm.reset()
        llm.eval(prompt)
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    first = read_prompt()

    def run(first_token: int, new_tokens: int):
        read_prompt()  # not timed
        tokens, token = [], first_token
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(token)
        return torch.tensor(tokens), (time.perf_counter() - start) / new_tokens  # seconds per token, as decode()

    def timed_prompt() -> float:
        start = time.perf_counter()
        read_prompt()
        return time.perf_counter() - start

    return run, first, timed_prompt, llm


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", required=True, help="a llama.cpp source tree built into <it>/build")
    parser.add_argument("--bindings", default=None, help="llama-cpp-python source dir (holding llama_cpp/)")
    parser.add_argument("--types", nargs="+", choices=TYPES, default=list(TYPES))
    add_decode_args(parser)
    parser.add_argument("--out", default="outputs/bench_llamacpp.json")
    args = parser.parse_args(argv)
    llama_cpp = Path(args.llama_cpp).resolve()
    bindings = Path(args.bindings).resolve() if args.bindings else llama_cpp.parents[1]
    library_dir = llama_cpp / "build" / "bin"
    for needed in (llama_cpp / "convert_hf_to_gguf.py", library_dir / "llama-quantize", bindings / "llama_cpp"):
        if not needed.exists():
            raise SystemExit(f"{needed} not found: build llama.cpp as the docstring says (--llama-cpp, --bindings)")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(library_dir)
    sys.path.insert(0, str(bindings))
    import llama_cpp as llama_cpp_module

    setup(args.threads)
    model = build_ssmkit(args.mixer, args.d_model, args.layers, args.vocab)
    quantized = ssmkit.quantize(copy.deepcopy(model), "int8")
    ids = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    print(f"{args.mixer}, d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}; {args.threads} threads; "
          f"prompt {args.prompt}, {args.new_tokens} greedy tokens, best of {args.repeats}; torch {torch.__version__}")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = make_ggufs(model, llama_cpp, Path(tmp), args.types)
        sizes = {kind: path.stat().st_size for kind, path in files.items()}
        for kind in args.types:
            run, first, timed_prompt, llm = llama_decoder(llama_cpp_module, files[kind], ids[0].tolist(),
                                                          args.threads, args.prompt + args.new_tokens + 8)
            run(first, 2)  # warm-up
            best, tokens = float("inf"), None
            for _ in range(args.repeats):
                tokens, seconds = run(first, args.new_tokens)
                best = min(best, seconds)
            prompt_seconds = min(timed_prompt() for _ in range(args.repeats))
            results[f"llama.cpp {kind}"] = (tokens, best, first, sizes[kind], prompt_seconds)
            del llm

    for name, m in (("fused-fp32", model), ("fused-int8", quantized)):
        prompt_seconds = float("inf")
        for _ in range(args.repeats):  # the prompt pass: the layers' parallel forms (int8: dequantised weights)
            start = time.perf_counter()
            logits, state = m.prefill(list(ids), chunk_size=2048)
            prompt_seconds = min(prompt_seconds, time.perf_counter() - start)
        first = logits.argmax(-1)
        step = FusedDecoder(m).step
        decode(step, first, state, 2)
        best, tokens = float("inf"), None
        for _ in range(args.repeats):
            tokens, seconds = decode(step, first, state, args.new_tokens)
            best = min(best, seconds)
        results[f"ssmkit {name}"] = (tokens.reshape(-1), best, int(first), weight_bytes_per_token(m), prompt_seconds)

    reference = results["ssmkit fused-fp32"][0]
    rows = []
    for name, (tokens, seconds, first, nbytes, prompt_seconds) in results.items():
        ms = seconds * 1e3
        row = dict(peer=name, ms_per_token=ms, tokens_per_s=1e3 / ms, bytes=nbytes,
                   prompt_tokens_per_s=args.prompt / prompt_seconds,
                   greedy_agreement_with_ssmkit_fp32=float((tokens == reference).float().mean()),
                   first_token=first)
        rows.append(row)
    by = {r["peer"]: r for r in rows}
    for r in rows:
        ratio = ""
        if r["peer"].startswith("ssmkit"):
            peer = SSMKIT_PEER["f32"] if r["peer"].endswith("fp32") else SSMKIT_PEER["q8_0"]
            kind = "f32" if peer == "fused-fp32" else "q8_0"
            if f"llama.cpp {kind}" in by:
                ratio = f", {by[f'llama.cpp {kind}']['ms_per_token'] / r['ms_per_token']:.2f}x llama.cpp {kind}"
        size = "GGUF file" if r["peer"].startswith("llama.cpp") else "weights read per token"
        print(f"  {r['peer']:18} {r['ms_per_token']:7.2f} ms/token {r['tokens_per_s']:7.1f} tok/s  "
              f"prompt {r['prompt_tokens_per_s']:7.1f} tok/s  {size} "
              f"{r['bytes'] / 1e6:6.1f} MB; greedy = ssmkit fp32: {r['greedy_agreement_with_ssmkit_fp32']:.0%}"
              f"{ratio}", flush=True)
    write_json(args.out, dict(machine=machine_info(args.threads), args=vars(args), rows=rows,
                              llama_cpp=str(llama_cpp)))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

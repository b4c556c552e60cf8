"""The ssmkit command end to end: info, train, eval, generate, convert, compare, bench, and its errors."""

import json
import subprocess
import sys

import pytest
import torch

from ssmkit.cli import main

TINY = ["task.name=induction_heads", "task.kwargs={vocab_size: 6, length: 12}", "model.d_model=16",
        "model.mixer_kwargs={mamba: {d_state: 4}}", "train.steps=6", "train.batch_size=4", "train.eval_every=0",
        "train.eval_batches=1", "train.checkpoint_every=3", "train.progress=false", "train.tensorboard=false",
        "train.warmup_steps=1", "train.device=cpu"]


@pytest.mark.slow  # a fresh interpreter that imports everything and probes the C++ build
def test_module_entry_point_runs_info():
    out = subprocess.run([sys.executable, "-m", "ssmkit", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "mixers" in out.stdout and "mamba" in out.stdout and "selective_scan" in out.stdout


def test_train_eval_generate_convert(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, f"train.out_dir={run_dir}"]) == 0
    final = run_dir / "final"
    assert (final / "model.safetensors").exists() and (run_dir / "metrics.jsonl").exists()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(final), "--batches", "1", "--length", "20"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["length"] == 20 and 0.0 <= metrics["accuracy"] <= 1.0
    assert main(["generate", "--checkpoint", str(final), "--ids", "1,2,3", "--max-new-tokens", "5", "--greedy"]) == 0
    tokens = capsys.readouterr().out.split()
    assert len(tokens) == 5 and all(0 <= int(t) < 6 for t in tokens)
    assert main(["convert", str(final), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mamba"
    # a second train into the same folder must not silently overwrite it; --resume continues it
    assert main(["train", *TINY, f"train.out_dir={run_dir}"]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_config_errors_name_the_key(tmp_path, capsys):
    assert main(["train", "train.lrr=3e-3", f"train.out_dir={tmp_path}"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert main(["train", "train.steps=many", f"train.out_dir={tmp_path}"]) == 2
    assert "train.steps must be an integer" in capsys.readouterr().err
    assert main(["train", "task.name=bytes_lm", f"task.kwargs={{paths: [{tmp_path / 'missing'}]}}",
                 f"train.out_dir={tmp_path / 'r'}", "train.steps=1"]) == 2
    assert "missing" in capsys.readouterr().err


def test_generate_needs_a_byte_model_for_text(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, f"train.out_dir={run_dir}"]) == 0
    with pytest.raises(SystemExit, match="byte-level model"):
        main(["generate", "--checkpoint", str(run_dir / "final"), "--prompt", "hi"])


@pytest.mark.slow  # trains two models
def test_compare_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--models", "mamba", "transformer", "--budget", "1", "--length", "16",
                 "--eval-lengths", "32", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["mamba", "transformer"]
    assert all(set(r["accuracy"]) == {"16", "32"} for r in rows)
    # the recurrent state of an SSM stays small; attention's KV cache grows with the context
    assert rows[0]["state_mb"] < rows[1]["state_mb"]
    assert (out / "report.md").exists() and (out / "compare.png").exists()
    assert "| mamba |" in capsys.readouterr().out


def test_every_compare_preset_builds_and_steps_like_it_reads():
    from ssmkit.compare import PRESETS, _preset_spec
    from ssmkit.models import from_config
    from ssmkit.tasks import make_task
    from ssmkit.train import model_config_for

    task = make_task("induction_heads", vocab_size=16, length=16)
    for name in PRESETS:
        spec = _preset_spec(name)
        assert spec.d_model == 64 and spec.n_layers == PRESETS[name].get("n_layers", 2), name
        torch.manual_seed(0)
        model = from_config(model_config_for(task, spec)).eval()
        ids = task.batch("val", 0, 2).inputs
        with torch.no_grad():
            full = model(ids).logits
            state, steps = model.init_state(2), []
            for token in ids.unbind(1):
                logits, state = model.step(token, state)
                steps.append(logits)
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=2e-5, rtol=1e-4, msg=name)
    assert _preset_spec("griffin").mixer == "HHA"


def test_compare_takes_a_run_config_file_as_a_model(tmp_path):
    from pathlib import Path

    from ssmkit.compare import _preset_spec

    jamba = Path(__file__).resolve().parents[1] / "configs" / "jamba.yaml"
    spec = _preset_spec(str(jamba))
    assert spec.mlp != "none" and "A" in "".join(spec.mixer) and "M" in "".join(spec.mixer)
    with pytest.raises(ValueError, match="does not exist"):
        _preset_spec(str(tmp_path / "missing.yaml"))


def test_bench_prints_every_requested_mixer(capsys):
    assert main(["bench", "--mixers", "s4d", "mamba", "--d-model", "16", "--length", "64"]) == 0
    out = capsys.readouterr().out
    assert "s4d" in out and "mamba" in out


def test_generate_quantized_fused_says_which_path_ran(tmp_path, capsys):
    from ssmkit.ops.decode import cpp

    if not cpp.is_available():
        pytest.skip(f"C++ decoding kernels unavailable: {cpp.build_error()}")
    import ssmkit

    ssmkit.from_config(dict(d_model=32, n_layers=2, vocab_size=256, mixer="mamba")).save_pretrained(tmp_path / "m")
    outputs = {}
    for backend in ("module", "fused"):
        assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--ids", "1,2,3", "--max-new-tokens", "8",
                     "--greedy", "--quantize", "int8", "--decode-backend", backend]) == 0
        captured = capsys.readouterr()
        assert f"[decoding: {backend} (requested)]" in captured.err
        outputs[backend] = captured.out
    assert outputs["fused"] == outputs["module"]
    assert main(["build"]) == 0
    assert "decoding kernels ... ready" in capsys.readouterr().out
    assert main(["bench", "--quantize", "int8", "--mixers", "mamba", "--d-model", "16"]) == 0
    assert "fused int8" in capsys.readouterr().out

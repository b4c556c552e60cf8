"""Without the deploy extra the library still imports and exports pt2; ONNX and the server say which extra
to install, in one line."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys, tempfile
    for name in ("onnx", "onnxscript", "onnxruntime", "starlette", "uvicorn", "httpx", "fastapi"):
        sys.modules[name] = None  # as if not installed: importing it raises ImportError
    import ssmkit
    from ssmkit.deploy.export import export_recurrence
    from ssmkit.deploy.serve import create_app
    from ssmkit.cli import main
    model = ssmkit.from_config(ssmkit.ModelConfig(d_model=16, n_layers=1, vocab_size=256, mixer="s4d"))
    out = tempfile.mkdtemp()
    export_recurrence(model, out, format="pt2", prefill_chunk=4)
    for call in (lambda: export_recurrence(model, out, format="onnx"), lambda: create_app(model, out)):
        try:
            call()
        except ImportError as error:
            print("ERROR:", error)
    model.save_pretrained(out + "/ckpt")
    print("RC:", main(["serve", "--checkpoint", out + "/ckpt"]))
""")


def test_deploy_without_the_extra():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    errors = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 2 and all("pip install 'ssmkit[deploy]'" in e for e in errors), out.stdout
    assert "ONNX export needs the optional package 'onnx'" in errors[0]
    assert "ssmkit serve needs the optional package 'starlette'" in errors[1]
    assert "RC: 2" in out.stdout
    assert out.stderr.strip().splitlines()[-1].startswith("ssmkit serve: error: ssmkit serve needs")

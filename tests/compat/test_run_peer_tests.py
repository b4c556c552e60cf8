"""tools/run_peer_tests.py: rewrites only the peer imports and the device, then runs pytest on the copies."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("run_peer_tests", ROOT / "tools" / "run_peer_tests.py")
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)

# a stand-in for a user's checkout: a test written here in the peers' import style
FAKE_TEST = '''import torch
from causal_conv1d.causal_conv1d_interface import causal_conv1d_update, causal_conv1d_update_ref
from causal_conv1d.cpp_functions import some_internal


def test_update_in_place():
    device = "cuda"
    x = torch.randn(2, 3, device=device)
    state, state_ref = torch.randn(2, 3, 4, device=device), None
    state_ref = state.clone()
    weight = torch.randn(3, 4, device=device)
    torch.testing.assert_close(causal_conv1d_update(x, state, weight), causal_conv1d_update_ref(x, state_ref, weight))
    assert torch.equal(state, state_ref)
'''


def test_rewrite_touches_only_peer_imports_and_the_device_string():
    source = 'from mamba_ssm.ops.triton.x import a, b\nfrom einops import rearrange\nd = "cuda"; e = \'cuda\'\n' \
             'torch.cuda.manual_seed_all(0)\n'
    assert runner.rewrite(source, "cpu") == ('from ssmkit_peer_shim import a, b\nfrom einops import rearrange\n'
                                            'd = "cpu"; e = \'cpu\'\ntorch.cuda.manual_seed_all(0)\n')


@pytest.mark.slow  # a pytest subprocess that imports torch
def test_runner_runs_a_checkout_against_the_compat_modules(tmp_path):
    checkout = tmp_path / "causal-conv1d"
    (checkout / "tests").mkdir(parents=True)
    (checkout / "tests" / "test_causal_conv1d.py").write_text(FAKE_TEST)
    code = runner.main(["--causal-conv1d", str(checkout), "--work", str(tmp_path / "work"), "--", "-q"])
    assert code == 0
    copy = (tmp_path / "work" / "tests" / "causal_conv1d__test_causal_conv1d.py").read_text()
    assert 'device = "cpu"' in copy and "from ssmkit_peer_shim import some_internal" in copy

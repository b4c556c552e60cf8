"""The named hybrid configs of issue 13 (Jamba-, Samba- and Bamba-style) build, run forward, and continue
from a carried state exactly as when reading everything at once."""

from pathlib import Path

import pytest
import torch

from ssmkit.models import SSMModel
from ssmkit.tasks import make_task
from ssmkit.train import load_run_config, model_config_for

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name, mixers, mlps", [
    ("jamba", ["mamba"] * 4 + ["attention"] + ["mamba"] * 3, ["gated", "moe"] * 4),
    ("samba", ["mamba", "attention"] * 2, ["gated"] * 4),
    ("bamba", ["mamba2", "mamba2", "attention", "mamba2"], ["gated"] * 4),
    ("hymba", ["mamba2+attention"] * 4, ["gated"] * 4),
])
def test_hybrid_config_builds_and_runs(name, mixers, mlps):
    run = load_run_config(CONFIGS / f"{name}.yaml")
    task = make_task(run.task.name, **run.task.kwargs)
    config = model_config_for(task, run.model)
    assert config.layer_mixers() == mixers and config.layer_mlps() == mlps
    torch.manual_seed(0)
    model = SSMModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 37))
    with torch.no_grad():
        out = model(ids)
        first = model(ids[:, :20], return_state=True)
        rest = model(ids[:, 20:], state=first.state)
    assert out.logits.shape == (2, 37, config.vocab_size) and bool(torch.isfinite(out.logits).all())
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), out.logits, rtol=1e-4, atol=1e-4)
    assert float(out.aux_loss) > 0 if "moe" in mlps else float(out.aux_loss) == 0

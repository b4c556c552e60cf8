"""Every named config under configs/ loads (known keys, valid values, a task and model that build) and says,
on its first line, the command that runs it."""

import math
from pathlib import Path

import pytest

from ssmkit.tasks import make_task
from ssmkit.train import load_run_config, model_config_for, train

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
REQUIRED = ("induction", "selective_copying", "mqar", "digits_s4d", "digits_mamba", "listops_small",
            "bytes_mamba", "bytes_transformer", "griffin", "hawk")


def test_the_named_configs_exist():
    names = {path.stem for path in CONFIGS}
    missing = [name for name in REQUIRED if name not in names]
    assert not missing, f"configs/ lacks {missing}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_names_its_command(path):
    lines = path.read_text().splitlines()
    assert lines[0] == f"# ssmkit train --config configs/{path.name}", lines[0]
    assert lines[1].startswith("# ") and len(lines[1]) > 20, "the second line says what to expect"
    run = load_run_config(path)
    task = make_task(run.task.name, **run.task.kwargs)  # unknown task keys raise here
    config = model_config_for(task, run.model)          # and an invalid model here
    assert config.d_model == run.model.d_model
    assert run.train.out_dir.startswith("outputs/"), "runs write under outputs/ (ignored by git)"


def test_hymba_config_trains_a_few_steps(tmp_path):
    """The parallel-mixer layer ("mamba2+attention", averaged normed branches) trains from its named config."""
    path = Path(__file__).resolve().parents[1] / "configs" / "hymba.yaml"
    run = load_run_config(path, ["train.steps=3", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=0",
                                 "train.eval_batches=1", "train.eval_lengths=[]", "train.checkpoint_every=0",
                                 f"train.out_dir={tmp_path / 'hymba'}"])
    result = train(run)
    assert len(result.losses) == 3 and all(math.isfinite(loss) for loss in result.losses), result.losses

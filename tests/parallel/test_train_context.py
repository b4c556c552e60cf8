"""``ssmkit train`` with ``parallel.context=2`` under torchrun (2 CPU processes, gloo): the losses of one
process reading whole sequences, with DDP and with FSDP; a job killed in step 5 and resumed from its step-3
checkpoint by a new job repeats the uninterrupted run exactly."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ssmkit
from ssmkit.train import load_run_config, train

# induction heads scores the last position only: rank 0's slices carry no loss, so every gradient it gets
# arrives through the states that rank 1 sends back
ARGS = ["task.name=induction_heads", "task.kwargs={vocab_size: 4, length: 9}", "model.d_model=16", "model.n_layers=2",
        "model.mixer=MD", "model.mixer_kwargs={mamba: {d_state: 4, backend: torch}, mamba2: {d_state: 8, headdim: 8}}",
        "train.steps=6", "train.batch_size=4", "train.lr=1e-2", "train.warmup_steps=2", "train.eval_every=0",
        "train.eval_batches=1", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
        "train.checkpoint_every=3", "train.threads=1"]

SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from ssmkit.train import load_run_config, train

args, out, phase = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo")  # shared by the runs below (train() reuses it)
rank = dist.get_rank()
results = {}
if phase == "first":
    for kind in ("ddp", "fsdp"):
        result = train(load_run_config(None, args + [f"train.out_dir={out}/{kind}", f"train.distributed={kind}"]))
        results[kind] = {"losses": result.losses, "world_size": result.world_size}
    with open(f"{out}/result-{rank}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()

    calls = []
    def kill_in_step_5(module, inputs, output):  # the job dies without cleaning up, in every process
        if module.training and type(module).__name__ == "SSMModel":
            calls.append(1)
            if len(calls) == 5:
                os._exit(3)
    torch.nn.modules.module.register_module_forward_hook(kill_in_step_5)
    train(load_run_config(None, args + [f"train.out_dir={out}/killed"]))
elif phase == "grid":
    result = train(load_run_config(None, args + [f"train.out_dir={out}/grid"]))
    with open(f"{out}/grid-{rank}.json", "w") as f:
        json.dump({"losses": result.losses}, f)
else:
    result = train(load_run_config(None, args + [f"train.out_dir={out}/killed"]), resume=True)
    with open(f"{out}/resumed-{rank}.json", "w") as f:
        json.dump({"losses": result.losses, "start_step": result.start_step}, f)
dist.destroy_process_group()
"""


def _torchrun(tmp_path, phase, processes=2):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(ssmkit.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           str(tmp_path / "script.py"), json.dumps(ARGS + ["parallel.context=2"]), str(tmp_path), phase]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _close(a, b, rel=1e-5):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rel * max(abs(x), abs(y), 1e-12), f"step {i + 1}: {x!r} vs {y!r}"


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.slow  # two torchrun jobs and four short trainings: about 45 s on 2 busy cores
def test_context_parallel_training_matches_one_process_and_resumes_exactly(tmp_path):
    (tmp_path / "script.py").write_text(textwrap.dedent(SCRIPT))
    first = _torchrun(tmp_path, "first")
    assert first.returncode != 0  # the third run was killed in step 5 ...
    assert (tmp_path / "killed" / "checkpoints" / "step-000003").is_dir()  # ... after its step-3 checkpoint
    assert not (tmp_path / "killed" / "final").exists(), first.stdout[-2000:] + first.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]

    single = train(load_run_config(None, ARGS + [f"train.out_dir={tmp_path / 'single'}"]))
    for kind in ("ddp", "fsdp"):
        assert ranks[0][kind]["world_size"] == 2
        assert ranks[0][kind]["losses"] == ranks[1][kind]["losses"]  # every rank reports the global loss
        _close(ranks[0][kind]["losses"], single.losses)
        records = [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
        assert records[0]["context"] == 2 and records[0]["world_size"] == 2
        norms = [r["grad_norm"] for r in records if r["event"] == "train"]
        single_norms = [r["grad_norm"] for r in single.history if r["event"] == "train"]
        _close(norms, single_norms)  # the gradients, through their norms, at every step

    second = _torchrun(tmp_path, "resume")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    resumed = json.loads((tmp_path / "resumed-0.json").read_text())
    assert resumed["start_step"] == 3
    assert resumed["losses"] == ranks[0]["ddp"]["losses"][3:]  # bitwise: the killed run continues exactly


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.slow  # four processes on a small machine
def test_data_parallel_replicas_of_context_groups(tmp_path):
    """4 processes = 2 data-parallel replicas x 2 context ranks == 1 process with grad_accum 2."""
    (tmp_path / "script.py").write_text(textwrap.dedent(SCRIPT))
    proc = _torchrun(tmp_path, "grid", processes=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"grid-{r}.json").read_text())["losses"] for r in range(4)]
    assert all(r == ranks[0] for r in ranks)
    single = train(load_run_config(None, ARGS + [f"train.out_dir={tmp_path / 'single'}", "train.grad_accum=2"]))
    _close(ranks[0], single.losses)


def test_context_parallel_refuses_one_process_and_non_lm_tasks(tmp_path):
    run = load_run_config(None, ARGS + [f"train.out_dir={tmp_path}", "parallel.context=2"])
    with pytest.raises(ValueError, match=r"parallel.context=2 needs 2 processes"):
        train(run)


# Whole module: subprocesses, exports or many drawn cases (tens of seconds); `make test` and CI run it,
# `make test-fast` does not.
pytestmark = pytest.mark.slow

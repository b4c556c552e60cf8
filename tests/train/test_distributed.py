"""Data-parallel training under torchrun: 2 CPU processes (gloo) compute what 1 process computes.

The global batch of a step is the same set of micro-batches however it is split (ssmkit.train.loop), so
2 processes x grad_accum 1 must give the losses of 1 process x grad_accum 2, up to the order of float
additions in the gradient all-reduce.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ssmkit
from ssmkit.train import list_checkpoints, load_run_config, train

ARGS = ["task.name=induction_heads", "task.kwargs={vocab_size: 4, length: 8}", "model.d_model=16", "model.n_layers=2",
        "model.mixer=MS", "model.mixer_kwargs={mamba: {d_state: 4}, s4d: {d_state: 4}}", "train.steps=6",
        "train.batch_size=8", "train.lr=1e-2", "train.warmup_steps=2", "train.eval_every=0", "train.eval_batches=1",
        "train.progress=false", "train.tensorboard=false", "train.log_every=1", "train.checkpoint_every=3"]

SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from ssmkit.train import load_run_config, train

args, out = json.loads(sys.argv[1]), sys.argv[2]
# train() joins torchrun's process group by itself; here the script makes it first, so that two runs
# (DDP, then FSDP) share it: train() then reuses it and leaves it open
dist.init_process_group("gloo")
rank = dist.get_rank()
results = {}
for kind in ("ddp", "fsdp"):
    run = load_run_config(None, args + [f"train.out_dir={out}/{kind}", "train.grad_accum=1",
                                        f"train.distributed={kind}"])
    result = train(run)
    results[kind] = {"losses": result.losses, "final": result.final_metrics, "world_size": result.world_size}
with open(f"{out}/result-{rank}.json", "w") as f:
    json.dump(results, f)
# no rank tears gloo down while the other may still be in a collective: leaving early made the other's
# process abort at exit ("terminate called without an active exception") once in several CI runs
dist.barrier()
dist.destroy_process_group()
"""


def _close(a, b, rel=1e-6):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rel * max(abs(x), abs(y), 1e-12), f"step {i + 1}: {x!r} vs {y!r}"


@pytest.mark.slow  # starts two torchrun processes
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_match_one_process_with_accumulation(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(ssmkit.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    # --standalone: a local rendezvous on a free port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           json.dumps(ARGS), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]

    single = train(load_run_config(None, ARGS + [f"train.out_dir={tmp_path / 'single'}", "train.grad_accum=2"]))
    for kind in ("ddp", "fsdp"):
        assert ranks[0][kind]["world_size"] == 2
        assert ranks[0][kind]["losses"] == ranks[1][kind]["losses"]  # every rank reports the global loss
        _close(ranks[0][kind]["losses"], single.losses)
        # only rank 0 wrote the log: one start record, for a world of 2
        records = [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
        assert [r["event"] for r in records].count("start") == 1 and records[0]["world_size"] == 2
        assert [s for s, _ in list_checkpoints(tmp_path / kind)] == [3]

    # a checkpoint of the 2-process run resumes in 1 process with grad_accum 2 (same micro-batches per step)
    resumed = train(load_run_config(None, ARGS + [f"train.out_dir={tmp_path / 'resumed'}", "train.grad_accum=2"]),
                    resume=str(tmp_path / "ddp" / "checkpoints" / "step-000003"))
    assert resumed.start_step == 3
    _close(resumed.losses, ranks[0]["ddp"]["losses"][3:])

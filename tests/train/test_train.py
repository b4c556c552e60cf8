"""The trainer: learning, parameter groups, schedule, checkpoints, exact resume, divergence, configs, logs."""

import dataclasses
import json
import math

import pytest
import torch

from ssmkit.models import ModelConfig, SSMModel
from ssmkit.models.model import ModelOutput
from ssmkit.layers import build_mixer
from ssmkit.tasks import make_task
from ssmkit.train import (CheckpointMismatch, ModelSpec, RunConfig, TrainingDiverged, evaluate,
                          list_checkpoints, load_run_config, model_config_for, train)
from ssmkit.train import checkpointing as ckpt
from ssmkit.train.config import TASK_MODEL_FIELDS
from ssmkit.train.logging import read_metrics
from ssmkit.train.optim import (SSM_PARAMETER_NAMES, WarmupCosine, build_optimizer, classify_parameters,
                                lr_factor)
from ssmkit.utils.configs import ConfigError

# induction heads over 3 body tokens at length 8: chance accuracy is 1/3, a 2-layer Mamba of d=16 gets
# above 0.8 within 60 steps (about 1 s on one core)
EASY_TASK = ["task.name=induction_heads", "task.kwargs={vocab_size: 4, length: 8}"]


def make_run(out_dir, *overrides) -> RunConfig:
    base = EASY_TASK + ["model.d_model=16", "model.n_layers=2", "model.mixer=mamba", "model.mixer_kwargs={d_state: 4}",
                        "train.batch_size=8", "train.lr=1e-2", "train.warmup_steps=2", "train.eval_every=0",
                        "train.eval_batches=1", "train.checkpoint_every=0", "train.progress=false",
                        "train.tensorboard=false", f"train.out_dir={out_dir}"]
    return load_run_config(None, base + list(overrides))


class _OnTrainingForward:
    """A global forward hook that acts on the n-th training forward of an SSMModel (1-based)."""

    def __init__(self, n: int, action):
        self.n, self.action, self.calls = n, action, 0

    def __enter__(self):
        def hook(module, args, output):
            if isinstance(module, SSMModel) and module.training:
                self.calls += 1
                if self.calls == self.n:
                    return self.action(output)
            return None

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class _Crash(Exception):
    pass


def _crash(output):
    raise _Crash("simulated interruption")


def _nan(output):
    return ModelOutput(logits=output.logits * float("nan"), loss=output.loss, aux_loss=output.aux_loss)


# --------------------------------------------------------------------------------------------------
def test_short_run_learns_and_writes_logs(tmp_path):
    run = make_run(tmp_path / "run", "train.steps=60", "train.batch_size=32", "train.warmup_steps=5",
                   "train.eval_every=30", "train.eval_batches=4", "train.eval_lengths=[12]", "train.log_every=10")
    result = train(run)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.6 * first, f"loss did not fall: first 10 steps {first:.3f}, last 10 {last:.3f}"
    assert result.final_metrics["val_accuracy"] > 0.6, result.final_metrics  # chance: 1/3
    assert "val_accuracy@12" in result.final_metrics
    assert result.num_parameters == result.model.num_parameters() and result.tokens_per_second > 0
    assert result.threads == torch.get_num_threads()
    # metrics.jsonl: every line is JSON; start, train, eval (both lengths, twice) and end events
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    events = [r["event"] for r in records]
    assert events[0] == "start" and events[-1] == "end" and events.count("train") == 6
    evals = [(r["step"], r["length"]) for r in records if r["event"] == "eval"]
    assert evals == [(30, 8), (30, 12), (60, 8), (60, 12)]
    assert records[0]["threads"] == torch.get_num_threads() and records[0]["num_parameters"] == result.num_parameters
    png = tmp_path / "run" / "curves.png"
    assert result.curves == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the final checkpoint is a model directory, and evaluate() on it reproduces the final metrics
    from ssmkit.models import from_pretrained

    model = from_pretrained(result.checkpoint_dir)
    task = make_task("induction_heads", vocab_size=4, length=8)
    again = evaluate(model, task, split="val", batches=4, batch_size=32)
    assert again["accuracy"] == result.final_metrics["val_accuracy"]


def test_model_spec_and_task_fields_cover_model_config():
    spec_fields = {f.name for f in dataclasses.fields(ModelSpec)}
    config_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert spec_fields | set(TASK_MODEL_FIELDS) == config_fields
    assert not spec_fields & set(TASK_MODEL_FIELDS)
    spec = ModelSpec(d_model=8, n_layers=1, mixer="s4d")
    heads = lambda c: (c.head, c.vocab_size, c.input_dim, c.num_classes, c.output_dim)  # noqa: E731
    assert heads(model_config_for(make_task("digits"), spec)) == ("classifier", 17, None, 10, None)
    assert heads(model_config_for(make_task("digits", real_valued=True), spec)) == ("classifier", None, 1, 10, None)
    assert heads(model_config_for(make_task("adding", length=16), spec)) == ("regression", None, 2, None, 1)
    assert heads(model_config_for(make_task("induction_heads"), spec)) == ("lm", 16, None, None, None)


def test_config_file_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: {name: adding, kwargs: {length: 16}}\nmodel: {mixer: s4d, d_model: 8}\n"
                    "train: {steps: 5, lr: 3.0e-3}\n")
    run = load_run_config(path, ["train.lr=1e-2", "model.n_layers=3", "train.betas=[0.9, 0.95]"])
    assert (run.train.lr, run.train.steps, run.model.n_layers, run.model.mixer) == (1e-2, 5, 3, "s4d")
    assert run.train.betas == [0.9, 0.95] and run.task.kwargs == {"length": 16}
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    with pytest.raises(ConfigError, match=r"did you mean '?train\.'?lr"):
        load_run_config(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        load_run_config(path, ["train.steps=many"])
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        load_run_config(path, ["train.min_lr_ratio=2"])


# --------------------------------------------------------------------------------------------------
def test_ssm_parameter_names_exist_in_their_mixers():
    """Every name listed for a mixer is a parameter of that mixer (a rename in a layer fails here)."""
    from ssmkit.layers import MIXERS

    for mixer, names in SSM_PARAMETER_NAMES.items():
        if mixer not in MIXERS:
            continue  # a mixer not in this build (e.g. s5 before it is registered)
        layer = build_mixer(mixer, 8, **MIXERS[mixer].contract_config)
        params = dict(layer.named_parameters())
        missing = [n for n in names if n not in params]
        assert not missing, f"{mixer}: {missing} are not parameters (have {sorted(params)})"


def test_parameter_groups_decay_and_ssm_lr():
    config = ModelConfig(d_model=8, n_layers=2, vocab_size=10, mixer=["mamba", "s4d"], mlp="gated",
                         mixer_kwargs={"mamba": {"d_state": 4}, "s4d": {"d_state": 4}})
    model = SSMModel(config)
    roles = classify_parameters(model)
    expect = {
        "backbone.embeddings.weight": "decay",  # decayed (as nanoGPT / mamba_ssm); the tied LM head with it
        "backbone.layers.0.mixer.in_proj.weight": "decay",
        "backbone.layers.0.mixer.A_log": "ssm", "backbone.layers.0.mixer.D": "ssm",
        "backbone.layers.0.mixer.dt_proj.bias": "ssm",
        "backbone.layers.0.mixer.conv1d.bias": "no_decay",
        "backbone.layers.0.norm.weight": "no_decay", "backbone.norm_f.weight": "no_decay",
        "backbone.layers.0.mlp.up_proj.weight": "decay",
        "backbone.layers.1.mixer.log_dt": "ssm", "backbone.layers.1.mixer.A_log_re": "ssm",
        "backbone.layers.1.mixer.A_im": "ssm", "backbone.layers.1.mixer.B": "ssm",
        "backbone.layers.1.mixer.C": "decay", "backbone.layers.1.mixer.D": "no_decay",
        "backbone.layers.1.mixer.output_linear.bias": "no_decay",
    }
    for name, role in expect.items():
        assert roles[name] == role, f"{name}: {roles[name]} != {role}"
    assert "lm_head.weight" not in roles  # tied: one parameter, one group
    assert len(roles) == len({id(p) for p in model.parameters()})

    run = RunConfig()
    run.train.lr, run.train.weight_decay, run.train.ssm_lr_scale = 1e-2, 0.5, 0.1
    optimizer = build_optimizer(model.named_parameters(), roles, run.train)
    groups = {g["group"]: g for g in optimizer.param_groups}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "decay": (1e-2, 0.5), "no_decay": (1e-2, 0.0), "ssm": (pytest.approx(1e-3), 0.0)}
    # behaviour: with zero gradients AdamW moves only by decoupled weight decay, p <- p (1 - lr wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    params = dict(model.named_parameters())
    for name in ("backbone.layers.0.mixer.A_log", "backbone.layers.1.mixer.log_dt", "backbone.norm_f.weight"):
        assert torch.equal(params[name], before[name]), f"{name} was decayed"
    name = "backbone.layers.0.mixer.in_proj.weight"
    torch.testing.assert_close(params[name], before[name] * (1 - 1e-2 * 0.5), rtol=1e-6, atol=0)


def test_schedule_values():
    factor = lambda s: lr_factor(s, warmup_steps=10, total_steps=111, min_lr_ratio=0.1)  # noqa: E731
    assert factor(0) == pytest.approx(0.1) and factor(4) == pytest.approx(0.5) and factor(9) == 1.0
    assert factor(10) == 1.0  # first step after warm-up: the peak
    assert factor(60) == pytest.approx(0.55)  # half-way through the cosine: midpoint of 1 and 0.1
    assert factor(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)  # floor at the last step
    assert lr_factor(3, warmup_steps=0, total_steps=1, min_lr_ratio=0.1) == 1.0
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.25}])
    schedule = WarmupCosine(optimizer, warmup_steps=10, total_steps=111, min_lr_ratio=0.1)
    schedule.set_step(4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.125])


# --------------------------------------------------------------------------------------------------
def test_exact_resume_and_keep_last(tmp_path):
    """6 steps straight == 3 steps, a crash in step 5, and a resume from the step-3 checkpoint: bitwise.
    A hybrid (Mamba + S4D layers), SSM lr scaling and gradient accumulation all take part."""
    args = ["model.mixer=MS", "model.mixer_kwargs={mamba: {d_state: 4}, s4d: {d_state: 4}}", "train.steps=6",
            "train.grad_accum=2", "train.ssm_lr_scale=0.5", "train.eval_every=2", "train.log_every=1"]
    straight = train(make_run(tmp_path / "a", *args, "train.checkpoint_every=1", "train.keep_last=2"))
    assert [step for step, _ in list_checkpoints(tmp_path / "a")] == [4, 5]  # keep-last 2 of steps 1..5
    assert (tmp_path / "a" / "final" / "model.safetensors").exists()
    assert not list((tmp_path / "a" / "checkpoints").glob(".*"))  # no temporary directories left

    resumed_run = make_run(tmp_path / "b", *args, "train.checkpoint_every=3")
    with _OnTrainingForward(2 * 4 + 1, _crash), pytest.raises(_Crash):  # first micro-batch of step 5
        train(resumed_run)
    assert [step for step, _ in list_checkpoints(tmp_path / "b")] == [3]
    with pytest.raises(FileExistsError, match="resume"):
        train(resumed_run)  # a new run must not overwrite the checkpoints of the interrupted one
    resumed = train(resumed_run, resume=True)
    assert resumed.start_step == 3
    assert resumed.losses == straight.losses[3:]  # bitwise
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.final_metrics == straight.final_metrics
    # the appended log keeps one record per (event, step, length): the resumed ones
    records = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_cut_metrics_line_is_dropped_on_resume_and_a_damaged_one_skipped_with_a_warning(tmp_path):
    from ssmkit.train.logging import RunLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 1, "loss": 2.0}\n{"event": "train", "st')  # killed mid-record
    logger = RunLogger(tmp_path, progress=False, tensorboard=False, append=True)
    logger.log({"event": "train", "step": 2, "loss": 1.5})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]  # the resumed record is not glued onto the cut one
    # two writers in one folder, or a damaged disk: plotting at the end of a run must not throw the run away
    path.write_text('{"event": "train", "step": 1, "loss": 2.0}\n{"ev{"event": "train"\n[1, 2]\n'
                    '{"event": "train", "step": 2, "loss": 1.0}\n')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped 2 line\(s\).*lines \[2, 3\]"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = make_run(tmp_path / "run", "train.steps=6", "train.checkpoint_every=2")
    with _OnTrainingForward(4, _nan), pytest.raises(TrainingDiverged, match="at step 4 of 6") as info:
        train(run)
    good = tmp_path / "run" / "checkpoints" / "step-000002"
    assert info.value.step == 4 and info.value.checkpoint == good and str(good) in str(info.value)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert not (tmp_path / "run" / "final").exists()
    state = ckpt.read_trainer_state(good)
    assert state["step"] == 2
    from ssmkit.models import from_pretrained

    weights = from_pretrained(good).state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "diverged" and last["step"] == 4 and last["last_checkpoint"] == str(good)

    # resuming with another config is refused, naming each differing key
    other = make_run(tmp_path / "run", "train.steps=6", "train.checkpoint_every=2", "model.d_model=8",
                     "train.lr=3e-3", "task.kwargs={vocab_size: 5, length: 8}")
    with pytest.raises(CheckpointMismatch) as mismatch:
        train(other, resume=True)
    message = str(mismatch.value)
    for key in ("model.d_model", "train.lr", "task.kwargs.vocab_size"):
        assert key in message
    assert "model.n_layers" not in message
    with pytest.raises(CheckpointMismatch, match="micro-batches"):
        train(make_run(tmp_path / "run", "train.steps=6", "train.grad_accum=2"), resume=True)
    # the same config resumes from the good checkpoint (the NaN was injected, so it now finishes)
    finished = train(run, resume=True)
    assert finished.start_step == 2 and all(math.isfinite(v) for v in finished.losses)


def test_bf16_autocast_run(tmp_path):
    """bfloat16 autocast runs end to end (attention: every op of this mixer supports autocast on CPU)."""
    run = make_run(tmp_path / "run", "train.steps=2", "train.bf16=true", "model.mixer=attention",
                   "model.mixer_kwargs={n_heads: 2}", "train.log_every=1")
    result = train(run)
    assert all(math.isfinite(v) for v in result.losses) and math.isfinite(result.final_metrics["val_loss"])


def test_chunked_lm_loss_and_recompute_give_the_same_run(tmp_path):
    """train.loss_chunk_size (the model's chunked LM loss on the task's aligned targets) and train.recompute
    change how a step runs, not what it computes: the losses of a short run agree with the default run's, and
    the start event records the choice ("auto" resolves to the full logits for this small vocabulary)."""
    base = make_run(tmp_path / "base", "train.steps=4")
    assert base.train.loss_chunk_size == "auto" and base.train.recompute is False
    plain = train(base)
    chunked = train(make_run(tmp_path / "chunked", "train.steps=4", "train.loss_chunk_size=5",
                             "train.recompute=true"))
    assert chunked.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)
    starts = [json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0]) for name in ("base", "chunked")]
    assert (starts[0]["loss_chunk_size"], starts[0]["recompute"]) == (None, False)
    assert (starts[1]["loss_chunk_size"], starts[1]["recompute"]) == (5, True)


def test_auto_loss_chunk_size_applies_to_large_vocabularies():
    from ssmkit.train.loop import AUTO_LOSS_CHUNK_SIZE, _resolve_loss_chunk_size

    class LMTask:
        kind, default_length = "lm", 4096

    plan = type("Plan", (), {"context": None})()  # no context parallelism
    big = ModelConfig(d_model=16, n_layers=1, vocab_size=50280, mixer="mamba")
    small = ModelConfig(d_model=16, n_layers=1, vocab_size=16, mixer="mamba")
    cfg = RunConfig().train
    assert _resolve_loss_chunk_size(cfg, LMTask(), plan, big, 1) == AUTO_LOSS_CHUNK_SIZE
    assert _resolve_loss_chunk_size(cfg, LMTask(), plan, small, 1) is None
    for bad in (0, "big", True):
        with pytest.raises(ValueError, match="loss_chunk_size must be a positive int, 'auto' or null"):
            dataclasses.replace(cfg, loss_chunk_size=bad)


def test_a_replacement_interrupted_between_its_two_renames_puts_the_old_directory_back(tmp_path, monkeypatch):
    """write_directory_atomically moves the old directory aside, then the new one in: a kill between the two
    left no directory under the name (the old one hidden). The next writer or reader restores it, and an
    interruption inside this process restores it at once."""
    import os

    import ssmkit
    from ssmkit.models import io as model_io

    model = ssmkit.from_config(dict(d_model=8, n_layers=1, vocab_size=16, mixer="s4d"))
    target = tmp_path / "final"
    model.save_pretrained(target)
    before = (target / "model.safetensors").read_bytes()

    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new directory's rename into place
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(model_io.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(target)
    monkeypatch.setattr(model_io.os, "replace", real_replace)
    assert (target / "model.safetensors").read_bytes() == before  # restored in this process
    assert not list(tmp_path.glob(".final.*"))

    # the state a SIGKILL between the renames leaves on disk: the old directory aside, none under the name
    os.replace(target, tmp_path / ".final.old-killed")
    assert not target.exists()
    loaded = ssmkit.from_pretrained(target)  # a reader restores it
    assert (target / "model.safetensors").read_bytes() == before and loaded is not None
    os.replace(target, tmp_path / ".final.old-killed")
    assert ckpt.latest_checkpoint(tmp_path) is None  # final/ holds no trainer state here; it is back all the same
    assert target.is_dir()

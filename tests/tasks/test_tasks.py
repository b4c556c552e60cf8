"""Tests of ssmkit.tasks: shapes, determinism and sharding, splits, labels checked by construction or by an
independent evaluator, losses and metrics, user data and errors."""

import math
import sys
import time

import numpy as np
import pytest
import torch

from ssmkit.tasks import (TASKS, AddingProblem, Batch, BytesLM, CopyingMemory, Digits, InductionHeads, ListOps,
                          MQAR, SelectiveCopying, SequenceData, last_valid, load_sequences, make_task, stable_seed)
from ssmkit.tasks import listops as listops_module
from ssmkit.tasks.text import STDLIB_EXCLUDED_DIRS

# small settings so the whole module stays fast; defaults are exercised separately
SMALL = {
    "selective_copying": dict(vocab_size=10, length=64, num_tokens=6),
    "induction_heads": dict(vocab_size=16, length=48),
    "mqar": dict(vocab_size=512, length=64, num_kv_pairs=4),
    "copying_memory": dict(blanks=30),
    "adding": dict(length=40),
    "listops": dict(min_length=20, max_length=120, num_train=500, num_val=40, num_test=40),
    "digits": dict(),
}


def _small(name, **extra):
    return make_task(name, **SMALL[name], **extra)


def _same(a: Batch, b: Batch) -> bool:
    same_lengths = (a.lengths is None and b.lengths is None) or (
        a.lengths is not None and b.lengths is not None and torch.equal(a.lengths, b.lengths))
    return (a.inputs.shape == b.inputs.shape and torch.equal(a.inputs, b.inputs)
            and torch.equal(a.targets, b.targets) and same_lengths)


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    (folder / "sub" / "b.md").write_text("".join(f"line {i}: lorem ipsum dolor sit amet\n" for i in range(60)))
    (folder / ".hidden").write_text("SECRET" * 100)
    return folder


# ------------------------------------------------------------------------------------------------------
# Shapes, dtypes, determinism, sharding
# ------------------------------------------------------------------------------------------------------
EXPECTED = {  # name: (input shape after B, input dtype, target shape after B, target dtype)
    "selective_copying": ((64,), torch.int64, (64,), torch.int64),
    "induction_heads": ((48,), torch.int64, (48,), torch.int64),
    "mqar": ((64,), torch.int64, (64,), torch.int64),
    "copying_memory": ((50,), torch.int64, (50,), torch.int64),
    "adding": ((40, 2), torch.float32, (1,), torch.float32),
    "digits": ((64,), torch.int64, (), torch.int64),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shapes_and_dtypes(name):
    task = _small(name)
    batch = task.batch("train", 0, 5)
    in_shape, in_dtype, out_shape, out_dtype = EXPECTED[name]
    assert tuple(batch.inputs.shape) == (5, *in_shape) and batch.inputs.dtype == in_dtype
    assert tuple(batch.targets.shape) == (5, *out_shape) and batch.targets.dtype == out_dtype
    assert batch.lengths is None and batch.num_tokens == 5 * in_shape[0]
    if task.vocab_size is not None:
        assert 0 <= int(batch.inputs.min()) and int(batch.inputs.max()) < task.vocab_size
    else:
        assert batch.inputs.shape[-1] == task.input_dim
    if task.kind == "lm":
        answers = batch.targets[batch.targets != -100]
        assert answers.numel() > 0 and int(answers.min()) >= 0 and int(answers.max()) < task.vocab_size


def test_listops_shapes_and_padding():
    task = _small("listops")
    batch = task.batch("train", 3, 6)
    assert batch.inputs.dtype == torch.int64 and batch.targets.shape == (6,) and batch.lengths.shape == (6,)
    assert batch.inputs.shape[1] == int(batch.lengths.max())                   # None pads to the longest row
    for row, n in zip(batch.inputs, batch.lengths.tolist()):
        assert (row[:n] != 0).all() and (row[n:] == 0).all()
    wide = task.batch("train", 3, 6, length=120)
    assert wide.inputs.shape == (6, 120) and torch.equal(wide.inputs[:, :batch.inputs.shape[1]], batch.inputs)
    assert torch.equal(wide.targets, batch.targets) and batch.num_tokens == int(batch.lengths.sum())
    with pytest.raises(ValueError, match="shorter than the longest"):
        task.batch("train", 3, 6, length=int(batch.lengths.max()) - 1)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_batches_are_deterministic(name):
    a, b = _small(name), _small(name)                            # two instances: nothing hidden in the object
    first = a.batch("train", 7, 4)
    assert _same(first, b.batch("train", 7, 4))
    assert not _same(first, a.batch("train", 8, 4))
    assert not _same(first, _small(name, seed=1).batch("train", 7, 4))
    if name != "digits":  # digits' val/test are fixed images; the others draw different examples per split
        assert not _same(a.batch("val", 0, 4), a.batch("train", 0, 4))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shards_of_ranks_make_the_global_batch(name):
    # rank r of W=2 reads batch(step * W + r, b); together they are batch(step, W * b)
    task = _small(name)
    length = 120 if name == "listops" else None
    whole = task.batch("train", 3, 6, length)
    shards = [task.batch("train", 3 * 2 + r, 3, length) for r in range(2)]
    glued = Batch(torch.cat([s.inputs for s in shards]), torch.cat([s.targets for s in shards]),
                  None if whole.lengths is None else torch.cat([s.lengths for s in shards]))
    assert _same(whole, glued)


def test_stable_seed_is_fixed_across_processes_and_versions():
    # resumed runs depend on this: a change of hash would silently change every task's data
    assert stable_seed("induction_heads", 0, "train", 0, 256) == stable_seed("induction_heads", 0, "train", 0, 256)
    assert stable_seed("a", 1) == 3220829997572325274  # blake2b-64 of "('a', 1)", top bit cleared
    assert stable_seed("a", 1) != stable_seed("a", 2) != stable_seed("b", 1)
    with pytest.raises(TypeError, match="stable_seed"):
        stable_seed(object())


# ------------------------------------------------------------------------------------------------------
# Synthetic tasks: targets by construction
# ------------------------------------------------------------------------------------------------------
def test_selective_copying_targets():
    task = SelectiveCopying(vocab_size=10, length=64, num_tokens=6)
    batch = task.batch("train", 0, 16)
    M = 6
    for x, y in zip(batch.inputs, batch.targets):
        body = x[:-M]
        data = body[body != 0]
        assert data.numel() == M and ((data >= 1) & (data <= 8)).all()            # data tokens 1..V-2
        assert (x[-M:] == 9).all() and (body != 9).all()                           # markers only at the end
        assert torch.equal(y[-M:], data) and (y[:-M] == -100).all()               # data in order at markers
    assert SelectiveCopying().batch("train", 0, 1).inputs.shape == (1, 4096)      # paper default


def test_induction_heads_targets_at_any_length():
    task = InductionHeads(vocab_size=16, length=32)
    for length in (32, 100, 512):
        batch = task.batch("test", 0, 8, length=length)
        assert batch.inputs.shape == (8, length)
        for x, y in zip(batch.inputs, batch.targets):
            triggers = (x == 15).nonzero().flatten().tolist()
            assert len(triggers) == 2 and triggers[1] == length - 1
            assert int(y[-1]) == int(x[triggers[0] + 1])                       # the token after the first trigger
            assert (y[:-1] == -100).all()
    positions = [int((x == 15).nonzero()[0]) for x in task.batch("train", 0, 200, length=64).inputs]
    assert min(positions) < 16 and max(positions) > 44                        # trigger spread over the body


def test_mqar_layout_and_targets():
    V, L, kv = 512, 64, 4
    task = MQAR(vocab_size=V, length=L, num_kv_pairs=kv)
    batch = task.batch("train", 0, 32)
    slots = []
    for x, y in zip(batch.inputs, batch.targets):
        keys, values = x[0:2 * kv:2], x[1:2 * kv:2]
        assert ((keys >= 1) & (keys < V // 2)).all() and keys.unique().numel() == kv
        assert ((values >= V // 2) & (values < V)).all()
        answer_positions = (y != -100).nonzero().flatten()
        assert answer_positions.numel() == kv and (answer_positions >= 2 * kv).all()
        assert ((answer_positions - 2 * kv) % 2 == 0).all()
        value_of = dict(zip(keys.tolist(), values.tolist()))
        for p in answer_positions.tolist():
            assert int(y[p]) == value_of[int(x[p])]                            # the queried key's value
        rest = torch.ones(L, dtype=torch.bool)
        rest[:2 * kv] = False
        rest[answer_positions] = False
        assert (x[rest] == 0).all()                                             # nothing else in the query region
        slots += ((answer_positions - 2 * kv) // 2).tolist()
    # power law with a = 0.01: p(slot j) ~ 1/j, so the first slot is the most frequent and short gaps dominate
    counts = torch.bincount(torch.tensor(slots), minlength=(L - 2 * kv) // 2)
    assert int(counts.argmax()) == 0 and counts[:4].sum() > counts[-8:].sum()
    with pytest.raises(ValueError, match="vocab_size > length"):
        MQAR(vocab_size=64, length=64, num_kv_pairs=4)
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs <= length"):
        MQAR(vocab_size=512, length=64, num_kv_pairs=17)
    with pytest.raises(ValueError, match="vocab_size > length"):
        task.batch("train", 0, 2, length=600)


def test_copying_memory_layout_and_chance_baseline():
    T = 30
    task = CopyingMemory(blanks=T)
    batch = task.batch("train", 0, 16)
    x, y = batch.inputs, batch.targets
    assert x.shape == (16, T + 20) and ((x[:, :10] >= 1) & (x[:, :10] <= 8)).all()
    assert (x[:, 10:T + 9] == 0).all() and (x[:, T + 9:] == 9).all()          # T-1 blanks, 11 markers
    assert (y[:, :T + 10] == 0).all() and torch.equal(y[:, T + 10:], x[:, :10])
    # the memoryless strategy: certain blank, then uniform over the 8 symbols -> 10 ln 8 / (T + 20)
    logits = torch.full((16, T + 20, 10), -1e4)
    logits[:, :T + 10, 0] = 0.0
    logits[:, T + 10:, 1:9] = 0.0
    assert task.loss(logits, batch).item() == pytest.approx(task.baseline_loss(), rel=1e-5)
    assert task.baseline_loss() == pytest.approx(10 * math.log(8) / (T + 20))
    perfect = torch.nn.functional.one_hot(y, 10).float() * 20
    metrics = task.metrics(perfect, batch)
    assert metrics["accuracy"] == 1.0 and metrics["token_accuracy"] == 1.0
    assert task.metrics(logits, batch)["token_accuracy"] >= (T + 10) / (T + 20)  # blanks right, recall at chance


def test_adding_targets_and_baseline():
    task = AddingProblem(length=10)
    batch = task.batch("train", 0, 4000)
    values, marks = batch.inputs[..., 0], batch.inputs[..., 1]
    assert ((values >= 0) & (values <= 1)).all()
    assert (marks[:, :5].sum(1) == 1).all() and (marks[:, 5:].sum(1) == 1).all()
    assert torch.allclose(batch.targets[:, 0], (values * marks).sum(1))
    ones = torch.ones(4000, 1)
    assert task.metrics(ones, batch)["mse"] == pytest.approx(AddingProblem.BASELINE_MSE, abs=0.015)
    assert task.metrics(batch.targets.clone(), batch)["mse"] == 0.0
    per_position = torch.zeros(4000, 10, 1)
    per_position[:, -1] = batch.targets                                         # causal readout: last position
    assert task.loss(per_position, batch).item() == 0.0


# ------------------------------------------------------------------------------------------------------
# ListOps
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[MIN 3 8 ]", 3), ("[SM 7 8 9 ]", 4), ("[MED 1 2 ]", 1),
    ("[MED 3 8 1 9 ]", 5), ("[MED 5 0 9 ]", 5), ("[SM [MAX 1 2 ] [MED 4 6 9 2 ] ]", 7), ("7", 7),
    ("( ( ( [MIN 4 ) 5 ) ] )", 4),
])
def test_listops_evaluator_on_hand_examples(text, value):
    assert listops_module.evaluate(text) == value
    assert listops_module.evaluate(listops_module.encode(text)) == value


@pytest.mark.parametrize("bad", ["[MAX 2 9", "[MIN ]", "2 ]", "1 2", "", "[MAX 2 x ]"])
def test_listops_evaluator_rejects_malformed(bad):
    with pytest.raises(ValueError):
        listops_module.evaluate(bad) if "x" not in bad else listops_module.encode(bad)


def test_listops_labels_match_the_independent_evaluator():
    task = ListOps()                                                            # LRA settings: 500..2000 tokens
    checked = 0
    for index in range(200 // 25):
        batch = task.batch("train", index, 25)
        assert ((batch.lengths >= 500) & (batch.lengths <= 2000)).all()
        for row, n, label in zip(batch.inputs, batch.lengths.tolist(), batch.targets.tolist()):
            assert listops_module.evaluate(row[:n]) == label
            checked += 1
        assert 0 <= int(batch.targets.min()) and int(batch.targets.max()) <= 9
    assert checked == 200
    text = listops_module.to_string(batch.inputs[0])
    assert listops_module.encode(text) == batch.inputs[0, :batch.lengths[0]].tolist()


def test_listops_batch_of_32_takes_well_under_a_second():
    task = ListOps(seed=5)
    start = time.perf_counter()
    batch = task.batch("train", 0, 32)
    elapsed = time.perf_counter() - start
    assert batch.inputs.shape[0] == 32 and elapsed < 1.0, f"{elapsed:.2f} s"


def test_listops_splits():
    task = ListOps()
    assert [task.num_examples(s) for s in ("train", "val", "test")] == [96000, 2000, 2000]
    small = _small("listops")
    train = {tuple(small.example("train", i)[0]) for i in range(40)}
    val = {tuple(small.example("val", i)[0]) for i in range(40)}
    assert len(train) == 40 and not train & val
    with pytest.raises(RuntimeError, match="no ListOps expression"):
        listops_module.generate_expression(__import__("random").Random(0), 50, 60, max_depth=2, max_args=3,
                                           max_attempts=200)
    with pytest.raises(ValueError, match="max_length must be >= min_length"):
        ListOps(min_length=100, max_length=50)


# ------------------------------------------------------------------------------------------------------
# Finite data sets: epochs and evaluation splits
# ------------------------------------------------------------------------------------------------------
def test_finite_splits_read_in_order_then_stop():
    task = Digits()
    assert [task.num_examples(s) for s in ("train", "val", "test")] == [1400, 100, 297]
    sizes = [task.batch("test", i, 100).batch_size for i in range(3)]
    assert sizes == [100, 100, 97]
    with pytest.raises(IndexError, match="past the end of split 'test'"):
        task.batch("test", 3, 100)


def test_train_epochs_are_permutations():
    task = Digits()
    from ssmkit.tasks.digits import load_digit_arrays
    pixels, labels = load_digit_arrays()
    assert pixels.shape == (1797, 64) and labels.shape == (1797,)
    assert int(pixels.min()) == 0 and int(pixels.max()) == 16 and sorted(labels.unique().tolist()) == list(range(10))
    epoch = torch.cat([task.batch("train", i, 200).inputs for i in range(7)])  # 1400 = one epoch
    key = lambda rows: sorted(map(tuple, rows.tolist()))  # noqa: E731
    assert key(epoch) == key(pixels[:1400])                                   # every train image exactly once
    assert not torch.equal(epoch, pixels[:1400])                              # in shuffled order
    next_epoch = torch.cat([task.batch("train", i, 200).inputs for i in range(7, 14)])
    assert key(next_epoch) == key(epoch) and not torch.equal(next_epoch, epoch)


def test_digits_permutation_is_a_fixed_bijection():
    plain, permuted = Digits(), Digits(permuted=True)
    perm = permuted.permutation
    assert torch.equal(perm.sort().values, torch.arange(64)) and not torch.equal(perm, torch.arange(64))
    assert torch.equal(perm, Digits(permuted=True).permutation)
    assert not torch.equal(perm, Digits(permuted=True, permutation_seed=1).permutation)
    a, b = plain.batch("test", 0, 50), permuted.batch("test", 0, 50)
    assert torch.equal(b.inputs, a.inputs[:, perm]) and torch.equal(a.targets, b.targets)
    real = Digits(real_valued=True).batch("test", 0, 50)
    assert real.inputs.shape == (50, 64, 1) and torch.allclose(real.inputs[..., 0] * 16, a.inputs.float())
    with pytest.raises(ValueError, match="length 64"):
        plain.batch("train", 0, 2, length=32)


def test_digits_names_scikit_learn_when_it_is_missing(monkeypatch):
    from ssmkit.tasks import digits
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)                 # makes the import fail
    digits.load_digit_arrays.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            Digits()
    finally:
        digits.load_digit_arrays.cache_clear()


# ------------------------------------------------------------------------------------------------------
# Byte-level language modelling
# ------------------------------------------------------------------------------------------------------
def test_bytes_lm_over_a_folder(text_folder):
    task = BytesLM(text_folder, length=32, val_fraction=0.1, test_fraction=0.1)
    assert [f.name for f in task.files] == ["a.txt", "b.md"]                   # hidden file skipped
    corpus = bytes(task.corpus.tolist())
    assert b"SECRET" not in corpus and task.num_bytes == len(corpus)
    batch = task.batch("train", 0, 8)
    assert batch.inputs.shape == (8, 32) and batch.targets.shape == (8, 32)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])             # targets = next byte, aligned
    train_end = task.split_range("train")[1]
    for split in ("train", "val", "test"):
        start, stop = task.split_range(split)
        for x, y in zip(*(lambda b: (b.inputs, b.targets))(task.batch(split, 0, 8))):
            window = bytes(x.tolist()) + bytes([int(y[-1])])
            offset = corpus.find(window, start)
            assert start <= offset and offset + 33 <= stop                    # inside its split
    assert task.split_range("val")[0] == train_end
    only_md = BytesLM(text_folder, length=16, extensions=[".md"])
    assert [f.name for f in only_md.files] == ["b.md"]
    metrics = task.metrics(torch.zeros(8, 32, 256), batch)
    assert metrics["bits_per_byte"] == pytest.approx(8.0) and metrics["loss"] == pytest.approx(math.log(256))


def test_bytes_lm_errors(tmp_path, text_folder):
    with pytest.raises(ValueError, match="does not exist.*nowhere"):
        BytesLM(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="corpus is empty.*empty"):
        BytesLM(tmp_path / "empty")
    (tmp_path / "empty" / "zero.txt").write_text("")
    with pytest.raises(ValueError, match="corpus is empty"):
        make_task("text", paths=[tmp_path / "empty"])
    with pytest.raises(ValueError, match="corpus is empty.*extensions"):
        BytesLM(text_folder, extensions=[".rst"])
    with pytest.raises(ValueError, match="fewer than length"):
        BytesLM(text_folder, length=1000).batch("val", 0, 1)
    with pytest.raises(ValueError, match="needs paths"):
        make_task("text", paths=None)


def test_bytes_lm_default_corpus_is_the_standard_library():
    task = BytesLM(length=64)
    assert len(task.files) > 100 and task.num_bytes > 2_000_000
    assert all(f.suffix == ".py" for f in task.files)
    assert not any(set(f.parts) & STDLIB_EXCLUDED_DIRS for f in task.files)
    batch = task.batch("val", 2, 4)
    assert batch.inputs.shape == (4, 64) and torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


# ------------------------------------------------------------------------------------------------------
# Users' sequences
# ------------------------------------------------------------------------------------------------------
def test_npz_and_npy_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 7, size=(50, 12))
    classes = rng.integers(0, 3, size=50)
    np.savez(tmp_path / "d.npz", inputs=tokens, targets=classes, lengths=rng.integers(1, 13, size=50))
    task = make_task("sequences", path=tmp_path / "d.npz", val_fraction=0.2, test_fraction=0.2)
    assert task.kind == "classification" and task.vocab_size == 7 and task.num_classes == 3
    seen = []
    for split in ("train", "val", "test"):
        n = task.num_examples(split)
        batch = task.batch(split, 0, n) if split != "train" else task.batch("train", 0, n)
        assert batch.lengths is not None and batch.inputs.dtype == torch.int64
        for x, y in zip(batch.inputs, batch.targets):
            row = int(np.flatnonzero((tokens == x.numpy()).all(1))[0])
            assert classes[row] == int(y)
            seen.append(row)
    assert sorted(seen) == list(range(50))                                      # splits partition the rows

    signals = rng.normal(size=(30, 20, 3)).astype(np.float32)
    outputs = rng.normal(size=(30, 2))
    np.save(tmp_path / "x.npy", signals)
    np.save(tmp_path / "y.npy", outputs)
    task = load_sequences(tmp_path / "x.npy", targets=tmp_path / "y.npy")
    assert task.kind == "regression" and task.input_dim == 3 and task.output_dim == 2
    batch = task.batch("test", 0, 10)
    assert batch.inputs.shape == (3, 20, 3) and batch.targets.shape == (3, 2)
    row = int(np.flatnonzero(np.isclose(signals[:, 0, 0], batch.inputs[0, 0, 0].item()))[0])
    assert np.allclose(outputs[row], batch.targets[0].numpy())
    assert task.metrics(batch.targets.clone(), batch)["mse"] == 0.0


def test_csv_round_trip(tmp_path):
    lines = ["label,t0,t1,t2,t3"] + [f"{i % 4},{i},{i + 1.5},{-i},{i * 2}" for i in range(20)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    task = load_sequences(tmp_path / "d.csv", header=True, val_fraction=0.0, test_fraction=0.25)
    assert task.kind == "classification" and task.num_classes == 4 and task.input_dim == 1
    batch = task.batch("test", 0, 10)
    assert batch.inputs.shape == (5, 4, 1) and task.num_examples("val") == 0
    for x, y in zip(batch.inputs[..., 0], batch.targets):
        i = int(x[0])
        assert torch.allclose(x, torch.tensor([i, i + 1.5, -i, 2 * i], dtype=torch.float32)) and int(y) == i % 4
    with pytest.raises(ValueError, match="holds no examples"):
        task.batch("val", 0, 2)
    regression = load_sequences(tmp_path / "d.csv", header=True, kind="regression", label_column=-1)
    assert regression.kind == "regression" and regression.output_dim == 1
    batch = regression.batch("train", 0, 4)
    assert torch.allclose(batch.targets[:, 0], batch.inputs[:, 1, 0] * 2)  # last column is the label; i % 4 leads


def test_user_data_errors(tmp_path):
    with pytest.raises(ValueError, match="one row per input sequence.*N=10"):
        SequenceData(np.zeros((10, 5), dtype=np.int64), np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError, match="lengths must lie in 1..L=5"):
        SequenceData(np.zeros((10, 5), dtype=np.int64), np.zeros(10, dtype=np.int64), np.full(10, 6))
    with pytest.raises(ValueError, match="finite"):
        SequenceData(np.full((4, 5), np.nan), np.zeros(4, dtype=np.int64))
    (tmp_path / "ragged.csv").write_text("0,1,2,3\n1,1,2\n")
    with pytest.raises(ValueError, match="line 2 has 3 fields but line 1 has 4"):
        load_sequences(tmp_path / "ragged.csv")
    (tmp_path / "header.csv").write_text("label,a,b\n0,1,2\n")
    with pytest.raises(ValueError, match="header=True"):
        load_sequences(tmp_path / "header.csv")
    np.save(tmp_path / "x.npy", np.zeros((4, 3)))
    with pytest.raises(ValueError, match="pass targets="):
        load_sequences(tmp_path / "x.npy")
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="missing \\['inputs', 'targets'\\]"):
        load_sequences(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="does not exist"):
        load_sequences(tmp_path / "nothing.csv")
    (tmp_path / "d.txt").write_text("1")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_sequences(tmp_path / "d.txt")


# ------------------------------------------------------------------------------------------------------
# Losses and metrics
# ------------------------------------------------------------------------------------------------------
def _perfect_logits(task, batch, width):
    if task.kind == "lm":
        targets = batch.targets.clamp(min=0)
        return torch.nn.functional.one_hot(targets, width).float() * 30
    return torch.nn.functional.one_hot(batch.targets, width).float() * 30


@pytest.mark.parametrize("name", ["selective_copying", "induction_heads", "mqar", "listops", "digits"])
def test_metrics_perfect_and_chance(name):
    task = _small(name)
    batch = task.batch("train", 0, 64)
    width = task.vocab_size + 3 if task.kind == "lm" else task.num_classes    # padded vocabulary allowed
    perfect = task.metrics(_perfect_logits(task, batch, width), batch)
    assert perfect["accuracy"] == 1.0 and perfect["loss"] < 1e-6 and perfect["count"] > 0
    shape = batch.targets.shape + (width,)
    uniform = task.metrics(torch.zeros(shape), batch)
    assert uniform["loss"] == pytest.approx(math.log(width), rel=1e-5)           # float32 cross-entropy
    random_logits = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    chance = 1 / (task.vocab_size - 2) if name == "selective_copying" else 1 / width
    if name == "mqar":
        chance = 1 / width                                                      # values are half the vocabulary
    assert task.metrics(random_logits, batch)["accuracy"] < chance + 0.12


def test_classification_reads_the_last_valid_position():
    task = _small("listops")
    batch = task.batch("train", 0, 4)
    per_position = torch.zeros(4, batch.inputs.shape[1], 10)
    rows = torch.arange(4)
    per_position[rows, batch.lengths - 1, batch.targets] = 30.0                 # right answer only at lengths-1
    assert task.metrics(per_position, batch)["accuracy"] == 1.0
    assert torch.equal(last_valid(per_position, batch.lengths), per_position[rows, batch.lengths - 1])
    with pytest.raises(ValueError, match="logits must be"):
        task.loss(torch.zeros(4, 9), batch)


def test_lm_loss_checks_shapes():
    task = _small("induction_heads")
    batch = task.batch("train", 0, 2)
    with pytest.raises(ValueError, match="vocab_size=16"):
        task.loss(torch.zeros(2, 48, 15), batch)
    with pytest.raises(ValueError, match="matching targets"):
        task.loss(torch.zeros(2, 47, 16), batch)
    loss = task.loss(torch.zeros(2, 48, 16, requires_grad=True), batch)
    assert loss.shape == () and loss.requires_grad


# ------------------------------------------------------------------------------------------------------
# Registry and argument checks
# ------------------------------------------------------------------------------------------------------
def test_registry_names_and_errors():
    assert {"selective_copying", "induction_heads", "mqar", "copying_memory", "adding", "listops", "digits",
            "bytes_lm", "text", "sequences"} <= set(TASKS)
    with pytest.raises(ValueError, match="unknown task 'induction_head'.*did you mean 'induction_heads'"):
        make_task("induction_head")
    with pytest.raises(ValueError, match="unknown argument\\(s\\) \\['num_kv'\\].*did you mean 'num_kv_pairs'"):
        make_task("mqar", num_kv=4)
    task = _small("mqar")
    assert _same(make_task(**task.config).batch("val", 2, 3), task.batch("val", 2, 3))


def test_batch_argument_checks():
    task = _small("induction_heads")
    with pytest.raises(ValueError, match="split must be one of"):
        task.batch("dev", 0, 2)
    with pytest.raises(ValueError, match="index must be >= 0"):
        task.batch("train", -1, 2)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        task.batch("train", 0, 2.0)
    with pytest.raises(ValueError, match="length must be >= 3"):
        task.batch("train", 0, 2, length=2)
    with pytest.raises(ValueError, match="length must be >= 2 \\* num_tokens = 32"):
        SelectiveCopying(length=20)
    with pytest.raises(ValueError, match="length L = blanks \\+ 20 must be >= 21"):
        CopyingMemory(blanks=5).batch("train", 0, 1, length=20)

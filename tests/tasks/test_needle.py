"""The needle-in-a-haystack task on bytes-LM filler (issue 17, item 1c): layout, determinism, splits, errors."""

import pytest
import torch

from ssmkit.tasks import NeedleHaystack, make_task
from ssmkit.tasks.needle import NEEDLE_END, NEEDLE_START, QUERY


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 60 KB of text whose bytes say where they came from (byte i of the file is chr(32 + i % 90)),
    with the three control bytes sprinkled in, which the task must scrub from the filler."""
    path = tmp_path_factory.mktemp("needle") / "corpus.txt"
    data = bytearray(32 + i % 90 for i in range(60_000))
    data[100:103] = bytes([NEEDLE_START, NEEDLE_END, QUERY])
    data[59_000] = QUERY
    path.write_bytes(bytes(data))
    return path


def _task(corpus, **kwargs):
    return make_task("needle_haystack", paths=str(corpus), **{"length": 64, **kwargs})


def _parse(row):
    """(needle start, key, value, query key, query value so far) of one input row."""
    row = row.tolist()
    start, end, query = row.index(NEEDLE_START), row.index(NEEDLE_END), row.index(QUERY)
    key, value = bytes(row[start + 1:end]).split(b"=")
    q_key, q_value = bytes(row[query + 1:]).split(b"=")
    return start, key, value, q_key, q_value


def test_layout_needle_query_and_targets(corpus):
    task = _task(corpus, key_len=3, value_len=5)
    batch = task.batch("train", 0, 8)
    assert batch.inputs.shape == batch.targets.shape == (8, 64)
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64
    for x, y in zip(batch.inputs, batch.targets):
        for marker in (NEEDLE_START, NEEDLE_END, QUERY):
            assert int((x == marker).sum()) == 1                           # only the needle and the query
        start, key, value, q_key, q_value = _parse(x)
        assert len(key) == 3 and key.isalpha() and key.islower() and len(value) == 5 and value.isdigit()
        assert q_key == key and q_value == value[:-1]                      # the value so far, teacher forced
        assert (y[:-5] == -100).all()
        assert bytes(y[-5:].tolist()) == value                             # every value byte, from "=" on
        assert int(x[-5]) == ord("=")


def test_depth_places_the_needle(corpus):
    filler = _task(corpus).filler_length(64)
    assert filler == 64 - 2 * 4 - 2 * 4 - 4
    for depth, where in [(0.0, 0), (1.0, filler), (0.5, round(0.5 * filler))]:
        batch = _task(corpus, depth=depth).batch("val", 1, 4)
        assert [_parse(x)[0] for x in batch.inputs] == [where] * 4
    starts = {_parse(x)[0] for x in _task(corpus).batch("train", 0, 32).inputs}
    assert len(starts) > 8                                                  # depth=None: drawn per example


def test_filler_comes_from_the_split_and_control_bytes_are_scrubbed(corpus):
    task = _task(corpus, length=200, depth=1.0)                            # needle at the end: filler first
    n = task.filler_length(200)
    for split in ("train", "val", "test"):
        start, stop = task.haystack.split_range(split)
        data = corpus.read_bytes()
        for x in task.batch(split, 0, 16).inputs:
            filler = bytes(x[:n].tolist())
            offset = (filler[0] - 32 - start) % 90 + start                 # first candidate offset in the split
            found = [o for o in range(offset, stop - n + 1, 90)
                     if data[o:o + n].replace(b"\x02", b" ").replace(b"\x03", b" ").replace(b"\x05", b" ")
                     == filler]
            assert found and all(start <= o and o + n <= stop for o in found), split
    first_train = task.batch("train", 0, 200).inputs[:, :n]
    assert not ((first_train == NEEDLE_START) | (first_train == QUERY)).any()


def test_batches_are_a_pure_function_of_seed_split_and_index(corpus):
    a, b = _task(corpus), _task(corpus)
    first = a.batch("train", 3, 4)
    assert torch.equal(first.inputs, b.batch("train", 3, 4).inputs)
    assert torch.equal(first.targets, b.batch("train", 3, 4).targets)
    assert not torch.equal(first.inputs, a.batch("train", 4, 4).inputs)
    assert not torch.equal(first.inputs, _task(corpus, seed=1).batch("train", 3, 4).inputs)
    assert not torch.equal(a.batch("val", 0, 4).inputs, a.batch("train", 0, 4).inputs)
    # two ranks' shards are the global batch
    whole = a.batch("train", 2, 6)
    shards = [a.batch("train", 2 * 2 + r, 3) for r in (0, 1)]
    assert torch.equal(whole.inputs, torch.cat([s.inputs for s in shards]))
    # the config rebuilds the same task
    assert torch.equal(make_task(**a.config).batch("test", 1, 3).inputs, a.batch("test", 1, 3).inputs)


def test_other_lengths_and_default_corpus():
    task = make_task("needle_haystack", length=96)                          # the standard-library sources
    assert isinstance(task, NeedleHaystack) and task.vocab_size == 256
    for length in (96, 300):
        batch = task.batch("test", 0, 2, length=length)
        assert batch.inputs.shape == (2, length) and int((batch.targets != -100).sum()) == 2 * 4


def test_metrics_exact_match(corpus):
    task = _task(corpus)
    batch = task.batch("train", 0, 4)
    logits = torch.nn.functional.one_hot(batch.targets.clamp(min=0), 259).float() * 30   # padded vocabulary
    perfect = task.metrics(logits, batch)
    assert perfect["accuracy"] == 1.0 and perfect["exact_match"] == 1.0 and perfect["count"] == 16
    logits[0, -1] = 0.0
    logits[0, -1, (int(batch.targets[0, -1]) + 1) % 256] = 30.0            # one wrong digit in row 0
    one_off = task.metrics(logits, batch)
    assert one_off["accuracy"] == 15 / 16 and one_off["exact_match"] == 3 / 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(length=19), "length must be >= 2 \\* key_len \\+ 2 \\* value_len \\+ 4 = 20"),
    (dict(depth=1.5), "depth must be None .* in \\[0, 1\\]; got 1.5"),
    (dict(key_len=0), "key_len"),
    (dict(value_len=0), "value_len"),
])
def test_bad_arguments_are_named(corpus, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _task(corpus, **kwargs)


def test_too_small_a_split_is_named(tmp_path):
    path = tmp_path / "small.txt"
    path.write_bytes(b"x" * 2_000)
    task = make_task("needle_haystack", paths=str(path), length=400)
    task.batch("train", 0, 1)
    with pytest.raises(ValueError, match=r"split 'val' of the filler corpus holds \d+ bytes, fewer than the 381"):
        task.batch("val", 0, 1)

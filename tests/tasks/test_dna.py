"""Nucleotide tokenizers, the generated A-tract phasing task and reverse-complement-equivariant classifiers."""

import random
import socket

import pytest
import torch

from ssmkit.models import ModelConfig
from ssmkit.models.model import SSMModel
from ssmkit.tasks import GeneratedATractPhasing, NucleotideTokenizer, make_task, reverse_complement
from ssmkit.tasks.dna import TRACT, count_pairs
from ssmkit.train import ModelSpec, model_config_for

TOKENIZERS = [(1, None), (2, None), (3, None), (4, 1), (3, 1)]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the task tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def random_dna(length, seed, alphabet="ACGT"):
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(length))


# ------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,stride", TOKENIZERS)
def test_tokenizer_round_trips(k, stride):
    tokenizer = NucleotideTokenizer(k, stride)
    for seed, length in enumerate((12, 60, 96)):
        text = random_dna(length, seed)
        ids = tokenizer.encode(text.lower() if seed % 2 else text)
        assert ids.shape == (tokenizer.num_tokens(length),)
        assert int(ids.min()) >= 2 and int(ids.max()) < tokenizer.vocab_size
        assert tokenizer.decode(ids) == text


def test_character_tokenizer_keeps_n_and_skips_padding():
    tokenizer = NucleotideTokenizer()
    ids = tokenizer.encode("ACGTNacgtn")
    assert ids.tolist() == [2, 3, 4, 5, 1, 2, 3, 4, 5, 1]
    assert tokenizer.decode(torch.cat([ids, torch.zeros(3, dtype=torch.long)])) == "ACGTNACGTN"
    assert NucleotideTokenizer(2).decode(NucleotideTokenizer(2).encode("ANGT")) == "NNGT"


@pytest.mark.parametrize("k,stride", TOKENIZERS)
def test_reverse_complement_on_tokens_is_the_tokens_of_the_reverse_complement(k, stride):
    tokenizer = NucleotideTokenizer(k, stride)
    cmap = tokenizer.complement_map
    assert torch.equal(cmap[cmap], torch.arange(tokenizer.vocab_size))
    for seed in range(3):
        text = random_dna(48, seed, "ACGTN" if k == 1 else "ACGT")
        assert torch.equal(tokenizer.encode(reverse_complement(text)),
                           tokenizer.reverse_complement_ids(tokenizer.encode(text)))


def test_reverse_complement_string():
    assert reverse_complement("AACGTn") == "NACGTT"
    assert reverse_complement(reverse_complement(TRACT + 'GC')) == TRACT + 'GC'


@pytest.mark.parametrize("kwargs,match", [(dict(k=0), "k must be"), (dict(k=3, stride=2), "stride must be"),
                                          (dict(k=True), "k must be")])
def test_tokenizer_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NucleotideTokenizer(**kwargs)


def test_tokenizer_refuses_bad_input():
    with pytest.raises(ValueError, match="multiple of 3"):
        NucleotideTokenizer(3).encode("ACGTA")
    with pytest.raises(TypeError, match="sequence must be a str"):
        NucleotideTokenizer().encode(b"ACGT")
    with pytest.raises(ValueError, match="vocab_size=6"):
        NucleotideTokenizer().decode([2, 9])
    with pytest.raises(ValueError, match="same length"):
        NucleotideTokenizer().encode_batch(["ACG", "AC"])


# ------------------------------------------------------------------------------------------------------
# Task
# ------------------------------------------------------------------------------------------------------
def test_task_is_deterministic_offline_and_has_the_documented_shapes(no_network):
    task = make_task("generated_a_tract_phasing", seed=3)
    first = task.batch("train", 2, 4, length=2000)
    again = make_task("generated_a_tract_phasing", seed=3).batch("train", 2, 4, length=2000)
    assert first.inputs.shape == (4, 2000) and first.inputs.dtype == torch.int64
    assert first.targets.shape == (4,) and set(first.targets.tolist()) <= {0, 1}
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    # rows are examples: batch 2 of size 4 holds examples 8..11, the first four rows of batch 1 of size 8
    assert torch.equal(task.batch("train", 1, 8, length=2000).inputs[:4], first.inputs)
    assert not torch.equal(first.inputs, make_task("generated_a_tract_phasing", seed=4).batch("train", 2, 4, 2000).inputs)
    assert not torch.equal(first.inputs, task.batch("test", 2, 4, length=2000).inputs)
    kmers = make_task("generated_a_tract_phasing", k=4, seed=3).batch("train", 2, 4, length=2000)
    assert kmers.inputs.shape == (4, 500) and torch.equal(kmers.targets, first.targets)  # same bases, other tokens
    overlapping = make_task("generated_a_tract_phasing", k=3, stride=1, length=2000, seed=3).batch("train", 2, 4, length=2000)
    assert overlapping.inputs.shape == (4, 1998)


def test_labels_follow_the_grammar_and_do_not_depend_on_the_strand():
    task = GeneratedATractPhasing(seed=0)
    labels = []
    for example in range(24):
        codes, label = task.example("val", example, 3000)
        text = "".join("ACGT"[c] for c in codes)
        grammatical, ungrammatical = count_pairs(text)
        pairs = task.num_pairs(3000)
        assert grammatical + ungrammatical >= pairs  # every planted pair is found (background may add more)
        assert label == int(grammatical > ungrammatical)
        assert count_pairs(reverse_complement(text)) == (grammatical, ungrammatical)
        labels.append(label)
    assert 6 <= sum(labels) <= 18  # both classes, about half each


def test_count_pairs_reads_both_strands_and_the_spacing():
    background = "GC" * 20
    in_phase = background + TRACT + "C" * 4 + TRACT + background
    out_of_phase = background + TRACT + "G" * 10 + TRACT + background
    assert count_pairs(in_phase) == (1, 0)
    assert count_pairs(out_of_phase) == (0, 1)
    assert count_pairs(reverse_complement(in_phase)) == (1, 0)  # T-tracts: the same pair on the other strand
    assert count_pairs(background + TRACT + "C" * 7 + TRACT + background) == (0, 0)  # neither spacing
    assert count_pairs(background + TRACT + "C" * 4 + "TTTTTT" + background) == (0, 0)  # one tract per strand


def test_task_refuses_bad_lengths_and_settings():
    task = make_task("generated_a_tract_phasing", k=3, length=999)
    with pytest.raises(ValueError, match="multiple of 3"):
        task.batch("train", 0, 1, length=1000)
    with pytest.raises(ValueError, match="multiple of 3"):
        make_task("generated_a_tract_phasing", k=3)  # the default length, 10,000 bases
    with pytest.raises(ValueError, match="length >= 100"):
        make_task("generated_a_tract_phasing").batch("train", 0, 1, length=50)
    with pytest.raises(ValueError, match="gc_content"):
        make_task("generated_a_tract_phasing", gc_content=1.5)


# ------------------------------------------------------------------------------------------------------
# Reverse-complement-equivariant classifier (Caduceus)
# ------------------------------------------------------------------------------------------------------
def dna_model(mixer, rc, bidirectional=True, k=1, seed=0):
    task = make_task("generated_a_tract_phasing", k=k)
    kwargs = {"hyena": {"l_max": 256}, "attention": {"n_heads": 2}}.get(mixer, {})
    config = model_config_for(task, ModelSpec(d_model=8, n_layers=2, mixer=mixer, mixer_kwargs=kwargs,
                                              bidirectional=bidirectional, rc_equivariant=rc))
    torch.manual_seed(seed)
    return task, SSMModel(config).double()


@pytest.mark.parametrize("mixer", ["mamba", "s4d", "hyena", "attention"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_rc_equivariant_classifier_gives_the_same_logits_for_both_strands(mixer, bidirectional):
    task, model = dna_model(mixer, rc=True, bidirectional=bidirectional)
    batch = task.batch("train", 0, 3, length=200)
    reverse = task.tokenizer.reverse_complement_ids(batch.inputs)
    assert torch.equal(model(batch.inputs).logits, model(reverse).logits)  # exact, not approximate
    # the same model without the option does depend on the strand: the test above can fail
    _, plain = dna_model(mixer, rc=False, bidirectional=bidirectional)
    assert not torch.allclose(plain(batch.inputs).logits, plain(reverse).logits, atol=1e-6)


def test_rc_equivariance_with_kmers_and_right_padding():
    task, model = dna_model("mamba", rc=True, k=2)
    batch = task.batch("train", 0, 2, length=200)                   # (2, 100) 2-mer tokens
    lengths = torch.tensor([100, 60])
    inputs = batch.inputs.clone()
    inputs[1, 60:] = 0                                              # row 1: 60 tokens, then padding
    reverse = inputs.clone()
    reverse[0] = task.tokenizer.reverse_complement_ids(inputs[0])
    reverse[1, :60] = task.tokenizer.reverse_complement_ids(inputs[1, :60])
    assert torch.equal(model(inputs, lengths=lengths).logits, model(reverse, lengths=lengths).logits)


def test_rc_equivariant_config_is_checked():
    with pytest.raises(ValueError, match="needs complement_map"):
        ModelConfig(d_model=8, n_layers=1, vocab_size=6, head="classifier", num_classes=2, rc_equivariant=True)
    with pytest.raises(ValueError, match="involution"):
        ModelConfig(d_model=8, n_layers=1, vocab_size=3, head="classifier", num_classes=2, complement_map=[1, 2, 0])
    with pytest.raises(ValueError, match="head='classifier'"):
        ModelConfig(d_model=8, n_layers=1, vocab_size=6, rc_equivariant=True, complement_map=[0, 1, 5, 4, 3, 2])
    task, model = dna_model("mamba", rc=True)
    with pytest.raises(ValueError, match="no recurrent"):
        model.init_state(1)
    with pytest.raises(ValueError, match="state, return_state and context"):
        model(task.batch("train", 0, 1, length=100).inputs, return_state=True)
    config = model_config_for(task, ModelSpec(d_model=8, n_layers=1))
    assert config.complement_map == task.tokenizer.complement_map.tolist() and not config.rc_equivariant
    assert ModelConfig.from_dict(model.config.to_dict()) == model.config  # survives a checkpoint round trip

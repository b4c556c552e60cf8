"""Text in, text out: a checkpoint's own tokenizer.json (through the tokenizers package), streaming, and the
errors for a missing file or extra; byte-level models keep reading bytes."""

import sys

import pytest
import torch

from ssmkit import generate_text, load_tokenizer
from ssmkit.cli import main
from ssmkit.models import ModelConfig, from_config
from ssmkit.text import ByteTokenizer, TextStream

tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["the state space model reads the sequence one token at a time",
          "a selective scan keeps a constant state: naïve café déjà vu",
          "def step(state, token): return state"] * 20


def _tokenizer():
    """A small byte-level BPE trained here (no download), so multi-byte characters span tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("text") / "ckpt"
    tok = _tokenizer()
    torch.manual_seed(0)
    model = from_config(ModelConfig(d_model=16, n_layers=2, vocab_size=tok.get_vocab_size(), mixer="mamba",
                                    mixer_kwargs={"d_state": 4}))
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    return directory, tok


def _greedy_text(directory, tok, prompt, n):
    from ssmkit.models import from_pretrained

    model = from_pretrained(directory)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    new = model.generate(ids, max_new_tokens=n).new_tokens[0].tolist()
    return tok.decode(new, skip_special_tokens=True)


def test_cli_generate_reads_the_checkpoint_tokenizer(checkpoint, capsys):
    directory, tok = checkpoint
    prompt = "the café "
    assert main(["generate", "--checkpoint", str(directory), "--prompt", prompt, "--greedy",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == prompt + _greedy_text(directory, tok, prompt, 12) + "\n"


def test_generate_text_streams_the_same_text_it_returns(checkpoint):
    directory, tok = checkpoint
    pieces = []
    text = generate_text(directory, "a selective ", max_new_tokens=15, on_text=pieces.append)
    assert text == _greedy_text(directory, tok, "a selective ", 15)
    assert "".join(pieces) == text and len(pieces) > 1


def test_stream_holds_back_half_characters():
    stream = TextStream(ByteTokenizer())
    first, second = "é".encode("utf-8")
    assert stream.push(ord("a")) == "a"
    assert stream.push(first) == ""  # half of é: nothing final yet
    assert stream.push(second) == "é"
    assert stream.text == "aé"


def test_missing_tokenizer_json_is_named(tmp_path):
    from_config(ModelConfig(d_model=8, n_layers=1, vocab_size=300, mixer="mamba")).save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match="tokenizer.json"):
        main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "hi"])
    with pytest.raises(FileNotFoundError, match=r"m/tokenizer.json is missing"):
        load_tokenizer(tmp_path / "m", 300)


def test_missing_tokenizers_extra_is_named(checkpoint, monkeypatch):
    directory, _ = checkpoint
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the package were not installed
    with pytest.raises(ImportError, match=r"'tokenizers' package: pip install 'ssmkit\[text\]'"):
        load_tokenizer(directory)
    with pytest.raises(SystemExit, match="tokenizers"):
        main(["generate", "--checkpoint", str(directory), "--prompt", "hi"])


def test_byte_level_models_still_read_bytes(tmp_path, capsys):
    torch.manual_seed(0)
    model = from_config(ModelConfig(d_model=8, n_layers=1, vocab_size=256, mixer="mamba"))
    model.save_pretrained(tmp_path / "bytes")
    assert isinstance(load_tokenizer(tmp_path / "bytes", 256), ByteTokenizer)
    prompt = "naïve "
    new = model.eval().generate(torch.tensor([list(prompt.encode())]), max_new_tokens=6).new_tokens[0].tolist()
    assert main(["generate", "--checkpoint", str(tmp_path / "bytes"), "--prompt", prompt, "--greedy",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == prompt + bytes(new).decode("utf-8", errors="replace") + "\n"
    assert generate_text(model, prompt, max_new_tokens=6) == bytes(new).decode("utf-8", errors="replace")

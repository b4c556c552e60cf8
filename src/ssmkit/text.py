"""Text in, text out: a checkpoint directory's own tokenizer, and generation that streams text.

A checkpoint directory with a ``tokenizer.json`` (the file transformers' fast tokenizers write) is read
through the ``tokenizers`` package (``pip install 'ssmkit[text]'``); a byte-level model (vocab_size 256)
without one reads and writes UTF-8 bytes. Anything else is one clear error naming the missing file or extra.

    tokenizer = load_tokenizer("ckpt", model.config.vocab_size)
    text = generate_text("ckpt", "def fib(n):", max_new_tokens=50, on_text=print)   # or a loaded model

Streaming: token ids turn into text only once they make whole characters (a multi-byte character, or a
token whose text depends on the next one, waits), so what is streamed always equals the final text's prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

TOKENIZER_FILE = "tokenizer.json"
BYTE_VOCAB = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (the byte-level models of ``configs/bytes_*.yaml``)."""

    source = "bytes"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A ``tokenizer.json`` read by the ``tokenizers`` package (special tokens neither added on encode nor
    shown on decode)."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f"reading {path} needs the 'tokenizers' package: pip install 'ssmkit[text]' "
                              "(or pip install tokenizers)") from None
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises its own Exception type
            raise ValueError(f"{path} is not a tokenizer.json the tokenizers package can read: {err}") from None
        self.source = str(path)

    def encode(self, text: str) -> List[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


Tokenizer = Union[ByteTokenizer, JsonTokenizer]


def load_tokenizer(directory: Union[str, Path], vocab_size: Optional[int] = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory: its tokenizer.json, else bytes for a byte-level model.

    Raises FileNotFoundError naming the missing tokenizer.json (when the model is not byte-level, vocab_size
    != 256), or ImportError naming the 'tokenizers' extra.
    """
    path = Path(directory) / TOKENIZER_FILE
    if path.exists():
        return JsonTokenizer(path)
    if vocab_size == BYTE_VOCAB:
        return ByteTokenizer()
    raise FileNotFoundError(f"{path} is missing: text needs the checkpoint's tokenizer.json, or a byte-level model "
                            f"(vocab 256); this model has vocab_size={vocab_size}")


class TextStream:
    """Turns token ids, one at a time, into text as soon as it is final (see the module docstring).

    ``push(id)`` returns the new text (often "", e.g. half of a multi-byte character); ``text`` is all of it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        decoded = self.tokenizer.decode(self.ids)
        # an incomplete character decodes to U+FFFD; and a decoder may still rewrite the last piece
        # (e.g. a leading space): hold back until the text so far is a stable prefix
        if decoded.endswith("\ufffd") or not decoded.startswith(self.text):
            return ""
        new, self.text = decoded[len(self.text):], decoded
        return new

    def finish(self) -> str:
        """Whatever is still held back (a character the stream ended inside of, as U+FFFD)."""
        decoded = self.tokenizer.decode(self.ids)
        new = decoded[len(self.text):] if decoded.startswith(self.text) else ""
        self.text = decoded
        return new


def generate_text(model, prompt: str, max_new_tokens: int = 100, tokenizer: Optional[Tokenizer] = None,
                  on_text: Optional[Callable[[str], None]] = None, **generate_kwargs) -> str:
    """Generate a continuation of ``prompt`` and return it as text (the new text only).

    Args:
        model: an :class:`ssmkit.SSMModel` language model, or the path of a checkpoint directory (loaded with
            ``ssmkit.from_pretrained``; its tokenizer.json is then the tokenizer).
        prompt: the text to continue.
        tokenizer: the tokenizer (default: the directory's, or bytes for a byte-level model).
        on_text: called with each new piece of text as soon as it is final (streaming).
        generate_kwargs: passed to ``model.generate`` (do_sample, temperature, top_p, eos_token_id, seed, ...).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str; got {type(prompt).__name__}")
    if isinstance(model, (str, Path)):
        from .models import from_pretrained

        directory = model
        model = from_pretrained(directory)
        if tokenizer is None:
            tokenizer = load_tokenizer(directory, model.config.vocab_size)
    if tokenizer is None:
        if model.config.vocab_size != BYTE_VOCAB:
            raise ValueError(f"generate_text needs tokenizer= for a model with vocab_size={model.config.vocab_size} "
                             "(or the checkpoint directory, whose tokenizer.json is then read)")
        tokenizer = ByteTokenizer()
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt encodes to no tokens; give at least one character")
    stream = TextStream(tokenizer)

    def push(tokens: torch.Tensor) -> None:
        piece = stream.push(int(tokens[0]))
        if piece and on_text is not None:
            on_text(piece)

    model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, streamer=push, **generate_kwargs)
    rest = stream.finish()
    if rest and on_text is not None:
        on_text(rest)
    return stream.text

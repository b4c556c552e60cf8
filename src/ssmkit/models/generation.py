"""Generation with a carried recurrent state.

The prompt is read in parallel (``forward`` with ``return_state=True``, optionally in chunks), then tokens
are produced one at a time with ``step``: SSM layers carry a constant-size state, so memory does not grow
with the context. The state after the last token is returned, so a conversation continues from it without
reading the earlier turns again:

    out = model.generate(prompt_ids, max_new_tokens=50, return_state=True)
    more = model.generate(next_turn_ids, max_new_tokens=50, state=out.state)

Sampling follows the usual order: repetition penalty, temperature, top-k, top-p (nucleus), min-p, then a
draw from the distribution (or argmax when ``do_sample=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch


@dataclass
class GenerationOutput:
    """``sequences``: (B, prompt + new) with ``pad_token_id`` after a row's EOS and left padding for shorter
    prompts; ``new_tokens``: (B, new); ``state``: per-layer states after the last generated token (or None)."""

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    state: Optional[list] = None


def apply_sampling_filters(logits: torch.Tensor, generated: Optional[torch.Tensor], temperature: float,
                           top_k: Optional[int], top_p: Optional[float], min_p: Optional[float],
                           repetition_penalty: float) -> torch.Tensor:
    """logits (B, V) float32 -> filtered logits (removed entries are -inf)."""
    if repetition_penalty != 1.0 and generated is not None and generated.numel():
        picked = logits.gather(1, generated)
        picked = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
        logits = logits.scatter(1, generated, picked)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def _validate(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None; got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1]; got {min_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0; got {repetition_penalty}")


def _as_prompts(input_ids, attention_mask) -> List[torch.Tensor]:
    """Normalise the prompt argument to a list of 1-D LongTensors (one per row, no padding)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length); got {tuple(input_ids.shape)}")
        if attention_mask is None:
            return list(input_ids.unbind(0))
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}; "
                             f"got {tuple(attention_mask.shape)}")
        return [row[mask.bool()] for row, mask in zip(input_ids, attention_mask)]
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a padded input_ids tensor, not with a list of prompts")
    return [torch.as_tensor(p, dtype=torch.long) for p in input_ids]


def _cat_states(states: Sequence[list]) -> list:
    """Concatenate per-row model states along the batch; growing entries (KV caches) are left-padded."""
    merged = []
    for layer_states in zip(*states):
        layer = {}
        for key in layer_states[0]:
            parts = [s[key] for s in layer_states]
            if parts[0].dim() >= 3 and len({p.shape[2] for p in parts}) > 1:
                longest = max(p.shape[2] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, 0, longest - p.shape[2], 0)) if p.dim() == 4 else p
                         for p in parts]
            layer[key] = torch.cat(parts, 0)
        merged.append(layer)
    return merged


def _freeze_rows(old: list, new: list, done: torch.Tensor) -> list:
    """Keep finished rows' states as they were (so a continuation starts from the row's real last token)."""
    out = []
    for old_layer, new_layer in zip(old, new):
        layer = {}
        for key, value in new_layer.items():
            prev = old_layer[key]
            if prev.shape == value.shape:
                mask = done.view(-1, *([1] * (value.dim() - 1)))
                layer[key] = torch.where(mask, prev, value)
            else:  # a growing cache: finished rows append padding, which later tokens never see as content
                layer[key] = value
        out.append(layer)
    return out


class GenerationMixin:
    """Adds ``generate`` and ``generate_stream`` to :class:`~ssmkit.models.model.SSMModel`."""

    #: decoders ``generate`` keeps on the model between calls (models/decoding.py); a copy or pickle of the
    #: model leaves them out (they hold compiled kernels, packed weights and CUDA graphs, rebuilt when needed)
    _decoder_caches = ("_fused_decoder", "_packed_decoder", "_cuda_graph_decoder")

    def __getstate__(self):
        state = super().__getstate__()
        for key in self._decoder_caches:
            state.pop(key, None)
        return state

    @torch.no_grad()
    def prefill(self, prompts: List[torch.Tensor], state: Optional[list] = None,
                chunk_size: Optional[int] = None):
        """Read prompts (a list of 1-D id tensors) and return (last logits (B, V), state).

        Rows of equal length are read together; rows of different lengths are read one at a time and their
        states stacked, which gives exactly what each prompt gives alone. ``chunk_size`` reads long prompts in
        pieces, carrying the state (same result, bounded activation memory).
        """
        device = next(self.parameters()).device
        if not prompts:
            raise ValueError("input_ids must hold at least one prompt")
        for i, p in enumerate(prompts):
            if p.dim() != 1 or p.numel() == 0:
                raise ValueError(f"prompt {i} is empty or not 1-D (shape {tuple(p.shape)}); every prompt needs >= 1 token")
        lengths = {p.numel() for p in prompts}
        groups = [torch.stack(prompts)] if len(lengths) == 1 else [p[None] for p in prompts]
        if state is not None and len(groups) > 1:
            states_in = [[{k: v[i : i + 1] for k, v in layer.items()} for layer in state] for i in range(len(prompts))]
        else:
            states_in = [state] * len(groups)
        all_logits, all_states = [], []
        for ids, st in zip(groups, states_in):
            ids = ids.to(device)
            pieces = ids.split(chunk_size or ids.shape[1], dim=1)
            for piece in pieces:
                out = self(piece, state=st, return_state=True, logits_to_keep=1)
                st = out.state
            all_logits.append(out.logits[:, -1].float())
            all_states.append(st)
        logits = torch.cat(all_logits, 0)
        return logits, (all_states[0] if len(all_states) == 1 else _cat_states(all_states))

    @torch.no_grad()
    def generate_stream(self, input_ids: Union[torch.Tensor, Sequence], max_new_tokens: int, do_sample: bool = False,
                        temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                        min_p: Optional[float] = None, repetition_penalty: float = 1.0,
                        eos_token_id: Optional[Union[int, Sequence[int]]] = None, seed: Optional[int] = None,
                        state: Optional[list] = None, attention_mask: Optional[torch.Tensor] = None,
                        prefill_chunk_size: Optional[int] = None, pad_token_id: int = 0,
                        decode_backend: Optional[str] = None,
                        _result: Optional[dict] = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (B,), as soon as it is chosen (see ``generate``)."""
        from .decoding import fused_decoder, graph_decoder, packed_decoder, resolve_decode_backend

        if self.config.head != "lm":
            raise ValueError(f"generate needs a language-model head; this model's head is {self.config.head!r}")
        _validate(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
        backend, why = resolve_decode_backend(self, decode_backend)
        prompts = _as_prompts(input_ids, attention_mask)
        if backend == "cuda_graph":
            try:
                decoder = graph_decoder(self)
                decoder.prepare(len(prompts))  # record the graph now, so a failure is seen before any output
                step = decoder.step
            except Exception as error:
                if decode_backend == "cuda_graph":
                    raise RuntimeError(f"decode_backend='cuda_graph': the step could not be captured "
                                       f"({type(error).__name__}: {error})") from error
                backend, why = "module", f"{why}, but the step could not be captured ({type(error).__name__}: {error})"
        if backend != "cuda_graph":
            step = {"fused": lambda: fused_decoder(self).step, "packed": lambda: packed_decoder(self).step}.get(
                backend, lambda: self.step)()
        self.last_decode_backend, self.last_decode_backend_reason = backend, why
        # the CUDA-graph decoder updates its state in place: finished rows are saved when they finish instead
        in_place = backend == "cuda_graph"
        finished_rows: list = []
        logits, state = self.prefill(prompts, state, prefill_chunk_size)
        device = logits.device
        eos = torch.tensor([] if eos_token_id is None else
                           ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)), device=device)
        generator = None
        if do_sample:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        history = None
        if repetition_penalty != 1.0:
            width = max(p.numel() for p in prompts)
            history = torch.stack([torch.cat([p.new_full((width - p.numel(),), int(p[0])), p]) for p in prompts]).to(device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        want_state = bool(_result is not None and _result.get("want_state"))
        vocab = self.config.vocab_size
        for i in range(max_new_tokens):
            scores = apply_sampling_filters(logits[:, :vocab], history, temperature, top_k, top_p, min_p,
                                            repetition_penalty)
            if do_sample:
                token = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
            else:
                token = scores.argmax(-1)
            if eos.numel():  # without EOS ids no row finishes early, and the loop never waits for the device
                token = torch.where(done, torch.full_like(token, pad_token_id), token)
            yield token
            if history is not None:
                history = torch.cat([history, token[:, None]], 1)
            if eos.numel():
                finished_now = torch.isin(token, eos) & ~done
                more = i < max_new_tokens - 1 and not bool((done | finished_now).all())
            else:
                finished_now, more = None, i < max_new_tokens - 1
            if not more and not want_state:
                break
            # feed the token: its logits give the next choice, and the state then covers every generated token
            logits, new_state = step(token, state)
            if in_place:
                state = new_state
                if finished_now is not None and bool(finished_now.any()):
                    rows = finished_now.nonzero()[:, 0]
                    finished_rows.append((rows, [{k: v[rows].clone() for k, v in layer.items()} for layer in state]))
            elif finished_now is not None and bool(done.any()):
                state = _freeze_rows(state, new_state, done)
            else:
                state = new_state
            logits = logits.float()
            if finished_now is not None:
                done = done | finished_now
            if not more:
                break
        if _result is not None:
            # the fused and CUDA-graph decoders' states live in buffers they reuse: hand the caller a copy
            if backend in ("fused", "cuda_graph"):
                state = [{k: v.clone() for k, v in layer.items()} for layer in state]
            for rows, saved in finished_rows:  # rows that finished keep the state they had at their EOS
                for layer, layer_saved in zip(state, saved):
                    for key, value in layer_saved.items():
                        layer[key][rows] = value
            _result["state"] = state

    def generate(self, input_ids: Union[torch.Tensor, Sequence], max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 min_p: Optional[float] = None, repetition_penalty: float = 1.0,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None, seed: Optional[int] = None,
                 streamer: Optional[Union[Callable[[torch.Tensor], None], object]] = None,
                 state: Optional[list] = None, attention_mask: Optional[torch.Tensor] = None,
                 prefill_chunk_size: Optional[int] = None, pad_token_id: int = 0,
                 return_state: bool = False, decode_backend: Optional[str] = None) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` tokens per row.

        Args:
            input_ids: (B, L) ids, a (L,) prompt, or a list of prompts of different lengths (each row then
                gives exactly what it gives alone); with ``attention_mask`` (B, L), padded positions (0) are
                dropped, left or right.
            do_sample, temperature, top_k, top_p, min_p, repetition_penalty: sampling controls (greedy when
                ``do_sample`` is False; the filters still shape the argmax only through the penalty).
            eos_token_id: one id or several; a row stops at its first EOS, later positions hold pad_token_id.
            seed: seeds a private generator, so sampling is reproducible and leaves global RNG alone.
            streamer: a callable receiving each step's tokens (B,), or an object with ``put(tokens)`` and
                ``end()`` (transformers' streamer protocol).
            state: continue from this per-layer state (a previous ``generate(..., return_state=True)``).
            prefill_chunk_size: read the prompt in pieces of this many tokens.
            return_state: return the state after the last generated token, to continue later.
            decode_backend: how each new token runs through the model (execution only: the tokens do not
                depend on it): None (the default: "cuda_graph" for a supported model on a GPU, else
                "module"), "module" (``model.step``), "fused" (one C++ call per layer on the CPU: Mamba,
                Mamba-2), "packed" (``model.step`` with every linear map on the same C++ kernel: any CPU model),
                "cuda_graph" (the whole step replayed from one CUDA graph) or "auto" (the fast path of the
                device where supported); see :mod:`ssmkit.models.decoding`. Afterwards
                ``model.last_decode_backend`` and ``model.last_decode_backend_reason`` say which ran and why.
        """
        result = {"want_state": return_state}
        tokens = []
        for token in self.generate_stream(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, min_p,
                                          repetition_penalty, eos_token_id, seed, state, attention_mask,
                                          prefill_chunk_size, pad_token_id, decode_backend, _result=result):
            tokens.append(token)
            if streamer is not None:
                (streamer.put if hasattr(streamer, "put") else streamer)(token)
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        prompts = _as_prompts(input_ids, attention_mask)
        device = next(self.parameters()).device
        new = torch.stack(tokens, 1) if tokens else torch.empty(len(prompts), 0, dtype=torch.long, device=device)
        width = max(p.numel() for p in prompts)
        padded = torch.stack([torch.cat([p.new_full((width - p.numel(),), pad_token_id), p]) for p in prompts]).to(device)
        return GenerationOutput(sequences=torch.cat([padded, new], 1), new_tokens=new,
                                state=result.get("state") if return_state else None)

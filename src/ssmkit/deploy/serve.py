"""``ssmkit serve``: an OpenAI-style completions server with continuous batching and resumable sessions.

    ssmkit serve --checkpoint outputs/bytes_mamba/final --port 8000
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"prompt": "def ", "max_tokens": 40, "temperature": 0, "session_id": "alice"}'

Endpoint ``POST /v1/completions`` takes OpenAI's fields ``prompt`` (a string for byte-level models, vocab 256,
or a list of token ids), ``max_tokens``, ``temperature`` (0: greedy), ``top_p``, ``seed``, ``stream`` and
``model`` (accepted, not checked), plus ``top_k`` and ``session_id``. It answers OpenAI's ``text_completion``
object, each choice also carrying ``token_ids``; with ``stream`` it sends server-sent events, one per token,
ending with ``data: [DONE]``. ``GET /health`` reports the load.

Continuous batching: one engine thread owns the model. Between two decode steps it admits waiting requests
(reading each prompt with the parallel forward) and drops finished ones; each decode step runs every active
request's token through ``model.step`` as one batch. States are constant-size, so a request joins or leaves
by concatenating or slicing the batch; nothing is padded.

Sessions: with ``session_id`` the request continues from the state the previous request of that session
left (see :mod:`ssmkit.deploy.sessions`), reading only its own prompt; the state after its last generated
token is committed to disk before the response ends. A session is used by one request at a time (409).

Limits, each a clear 4xx: body size (413), prompt tokens, ``max_tokens`` (400), waiting requests (429),
sessions (429), time per request (408); malformed JSON, wrong types and ids outside the vocabulary are 400.
The server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from . import require
from .sessions import SessionError, SessionStore, check_session_id, model_fingerprint


@dataclass
class ServerLimits:
    """What one request and the whole server may ask for."""

    max_new_tokens: int = 512  # largest max_tokens a request may ask
    max_prompt_tokens: int = 8192
    max_request_bytes: int = 1 << 20
    max_batch: int = 32  # requests decoded together; more wait
    max_waiting: int = 256  # requests waiting to join the batch; more get 429
    max_sessions: int = 10_000
    max_sessions_in_memory: int = 64
    request_timeout_s: float = 120.0


class RequestError(Exception):
    """An HTTP error with a status and a one-line message (always 4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ----------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    ids: List[int]
    max_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    seed: Optional[int]
    session_id: Optional[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False
    # engine side
    state: Optional[list] = None
    logits: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None
    produced: int = 0
    finish_reason: Optional[str] = None
    created: float = field(default_factory=time.monotonic)

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the server's event loop has closed (shutdown): nobody is listening
            pass


class Engine:
    """The thread that owns the model: admits jobs, runs batched decode steps, commits sessions."""

    def __init__(self, model, store: SessionStore, limits: ServerLimits, eos_token_id: Optional[int] = None):
        self.model, self.store, self.limits, self.eos = model, store, limits, eos_token_id
        self.vocab = model.config.vocab_size
        self.waiting: "queue.Queue[_Job]" = queue.Queue()
        self.active: List[_Job] = []
        self._held: Optional[_Job] = None  # taken from the queue while idle, admitted next
        self.busy_sessions: set = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ssmkit-engine", daemon=True)
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self.waiting.qsize() >= self.limits.max_waiting:
                raise RequestError(429, f"the server has max_waiting={self.limits.max_waiting} requests waiting; "
                                        "retry later")
            if job.session_id is not None:
                if job.session_id in self.busy_sessions:
                    raise RequestError(409, f"session {job.session_id!r} is already generating; a session takes "
                                            "one request at a time")
                self.busy_sessions.add(job.session_id)
        self.waiting.put(job)

    def _release(self, job: _Job) -> None:
        if job.session_id is not None:
            with self._lock:
                self.busy_sessions.discard(job.session_id)

    # ------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._admit()
            if not self.active:
                try:  # idle: sleep until a request arrives, then admit it with whatever else came
                    self._held = self.waiting.get(timeout=0.05)
                except queue.Empty:
                    pass
                continue
            try:
                self._decode_step()
            except Exception as error:  # noqa: BLE001 - fail the requests, keep the server
                for job in self.active:
                    self._finish(job, error=f"generation failed: {error}")
                self.active = []

    def _admit(self) -> None:
        while len(self.active) < self.limits.max_batch:
            if self._held is not None:
                job, self._held = self._held, None
            else:
                try:
                    job = self.waiting.get_nowait()
                except queue.Empty:
                    return
            if job.cancelled:
                self._release(job)
                continue
            try:
                state = self.store.get(job.session_id) if job.session_id is not None else None
                logits, job.state = self.model.prefill([torch.tensor(job.ids, dtype=torch.long)], state)
                job.logits = logits[0]
            except SessionError as error:
                self._finish(job, error=str(error), status=409)
                continue
            except Exception as error:  # noqa: BLE001
                self._finish(job, error=f"reading the prompt failed: {error}")
                continue
            if job.temperature > 0:
                job.generator = torch.Generator()
                job.generator.manual_seed(job.seed if job.seed is not None else torch.seed())
            self.active.append(job)

    def _choose(self, job: _Job) -> int:
        from ..models.generation import apply_sampling_filters

        logits = job.logits[None, : self.vocab].float()
        if job.temperature == 0:
            return int(logits.argmax(-1))
        scores = apply_sampling_filters(logits, None, job.temperature, job.top_k, job.top_p, None, 1.0)
        return int(torch.multinomial(scores.softmax(-1), 1, generator=job.generator))

    def _decode_step(self) -> None:
        """Choose one token for every active job, then feed the chosen tokens through one batched step.

        A job's last token is fed too when it has a session, so the committed state covers every token
        (as ``model.generate(..., return_state=True)`` does); without a session it leaves at once.
        """
        feeding, tokens = [], []
        for job in self.active:
            if job.cancelled or time.monotonic() - job.created > self.limits.request_timeout_s:
                job.finish_reason = "cancelled" if job.cancelled else "timeout"
                continue
            token = self._choose(job)
            job.produced += 1
            job.emit(("token", token))
            if job.produced >= job.max_tokens:
                job.finish_reason = "length"
            elif self.eos is not None and token == self.eos:
                job.finish_reason = "stop"
            if job.finish_reason is None or job.session_id is not None:
                feeding.append(job)
                tokens.append(token)
        if feeding:
            state = _cat_rows([job.state for job in feeding])
            logits, state = self.model.step(torch.tensor(tokens, dtype=torch.long), state)
            self.steps += 1
            for row, job in enumerate(feeding):
                job.state = [{k: v[row : row + 1] for k, v in layer.items()} for layer in state]
                job.logits = logits[row]
        still = []
        for job in self.active:
            if job.finish_reason is None:
                still.append(job)
            elif job.finish_reason in ("timeout", "cancelled"):
                self._finish(job, error=f"the request took longer than request_timeout_s="
                                        f"{self.limits.request_timeout_s}", status=408)
            else:
                self._finish(job)
        self.active = still

    def _finish(self, job: _Job, error: Optional[str] = None, status: int = 500) -> None:
        try:
            if error is None and job.session_id is not None:
                self.store.commit(job.session_id, job.state)
        except Exception as commit_error:  # noqa: BLE001
            error, status = f"saving the session failed: {commit_error}", 500
        finally:
            self._release(job)
        job.emit(("error", status, error) if error is not None else ("done", job.finish_reason))


def _cat_rows(states: List[list]) -> list:
    if len(states) == 1:
        return states[0]
    return [{k: torch.cat([s[i][k] for s in states], 0) for k in states[0][i]} for i in range(len(states[0]))]


# ----------------------------------------------------------------------------------------------------
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "session_id"}


def _number(body, name, default, low, high, integer=False, allow_none=False):
    value = body.get(name, default)
    if value is None and allow_none:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(400, f"{name} must be {kind} in [{low}, {high}]; got {value!r}")
    return value


def parse_request(raw: bytes, vocab_size: int, limits: ServerLimits) -> dict:
    """Validate a completions request body; RequestError (400/413) names what is wrong."""
    if len(raw) > limits.max_request_bytes:
        raise RequestError(413, f"request body is {len(raw)} bytes; the limit is max_request_bytes="
                                f"{limits.max_request_bytes}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object; got {type(body).__name__}")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise RequestError(400, f"unknown fields {unknown}; this server takes {sorted(FIELDS)}")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        if vocab_size != 256:
            raise RequestError(400, f"a text prompt needs a byte-level model (vocab 256); this model has "
                                    f"vocab_size={vocab_size}: send a list of token ids")
        ids = list(prompt.encode("utf-8"))
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(400, f"prompt ids must lie in [0, vocab_size={vocab_size}); got {bad[:5]}")
        ids = list(prompt)
    else:
        raise RequestError(400, f"prompt must be a string or a list of integer token ids; got "
                                f"{type(prompt).__name__ if prompt is not None else 'nothing'}")
    if not ids:
        raise RequestError(400, "prompt is empty; give at least one token")
    if len(ids) > limits.max_prompt_tokens:
        raise RequestError(400, f"prompt has {len(ids)} tokens; the limit is max_prompt_tokens="
                                f"{limits.max_prompt_tokens}")
    session_id = body.get("session_id")
    if session_id is not None:
        try:
            check_session_id(session_id)
        except SessionError as error:
            raise RequestError(400, str(error)) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream must be true or false; got {stream!r}")
    return {"ids": ids, "as_text": isinstance(prompt, str),
            "max_tokens": _number(body, "max_tokens", 16, 1, limits.max_new_tokens, integer=True),
            "temperature": float(_number(body, "temperature", 1.0, 0.0, 100.0)),
            "top_p": _number(body, "top_p", None, 1e-9, 1.0, allow_none=True),
            "top_k": _number(body, "top_k", None, 1, vocab_size, integer=True, allow_none=True),
            "seed": _number(body, "seed", None, 0, 2**63 - 1, integer=True, allow_none=True),
            "session_id": session_id, "stream": stream}


class _Detokenizer:
    """Byte-level models: bytes -> text, holding back an incomplete UTF-8 character; others: ids as text."""

    def __init__(self, as_text: bool):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if as_text else None

    def __call__(self, token: int, final: bool = False) -> str:
        if self.decoder is None:
            return f" {token}"
        return self.decoder.decode(bytes([token]) if 0 <= token < 256 else b"", final=final)


def create_app(model, session_dir, limits: Optional[ServerLimits] = None, eos_token_id: Optional[int] = None,
               model_name: str = "ssmkit"):
    """The ASGI application (Starlette) serving ``model``; the engine thread starts and stops with it."""
    starlette_apps = require("starlette.applications", "ssmkit serve")
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    if model.config.head != "lm":
        raise ValueError(f"ssmkit serve needs a language model; this model's head is {model.config.head!r}")
    limits = limits or ServerLimits()
    model = model.eval()
    store = SessionStore(session_dir, model_fingerprint(model.config), limits.max_sessions,
                         limits.max_sessions_in_memory)
    engine = Engine(model, store, limits, eos_token_id)
    vocab = model.config.vocab_size

    def error_response(status: int, message: str) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    async def completions(request: Request):
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            declared = 0
        if declared > limits.max_request_bytes:
            return error_response(413, f"request body is {declared} bytes; the limit is max_request_bytes="
                                       f"{limits.max_request_bytes}")
        try:
            req = parse_request(await request.body(), vocab, limits)
            if req["session_id"] is not None:
                try:
                    store.check_can_create(req["session_id"])
                except SessionError as error:
                    raise RequestError(429, str(error)) from None
            job = _Job(req["ids"], req["max_tokens"], req["temperature"], req["top_k"], req["top_p"], req["seed"],
                       req["session_id"], asyncio.get_running_loop(), asyncio.Queue())
            engine.submit(job)
        except RequestError as error:
            return error_response(error.status, error.message)
        completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        detok = _Detokenizer(req["as_text"])
        deadline = time.monotonic() + limits.request_timeout_s + 5.0  # the engine enforces the limit first

        async def next_event():
            remaining = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(job.events.get(), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                job.cancelled = True
                return ("error", 408, f"the request took longer than request_timeout_s={limits.request_timeout_s}")

        def chunk(text, token_ids, finish_reason):
            return {"id": completion_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "token_ids": token_ids, "finish_reason": finish_reason,
                                 "logprobs": None}]}

        if not req["stream"]:
            tokens, event = [], ("waiting",)
            try:
                while True:
                    event = await next_event()
                    if event[0] == "token":
                        tokens.append(event[1])
                    elif event[0] == "error":
                        return error_response(event[1], event[2])
                    else:
                        break
            finally:
                if event[0] != "done":
                    job.cancelled = True  # the client went away or the request failed: the engine drops it
            text = "".join(detok(t) for t in tokens) + detok(-1, final=True)
            body = chunk(text, tokens, event[1])
            body["usage"] = {"prompt_tokens": len(req["ids"]), "completion_tokens": len(tokens),
                             "total_tokens": len(req["ids"]) + len(tokens)}
            if req["session_id"] is not None:
                body["session_id"] = req["session_id"]
            return JSONResponse(body)

        async def events():
            finished = False
            try:
                while True:
                    event = await next_event()
                    if event[0] == "token":
                        yield f"data: {json.dumps(chunk(detok(event[1]), [event[1]], None))}\n\n"
                    elif event[0] == "error":
                        message = {"error": {"message": event[2], "type": "invalid_request_error", "code": event[1]}}
                        yield f"data: {json.dumps(message)}\n\n"
                        break
                    else:
                        yield f"data: {json.dumps(chunk(detok(-1, final=True), [], event[1]))}\n\n"
                        finished = True
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not finished:
                    job.cancelled = True  # the client went away or the request failed: the engine drops it

        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(request: Request):
        return JSONResponse({"status": "ok", "active": len(engine.active), "waiting": engine.waiting.qsize(),
                             "sessions": store.count(), "decode_steps": engine.steps})

    async def not_found(request: Request, exc):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    from starlette.exceptions import HTTPException

    app = starlette_apps.Starlette(
        routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/health", health, methods=["GET"])],
        exception_handlers={HTTPException: not_found}, lifespan=lifespan)
    app.state.engine, app.state.store = engine, store
    return app


def serve(checkpoint, host: str = "127.0.0.1", port: int = 8000, session_dir: Optional[str] = None,
          limits: Optional[ServerLimits] = None, eos_token_id: Optional[int] = None, threads: Optional[int] = None):
    """Load ``checkpoint`` and serve it with uvicorn until interrupted."""
    uvicorn = require("uvicorn", "ssmkit serve")
    from .. import from_pretrained

    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    model = from_pretrained(checkpoint)
    session_dir = session_dir or str(checkpoint).rstrip("/") + "-sessions"
    app = create_app(model, session_dir, limits, eos_token_id, model_name=str(checkpoint))
    uvicorn.run(app, host=host, port=port, log_level="warning")


class BackgroundServer:
    """Serve an app with uvicorn from a thread on 127.0.0.1 and a free port (tests, load benchmarks).

        with BackgroundServer(create_app(model, "sessions")) as server:
            httpx.post(server.url + "/v1/completions", json={...})
    """

    def __init__(self, app, start_timeout_s: float = 30.0):
        self.app, self.start_timeout_s = app, start_timeout_s
        self.url: Optional[str] = None

    def __enter__(self) -> "BackgroundServer":
        import socket

        uvicorn = require("uvicorn", "ssmkit serve")
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))  # the kernel picks a free port; localhost only
        port = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

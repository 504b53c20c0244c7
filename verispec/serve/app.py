"""The HTTP side: FastAPI routes that validate a request, hand it to the scheduler and relay its text."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from ..engine import SpeculativeConfig
from ..errors import InvalidParameter, ModelNotFound, VerispecError
from ..loaded import LoadedModel
from ..sampling import SamplingParams
from . import protocol
from .metrics import Metrics
from .protocol import ApiError, ChatRequest, CompletionRequest, Shape, SpeculativeOptions
from .scheduler import Event, QueueFull, RequestFailed, Scheduler
from .scheduler import Sequence as Job

DISCONNECT_POLL_SECONDS = 0.25

log = logging.getLogger("verispec.serve")


@dataclass
class ServeConfig:
    model: str  # the id clients send in "model"
    max_batch: int = 4
    max_queue: int = 64
    ctx: int | None = None  # per-slot context; None = the loaded target's
    api_key: str | None = None
    spec_off_at: int = 0  # active requests at which unpinned requests stop drafting; 0 = the goodput planner decides
    max_body_bytes: int = 1 << 20
    kv_pool: int | None = None  # cells of the shared KV pool; None = ctx x max_batch; 0 = per-slot contexts
    fuse_rows: int | None = None  # rows per fused decode; None = the most that stays bit-identical to solo runs
    # (64 on verispec's batch-invariant llama.cpp build, 3 on another; all of a step's rows on torch: pool.FusedScoring)
    prefill_chunk: int | None = None  # prompt tokens per step while nothing else decodes (chunked prefill); None = n_batch
    prefill_share: float = 1.0  # while others decode: a prompt's rows per step take about this share of their decode
    verify: str = "exact"  # "one-pass": fused decodes take all of a step's rows at once (not bit-identical)
    prefix_cache: int = 32  # prompt prefixes the shared KV pool keeps for later requests (runners/prefix_cache.py); 0 = off
    tree: str | None = None  # grow token trees ("dynamic", "static:4,2,2,1"); None = the loaded model's setting
    tree_budget: int | None = None  # drafted nodes per tree; None = measured per request ("no tree" included)
    request_timeout: float | None = None  # seconds from arrival to the last token; past it, 408
    queue_timeout: float | None = None  # seconds a request may wait for a slot; past it, 503
    max_connections: int = 256  # open connections and requests uvicorn takes at once; beyond, 503 (limit_concurrency)


class Server:
    """The loaded model, its scheduler and metrics: everything the routes talk to."""

    def __init__(self, base: LoadedModel, config: ServeConfig) -> None:
        if config.api_key is not None and not config.api_key.strip():
            raise InvalidParameter("--api-key is empty: give a key, or leave the option out to serve without one",
                                   "api_key")
        if config.max_connections < 1:
            raise InvalidParameter(f"--max-connections must be >= 1, got {config.max_connections}", "max_connections")
        self.base = base
        self.config = config
        self.spec = _serve_spec(base.spec, config)
        self.metrics = Metrics()
        self.scheduler = _scheduler(base, config, self.metrics, self.spec)
        self.model_ids = [config.model] + ([base.target.name] if base.target.name != config.model else [])
        self.created = int(time.time())
        # The --draft drafter as a key: "cascade" or "model" (cloned onto every slot), "suffix", "ngram" or None.
        loaded = base.drafter(base.spec.draft)
        self.default_draft = ("auto" if base.spec.draft == "auto" else "cascade" if self.scheduler.cascade
                              else "model" if self.scheduler.model_drafter
                              else "suffix" if loaded is not None and loaded.name == "suffix"
                              else "ngram" if loaded is not None else None)
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers must not encode concurrently

    def close(self) -> None:
        self.scheduler.close()

    def draft_name(self, key: str | None) -> str:
        model = self.scheduler.model_drafter
        if key == "cascade":
            return "cascade:" + ",".join(model.name if level == "model" else level for level in self.scheduler.cascade)
        return model.name if key == "model" else key or "none"

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), self.config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key")

    def speculative(self, opts: SpeculativeOptions | None) -> tuple[SpeculativeConfig, str | None, bool]:
        """The request's speculative config, its drafter key ("ngram", "suffix", "model", "cascade" or None) and whether it pinned
        it."""
        base = self.spec
        key, pinned, fixed, k_max = self.default_draft, False, base.draft_tokens, base.draft_max
        tree, budget = base.tree, base.tree_budget
        if opts is not None:
            if "draft" in opts.model_fields_set:
                key, pinned = self._draft_key(opts.draft), True
            if opts.draft_tokens is not None:
                fixed, pinned = opts.draft_tokens, True
            k_max = opts.draft_max if opts.draft_max is not None else k_max
            if "tree" in opts.model_fields_set:
                tree = self._tree(opts.tree)
            if opts.tree_budget is not None:  # pins the request only where it grows trees
                budget, pinned = opts.tree_budget, pinned or tree is not None
        if key == "auto":
            key = self.scheduler.auto.choose()
        try:
            spec = replace(base, draft=self.draft_name(key) if key else None, draft_tokens=fixed, draft_max=k_max,
                           tree=tree, tree_budget=budget)
        except InvalidParameter as exc:
            raise ApiError(400, str(exc), f"speculative.{exc.param}") from None
        return spec, key, pinned

    def _tree(self, shape: str | None) -> str | None:
        """A request's own tree shape. Any shape needs a pool opened for trees (`serve --tree`: each slot then owns
        sequence ids for leaves), so a server started without one offers only "none"."""
        if shape in (None, "", "none"):
            return None
        if not self.spec.uses_trees:
            raise ApiError(400, "this server verifies no token trees: start it with --tree to ask for one per request",
                           "speculative.tree")
        return shape

    def _draft_key(self, name: str | None) -> str | None:
        if name in (None, "", "none"):
            return None
        if name in ("ngram", "suffix"):
            return name
        if name == "auto":
            return self.default_draft or "ngram"
        # A server with a draft model offers it alone too; a cascade only where --draft named one.
        offered = (["model"] if self.scheduler.model_drafter else []) + (["cascade"] if self.scheduler.cascade else [])
        for key in offered:
            if name == self.draft_name(key) or (key == self.default_draft and name == self.base.spec.draft):
                return key
        allowed = ["none", "ngram", "suffix", "auto"] + [self.draft_name(key) for key in offered]
        raise ApiError(400, f"unknown draft {name!r}: this server offers {', '.join(allowed)}", "speculative.draft")

    def token_bytes(self, token: int) -> bytes:
        with self._tokenizer_lock:
            return self.base.tokenizer.token_bytes(token)

    def encode(self, req: CompletionRequest | ChatRequest) -> list[int]:
        with self._tokenizer_lock:
            if isinstance(req, ChatRequest):
                return self.base.prompt_tokens(messages=[m.as_dict() for m in req.messages])
            prompt = req.prompt
            if isinstance(prompt, list):
                if not prompt:
                    raise ApiError(400, "the prompt is empty", "prompt")
                if isinstance(prompt[0], int):
                    n_vocab = self.base.target.n_vocab
                    if any(not 0 <= t < n_vocab for t in prompt):
                        raise ApiError(400, f"prompt token ids must be in 0..{n_vocab - 1}", "prompt")
                    return list(prompt)
                if len(prompt) != 1:
                    raise ApiError(400, "send one prompt per request: batches of prompts are not supported", "prompt")
                prompt = prompt[0]
            return self.base.prompt_tokens(prompt=prompt)


def _serve_spec(spec: SpeculativeConfig, config: ServeConfig) -> SpeculativeConfig:
    """The loaded model's speculative config with the server's tree options (--tree, --tree-budget) on top."""
    if config.tree is None and config.tree_budget is None:
        return spec
    return replace(spec, tree=config.tree or spec.tree,
                   tree_budget=spec.tree_budget if config.tree_budget is None else config.tree_budget)


def _scheduler(base: LoadedModel, config: ServeConfig, metrics: Metrics, spec: SpeculativeConfig | None = None) -> Scheduler:
    """One shared KV pool unless --kv-pool 0; per-slot contexts otherwise, and for a target the pool
    cannot hold (e.g. sliding-window attention on torch) unless --kv-pool was asked for explicitly."""
    from ..runners.pool import PoolUnsupported

    spec = spec or _serve_spec(base.spec, config)
    default = _auto_drafters(base) if base.spec.draft == "auto" else base.drafter(base.spec.draft)
    fuse_rows = config.fuse_rows
    if fuse_rows is None and config.verify == "one-pass":
        fuse_rows = 1 << 16  # as many as the pool's batch holds

    def make(cells: int | None) -> Scheduler:
        return Scheduler(base.target, spec, default, config.max_batch, config.max_queue, config.ctx,
                         config.spec_off_at, metrics, cells, fuse_rows, config.prefill_chunk, config.prefix_cache,
                         config.prefill_share, base.suffix_store, config.request_timeout, config.queue_timeout)

    try:
        return make(config.kv_pool)
    except PoolUnsupported as exc:
        if config.kv_pool is not None:
            raise
        log.warning("%s. Falling back to one context per slot: passes are not fused.", exc)
    return make(0)


def _auto_drafters(base: LoadedModel) -> "Drafter":
    """What `--draft auto` serves: suffix lookup, and where a draft model shares the target's vocabulary, the model and a
    cascade of the two (suffix first, the model where it has no draft). Each request's pick is measured (AutoChoice)."""
    from ..drafters.cascade import CascadeDrafter
    from ..drafters.draft_model import ModelDrafter
    from ..drafters.suffix import SuffixDrafter

    model, suffix = base.drafter("auto"), SuffixDrafter(base.suffix_store)
    if not isinstance(model, ModelDrafter):
        return suffix
    return CascadeDrafter([suffix, model], base.target.n_vocab, base.spec.draft_max)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="verispec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        scheduler = server.scheduler
        if scheduler.dead is not None:
            return JSONResponse({"status": "dead", "model": server.config.model, "error": str(scheduler.dead)},
                                status_code=503)
        active, waiting = scheduler.counts()
        return JSONResponse({"status": "ok", "model": server.config.model, "slots": len(scheduler.slots),
                             "active": active, "queued": waiting, "draft": server.draft_name(server.default_draft)})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.check_key(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": server.created, "owned_by": "verispec"} for name in server.model_ids
        ]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(server, request, chat=True)

    return app


async def _generate(server: Server, request: Request, chat: bool) -> Response:
    endpoint = "chat" if chat else "completions"
    try:
        req, job = await _parse(server, request, chat)
    except (ApiError, VerispecError):
        server.metrics.requests.labels(endpoint, "invalid").inc()
        raise
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job.sink, job.endpoint = (lambda e: loop.call_soon_threadsafe(events.put_nowait, e)), endpoint
    try:
        server.scheduler.submit(job)
    except QueueFull as exc:
        server.metrics.requests.labels(endpoint, "rejected").inc()
        raise ApiError(429, f"the server is busy ({exc}); retry shortly", None, "queue_full", "rate_limit_error",
                       {"Retry-After": "1"}) from None
    except RequestFailed as exc:  # the engine is dead, or the server is shutting down
        server.metrics.requests.labels(endpoint, "rejected").inc()
        raise _error_for(exc) from None

    shape = Shape(chat, req.model, server.token_bytes)
    try:
        first = await _next_event(events, request, server, job)
        if first.kind == "error":
            raise _error_for(first.error)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _stream(server, job, events, first, shape, include_usage)
            # The background task also runs when the client left before the body generator started.
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(_cancel_unfinished, server, job))
        parts, event = [], first
        logprobs = [] if job.params.logprobs is not None else None
        while event.kind == "text":
            parts.append(event.text)
            if logprobs is not None:
                logprobs.extend(event.logprobs or [])
            event = await _next_event(events, request, server, job)
        if event.kind == "error":
            raise _error_for(event.error)
    except BaseException:
        server.scheduler.cancel(job)
        raise
    finish = protocol.FINISH_REASONS.get(event.finish_reason, event.finish_reason)
    return JSONResponse(shape.whole("".join(parts), finish, job.stats, _spec_stats(job), logprobs))


async def _parse(server: Server, request: Request, chat: bool) -> tuple[CompletionRequest | ChatRequest, Job]:
    """Check the key, read and validate the body, tokenize: a Job ready to submit, or an ApiError."""
    server.check_key(request)
    raw = await _read_body(request, server.config.max_body_bytes)
    req = protocol.parse(raw, ChatRequest if chat else CompletionRequest)
    if req.model not in server.model_ids:
        raise ApiError(404, f"model {req.model!r} is not served here; this server serves {server.model_ids[0]!r}",
                       "model", "model_not_found")
    if req.n != 1:
        raise ApiError(400, f"only n=1 is supported, got n={req.n}", "n")
    stop = req.stop_list()
    spec, draft, pinned = server.speculative(req.speculative)
    tokens = await run_in_threadpool(server.encode, req)
    n_ctx = server.scheduler.n_ctx
    room = n_ctx - len(tokens) - 1
    if room < 1:
        raise ApiError(400, f"the prompt has {len(tokens)} tokens but the context holds {n_ctx}",
                       "messages" if chat else "prompt", "context_length_exceeded")
    max_tokens = req.max_tokens if req.max_tokens is not None else getattr(req, "max_completion_tokens", None)
    if max_tokens is not None and max_tokens > 0 and len(tokens) + max_tokens > n_ctx:  # as OpenAI answers it
        field = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
        raise ApiError(400, f"this model's context holds {n_ctx} tokens, but {len(tokens)} prompt tokens and "
                       f"{field} {max_tokens} ask for {len(tokens) + max_tokens}: lower {field} to at most "
                       f"{n_ctx - len(tokens)}", field, "context_length_exceeded")
    params = SamplingParams(max_tokens=req.default_max_tokens(room) if max_tokens is None else max_tokens,
                            temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed, stop=stop,
                            min_p=req.min_p, presence_penalty=req.presence_penalty,
                            frequency_penalty=req.frequency_penalty, logit_bias=req.bias(server.base.target.n_vocab),
                            logprobs=req.top_logprobs_wanted())
    return req, Job(tokens, params, spec, draft, pinned, history=_history(request))


def _history(request: Request) -> str:
    """Whose earlier requests the suffix drafter may draft from: those sent with the same bearer token (hashed, so
    that no key is kept in memory or in the suffix cache). A server shared by several keys never drafts one key's
    tokens for another."""
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else ""


def _spec_stats(job: Job) -> dict:
    prefill = job.stats.draft_prefill_seconds if job.draft else 0.0
    return protocol.speculative(job.stats, job.spec.draft or "none", job.disabled_steps, prefill)


async def _stream(server: Server, job: Job, events: asyncio.Queue, first: Event, shape: Shape,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks; if the client goes away Starlette cancels this generator and the job is cancelled."""
    try:
        if shape.chat:
            yield protocol.sse(shape.chunk(None, first=True))
        event = first
        while event.kind == "text":
            yield protocol.sse(shape.chunk(event.text, logprobs=event.logprobs))
            event = await events.get()
        if event.kind == "error":
            yield protocol.sse(_error_for(event.error).body())
        else:
            spec_stats = _spec_stats(job)
            final = shape.chunk(None, protocol.FINISH_REASONS.get(event.finish_reason, event.finish_reason))
            final["usage"] = protocol.usage(job.stats)
            final["speculative"] = spec_stats
            yield protocol.sse(final)
            if include_usage:
                yield protocol.sse(shape.usage_chunk(job.stats, spec_stats))
        yield protocol.sse("[DONE]")
    finally:
        _cancel_unfinished(server, job)


def _cancel_unfinished(server: Server, job: Job) -> None:
    if not job.finished:
        server.scheduler.cancel(job)


class _ClientGone(Exception):
    pass


async def _next_event(events: asyncio.Queue, request: Request, server: Server, job: Job) -> Event:
    """The job's next event. Checks at most every DISCONNECT_POLL_SECONDS whether the client is
    still there, even while events keep coming; one that left cancels the job."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            event = None
        if loop.time() - job.checked_at >= DISCONNECT_POLL_SECONDS:
            job.checked_at = loop.time()
            if await request.is_disconnected():
                server.scheduler.cancel(job)
                raise _ClientGone()
        if event is not None:
            return event


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body exceeds {limit} bytes", None, "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _error_for(exc: Exception | None) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestFailed):
        retry = {"Retry-After": "1"} if exc.status == 503 else None
        return ApiError(exc.status, str(exc), None, exc.code,
                        "server_error" if exc.status >= 500 else "invalid_request_error", retry)
    if isinstance(exc, VerispecError):
        return ApiError(404 if isinstance(exc, ModelNotFound) else 400, str(exc), exc.param, "invalid_value")
    return ApiError(500, str(exc) or "internal error", None, "internal_error", "server_error")


def _install_error_handlers(app: FastAPI) -> None:
    def respond(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(VerispecError)
    async def verispec_error(request: Request, exc: VerispecError) -> JSONResponse:
        return respond(_error_for(exc))

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody is listening; nginx's code for "client closed request"

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return respond(ApiError(exc.status_code, str(exc.detail), None, None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(ApiError(400, str(exc), None, "invalid_request"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return respond(ApiError(500, "internal server error (see the server log)", None, "internal_error", "server_error"))


ENGINE_DEAD_EXIT = 1  # the process's exit status after the engine died (a supervisor restarts it)
DRAIN_SECONDS = 30  # after the engine died: how long open connections get to read their errors


def serve(base: LoadedModel, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until interrupted (the CLI's `verispec serve`). If the engine dies, every request is answered
    503, the open connections are drained and the process exits with ENGINE_DEAD_EXIT (SystemExit)."""
    import uvicorn

    server = Server(base, config)
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level,
                                       limit_concurrency=config.max_connections + 1,  # uvicorn counts the new one too
                                       timeout_graceful_shutdown=DRAIN_SECONDS))
    threading.Thread(target=_stop_when_dead, args=(server, uv), name="verispec-engine-watch", daemon=True).start()
    try:
        uv.run()
    finally:
        server.close()
    if server.scheduler.dead is not None:
        log.critical("exiting: %s", server.scheduler.dead)
        raise SystemExit(ENGINE_DEAD_EXIT)


def _stop_when_dead(server: Server, uv) -> None:
    server.scheduler.died.wait()
    uv.should_exit = True

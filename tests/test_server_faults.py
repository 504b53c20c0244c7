"""Faults injected into a toy server over HTTP (a tiny random Llama on the paged torch pool): the scheduler thread
raising at each phase, a decode failing for one request among many, the pool running dry mid-stream, clients
vanishing, timeouts. For each: what the clients see, that /health tells the truth, and that no KV cell leaks."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from tests.prompts import PROMPTS
from tests.test_server import _serving
from tests.toy import tiny_runner
from verispec.runners.pool import PoolFull

KEY = "k"
MODEL = "tiny"  # the toy servers; the SmolLM2 tests serve it under this name too
C = "/v1/completions"
SLOW = 0.004  # seconds added to every decode where a request must still be running when something happens


@pytest.fixture(scope="module")
def runner():
    runner = tiny_runner(0, scale=30)
    runner.tokenizer.eos_ids = frozenset()  # requests run to max_tokens: long enough for a fault to meet them
    return runner


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.005)


@contextmanager
def toy_server(runner, **config):
    from verispec.api import Model
    from verispec.serve import ServeConfig

    options = dict(model=MODEL, max_batch=4, ctx=256, api_key=KEY) | config
    with _serving(Model(runner, "torch"), ServeConfig(**options)) as running:
        running.faults = Faults(running.server.scheduler)
        yield running


class Faults:
    """Wraps the pool's decode: slows it, or raises for the rows of chosen requests."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.delay = 0.0  # seconds added to every decode
        self.prompt_delay = 0.0  # ... and to a decode of more than 32 rows (a prompt pass)
        self.rules: list = []  # (when(seqs) -> bool, exception, times left or None for always)
        self.raised = 0
        pool = scheduler.pool
        original = pool.decode

        def decode(seqs, tokens, want, places=None):
            time.sleep(self.delay + (self.prompt_delay if len(seqs) > 32 else 0.0))
            for rule in self.rules:
                when, exc, left = rule
                if left != 0 and when(seqs):
                    rule[2] = None if left is None else left - 1
                    self.raised += 1
                    raise exc
            return original(seqs, tokens, want, places)

        pool.decode = decode

    def fail(self, when, exc: Exception, times: int | None = None) -> None:
        self.rules.append([when, exc, times])

    def decoding(self, prompt: str, after: int = 4):
        """A decode holding a row of the request whose prompt is `prompt`, once it has generated `after` tokens."""
        tokens = self.scheduler.target.tokenizer.encode(prompt)

        def when(seqs) -> bool:
            for seq in set(seqs):
                job = self.scheduler.slots[seq]
                if job is not None and job.tokens == tokens and self.scheduler.pool.live[seq] > len(tokens) + after:
                    return True
            return False
        return when


def body(prompt: str, max_tokens: int = 40, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def complete(running, prompt: str, max_tokens: int = 40, **extra) -> httpx.Response:
    with running.http(KEY) as http:
        return http.post(C, json=body(prompt, max_tokens, **extra))


def stream(running, prompt: str, max_tokens: int = 40, **extra) -> tuple[int, str, list[dict]]:
    """(status, text streamed, the SSE events' JSON objects, [DONE] left out)."""
    with running.http(KEY) as http:
        r = http.post(C, json=body(prompt, max_tokens, stream=True, **extra))
    events = [json.loads(e[len("data: "):]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    return r.status_code, text, events


def no_leak(running) -> None:
    pool = running.server.scheduler.pool
    deadline = time.time() + 10
    while any(running.server.scheduler.slots) and time.time() < deadline:
        time.sleep(0.02)
    assert running.server.scheduler.slots == [None] * len(running.server.scheduler.slots)
    assert sum(pool.live) == 0 and sum(pool.reserved) == 0
    assert pool.used_cells() == pool.cached_cells()  # only cached prompt prefixes hold cells


def healthy(running) -> bool:
    r = httpx.get(running.url + "/health", timeout=10)
    assert r.status_code in (200, 503)
    return r.status_code == 200 and r.json()["status"] == "ok"


PROMPTS4 = [PROMPTS[0][:40], "abc abc abc abc " * 2, PROMPTS[7][:40], PROMPTS[12][:40]]


# -- engine dead -----------------------------------------------------------------------------------------------

PHASES = ["_expire", "_admit", "_drop_cancelled", "_resume", "_grow", "_plan", "_deliver", "_make_room", "_publish",
          "_finish"]


@pytest.mark.parametrize("phase", PHASES)
def test_the_scheduler_raising_at_any_phase_kills_the_engine_visibly(runner, phase):
    """An exception outside a step ends the step loop: the in-flight streams end with an error event, the queued
    and new requests get 503 at once, /health answers 503, `died` is set (serve() then exits), and no cell leaks."""
    with toy_server(runner, max_batch=1) as running:
        scheduler = running.server.scheduler
        assert complete(running, "warm up", 4).status_code == 200 and healthy(running)
        running.faults.delay = SLOW
        armed = threading.Event()
        original = getattr(scheduler, phase)

        def boom(*args, **kwargs):
            if armed.is_set():
                raise RuntimeError(f"injected fault in {phase}")
            return original(*args, **kwargs)

        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(stream, running, PROMPTS4[0], 200)
            wait_until(lambda: scheduler.slots[0] is not None and scheduler.slots[0].stats.generated > 0)
            queued = pool.submit(complete, running, PROMPTS4[1], 8)
            wait_until(lambda: scheduler.counts()[1] > 0)
            setattr(scheduler, phase, boom)
            armed.set()
            status, text, events = first.result(30)
            late = queued.result(30)
        assert scheduler.died.wait(10) and scheduler.dead is not None
        assert status == 200 and "error" in events[-1] and events[-1]["error"]["code"] == "engine_dead"
        assert late.status_code == 503 and late.json()["error"]["code"] == "engine_dead"
        new = complete(running, PROMPTS4[2], 4)
        assert new.status_code == 503 and new.json()["error"]["type"] == "server_error"
        health = httpx.get(running.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "dead" and phase in health.json()["error"]
        pool = scheduler.pool
        assert sum(pool.live) == 0 and sum(pool.reserved) == 0 and scheduler.slots == [None]


def test_a_failing_step_fails_its_requests_and_the_server_serves_on(runner):
    """An exception inside a step (outside any decode) fails the requests in it with a 500, not the engine."""
    with toy_server(runner) as running:
        stepper = running.server.scheduler.stepper
        original, calls = stepper.step, []

        def step():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected fault in a step")
            return original()

        stepper.step = step
        r = complete(running, PROMPTS4[0], 40)
        assert r.status_code == 500 and "decoding" in r.json()["error"]["message"]
        assert healthy(running) and complete(running, PROMPTS4[1], 8).status_code == 200
        no_leak(running)


# -- one request's fault stays its own ----------------------------------------------------------------------------


def test_a_decode_failing_for_one_request_fails_it_alone_and_the_others_write_what_they_write_alone(runner):
    """A fused decode that fails for one request's rows is retried in halves: that request alone fails, with a 5xx
    naming the cause (its stream with an error event), and the others' outputs are bit-identical to their solo
    runs, drafting (n-gram, K pinned) or not."""
    spec = {"speculative": {"draft": "ngram", "draft_tokens": 3}}
    with toy_server(runner) as running:
        alone = [complete(running, p, 60, **(spec if i % 2 else {})).json()["choices"][0]["text"]
                 for i, p in enumerate(PROMPTS4)]
        poisoned = "poison " * 4
        running.faults.fail(running.faults.decoding(poisoned), RuntimeError("llama_decode failed with status 1"))
        with ThreadPoolExecutor(6) as pool:
            others = [pool.submit(complete, running, p, 60, **(spec if i % 2 else {})) for i, p in enumerate(PROMPTS4)]
            whole = pool.submit(complete, running, poisoned, 60)
            streamed = pool.submit(stream, running, poisoned, 60)
            got = [f.result(60).json()["choices"][0]["text"] for f in others]
            whole, (status, text, events) = whole.result(60), streamed.result(60)
        assert got == alone
        assert whole.status_code == 500 and "llama_decode failed with status 1" in whole.json()["error"]["message"]
        assert status == 200 and text and events[-1]["error"]["code"] == "internal_error"
        assert "llama_decode failed" in events[-1]["error"]["message"]
        assert running.faults.raised > 2  # the fused decodes failed, then halves, down to the poisoned requests
        assert healthy(running)
        no_leak(running)


def test_a_fused_decode_that_fails_is_retried_in_halves_bit_identically(runner):
    """Decodes holding rows of two or more requests fail (a fault of the fused batch, not of a request): every request
    still completes, each with its solo output."""
    with toy_server(runner) as running:
        alone = [complete(running, p, 50).json()["choices"][0]["text"] for p in PROMPTS4]
        running.faults.fail(lambda seqs: len(set(seqs)) > 1, RuntimeError("llama_decode failed with status -1"), 30)
        with ThreadPoolExecutor(4) as pool:
            got = [r.json()["choices"][0]["text"] for r in pool.map(lambda p: complete(running, p, 50), PROMPTS4)]
        assert got == alone and running.faults.raised > 0
        no_leak(running)


def test_a_pool_running_dry_mid_stream_preempts_and_the_outputs_do_not_change(runner):
    """Out of cells in a decode mid-stream (PoolFull): the newest request is preempted, as when a reservation cannot
    grow, and everyone resumes and writes exactly what they write alone; nobody gets an error."""
    with toy_server(runner) as running:
        alone = [stream(running, p, 60)[1] for p in PROMPTS4]
        running.faults.fail(running.faults.decoding(PROMPTS4[0], after=10), PoolFull("injected: no cells"), 3)
        running.faults.delay = SLOW
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: stream(running, p, 60), PROMPTS4))
        assert [text for _, text, _ in got] == alone
        assert all(status == 200 and "error" not in events[-1] for status, _, events in got)
        assert running.faults.raised == 3 and running.metric("verispec_preemptions_total") > 0
        assert healthy(running)
        no_leak(running)


def test_a_lone_request_the_pool_cannot_hold_fails_with_a_5xx_naming_the_cause(runner):
    with toy_server(runner) as running:
        running.faults.fail(running.faults.decoding(PROMPTS4[0]), PoolFull("injected: no cells"))
        r = complete(running, PROMPTS4[0], 40)
        assert r.status_code == 500 and "no cells left" in r.json()["error"]["message"]
        assert healthy(running)
        no_leak(running)


# -- clients vanishing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["queued", "prefill", "streaming", "non-streamed"])
def test_a_client_vanishing_at_any_point_frees_its_request_and_the_others_go_on(runner, when):
    """The client hangs up while its request waits in the queue, while its prompt is prefilled, mid-stream, or while
    it waits for a whole response: the request is cancelled, its slot and cells are freed, and a request running
    beside it writes what it writes alone."""
    with toy_server(runner, max_batch=1 if when == "queued" else 2) as running:
        scheduler = running.server.scheduler
        alone = complete(running, PROMPTS4[1], 50).json()["choices"][0]["text"]
        cancelled = running.metric("verispec_requests_total", outcome="cancelled")
        running.faults.delay = SLOW if when in ("prefill", "streaming") else 0.02  # past the client's 0.3 s
        running.faults.prompt_delay = 1.0 if when == "prefill" else 0.0
        leaving = body("x" * 200 if when == "prefill" else PROMPTS4[2], 50, stream=when != "non-streamed")
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(complete, running, PROMPTS4[1], 50)
            wait_until(lambda: any(scheduler.slots))
            with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
                if when == "streaming":
                    with http.stream("POST", C, json=leaving) as r:
                        next(line for line in r.iter_lines() if line.startswith('data: {"id"'))
                else:  # gone before the response's headers: while queued, prefilled, or decoded whole
                    with pytest.raises(httpx.ReadTimeout):
                        http.post(C, json=leaving, timeout=httpx.Timeout(10, read=0.3))
            assert other.result(60).json()["choices"][0]["text"] == alone
        wait_until(lambda: running.metric("verispec_requests_total", outcome="cancelled") == cancelled + 1)
        assert healthy(running)
        no_leak(running)


# -- bounds -------------------------------------------------------------------------------------------------------


def test_queue_and_request_timeouts_are_answered_as_openai_does(runner):
    """--queue-timeout: a request that waited too long for a slot gets 503 (queue_timeout, Retry-After);
    --request-timeout: one that ran too long gets 408, or an error event ending its stream; the server serves on."""
    with toy_server(runner, max_batch=1, queue_timeout=0.3, request_timeout=1.5) as running:
        running.faults.delay = 0.02
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(stream, running, PROMPTS4[0], 200)
            wait_until(lambda: any(running.server.scheduler.slots))
            queued = complete(running, PROMPTS4[1], 4)
            status, text, events = long.result(30)
        assert queued.status_code == 503 and queued.json()["error"]["code"] == "queue_timeout"
        assert queued.headers["retry-after"] == "1"
        assert status == 200 and text and events[-1]["error"]["code"] == "request_timeout"
        whole = complete(running, PROMPTS4[2], 200)
        assert whole.status_code == 408 and whole.json()["error"]["code"] == "request_timeout"
        running.faults.delay = 0.0
        assert complete(running, PROMPTS4[3], 4).status_code == 200 and healthy(running)
        assert running.metric("verispec_requests_total", outcome="timeout") == 3
        no_leak(running)


def test_serve_caps_connections_and_exits_non_zero_after_its_engine_dies(runner, monkeypatch):
    """`serve()` hands --max-connections to uvicorn (beyond it, 503), and when the engine dies it drains the open
    connections and ends the process with ENGINE_DEAD_EXIT."""
    import socket

    from verispec.api import Model
    from verispec.serve import ServeConfig
    from verispec.serve import app as serving
    from verispec.serve.scheduler import Scheduler

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    armed = threading.Event()
    original = Scheduler._plan

    def plan(self):
        if armed.is_set():
            raise RuntimeError("injected fault")
        original(self)

    monkeypatch.setattr(Scheduler, "_plan", plan)
    exit_code = []

    def run() -> None:
        try:
            serving.serve(Model(runner, "torch"), ServeConfig(model=MODEL, ctx=256, max_connections=1), port=port,
                          log_level="warning")
        except SystemExit as exc:
            exit_code.append(exc.code)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, 60)
    with httpx.Client(base_url=url, timeout=30) as first, httpx.Client(base_url=url, timeout=30) as second:
        with first.stream("POST", C, json=body(PROMPTS4[0], 200, stream=True)) as held:
            assert held.status_code == 200
            assert second.post(C, json=body("hi", 2)).status_code == 503  # the one connection is taken
            armed.set()
            assert '"engine_dead"' in held.read().decode()
    thread.join(60)
    assert not thread.is_alive() and exit_code == [serving.ENGINE_DEAD_EXIT]


# -- bad input ----------------------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
OK = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
CHAT_OK = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
FAILING_TEMPLATE = ("{% for m in messages %}{% if m.content == 'divide' %}{{ 1 // 0 }}{% endif %}"
                    "{% if m.content == 'raise' %}{{ raise_exception('no raising') }}{% endif %}"
                    "{% if m.content == 'undefined' %}{{ messages[9].content.upper() }}{% endif %}"
                    "<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>")


def _unsupported_values() -> list[tuple[str, object]]:
    asks = {"response_format": {"type": "json_object"}, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required", "parallel_tool_calls": "yes", "functions": [{"name": "f"}],
            "function_call": {"name": "f"}, "logprobs": True, "top_logprobs": 3, "logit_bias": {"65": 100},
            "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.3, "min_p": 0.1, "echo": True,
            "best_of": 3, "suffix": "end", "prediction": {"type": "content", "content": "x"},
            "modalities": ["text", "audio"], "audio": {"voice": "alloy"}, "reasoning_effort": "low",
            "web_search_options": {}}
    from verispec.serve.protocol import UNSUPPORTED_FIELDS

    return [(name, asks[name]) for name in UNSUPPORTED_FIELDS]


def _bad_requests() -> list[tuple[str, str, object, str | None]]:
    """(name, path, body: bytes or a JSON object, the param the error must name; None: any)."""
    deep = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    bad = [
        ("nested 100000 deep", C, deep, None),
        ("nested 200 deep", C, {**OK, "prompt": json.loads("[" * 200 + "]" * 200)}, None),
        ("nested 70 deep in an unknown field", C, {**OK, "x": json.loads("[" * 70 + "]" * 70)}, None),
        ("lone surrogate in the prompt", C, b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 4}', "prompt"),
        ("lone low surrogate in a message", CHAT,
         b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages.0.content"),
        ("lone surrogate in the model", C, b'{"model": "\\ud83d", "prompt": "a"}', "model"),
        ("lone surrogate in a stop string", C, b'{"model": "tiny", "prompt": "a", "stop": ["\\ud83d"]}', "stop.0"),
        ("lone surrogate in a key", C, b'{"model": "tiny", "prompt": "a", "\\ud83d": 1}', None),
        ("chat template divides by zero", CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": "divide"}]},
         "messages"),
        ("chat template raise_exception", CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": "raise"}]},
         "messages"),
        ("chat template undefined value", CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": "undefined"}]},
         "messages"),
        ("not utf-8", C, b'{"model": "tiny", "prompt": "\xff\xfe"}', None),
        ("empty body", C, b"", None),
        ("json null", C, b"null", None),
        ("json string", C, b'"hello"', None),
        ("NaN temperature", C, b'{"model": "tiny", "prompt": "a", "temperature": NaN}', "temperature"),
        ("Infinity temperature", C, b'{"model": "tiny", "prompt": "a", "temperature": Infinity}', "temperature"),
        ("temperature a bool", C, {**OK, "temperature": True}, "temperature"),
        ("max_tokens a float", C, {**OK, "max_tokens": 1.5}, "max_tokens"),
        ("max_tokens past the context", C, {**OK, "max_tokens": 300}, "max_tokens"),
        ("max_tokens huge", C, {**OK, "max_tokens": 10**30}, "max_tokens"),
        ("max_completion_tokens past the context", CHAT, {**CHAT_OK, "max_tokens": None, "max_completion_tokens": 999},
         "max_completion_tokens"),
        ("max_tokens zero", C, {**OK, "max_tokens": 0}, "max_tokens"),
        ("n zero", C, {**OK, "n": 0}, "n"),
        ("n two", C, {**OK, "n": 2}, "n"),
        ("seed negative", C, {**OK, "seed": -5}, "seed"),
        ("top_p zero", C, {**OK, "top_p": 0.0}, "top_p"),
        ("top_k negative", C, {**OK, "top_k": -1}, "top_k"),
        ("17 stop strings", C, {**OK, "stop": [f"s{i}" for i in range(17)]}, "stop"),
        ("a stop string of 1000 characters", C, {**OK, "stop": ["x" * 1000]}, "stop"),
        ("stop a number", C, {**OK, "stop": 5}, "stop"),
        ("prompt token id too large", C, {**OK, "prompt": [1, 5, 10**6]}, "prompt"),
        ("prompt token id negative", C, {**OK, "prompt": [1, -5]}, "prompt"),
        ("prompt a list of lists", C, {**OK, "prompt": [[1, 2], [3]]}, "prompt"),
        ("prompt a batch of two", C, {**OK, "prompt": ["a", "b"]}, "prompt"),
        ("prompt a number", C, {**OK, "prompt": 5}, "prompt"),
        ("prompt longer than the context", C, {**OK, "prompt": "y" * 300}, "prompt"),
        ("messages a string", CHAT, {**CHAT_OK, "messages": "hi"}, "messages"),
        ("a message not an object", CHAT, {**CHAT_OK, "messages": ["hi"]}, "messages.0"),
        ("a message without a role", CHAT, {**CHAT_OK, "messages": [{"content": "hi"}]}, "messages.0.role"),
        ("content a number", CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ("an image content part", CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages"),
        ("an unknown field in a content part", CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {}}]}]}, "messages.0.content.0.cache_control"),
        ("tool_calls in a message", CHAT, {**CHAT_OK, "messages": [{"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0.tool_calls"),
        ("tool_call_id in a message", CHAT, {**CHAT_OK, "messages": [{"role": "tool", "content": "1",
                                                                      "tool_call_id": "1"}]}, "messages.0.tool_call_id"),
        ("an unknown field in a message", CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": "hi", "mood": 1}]},
         "messages.0.mood"),
        ("an unknown field", C, {**OK, "temprature": 0.5}, "temprature"),
        ("an unknown vendor field", C, {**OK, "ignore_eos": True}, "ignore_eos"),
        ("an unknown field in stream_options", C, {**OK, "stream": True, "stream_options": {"include_usage": True,
                                                                                           "x": 1}}, "stream_options.x"),
        ("speculative a string", C, {**OK, "speculative": "ngram"}, "speculative"),
        ("an unknown speculative field", C, {**OK, "speculative": {"k": 3}}, "speculative.k"),
        ("draft_max out of range", C, {**OK, "speculative": {"draft": "ngram", "draft_max": 1000}}, "speculative.draft_max"),
        ("unknown model", C, {**OK, "model": "gpt-5"}, "model"),
        ("missing model", C, {"prompt": "a"}, "model"),
        ("chat on the completions route", C, CHAT_OK, None),
        ("a prompt on the chat route", CHAT, OK, None),
        ("body over the size limit", C, json.dumps({**OK, "prompt": "z" * (2 << 20)}).encode(), None),
    ]
    bad += [(f"unsupported {name}", C, {**OK, name: value}, name) for name, value in _unsupported_values()]
    return bad


def test_bad_requests_get_4xx_errors_that_name_the_field_never_a_500(runner):
    """The bad-input sweep: every malformed, unsupported or hostile request gets an OpenAI error body with a 4xx
    status, the field named where there is one; unknown and unsupported fields are refused, never dropped."""
    bad = _bad_requests()
    assert len(bad) >= 60
    saved = runner.tokenizer.chat_template
    runner.tokenizer.chat_template = FAILING_TEMPLATE
    try:
        with toy_server(runner, max_batch=2) as running, running.http(KEY) as http:
            answers = []
            for name, path, payload, param in bad:
                if isinstance(payload, bytes):
                    r = http.post(path, content=payload, headers={"content-type": "application/json"})
                else:
                    r = http.post(path, json=payload)
                answers.append((name, r.status_code, r.json()["error"], param))
            others = [http.get(C), http.post("/v1/nothing", json=OK), httpx.post(running.url + C, json=OK),
                      httpx.post(running.url + C, json=OK, headers={"Authorization": "Bearer wrong"})]
            still = http.post(CHAT, json=CHAT_OK)
            health = healthy(running)
            no_leak(running)
    finally:
        runner.tokenizer.chat_template = saved
    wrong = [(name, status, error) for name, status, error, param in answers
             if not 400 <= status < 500 or (param is not None and error["param"] != param)]
    assert not wrong, wrong
    assert all(set(error) == {"message", "type", "param", "code"} and error["message"] for _, _, error, _ in answers)
    assert [r.status_code for r in others] == [405, 404, 401, 401]
    assert still.status_code == 200 and health


def test_odd_but_valid_requests_are_served(runner):
    """Values at the edges that a client may send: fields that ask for nothing (OpenAI's defaults for what is not
    supported, bookkeeping fields), extreme seeds and sampling values. Served, not refused, and never a 500."""
    odd = [{"presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "echo": False, "logit_bias": {},
            "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "user": "u1", "store": False,
            "metadata": {"a": "b"}},
           {"seed": 2**100, "temperature": 0.7}, {"temperature": 1e-300, "seed": 3}, {"temperature": 1e300},
           {"top_k": 10**12, "temperature": 1.0}, {"top_p": 1e-300, "temperature": 1.0}, {"stop": ["", "\x00"]},
           {"prompt": "\x00\u202e\U0001f600"}, {"max_tokens": 256 - 2, "prompt": "a"}]
    with toy_server(runner, max_batch=2) as running, running.http(KEY) as http:
        answers = [http.post(C, json={**OK, **extra}) for extra in odd]
        chat = http.post(CHAT, json={**CHAT_OK, "messages": [{"role": "user", "content": "hi", "name": "ann"}]})
        no_leak(running)
    assert [r.status_code for r in answers] == [200] * len(odd), [r.text for r in answers]
    assert chat.status_code == 200


# -- on SmolLM2 (llama.cpp's pool) ----------------------------------------------------------------------------------

SMOL = "smollm2-135m"


@pytest.mark.real
def test_a_failed_llama_decode_leaves_no_trace_and_its_retry_gets_the_same_bits(smol_source, monkeypatch):
    """llama_decode returning non-zero: the pool takes the rows back (cells, lengths, token history), so the retry
    decodes them into the same state and gets the logits a decode that never failed gets, bit for bit."""
    import numpy as np

    import verispec
    from verispec.runners import llamacpp_pool

    model = verispec.load(SMOL, n_ctx=512, n_threads=1)
    pool = llamacpp_pool.KvPool(model.target, 512, 3)
    try:
        prompts = [model.prompt_tokens(p) for p in PROMPTS[:3]]
        for seq, prompt in enumerate(prompts):
            pool.reserve(seq, 128)
            pool.decode([seq] * len(prompt), prompt, [False] * (len(prompt) - 1) + [True])
        rows = ([0, 1, 2], [11, 22, 33], [True] * 3)
        expected = pool.decode(*rows).copy()
        for seq, prompt in enumerate(prompts):
            pool.drop(seq, len(prompt))
        before = (list(pool.live), [list(h) for h in pool.history], pool.bump)
        real = llamacpp_pool.decode
        monkeypatch.setattr(llamacpp_pool, "decode", lambda ctx, batch: real(ctx, batch) or 1)  # decodes, then fails
        with pytest.raises(RuntimeError, match="status 1"):
            pool.decode(*rows)
        assert (list(pool.live), [list(h) for h in pool.history], pool.bump) == before
        monkeypatch.setattr(llamacpp_pool, "decode", real)
        got = pool.decode(*rows).copy()
    finally:
        pool.close()
        model.close()
    assert np.array_equal(got, expected)


@pytest.mark.real
def test_on_smollm2_a_decode_failing_for_one_request_leaves_the_others_bit_identical(smol_source):
    """The fused 3-row decodes of llama.cpp's pool, one request's rows failing mid-decode: it alone fails with a 500
    naming the cause, the others (greedy, n-gram drafting pinned, seeded) write what they write alone."""
    import verispec
    from verispec.serve import ServeConfig

    base = verispec.load(SMOL, n_ctx=512, draft="ngram", n_threads=1)
    extras = [{}, {"speculative": {"draft": "ngram", "draft_tokens": 3}}, {"temperature": 0.8, "seed": 3}]
    prompts = [PROMPTS[0], "Repeat: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", PROMPTS[4]]
    try:
        with _serving(base, ServeConfig(model=MODEL, max_batch=4, ctx=512, api_key=KEY)) as running:
            running.faults = Faults(running.server.scheduler)

            def ask(prompt: str, extra: dict) -> httpx.Response:
                with running.http(KEY) as http:
                    return http.post(C, json={**body(prompt, 24), **extra})

            alone = [ask(p, e).json()["choices"][0]["text"] for p, e in zip(prompts, extras)]
            poisoned = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # SmolLM2 counts on: it reaches the failing decode
            running.faults.fail(running.faults.decoding(poisoned), RuntimeError("llama_decode failed with status 1"))
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(ask, p, e) for p, e in zip(prompts, extras)]
                failed = pool.submit(ask, poisoned, {}).result(120)
                together = [f.result(120).json()["choices"][0]["text"] for f in futures]
            assert failed.status_code == 500 and "llama_decode failed" in failed.json()["error"]["message"]
            assert together == alone and healthy(running)
            assert running.wait_idle()["active"] == 0 and sum(running.server.scheduler.pool.reserved) == 0
    finally:
        base.close()

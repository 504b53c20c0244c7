"""The OpenAI-compatible server, end to end: a real uvicorn server on loopback, SmolLM2-135M on
llama.cpp with 4 slots, driven by the `openai` client (and httpx for raw bodies)."""

import json
import re
from contextlib import contextmanager
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.prompts import PROMPTS
from verispec.sampling import SamplingParams

pytestmark = pytest.mark.real

MODEL = "smollm2-135m"
KEY = "test-key"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # SmolLM2 keeps counting: a request that runs long


class Running:
    def __init__(self, url: str, server, base):
        self.url, self.server, self.base = url, server, base

    def http(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=120, max_retries=0)

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        total = 0.0
        for line in text.splitlines():
            m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def wait_idle(self, timeout: float = 10.0) -> dict:
        deadline = time.time() + timeout
        while True:
            health = httpx.get(self.url + "/health", timeout=30).json()
            if health["active"] == 0 and health["queued"] == 0 or time.time() > deadline:
                return health
            time.sleep(0.05)


@contextmanager
def _serving(base, config):
    """A verispec server for `base` on a free loopback port, run by uvicorn on a thread."""
    import uvicorn

    from verispec.serve import Server, create_app

    server = Server(base, config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Running(f"http://127.0.0.1:{port}", server, base)
    finally:
        uv.should_exit = True
        thread.join(30)
        server.close()


@pytest.fixture(scope="module")
def running(smol_source):
    import verispec
    from verispec.serve import ServeConfig

    # One thread per context: the test machine's 2 cores are shared with other jobs.
    base = verispec.load(MODEL, n_ctx=2048, draft="ngram", n_threads=1)
    with _serving(base, ServeConfig(model=MODEL, max_batch=4, max_queue=32, api_key=KEY)) as running:
        yield running
    base.close()


def alone(running: Running, prompt: str, max_tokens: int) -> str:
    """What the library itself produces for a greedy completion (the server must match it)."""
    return running.base.generate(prompt, SamplingParams(max_tokens=max_tokens)).text


# -- happy paths ------------------------------------------------------------------------------------


def test_models_and_health(running):
    ids = [m.id for m in running.client().models.list().data]
    assert ids[0] == MODEL
    health = httpx.get(running.url + "/health").json()
    assert health == {"status": "ok", "model": MODEL, "slots": 4, "active": 0, "queued": 0, "draft": "ngram"}


def test_completion_matches_library(running):
    prompt = PROMPTS[0]
    out = running.client().completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    choice = out.choices[0]
    assert choice.text == alone(running, prompt, 24)
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 24
    assert out.usage.prompt_tokens == len(running.base.prompt_tokens(prompt))
    assert out.usage.total_tokens == out.usage.prompt_tokens + 24
    spec = out.model_extra["speculative"]
    assert spec["draft"] == "ngram"
    assert set(spec) >= {"drafted", "accepted", "mean_accepted_length", "acceptance_rate", "draft_seconds"}
    assert spec["mean_accepted_length"] >= 1.0
    assert spec["draft_seconds"] >= 0.0 and spec["draft_prefill_seconds"] < 0.01  # n-grams: no model to prefill


def test_completion_stream_equals_whole(running):
    client = running.client()
    prompt = PROMPTS[7]
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True))
    assert len(chunks) > 3  # streamed piece by piece, not in one block
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 24


def test_sse_wire_format_ends_with_done(running):
    body = {"model": MODEL, "prompt": PROMPTS[5], "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with running.http() as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    usage_chunk = json.loads(events[-2][len("data: "):])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8


def test_chat_whole_and_stream(running):
    client = running.client()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    text = whole.choices[0].message.content
    assert text and text == running.base.generate(params=SamplingParams(max_tokens=24), messages=messages).text
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.usage.completion_tokens <= 24


def test_stop_string_and_seeded_sampling(running):
    client = running.client()
    full = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=16, temperature=0).choices[0].text
    assert " 15," in full
    cut = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=16, temperature=0, stop=[" 15,"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(" 15,")]
    # The same seed writes the same text however the request is drafted (sampling.PositionNoise).
    sampled = [client.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=16, temperature=0.9, top_p=0.95,
                                         seed=7, extra_body={"top_k": 40, **extra}).choices[0].text
               for extra in ({}, {}, {"speculative": {"draft": "none"}}, {"speculative": {"draft": "ngram", "draft_tokens": 4}})]
    assert sampled[0] == sampled[1] == sampled[2] == sampled[3]


def test_speculative_per_request_is_lossless(running):
    client = running.client()
    prompt = "Repeat this list exactly:\n" + COUNTING + "\n" + COUNTING[:20]
    spec = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                     extra_body={"speculative": {"draft": "ngram", "draft_tokens": 4}})
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                      extra_body={"speculative": {"draft": "none"}})
    assert spec.choices[0].text == plain.choices[0].text
    s, p = spec.model_extra["speculative"], plain.model_extra["speculative"]
    assert s["draft"] == "ngram" and s["drafted"] > 0 and s["accepted"] > 0
    assert s["mean_accepted_length"] > 1.0 and s["target_passes"] < p["target_passes"]
    assert p["draft"] == "none" and p["drafted"] == 0 and p["mean_accepted_length"] == 1.0
    assert s["draft_prefill_seconds"] >= 0.0 and p["draft_prefill_seconds"] == 0.0  # the engine times it


# -- concurrency ------------------------------------------------------------------------------------


def test_sixteen_concurrent_requests_equal_alone(running):
    client = running.client()
    # Half chat, half plain completions (on prompts SmolLM2 does not end at once in completion mode).
    requests = [("chat", p) for p in PROMPTS[:8]] + [("text", PROMPTS[i]) for i in (0, 1, 2, 4, 5, 7, 8, 9)]

    def complete(request: tuple[str, str]) -> str:
        kind, prompt = request
        if kind == "chat":
            out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=16, temperature=0)
            return out.choices[0].message.content
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0).choices[0].text

    expected = [complete(r) for r in requests]  # one at a time through the server
    assert len(set(expected)) == 16 and all(expected)
    disabled_before = running.metric("verispec_speculation_disabled_total")
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(complete, requests))
    assert got == expected
    # With 2+ active requests the scheduler turned the server's default drafting off, losslessly.
    assert running.metric("verispec_speculation_disabled_total") > disabled_before
    health = running.wait_idle()
    assert (health["active"], health["queued"]) == (0, 0)
    assert running.metric("verispec_active_requests") == 0
    assert running.metric("verispec_queue_depth") == 0


def _long_prompts(running: Running, n: int, tokens: int) -> list[str]:
    """n different prompts past 256 tokens: slices of Python's textwrap source, each with a task."""
    import inspect
    import textwrap

    source = inspect.getsource(textwrap)
    ids = running.base.tokenizer.encode(source, add_special=False)
    step = (len(ids) - tokens) // max(1, n - 1)
    docs = [running.base.tokenizer.decode(ids[i * step: i * step + tokens]) for i in range(n)]
    return [f"{doc}\n# Continue this code:\n" for doc in docs]


def test_concurrent_pinned_and_seeded_requests_past_256_tokens_equal_alone(running):
    """Over HTTP, with speculation pinned on (it drafts) and with seeded sampling, 4 requests in flight on
    contexts of ~300 tokens write exactly what each writes alone on the server."""
    client = running.client()
    prompts = _long_prompts(running, 3, 300)
    pinned = {"speculative": {"draft": "ngram", "draft_tokens": 3}}

    def complete(job: tuple[str, str]) -> tuple[str, int]:
        kind, prompt = job
        if kind == "pinned":
            out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body=pinned)
        else:
            out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.8, seed=11)
        return out.choices[0].text, out.model_extra["speculative"]["drafted"]

    jobs = [("pinned", p) for p in prompts] + [("seeded", p) for p in prompts]
    alone_out = [complete(j) for j in jobs]
    assert len(running.base.tokenizer.encode(prompts[0])) > 256
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(complete, jobs))
    assert [t for t, _ in together] == [t for t, _ in alone_out]
    assert all(d > 0 for (kind, _), (_, d) in zip(jobs, together) if kind == "pinned")  # pinned K drafts
    assert running.wait_idle()["active"] == 0


def test_multi_turn_chat_hits_the_prefix_cache_and_writes_what_it_writes_without(running):
    """Turn 2 of a chat re-sends turn 1: it shares turn 1's cached prompt cells (counted in /metrics) and
    writes exactly what it writes with nothing cached, pinned speculative (it drafts) and seeded."""
    client = running.client()
    pinned = {"speculative": {"draft": "ngram", "draft_tokens": 3}}
    docs = _long_prompts(running, 2, 300)

    def turn(doc: str, turns: int, seeded: bool) -> tuple[str, int]:
        messages = [{"role": "system", "content": "Answer about this code:\n" + doc},
                    {"role": "user", "content": "What does it do?"}]
        if turns == 2:
            messages += [{"role": "assistant", "content": "It wraps text."}, {"role": "user", "content": "How?"}]
        sampling = dict(temperature=0.8, seed=5) if seeded else dict(temperature=0, extra_body=pinned)
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, **sampling)
        return out.choices[0].message.content, out.model_extra["speculative"]["drafted"]

    def saved() -> float:
        return running.metric("verispec_prefix_cache_tokens_saved_total", pool="target")

    before = saved()
    cold = [turn(doc, 2, seeded) for doc, seeded in zip(docs, (False, True))]
    assert saved() - before < 32  # nothing cached holds their documents: at most the template's opening is shared
    for doc, seeded in zip(docs, (False, True)):
        turn(doc, 1, seeded)
    hits = running.metric("verispec_prefix_cache_hits_total", pool="target")
    warm = [turn(doc, 2, seeded) for doc, seeded in zip(docs, (False, True))]
    assert running.metric("verispec_prefix_cache_hits_total", pool="target") == hits + 2
    assert saved() - before >= 2 * 4 * 63  # turn 1 re-used the cold turn 2's cells, turn 2 turn 1's
    assert [text for text, _ in warm] == [text for text, _ in cold]
    assert warm[0][1] > 0  # pinned K drafts


def test_requests_preempted_for_cells_resume_and_write_what_they_write_alone(smol_source, monkeypatch):
    """KV on demand over HTTP: three requests fit a 512-cell pool at admission but not at their peak, so the
    newest is preempted (its target and draft-model cells freed) and resumed by recompute (counted in
    /metrics). Each writes exactly what it writes alone: greedy with the draft model or n-gram, K pinned
    (they draft), and seeded sampling."""
    import verispec
    from verispec.serve import ServeConfig
    from verispec.serve import scheduler as scheduling

    monkeypatch.setattr(scheduling, "RESERVE_AHEAD", 16)  # grow (and run out) sooner: a shorter test
    base = verispec.load(MODEL, n_ctx=512, draft=MODEL, n_threads=1)  # SmolLM2 drafting for itself
    pinned = [{"speculative": {"draft": MODEL, "draft_tokens": 4}}, None, {"speculative": {"draft": "ngram", "draft_tokens": 3}}]
    prompts = [PROMPTS[0] * 6, PROMPTS[4] * 4, PROMPTS[7] * 7]
    try:
        with _serving(base, ServeConfig(model=MODEL, max_batch=3, ctx=512, kv_pool=512, api_key=KEY)) as server:
            client = server.client()

            def complete(i: int) -> tuple[str, int]:
                sampling = dict(temperature=0.8, seed=7) if i == 1 else dict(temperature=0, extra_body=pinned[i])
                out = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=96, **sampling)
                return out.choices[0].text, out.model_extra["speculative"]["drafted"]

            alone = [complete(i) for i in range(3)]
            assert server.metric("verispec_preemptions_total") == 0
            with ThreadPoolExecutor(3) as pool:
                together = list(pool.map(complete, range(3)))
            assert server.metric("verispec_preemptions_total") > 0
            assert server.server.scheduler.pool.recomputed > 0  # resumed with generated tokens to decode again
            assert server.wait_idle()["active"] == 0 and server.metric("verispec_kv_pool_reserved_cells") == 0
    finally:
        base.close()
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert together[0][1] > 0 and together[2][1] > 0  # pinned K drafts


def test_token_trees_served_fused_write_what_each_request_writes_alone(smol_source):
    """`serve --tree dynamic`: n-gram trees of concurrent requests verified in the shared pool's fused decodes
    (greedy pinned, and seeded sampling) write exactly what each writes alone, and trees were decoded."""
    import verispec
    from verispec.serve import ServeConfig

    base = verispec.load(MODEL, n_ctx=512, draft="ngram", n_threads=1)
    prompts = [PROMPTS[0] * 3, "Repeat this list exactly:\n" + COUNTING + "\n" + COUNTING[:20], PROMPTS[4] * 3]
    try:
        with _serving(base, ServeConfig(model=MODEL, max_batch=3, ctx=512, tree="dynamic", api_key=KEY)) as server:
            client = server.client()

            def complete(i: int) -> tuple[str, int]:
                sampling = dict(temperature=0.8, seed=5) if i == 2 else dict(temperature=0)
                out = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=48,
                                                extra_body={"speculative": {"draft": "ngram"}}, **sampling)
                return out.choices[0].text, out.model_extra["speculative"]["drafted"]

            alone = [complete(i) for i in range(3)]
            trees_alone = server.metric("verispec_tree_passes")
            for i in (0, 1):  # greedy: the library's plain output (prompts under 64 tokens: the same prefill passes)
                assert alone[i][0] == base.generate(prompts[i], SamplingParams(max_tokens=48)).text
            with ThreadPoolExecutor(3) as pool:
                together = list(pool.map(complete, range(3)))
            assert trees_alone > 0 and server.metric("verispec_tree_passes") > trees_alone
            own = {}  # a request's own tree, and a chain on the tree server
            for shape in ("static:2,2,1", "none"):
                trees_before = server.metric("verispec_tree_passes")
                out = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=48, temperature=0, extra_body={
                    "speculative": {"draft": "ngram", "draft_tokens": 4, "tree": shape, "tree_budget": 5}})
                own[shape] = (out.choices[0].text, out.model_extra["speculative"]["drafted"],
                              server.metric("verispec_tree_passes") - trees_before)
            with pytest.raises(openai.BadRequestError, match="tree"):
                client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={
                    "speculative": {"tree": "static:99"}})
            from verispec.serve.protocol import SpeculativeOptions

            assert server.server.speculative(SpeculativeOptions(tree="dynamic", tree_budget=8))[2]  # pinned
            assert server.wait_idle()["active"] == 0
    finally:
        base.close()
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert all(drafted > 0 for _, drafted in together)
    assert own["static:2,2,1"][0] == own["none"][0] == alone[1][0]
    assert own["static:2,2,1"][1] > 0 and own["static:2,2,1"][2] > 0  # drafted, in trees
    assert own["none"][1] > 0 and own["none"][2] == 0  # drafted, in chains


def test_a_soak_run_loses_nothing_and_leaks_no_cells(running):
    """bench-load --soak: random completions and chats, streamed and whole, clients leaving mid-stream and
    bad requests, 4 in flight: no good request lost, no 5xx, every bad one a 4xx, no KV cell left behind."""
    import asyncio

    from verispec.bench.soak import soak

    report = asyncio.run(soak(running.url, MODEL, 14, concurrency=4, seed=1, api_key=KEY))  # all four kinds
    assert set(report.kinds) == {"stream", "whole", "disconnect", "bad"}, report.kinds
    assert report.ok(), report.markdown("soak")
    assert report.leaked_cells == 0 and running.wait_idle()["active"] == 0


# -- bad input ------------------------------------------------------------------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}


def _with(**changes):
    body = {**OK, **changes}
    return {k: v for k, v in body.items() if v is not ...}


BAD = [
    ("malformed json", C, b'{"model": "smollm2-135m", "prompt": ', 400, None),
    ("json not an object", C, b"[1, 2]", 400, None),
    ("missing model", C, _with(model=...), 400, "model"),
    ("missing prompt", C, _with(prompt=...), 400, "prompt"),
    ("mistyped max_tokens", C, _with(max_tokens="ten"), 400, "max_tokens"),
    ("mistyped temperature", C, _with(temperature="hot"), 400, "temperature"),
    ("mistyped stream", C, _with(stream="yes"), 400, "stream"),
    ("unknown model", C, _with(model="gpt-17"), 404, "model"),
    ("max_tokens zero", C, _with(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", C, _with(max_tokens=-3), 400, "max_tokens"),
    ("temperature negative", C, _with(temperature=-0.5), 400, "temperature"),
    ("top_p zero", C, _with(top_p=0.0), 400, "top_p"),
    ("top_p above one", C, _with(top_p=1.5), 400, "top_p"),
    ("n two", C, _with(n=2), 400, "n"),
    ("negative seed", C, _with(seed=-1), 400, "seed"),
    ("stop not strings", C, _with(stop=[1, 2]), 400, "stop"),
    ("empty prompt", C, _with(prompt=""), 400, "prompt"),
    ("blank prompt", C, _with(prompt="   \n"), 400, "prompt"),
    ("empty token prompt", C, _with(prompt=[]), 400, "prompt"),
    ("prompt longer than context", C, _with(prompt="hello " * 2100), 400, "prompt"),
    ("bad stream with bad temperature", C, _with(stream=True, temperature=-1.0), 400, "temperature"),
    ("unknown draft", C, _with(speculative={"draft": "/etc/passwd"}), 400, "speculative.draft"),
    ("draft_tokens out of range", C, _with(speculative={"draft": "ngram", "draft_tokens": 999}), 400, "speculative.draft_tokens"),
    ("unknown speculative field", C, _with(speculative={"drafts": 3}), 400, "speculative.drafts"),
    ("a tree on a server without --tree", C, _with(speculative={"tree": "dynamic"}), 400, "speculative.tree"),
    ("chat without messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("chat empty messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat bad role", CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("chat prompt too long", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 2100}]}, 400, "messages"),
]


def test_a_tree_budget_pins_a_request_only_where_it_grows_trees(running):
    """On a server without --tree, a tree budget changes nothing, so it must not take the request from the goodput
    planner either; choosing the drafter still pins it."""
    from verispec.serve.protocol import SpeculativeOptions

    spec, _, pinned = running.server.speculative(SpeculativeOptions(tree_budget=8))
    assert spec.tree is None and not pinned
    assert running.server.speculative(SpeculativeOptions(draft="ngram", tree_budget=8))[2]


@pytest.mark.parametrize("path, body, status, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(running, path, body, status, param):
    with running.http() as http:
        if isinstance(body, bytes):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param


def test_null_fields_take_defaults(running):
    body = {**OK, "max_tokens": 2, "temperature": None, "top_p": None, "n": None, "stop": None, "stream": None}
    with running.http() as http:
        r = http.post(C, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


def test_prompt_too_long_says_context_length(running):
    with running.http() as http:
        r = http.post(C, json=_with(prompt="hello " * 2100))
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_body_over_limit_is_413(running):
    big = json.dumps(_with(prompt="x" * (2 << 20))).encode()
    with running.http() as http:
        r = http.post(C, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_unknown_route_is_json_404(running):
    with running.http() as http:
        r = http.get("/v1/engines")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key_required(running):
    for key in (None, "wrong-key"):
        with running.http(key) as http:
            for r in (http.post(C, json=OK), http.get("/v1/models")):
                assert r.status_code == 401
                assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        running.client("wrong-key").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert httpx.get(running.url + "/health").status_code == 200  # probes need no key


# -- faults ------------------------------------------------------------------------------------------------


class LongStream:
    """A long streamed request, read up to its first text chunk; close() hangs up mid-stream."""

    def __init__(self, http: httpx.Client) -> None:
        body = {"model": MODEL, "prompt": COUNTING, "max_tokens": 1000, "temperature": 0, "stream": True}
        self._cm = http.stream("POST", C, json=body)
        response = self._cm.__enter__()
        assert response.status_code == 200
        self._lines = response.iter_lines()  # keep it: a collected line iterator closes the response
        first = next(line for line in self._lines if line.startswith("data: "))
        assert json.loads(first[len("data: "):])["choices"][0]["text"]

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def test_client_disconnect_cancels_and_frees_slot(running):
    cancelled = running.metric("verispec_requests_total", outcome="cancelled")
    generated = running.metric("verispec_generated_tokens_total")
    with running.http() as http:
        LongStream(http).close()
    health = running.wait_idle()
    assert health["active"] == 0
    assert running.metric("verispec_requests_total", outcome="cancelled") == cancelled + 1
    assert running.metric("verispec_generated_tokens_total") - generated < 1000  # it did not run to the end
    scheduler = running.server.scheduler
    assert scheduler.slots == [None] * 4 and sum(scheduler.pool.live) == 0 and sum(scheduler.pool.reserved) == 0
    out = running.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert out.choices[0].text == alone(running, PROMPTS[1], 8)


def test_non_streamed_client_that_gives_up_is_cancelled(running):
    cancelled = running.metric("verispec_requests_total", outcome="cancelled")
    body = {"model": MODEL, "prompt": COUNTING, "max_tokens": 1000, "temperature": 0}
    with running.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post(C, json=body, timeout=httpx.Timeout(60, read=1.0))  # ~1000 tokens take far longer
    assert running.wait_idle(5)["active"] == 0
    assert running.metric("verispec_requests_total", outcome="cancelled") == cancelled + 1


def test_full_queue_gets_429_with_retry_after(running):
    scheduler = running.server.scheduler
    saved, scheduler.max_queue = scheduler.max_queue, 0
    try:
        with running.http() as http:
            streams = [LongStream(http) for _ in range(4)]  # every slot busy
            assert httpx.get(running.url + "/health").json()["active"] == 4
            r = http.post(C, json=OK)
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            for stream in streams:
                stream.close()
    finally:
        scheduler.max_queue = saved
    assert running.wait_idle()["active"] == 0
    assert running.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_metrics_exposition(running):
    running.client().completions.create(model=MODEL, prompt=COUNTING + COUNTING, max_tokens=8, temperature=0,
                                        extra_body={"speculative": {"draft": "ngram", "draft_tokens": 3}})
    with running.http() as http:
        assert http.post(C, json=_with(n=3)).status_code == 400
    text = httpx.get(running.url + "/metrics").text
    for name in ("verispec_requests_total", "verispec_prompt_tokens_total", "verispec_generated_tokens_total",
                 "verispec_drafted_tokens_total", "verispec_accepted_tokens_total", "verispec_drafted_at_position_total",
                 "verispec_accepted_at_position_total", "verispec_mean_accepted_length", "verispec_queue_depth",
                 "verispec_active_requests", "verispec_time_to_first_token_seconds_bucket",
                 "verispec_inter_token_latency_seconds_bucket", "verispec_draft_length_bucket",
                 "verispec_speculation_disabled_total", "verispec_speculation_disabled_now", "verispec_draft_budget",
                 "verispec_goodput_predicted_tokens_per_second", "verispec_fused_pass_seconds", "verispec_fused_rows_bucket",
                 "verispec_kv_pool_cells", "verispec_kv_pool_live_tokens", "verispec_kv_pool_reserved_cells",
                 "verispec_prefix_cache_lookups_total", "verispec_prefix_cache_hits_total",
                 "verispec_prefix_cache_tokens_saved_total", "verispec_prefix_cache_entries"):
        assert name in text, name
    assert running.metric("verispec_drafted_at_position_total", position="1") >= running.metric(
        "verispec_accepted_at_position_total", position="1") > 0
    assert running.metric("verispec_time_to_first_token_seconds_count") > 0
    assert running.metric("verispec_requests_total", outcome="invalid") > 0
    assert running.metric("verispec_kv_pool_cells") >= 4 * 2048  # one pool for all slots
    assert running.metric("verispec_fused_rows_count") > 0
    assert running.metric("verispec_fused_pass_seconds", rows="1") > 0


def test_model_drafter_gets_a_context_per_slot(smol_source):
    """A draft *model* (here SmolLM2 drafting for itself) gets a runner per slot: a sequence of the draft pool."""
    from fastapi.testclient import TestClient

    import verispec
    from verispec.serve import ServeConfig, Server, create_app

    base = verispec.load(MODEL, n_ctx=512, draft=MODEL, n_threads=1)
    server = Server(base, ServeConfig(model=MODEL, max_batch=2, ctx=512))
    try:
        drafters = server.scheduler._drafters
        assert all(drafters) and len({id(d.runner) for d in drafters} | {id(base.drafter(MODEL).runner)}) == 3
        with TestClient(create_app(server)) as http:
            body = {"model": MODEL, "prompt": PROMPTS[7], "max_tokens": 16, "temperature": 0}
            spec = http.post(C, json={**body, "speculative": {"draft": MODEL, "draft_tokens": 4}}).json()
            plain = http.post(C, json={**body, "speculative": {"draft": "none"}}).json()
            assert http.post(C, json={**body, "speculative": {"draft": "other-model"}}).status_code == 400
        assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
        assert spec["speculative"]["draft"] == MODEL
        assert spec["speculative"]["acceptance_rate"] == 1.0  # a model drafting for itself is always right
        assert spec["speculative"]["mean_accepted_length"] > 2
    finally:
        server.close()
        base.close()


def test_a_cascade_server_drafts_with_each_slots_draft_model_fused(smol_source):
    """`serve --draft cascade:ngram,MODEL` (SmolLM2 drafting for itself after n-gram lookup): each slot's cascade
    drafts with n-gram lookup, then with that slot's draft model, a sequence of the draft pool whose passes are fused
    across requests. Concurrent greedy outputs equal the library's plain ones. (A cascade used to be served as n-gram
    lookup alone, its draft model loaded and never run.)"""
    import verispec
    from verispec.serve import ServeConfig

    cascade = f"cascade:ngram,{MODEL}"
    base = verispec.load(MODEL, n_ctx=512, draft=cascade, n_threads=1)
    prompts = [PROMPTS[0], "Repeat this list exactly:\n" + COUNTING + "\n" + COUNTING[:20], PROMPTS[4]]
    try:
        plain = [base.generate(p, SamplingParams(max_tokens=32)).text for p in prompts]
        with _serving(base, ServeConfig(model=MODEL, max_batch=3, ctx=512, api_key=KEY)) as server:
            client = server.client()

            def complete(prompt: str) -> tuple[str, dict]:
                out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                                extra_body={"speculative": {"draft_tokens": 4}})
                return out.choices[0].text, out.model_extra["speculative"]

            with ThreadPoolExecutor(3) as pool:
                together = list(pool.map(complete, prompts))
            model_alone = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=0,
                                                    extra_body={"speculative": {"draft": MODEL, "draft_tokens": 4}})
            shared = server.server.scheduler.draft_pool.shared_decodes
            assert server.wait_idle()["active"] == 0
    finally:
        base.close()
    assert [text for text, _ in together] == plain
    assert all(spec["draft"] == cascade and spec["drafted"] > 0 for _, spec in together)
    assert shared > 0  # the model level drafted, fused
    assert model_alone.model_extra["speculative"]["draft"] == MODEL and model_alone.choices[0].text == plain[0][
        : len(model_alone.choices[0].text)]


def test_a_server_refuses_a_drafter_it_cannot_run_on_its_pool():
    """Heads read the target's hidden states, which pool sequences do not keep, and a cascade runs one draft model per
    slot: the server says so at start-up instead of serving something else."""
    from tests.toy import TableRunner
    from verispec.drafters.base import Draft, Drafter
    from verispec.drafters.cascade import CascadeDrafter
    from verispec.drafters.draft_model import ModelDrafter
    from verispec.drafters.ngram import NgramDrafter
    from verispec.errors import InvalidParameter
    from verispec.serve.scheduler import served_drafters

    class Heads(Drafter):
        name = "medusa:heads.pt"

        def propose(self, context, k):
            return Draft([])

    model = ModelDrafter(TableRunner(8))
    assert served_drafters(CascadeDrafter([NgramDrafter(), model], 8)) == (model, ("ngram", "model"))
    assert served_drafters(model) == (model, None) and served_drafters(NgramDrafter()) == (None, None)
    assert served_drafters(CascadeDrafter([NgramDrafter(), NgramDrafter(1, 2)], 8)) == (None, None)  # n-gram lookup
    for drafter in (Heads(), CascadeDrafter([NgramDrafter(), Heads()], 8),
                    CascadeDrafter([model, ModelDrafter(TableRunner(8))], 8)):
        with pytest.raises(InvalidParameter, match="verispec generate"):
            served_drafters(drafter)


def test_per_slot_contexts_without_pool(smol_source):
    """--kv-pool 0: one context per slot, passes not fused; concurrent outputs still equal solo ones."""
    from fastapi.testclient import TestClient

    import verispec
    from verispec.serve import ServeConfig, Server, create_app
    from verispec.runners.context_pool import ContextPool

    base = verispec.load(MODEL, n_ctx=512, draft="ngram", n_threads=1)
    server = Server(base, ServeConfig(model=MODEL, max_batch=2, ctx=512, kv_pool=0))
    try:
        assert isinstance(server.scheduler.pool, ContextPool)
        with TestClient(create_app(server)) as http:
            def complete(prompt: str) -> str:
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}
                return http.post(C, json=body).json()["choices"][0]["text"]

            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(complete, PROMPTS[:4]))
        assert got == [base.generate(p, SamplingParams(max_tokens=12)).text for p in PROMPTS[:4]]
    finally:
        server.close()
        base.close()

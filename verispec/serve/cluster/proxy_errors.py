"""Runs inside Ray Serve's HTTP proxy: turns a replica that died mid-request into an OpenAI error.

Without it the proxy answers a request whose replica died with a bare "500 Internal Server Error"
in plain text, and cuts a stream that had started. With it:
  not started yet   -> 502 with an OpenAI error body, code "replica_failed"
  stream under way  -> a last SSE `data: {"error": ...}` event and `data: [DONE]`, as the
                       single-machine server ends a stream that fails
The server does not retry the request; the client may (the `openai` client resends on 502 by itself,
max_retries=2 by default), and greedy requests give the same text again."""

from __future__ import annotations

import json

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

IMPORT_PATH = "verispec.serve.cluster.proxy_errors:middlewares"  # for RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
STATUS = 502
MESSAGE = ("the replica serving this request stopped before finishing it (its process died or was stopped); "
           "the request was not retried: send it again")


def error_body() -> dict:
    return {"error": {"message": MESSAGE, "type": "server_error", "param": None, "code": "replica_failed"}}


class ReplicaFailure:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = {"started": False, "ended": False, "stream": False}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["started"] = True
                types = [v for k, v in message.get("headers", []) if k.lower() == b"content-type"]
                seen["stream"] = any(v.startswith(b"text/event-stream") for v in types)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                seen["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if seen["ended"]:
                raise
        if not seen["started"]:
            await send({"type": "http.response.start", "status": STATUS,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(error_body()).encode()})
        elif not seen["ended"]:
            tail = f"data: {json.dumps(error_body())}\n\ndata: [DONE]\n\n".encode() if seen["stream"] else b""
            await send({"type": "http.response.body", "body": tail})


def middlewares() -> list[Middleware]:
    """What the proxy calls at start-up (Ray Serve's HTTP proxy callback)."""
    return [Middleware(ReplicaFailure)]

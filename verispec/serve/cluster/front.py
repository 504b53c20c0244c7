"""What a replica adds in front of the single-machine app: its name on every response, and the
cluster-wide /metrics in place of its own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = "x-verispec-replica"


class ClusterFront:
    """Pure ASGI middleware (not BaseHTTPMiddleware), so streamed bodies pass through untouched."""

    def __init__(self, app: ASGIApp, replica: str, cluster_metrics: Callable[[], Awaitable[bytes]]) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())
        self.cluster_metrics = cluster_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        if scope["path"] == "/metrics" and scope["method"] == "GET":
            from prometheus_client import CONTENT_TYPE_LATEST

            await Response(await self.cluster_metrics(), media_type=CONTENT_TYPE_LATEST)(scope, receive, stamped)
            return
        await self.app(scope, receive, stamped)

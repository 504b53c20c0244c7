"""One Ray Serve replica: its own model, scheduler, KV contexts and metrics, behind the same FastAPI
app as `verispec serve`."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..app import ServeConfig, Server, create_app
from .front import ClusterFront
from .metrics_board import PUBLISH_SECONDS, merge

BOARD = "metrics_board"  # the deployment-scoped actor holding every replica's metrics


@dataclass
class ReplicaSpec:
    model: str  # registered name, GGUF path or HF directory, as seen from the worker node
    draft: str | None
    backend: str
    threads: int  # llama.cpp threads; also the Ray CPUs the replica reserves, so a node is never oversubscribed
    serve: ServeConfig
    loopback_only: bool = False  # a one-machine cluster: keep every socket of the replica on 127.0.0.1


class VerispecReplica:
    def __init__(self, spec: ReplicaSpec) -> None:
        from ray import serve

        from ...loaded import LoadedModel

        if spec.loopback_only:
            _bind_internal_grpc_to_loopback()
        self.name = serve.get_replica_context().replica_tag
        # The base context only tokenizes and owns the weights; each slot gets its own ServeConfig.ctx context.
        self.base = LoadedModel.open(spec.model, draft=spec.draft, backend=spec.backend, pull=True,
                                     n_ctx=min(spec.serve.ctx or 4096, 512), n_threads=spec.threads)
        self.server = Server(self.base, spec.serve)
        self._info = _info(getattr(self.base.target, "n_threads", spec.threads))
        self._stopped = threading.Event()
        threading.Thread(target=self._publish_metrics, name="verispec-metrics", daemon=True).start()

    def __serve_build_asgi_app__(self):
        app = create_app(self.server)
        app.add_middleware(ClusterFront, replica=self.name, cluster_metrics=self.cluster_metrics)
        return app

    def check_health(self) -> None:
        """Ray Serve calls this periodically: a replica whose engine died is reported unhealthy and replaced."""
        dead = self.server.scheduler.dead
        if dead is not None:
            raise RuntimeError(f"replica {self.name}: {dead}")

    def _board(self):
        from ray import serve

        return serve.get_deployment_actor(BOARD)  # resolved each time: the board is recreated if it dies

    def _publish_metrics(self) -> None:
        while not self._stopped.wait(PUBLISH_SECONDS):
            try:
                self._board().put.remote(self.name, self.exposition())
            except Exception:  # the board is being recreated; the next round publishes again
                pass

    def exposition(self) -> bytes:
        return self.server.metrics.exposition() + self._info

    async def cluster_metrics(self) -> bytes:
        own = self.exposition()
        try:
            board = self._board()
            board.put.remote(self.name, own)
            texts = await board.current.remote()
        except Exception:
            texts = {}
        return merge({**texts, self.name: own})

    async def __del__(self) -> None:
        """Called by Serve when the replica is stopped (scale-down, redeploy, shutdown)."""
        if hasattr(self, "_stopped"):  # not if __init__ failed
            self._stopped.set()
            try:
                self._board().drop.remote(self.name)
            except Exception:
                pass
        parent = getattr(super(), "__del__", None)  # the ASGI wrapper's lifespan shutdown
        if parent is not None:
            await parent()
        for part in (getattr(self, "server", None), getattr(self, "base", None)):  # None if __init__ failed
            if part is not None:
                part.close()


def _info(threads: int) -> bytes:
    """`verispec_replica_info`: which process and node a replica label stands for, and its thread count."""
    import os

    import ray
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    Gauge("verispec_replica_info", "This replica's process id, node address and llama.cpp threads",
          ["pid", "node", "threads"], registry=registry).labels(str(os.getpid()), ray.util.get_node_ip_address(),
                                                               str(threads)).set(1)
    return generate_latest(registry)


def _bind_internal_grpc_to_loopback() -> None:
    """Ray Serve 2.58 starts each replica's inter-deployment gRPC server on [::]:0 (all interfaces),
    with no option to change it. It runs after this constructor, so rebinding it here is in time.
    verispec's one deployment never uses that server (the proxy reaches replicas by actor calls)."""
    import ray.serve._private.replica as ray_replica

    original = ray_replica.add_port_to_grpc_server
    if getattr(original, "verispec_loopback", False):
        return

    def loopback(server, address: str) -> int:
        return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

    loopback.verispec_loopback = True
    ray_replica.add_port_to_grpc_server = loopback

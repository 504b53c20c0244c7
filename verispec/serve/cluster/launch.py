"""Start or join a Ray cluster, deploy the replicas behind one HTTP endpoint, and tear it all down."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from ...errors import VerispecError
from . import proxy_errors
from .metrics_board import MetricsBoard
from .replica import BOARD, ReplicaSpec, VerispecReplica

APP_NAME = "verispec"
LOOPBACK = "127.0.0.1"


class ClusterError(VerispecError):
    """The deployment failed (for instance a replica could not load its model)."""


@dataclass
class ClusterConfig:
    replica: ReplicaSpec
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; replaces `replicas`
    address: str | None = None  # an existing cluster ("auto" or "host:port"); None = a local one on loopback
    host: str = LOOPBACK  # where Serve's HTTP proxies listen
    port: int = 8000
    constructor_retries: int = 2  # a replica that cannot load its model fails the deployment after this many

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas


def threads_per_replica(replicas_here: int, cores: int | None = None) -> int:
    """llama.cpp threads spin-wait, so replicas sharing a machine split its cores instead of each taking all."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, replicas_here))


def parse_autoscale(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ClusterError(f"--autoscale takes MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def require_ray(what: str = "`serve --ray`") -> None:
    """Ray is the [cluster] extra: its absence is one line naming it, before anything else is started."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ClusterError(f"{what} needs Ray Serve: pip install 'verispec[cluster]'") from None


def start_ray(config: ClusterConfig) -> None:
    """Join `config.address`, or start a one-machine cluster whose every socket is on loopback."""
    require_ray()
    import ray

    if config.address:
        ray.init(address=config.address, log_to_driver=False)
        return
    _loopback_node()
    # Read by Serve's proxy when it starts; the raylet and its workers inherit this process's environment.
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", proxy_errors.IMPORT_PATH)
    cores = len(os.sched_getaffinity(0))
    # Ray places replicas by their reserved CPUs; never report fewer CPUs than the replicas ask for, or
    # the last ones would wait forever for a free CPU instead of running (oversubscribed) at once.
    cpus = max(cores, config.max_replicas * config.replica.threads)
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=False,
             configure_logging=False)


def _loopback_node() -> None:
    """Make Ray take 127.0.0.1 as this node's address, so its servers bind there and not to the LAN.
    Ray resolves a 127.0.0.1 node address to the LAN address unless "clusters" are off (as on macOS);
    the variable reaches the raylet and workers, the constant the already imported driver."""
    import ray._private.ray_constants as constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants.ENABLE_RAY_CLUSTER = False


def build(config: ClusterConfig):
    """The Serve application: the replica class as an ingress deployment, with its metrics board."""
    import ray
    from ray import serve
    from ray.serve.config import DeploymentActorConfig

    s = config.replica.serve
    scaling = ({"num_replicas": config.replicas} if config.autoscale is None else {"autoscaling_config": {
        "min_replicas": config.autoscale[0], "initial_replicas": config.autoscale[0],
        "max_replicas": config.autoscale[1], "target_ongoing_requests": s.max_batch}})
    deployment = serve.deployment(
        serve.ingress()(VerispecReplica), name="VerispecReplica",
        ray_actor_options={"num_cpus": config.replica.threads},
        # Each replica's own queue (and its 429) works as on one machine; the router sees active + queued.
        max_ongoing_requests=s.max_batch + s.max_queue,
        max_constructor_retry_count=config.constructor_retries,
        deployment_actors=[DeploymentActorConfig(name=BOARD, actor_class=ray.remote(MetricsBoard),
                                                 actor_options={"num_cpus": 0})],
        **scaling,
    )
    return deployment.bind(replace(config.replica, loopback_only=config.address is None))


def deploy(config: ClusterConfig) -> str:
    """Deploy and wait until every replica answers; returns the endpoint's URL. A replica that cannot
    start fails the deployment after `constructor_retries` attempts, with the replica's own error."""
    from ray import serve

    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(build(config), name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:
        raise ClusterError(f"the deployment failed: {_replica_error() or exc}") from None
    return f"http://{LOOPBACK if config.host in ('0.0.0.0', '::') else config.host}:{config.port}"


def _replica_error() -> str | None:
    """The last exception line of the failed replica's traceback, which Serve keeps in the deployment's status."""
    from ray import serve

    try:
        app = serve.status().applications[APP_NAME]
    except Exception:
        return None
    for deployment in app.deployments.values():
        text = re.sub(r"\x1b\[[0-9;]*m", "", deployment.message or "")
        raised = re.findall(r"^(?:[\w]+\.)*(\w+: .+)$", text, re.M)
        raised = [line for line in raised if not line.startswith("RuntimeError: Traceback")]
        if raised:
            return f"a replica could not start: {raised[-1]}"
    return None


def shutdown() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def run(config: ClusterConfig, announce) -> None:
    """`verispec serve --ray`: start or join Ray, deploy, serve until interrupted, then tear down what
    was started (a joined cluster keeps running; only this application is removed)."""
    import time

    start_ray(config)
    try:
        announce(deploy(config))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if config.address:
            _remove_app()
        else:
            shutdown()


def _remove_app() -> None:
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()

"""`verispec serve --ray`: the OpenAI server as Ray Serve replicas behind one endpoint.

replica.py        one replica: its own model, scheduler and KV contexts, serving serve/app.py's routes
front.py          what a replica adds: the x-verispec-replica header and the cluster-wide /metrics
metrics_board.py  the shared board of every replica's metrics, merged with a `replica` label
launch.py         start or join Ray (loopback only when local), deploy, scale, shut down

Routing is Ray Serve's default: power of two choices on each replica's ongoing requests (README,
"Running on a cluster").
"""

from .launch import (ClusterConfig, ClusterError, deploy, parse_autoscale, require_ray, run, shutdown, start_ray,
                     threads_per_replica)
from .replica import ReplicaSpec

__all__ = ["ClusterConfig", "ClusterError", "ReplicaSpec", "deploy", "parse_autoscale", "require_ray", "run", "shutdown",
           "start_ray", "threads_per_replica"]

"""Start or join a Ray cluster, and check resource requests against it.

Jobs, training and tuning call :func:`init_ray` once on the driver. Without an
address it starts a single-machine cluster whose services listen only on
127.0.0.1, and with ``auto`` or a ``host:port`` address (or ``RAY_ADDRESS``) it
joins a running cluster. Usage statistics are always disabled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Iterator, Mapping

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class ClusterResourceError(RuntimeError):
    """A resource request can never be met by the cluster's total resources."""


def init_ray(address: str = "", num_cpus: int = 0, *, include_dashboard: bool = True) -> None:
    """Connect this process to Ray, starting a local cluster when no address is given.

    Does nothing when the process is already connected. Joining a cluster that uses
    token authentication, which Ray 2.60 enables for clusters started on one
    machine, needs ``RAY_AUTH_MODE=token`` in the environment. A cluster that listens
    only on loopback, like the local one started here, must be joined by its
    ``127.0.0.1:PORT`` address: Ray replaces a loopback address that it finds
    through ``auto`` with the machine's routable address.

    Args:
        address: ``""`` to use ``RAY_ADDRESS`` if set and otherwise start a local
            cluster, ``"auto"`` to join the cluster running on this machine, or the
            ``host:port`` of a cluster's head node.
        num_cpus: CPUs of a new local cluster, or 0 to let Ray count the cores. Ignored
            when joining a cluster, whose size its nodes set.
        include_dashboard: Whether a new local cluster runs the dashboard. Ray's
            State API and Tune with nested Train need it.
    """
    # Ray reads this when it starts. Without it, Ray reports usage statistics to a remote server.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Imported here so that the variable above is set before Ray's first import.
    import ray

    if ray.is_initialized():
        logger.debug("Ray is already initialised, so the current connection is kept")
        return

    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        if num_cpus:
            logger.warning(
                "ignoring num_cpus=%d: the size of the Ray cluster at %s is set by its nodes",
                num_cpus, address,
            )
        loopback = address.rsplit(":", 1)[0] in {LOOPBACK, "localhost"}
        with _single_machine_mode() if loopback else contextlib.nullcontext():
            ray.init(address=address)
        logger.info("joined the Ray cluster at %s with %s", address, _describe(ray.cluster_resources()))
        return

    extra = {}
    if include_dashboard:
        # Ray's own helper processes (the placement-group cleaner among them) find
        # the dashboard through this variable. Without it they fail with "Found
        # multiple active Ray instances" when another cluster runs on the machine,
        # and a trial stopped early then leaks its workers' resources.
        # The processes started by ray.init inherit it; it is removed again afterwards
        # so that later clients in this process (job submission) use their own address.
        port = _free_port()
        extra["dashboard_port"] = port
    saved_api_address = os.environ.get("RAY_API_SERVER_ADDRESS")
    if include_dashboard:
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{extra['dashboard_port']}"
    try:
        with _single_machine_mode():
            ray.init(
                address="local",
                num_cpus=num_cpus or None,
                include_dashboard=include_dashboard,
                dashboard_host=LOOPBACK,
                _node_ip_address=LOOPBACK,
                **extra,
            )
    finally:
        if saved_api_address is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved_api_address
    logger.info("started a local Ray cluster on %s with %s", LOOPBACK, _describe(ray.cluster_resources()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _single_machine_mode() -> Iterator[None]:
    """Keep a new local cluster's node address, and so all its listeners, on loopback.

    Ray 2.60 replaces a loopback ``_node_ip_address`` with the machine's routable
    address (``ray._private.services.resolve_ip_for_localhost``), and its services
    then listen on every interface. Its single-machine switch, meant for Windows and
    macOS, keeps the loopback address. The environment variable reaches the processes
    that ``ray.init`` spawns, and the module constant covers this process, where Ray
    read the variable at import.
    """
    # NOTE: this relies on a private Ray constant. Recheck it when upgrading Ray.
    from ray._private import ray_constants

    variable = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_variable = os.environ.get(variable)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[variable] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_variable is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved_variable


def check_resources(request: Mapping[str, float], what: str) -> None:
    """Raise at once if a request exceeds the cluster's total resources.

    A request that exceeds the total can never be scheduled, and Ray would wait for
    it forever instead of failing.

    Args:
        request: Resource amounts, for example ``{"CPU": 3, "GPU": 1}``.
        what: What makes the request, for the message, for example
            ``"training with 2 workers of 1.5 CPUs"``.

    Raises:
        ClusterResourceError: Naming what was requested and what the cluster has.
    """
    # NOTE: an autoscaling cluster could add nodes later, but only the nodes present now count.
    import ray

    total = ray.cluster_resources()
    missing = {name: amount for name, amount in request.items() if amount > total.get(name, 0.0)}
    if missing:
        shortfall = ", ".join(
            f"{name}={amount:g} (cluster total {total.get(name, 0.0):g})" for name, amount in missing.items()
        )
        raise ClusterResourceError(
            f"{what} requests {shortfall}, which no placement can ever satisfy. The cluster has "
            f"{_describe(total)}. Request less (for example fewer workers or CPUs per worker) "
            "or start Ray with more resources (ray.num_cpus, or `ray start --num-cpus` on more nodes)"
        )


def _describe(resources: Mapping[str, float]) -> str:
    # Ray names devices in capitals (CPU, GPU, TPU); memory and node names are lowercase.
    devices = {name: amount for name, amount in sorted(resources.items()) if name.isupper()}
    return ", ".join(f"{name}={amount:g}" for name, amount in devices.items()) or "no CPU or GPU"

"""``gfc federate``: the ServerApp and ClientApp on this machine, under Flower's simulation engine.

`federate` runs `flwr.simulation.run_simulation` (Ray as the backend): the ServerApp in a
thread of this process, each of the K virtual SuperNodes' ClientApp in a pool of Ray
actors (one CPU each, at most as many actors as cores). Flower deprecates
``run_simulation`` in favour of ``flwr run`` against a SuperLink (the deployment
engine, which runs the very same apps from their pyproject); it is the one in-process
entry point, and Flower's deprecation notice is silenced with Flower's other logs
unless ``verbose``.

Ctrl-C: the ServerApp saves the global checkpoint at the end of every round, atomically,
so what the run directory holds is always a completed round's model. On an interrupt the
ServerApp is told to stop (it gives up waiting for the round's replies) and the
interrupt propagates: ``gfc`` exits 130.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from flwr.simulation import run_simulation

from gfcompiler.errors import GfcError
from gfcompiler.federated.client_app import create_client_app
from gfcompiler.federated.server_app import FederationResult, create_server_app
from gfcompiler.federated.settings import FederationConfig
from gfcompiler.runtime.progress import Progress


def federate(config: FederationConfig, progress: Progress | None = None, *, verbose: bool = False) -> FederationResult:
    """Run the federation ``config`` describes; the result of its ServerApp."""
    progress = progress or Progress()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning about num_gpus=0
    stop, results = threading.Event(), []
    server = create_server_app(config, progress, stop, results)
    client = create_client_app(config)
    actors = max(1, min(config.clients, os.cpu_count() or 1))
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": actors, "num_gpus": 0, "log_to_driver": verbose,
                             "logging_level": logging.INFO if verbose else logging.ERROR}}
    try:
        with _flower_logs(verbose):
            run_simulation(server_app=server, client_app=client, num_supernodes=config.clients, backend_config=backend)
    except KeyboardInterrupt:
        stop.set()  # the ServerApp's thread stops waiting for replies; a completed round's checkpoint is kept
        raise
    if not results:
        raise GfcError("the simulation ended without the server's result (rerun with --verbose for Flower's logs)")
    return results[0]


@contextlib.contextmanager
def _flower_logs(verbose: bool):
    """Flower's logger at ERROR within the block unless ``verbose`` (gfc prints its own round lines); INFO when ``verbose``."""
    logger = logging.getLogger("flwr")
    previous = logger.level
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)

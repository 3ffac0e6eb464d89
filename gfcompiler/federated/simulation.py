"""``gfc federate``: the ServerApp and ClientApp on this machine, under Flower's simulation engine.

`federate` runs `flwr.simulation.run_simulation` (Ray as the backend): the ServerApp in a
thread of this process, each of the K virtual SuperNodes' ClientApp in a pool of Ray
actors (one CPU each, at most as many actors as cores; without ``--threads`` each
client's onnxruntime gets cores / actors threads). Ray is started as a private local
instance (``address="local"``): without it Ray joins any cluster another process runs
on this machine, another ``gfc federate`` included, and refuses the CPU count. Flower deprecates
``run_simulation`` in favour of ``flwr run`` against a SuperLink (the deployment
engine, which runs the very same apps from their pyproject); it is the one in-process
entry point, and Flower's deprecation notice is silenced with Flower's other logs
unless ``verbose``.

The simulation runs in a thread of its own while the main thread waits in short joins:
a Ctrl-C reaches Python's handler only on the main thread, and only between two waits
(a main thread blocked in Flower's own joins never saw it). On Ctrl-C the ServerApp is
told to stop: it gives up waiting for the round in progress, reports the last completed
round, whose global model the run directory holds (saved atomically at each round's
end), and the federation ends; ``gfc`` exits 130. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading

from flwr.simulation import run_simulation

from gfcompiler.errors import GfcError
from gfcompiler.federated.client_app import create_client_app
from gfcompiler.federated.server_app import FederationResult, create_server_app
from gfcompiler.federated.settings import FederationConfig
from gfcompiler.runtime.progress import Progress

_JOIN_SECONDS = 0.2
_SERVER_SECONDS = 60.0  # the ServerApp's last steps after the engine stopped (an evaluation and a save)


def federate(config: FederationConfig, progress: Progress | None = None, *, verbose: bool = False) -> FederationResult:
    """Run the federation ``config`` describes; the result of its ServerApp."""
    progress = progress or Progress()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning about num_gpus=0
    cores = os.cpu_count() or 1
    actors = max(1, min(config.clients, cores))
    if not config.threads:  # the actors share the cores: onnxruntime's default would take them all in each
        config = dataclasses.replace(config, threads=max(1, cores // actors))
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"address": "local", "num_cpus": actors, "num_gpus": 0, "log_to_driver": verbose,
                             "logging_level": logging.INFO if verbose else logging.ERROR}}
    stop, finished, results = threading.Event(), threading.Event(), []
    server = create_server_app(config, progress, stop, results, finished)
    client = create_client_app(config)
    failures: list[BaseException] = []

    def simulate() -> None:
        try:
            with _flower_logs(verbose):
                run_simulation(server_app=server, client_app=client, num_supernodes=config.clients,
                               backend_config=backend)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            failures.append(error)

    simulation = threading.Thread(target=simulate, name="gfc-federate", daemon=True)
    simulation.start()
    try:
        _wait(simulation)
    except KeyboardInterrupt:
        stop.set()  # the ServerApp stops waiting for replies; the completed rounds' checkpoint stays
        progress.message("stopping the federation (Ctrl-C again to abort)")
        _wait(simulation)
    if not failures:  # the engine can end before the ServerApp's thread has returned
        _wait_for(finished, _SERVER_SECONDS)
    if failures:
        raise failures[0]
    if not results:
        raise GfcError("the simulation ended without the server's result (rerun with --verbose for Flower's logs)")
    return results[0]


def _wait(thread: threading.Thread) -> None:
    """Join ``thread`` in short waits: Python runs a Ctrl-C's handler only between them."""
    while thread.is_alive():
        thread.join(_JOIN_SECONDS)


def _wait_for(event: threading.Event, seconds: float) -> None:
    """Wait up to ``seconds`` for ``event``, in short waits (see `_wait`)."""
    for _ in range(int(seconds / _JOIN_SECONDS)):
        if event.wait(_JOIN_SECONDS):
            return


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

"""``gfc federate``: its parser (no Flower needed to register it) and its handler.

The handler checks everything it can before Flower starts (arguments, artifacts, every
client's data, the run directory), prints each client's shard, runs the federation
(gfcompiler.federated.simulation, imported only then) and ends with where the global
model is. Errors are GfcErrors, printed as one line by gfcompiler.commandline.run_command.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from gfcompiler.commandline import DATA_HELP
from gfcompiler.errors import EXIT_HELP, EXIT_INTERRUPTED, InputError, OutputError
from gfcompiler.federated.settings import STRATEGIES, FederationConfig

DESCRIPTION = """\
Federated fine-tuning on this machine with Flower's simulation engine: K clients, each a
Trainer on the compiled artifacts and its own data, train E local epochs per round; only
the trained tensors travel. The server aggregates them (FedAvg, FedProx or FedAdam),
evaluates the global model on held-out data after every round and saves it as the run
directory's checkpoint (gfc eval / gfc export read it); metrics.jsonl gets a record per
round. Needs the federated extra: pip install "gfcompiler[federated]".

Data: one --data source is split into label-skewed shards, Dirichlet(--alpha) per class
(seeded); --data repeated gives each client one source. The global evaluation uses
--val-data, else the /test split of a built-in set (clients then share its /train
split), else a seeded 20% held out of each source.
"""


def add_command(subparsers) -> None:
    """Register ``gfc federate`` on the top-level CLI's sub-parsers."""
    parser = subparsers.add_parser("federate", help="federated fine-tuning of compiled artifacts (Flower simulation)",
                                   description=DESCRIPTION, epilog=EXIT_HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = FederationConfig("", ())
    parser.add_argument("artifacts", help="the directory written by gfc compile")
    parser.add_argument("--data", action="append", required=True, help=DATA_HELP + "; repeat for one source per client")
    parser.add_argument("--clients", type=int, help="number of clients K (default 2, or the number of --data sources)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help=f"server rounds (default {defaults.rounds})")
    parser.add_argument("--epochs", type=int, default=defaults.local_epochs,
                        help=f"local epochs per round (default {defaults.local_epochs})")
    parser.add_argument("--alpha", type=float, default=defaults.alpha,
                        help=f"Dirichlet concentration of the label skew: small = few classes per client (default {defaults.alpha})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the split and the shuffling (default 0)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy, help="aggregation (default fedavg)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"client learning rate (default {defaults.lr:g})")
    parser.add_argument("--batch-size", type=int, help="client batch size (default 32, or the model's fixed batch)")
    parser.add_argument("--proximal-mu", type=float, default=defaults.proximal_mu,
                        help=f"fedprox: weight of the proximal term (default {defaults.proximal_mu:g})")
    parser.add_argument("--server-lr", type=float, default=defaults.server_lr,
                        help=f"fedadam: the server optimizer's step size (default {defaults.server_lr:g})")
    parser.add_argument("--val-data", help="the server's held-out evaluation data (default: see above)")
    parser.add_argument("--run-dir", help="global checkpoint and metrics (default: ARTIFACTS/run)")
    parser.add_argument("--overwrite", action="store_true", help="discard the run directory's checkpoint and start over")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime threads per client (default: the cores shared by the clients running at once)")
    parser.add_argument("--quiet", action="store_true", help="no per-round output")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.set_defaults(handler=run_federate)


def config_from_args(args: argparse.Namespace) -> FederationConfig:
    """The federation the arguments describe, with absolute paths (clients may run elsewhere)."""
    from gfcompiler.runtime.artifacts import open_artifacts

    artifacts = open_artifacts(args.artifacts)
    batch_size = args.batch_size or artifacts.fixed_batch or 32
    return FederationConfig(
        artifacts=str(Path(args.artifacts).resolve()), data=tuple(_absolute(s) for s in args.data),
        clients=args.clients if args.clients is not None else (len(args.data) if len(args.data) > 1 else 2),
        rounds=args.rounds,
        local_epochs=args.epochs, lr=args.lr, batch_size=batch_size, alpha=args.alpha, seed=args.seed,
        strategy=args.strategy, proximal_mu=args.proximal_mu, server_lr=args.server_lr,
        val_data=_absolute(args.val_data) if args.val_data else "",
        run_dir=str(Path(args.run_dir).resolve()) if args.run_dir else "", overwrite=args.overwrite,
        threads=args.threads,
    ).checked()


def _absolute(source: str) -> str:
    return source if source.startswith("builtin:") else str(Path(source).resolve())


def run_federate(args: argparse.Namespace) -> int:
    from gfcompiler.federated.partition import describe_shards, evaluation_data, shared_artifacts
    from gfcompiler.runtime.checkpoints import RunDir
    from gfcompiler.runtime.progress import Progress

    config = config_from_args(args)
    _require_flower()
    progress = Progress(enabled=not args.quiet)
    runs = RunDir(config.run_path, shared_artifacts(config.artifacts))
    if runs.has_checkpoint() and not config.overwrite:
        raise OutputError(f"{runs.path} already holds a checkpoint: pass --overwrite to start over (or another --run-dir)")
    evaluation = evaluation_data(config)
    progress.message(f"federating {config.clients} clients, {config.rounds} rounds of {config.local_epochs} local "
                     f"epoch(s), {config.strategy}, lr {config.lr:g}, batch {config.batch_size}; global evaluation "
                     f"on {len(evaluation)} samples of {evaluation.source}")
    for line in describe_shards(config):
        progress.message(line)
    from gfcompiler.federated.simulation import federate

    result = federate(config, progress, verbose=args.verbose)
    if result.interrupted:
        return EXIT_INTERRUPTED
    progress.message(f"done: {len(result.history) - 1} round(s); global model in {result.checkpoint.path} "
                     "(gfc eval / gfc export read it)")
    return 0


def _require_flower() -> None:
    missing = [name for name in ("flwr", "ray") if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"gfc federate needs Flower's simulation engine ({', '.join(missing)} not installed): "
                         'pip install "gfcompiler[federated]"')

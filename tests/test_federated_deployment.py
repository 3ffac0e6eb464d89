"""gfcompiler's Flower app on Flower's deployment engine, on 127.0.0.1 only.

A SuperLink and three SuperNodes run as separate processes, as on a real fleet, each node
with its own partition of the data (``--node-config "partition-id=i num-partitions=3"``).
The run is launched with Flower's own CLI: ``flwr run`` on a copy of
examples/federated/pyproject.toml (the app users get), with ``--run-config`` overrides.
One SuperNode is killed with SIGKILL (a crash: no goodbye to the SuperLink) as soon as its
first training message arrives; the federation must still finish its rounds with the
other two, and ``gfc eval`` must read the global checkpoint and score it exactly as the
server did after the last round.

Bounded in time: every wait has a deadline within TIME_LIMIT_S, and `LocalFleet.close`
(always run) kills every process the test started and every process those started: Flower
launches its SuperExec in a session of its own, so the test finds them by a token it puts
in their environment, not by process group alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

if sys.version_info < (3, 11):
    pytest.skip("Flower 1.42 needs Python >= 3.11 (where the test extra installs it)", allow_module_level=True)

from flwr import __version__ as FLOWER_VERSION  # noqa: E402  (installed by the test extra: fail loudly without it)
from runtime_fixtures import fresh_copy  # noqa: E402

from gfcompiler.runtime.progress import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP_PYPROJECT = ROOT / "examples" / "federated" / "pyproject.toml"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, flower-superexec: the venv's scripts
TIME_LIMIT_S = 115.0
NODES = 3
VICTIM = 2  # the SuperNode killed during the run
ROUNDS = 2
ROUND_TIMEOUT_S = 25.0  # the server's wait for a round's replies: a SIGKILLed node never answers
MARKER = "GFC_FLEET_TEST"  # environment variable naming the processes of one test
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="finds its processes in /proc")]


class LocalFleet:
    """Flower's deployment engine on 127.0.0.1 under ``root``: one SuperLink, SuperNodes, the ``flwr`` CLI.

    Every process gets a session of its own, its own FLWR_HOME and a log file in ``root``;
    ``deadline`` (time.monotonic()) bounds every wait.
    """

    def __init__(self, root: Path, deadline: float):
        self.root, self.deadline = root, deadline
        self.token = uuid.uuid4().hex
        self.processes: dict[str, subprocess.Popen] = {}
        self.link_port = free_port()
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1",
                        FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", **{MARKER: self.token})

    def start(self, name: str, argv: list) -> subprocess.Popen:
        """Start ``argv`` as process ``name`` (log ``root/name.log``, FLWR_HOME ``root/name-home``)."""
        home = self.root / f"{name}-home"
        home.mkdir()
        with open(self.log_path(name), "w") as log:
            process = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(self.env, FLWR_HOME=str(home)), cwd=self.root, start_new_session=True)
        self.processes[name] = process
        return process

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log(self, name: str) -> str:
        """Process ``name``'s output so far, without Flower's terminal colours."""
        return ANSI_COLOUR.sub("", self.log_path(name).read_text(errors="replace"))

    def start_superlink(self) -> None:
        self.start("superlink", [BIN / "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                 "--host", "127.0.0.1", "--port", self.link_port])

    def start_supernode(self, index: int, count: int) -> None:
        self.start(f"node{index}", [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.link_port}",
                                    "--port", free_port(), "--node-config", f"partition-id={index} num-partitions={count}"])

    def write_cli_config(self) -> dict:
        """The ``flwr`` CLI's Flower Configuration: a SuperLink connection named ``fleet``; its environment."""
        home = self.root / "cli-home"
        home.mkdir()
        (home / "config.toml").write_text('[superlink]\ndefault = "fleet"\n\n'
                                          f'[superlink.fleet]\naddress = "127.0.0.1:{self.link_port}"\ninsecure = true\n')
        return dict(self.env, FLWR_HOME=str(home))

    def wait_for(self, what: str, condition, names=()) -> None:
        """Poll ``condition()`` until true; past the deadline, fail showing the logs of ``names``."""
        while not condition():
            if time.monotonic() > self.deadline:
                pytest.fail(f"timed out waiting for {what} (Flower {FLOWER_VERSION})\n" + self.tails(names or list(self.processes)))
            dead = [name for name, p in self.processes.items() if name != f"node{VICTIM}" and p.poll() is not None]
            if dead:
                pytest.fail(f"{', '.join(dead)} exited while waiting for {what}\n" + self.tails(dead))
            time.sleep(0.2)

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def tails(self, names, lines: int = 25) -> str:
        return "\n".join(f"--- {name}.log (last {lines} lines)\n" + "\n".join(self.log(name).splitlines()[-lines:])
                         for name in names if self.log_path(name).exists())

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` and its process group (its SuperExec and ClientApp processes)."""
        _kill_group(self.processes[name].pid)
        self.processes[name].wait(timeout=10)

    def close(self) -> None:
        """Kill everything this fleet started, directly or not, and reap what it can."""
        for process in self.processes.values():
            _kill_group(process.pid)
        for pid in self.marked_processes():
            _kill_group(pid)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def marked_processes(self) -> list[int]:
        """Live processes whose environment carries this fleet's token."""
        needle = f"{MARKER}={self.token}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours
                continue
        return found


def _kill_group(pid: int) -> None:
    """SIGKILL ``pid``'s process group (it leads one: started with start_new_session) and ``pid`` itself."""
    for kill, target in ((os.killpg, _group_of(pid)), (os.kill, pid)):
        if target is None:
            continue
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _group_of(pid: int) -> int | None:
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        return None
    return group if group != os.getpgrp() else None  # never the test runner's own group


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(artifacts: Path) -> str:
    """``flwr run --run-config`` overrides: the federation the test runs (TOML values)."""
    values = {"artifacts": str(artifacts), "data": "builtin:digits", "clients": NODES, "min-clients": NODES - 1,
              "rounds": ROUNDS, "round-timeout": ROUND_TIMEOUT_S, "lr": 0.01, "batch-size": 32, "threads": 1}
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def test_flwr_run_on_superlink_and_supernodes_survives_a_killed_node(tmp_path):
    deadline = time.monotonic() + TIME_LIMIT_S
    artifacts = fresh_copy(tmp_path, layers=2, patch=2)
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(APP_PYPROJECT, app / "pyproject.toml")
    fleet = LocalFleet(tmp_path, deadline)
    try:
        fleet.start_superlink()
        for index in range(NODES):
            fleet.start_supernode(index, NODES)
        nodes = [f"node{i}" for i in range(NODES)]
        fleet.wait_for("the SuperNodes to register with the SuperLink",
                       lambda: all("SuperNode ID" in fleet.log(n) for n in nodes), nodes + ["superlink"])

        cli_env = fleet.write_cli_config()
        with open(fleet.log_path("flwr-run"), "w") as log:
            run = subprocess.Popen([str(BIN / "flwr"), "run", str(app), "fleet", "--stream", "--run-config", run_config(artifacts)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=cli_env, cwd=tmp_path,
                                   start_new_session=True)
        fleet.processes["flwr-run"] = run

        victim = f"node{VICTIM}"
        fleet.wait_for(f"{victim}'s first training message", lambda: "Receiving: train message" in fleet.log(victim),
                       [victim, "superlink", "flwr-run"])
        fleet.kill(victim)

        fleet.wait_for("the run to finish (flwr run --stream returns)", lambda: run.poll() is not None,
                       ["flwr-run", "superlink"] + [n for n in nodes if n != victim])
        output = fleet.log("flwr-run")
        assert run.returncode == 0, output
        run_id = output.split("Successfully started run ", 1)[1].split()[0]
        listed = subprocess.run([str(BIN / "flwr"), "ls", "fleet", "--run-id", run_id, "--format", "json"], env=cli_env,
                                cwd=tmp_path, capture_output=True, text=True, timeout=fleet.remaining())
        status = json.loads(listed.stdout)["runs"][0]["status"]
        assert status == "finished:completed", output

        records = read_metrics(artifacts / "run" / "metrics.jsonl")
        rounds = [r for r in records if r["event"] == "round" and r["round"] > 0]
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
        assert [r["clients"] for r in rounds] == [NODES - 1] * ROUNDS, rounds  # the killed node's update never came
        assert rounds[0]["sampled"] == NODES, rounds  # it was sampled in round 1: killed during the run

        evaluated = subprocess.run([sys.executable, "-m", "gfcompiler.cli", "eval", str(artifacts), "--data", "builtin:digits/test",
                                    "--json"], capture_output=True, text=True, timeout=fleet.remaining())
        assert evaluated.returncode == 0, evaluated.stderr
        scores = json.loads(evaluated.stdout)
        assert scores["accuracy"] == pytest.approx(rounds[-1]["accuracy"], abs=1e-9)
        assert scores["loss"] == pytest.approx(rounds[-1]["loss"], rel=1e-5)
    finally:
        fleet.close()
    survivors = fleet.marked_processes()
    for _ in range(50):  # SIGKILL is delivered at once; a process leaves /proc when its exit completes
        if not survivors:
            break
        time.sleep(0.1)
        survivors = fleet.marked_processes()
    assert survivors == [], "processes of the fleet outlived the test"

"""`make up`, `make status` and `make down` through `make` itself, as a newcomer runs them.

Each test runs a private stack on free ports in a run directory of its own: with Prometheus,
with a RabbitMQ of its own (nothing answers on its AMQP port), or beside a foreign service.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bot.settings import load_settings
from infra import observability, programs, users
from infra.common import ROOT, VENV_BIN, Paths, answers, drop_queues, free_port
from infra.programs import EPMD_PORT_FILE
from tests.conftest import OWNER
from tests.support import claim_redis_db, release_redis_db, stack_dir, stack_env

pytestmark = pytest.mark.system


def make(target: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), target, f"PY={os.environ.get('PY', 'python3')}"],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


def processes_under(run_dir: Path) -> list[str]:
    """Every process whose command line names the run directory (what `up` started)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(run_dir) in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline[:160]}")
    return found


def supervised_pids(env: dict[str, str]) -> dict[str, int]:
    """`make status`'s processes: name -> pid."""
    status = make("status", env)
    assert status.returncode == 0, status.stdout + status.stderr
    rows = (line.split() for line in status.stdout.splitlines() if "pid=" in line)
    return {row[0]: int(row[2].removeprefix("pid=")) for row in rows if row[2] != "pid=-"}


@pytest.fixture
def make_env() -> Iterator[dict[str, str]]:
    """The environment of a stack on free ports with a run directory of its own."""
    owner = f"{OWNER}-make"
    db = claim_redis_db(owner)
    with stack_dir() as base:
        env = stack_env(db, BOT_REPLICAS="2", BOT_SCRAPE_INTERVAL="1")
        run_dir = base / "run"
        full = {**os.environ, **env, "BOT_RUN_DIR": str(run_dir), "BOT_DOTENV": "/dev/null"}
        try:
            yield full
        finally:
            make("down", full)  # which keeps a stack's queues, as it must
            drop_queues(load_settings(full))
            release_redis_db(db, owner)


def test_make_up_prints_its_urls_once_prometheus_lists_its_targets(
    make_env: dict[str, str],
) -> None:
    env = {**make_env, "BOT_OBSERVABILITY": "true"}
    settings = load_settings(env)
    up = make("up", env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"http://127.0.0.1:{settings.prometheus_port}/" in up.stdout
    # Someone opening Prometheus now finds every target it was given.
    paths = Paths(Path(env["BOT_RUN_DIR"]))
    assert observability.targets_loaded(settings, paths), "Prometheus lists no targets yet"
    # Without keys, one line says who /v1 answers (issue 15, item 10).
    said = [line for line in up.stdout.splitlines() if "/v1/* answers" in line]
    assert len(said) == 1 and "loopback clients only" in said[0], up.stdout
    # Run as root, only NGINX's master keeps root: replicas, worker, stub, Prometheus,
    # Alertmanager and every exporter run unprivileged (item 11).
    if os.geteuid() == 0 and users.reaches(users.RUN_USER, VENV_BIN / "python"):
        pids = supervised_pids(env)
        assert {"bot-1", "worker", "stub", "prometheus", "nginx-exporter"} <= set(pids), pids
        rooted = {name for name, pid in pids.items() if 0 in psutil.Process(pid).uids()}
        assert rooted == {"nginx"}, rooted


def test_make_up_status_down_with_its_own_rabbitmq_leave_nothing(
    make_env: dict[str, str],
) -> None:
    amqp_port = free_port()  # nothing answers there: the runner starts a RabbitMQ of its own
    env = {**make_env, "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{amqp_port}/"}
    paths = Paths(Path(env["BOT_RUN_DIR"]))

    up = make("up", env)
    assert up.returncode == 0, up.stdout + up.stderr
    # The RabbitMQ the runner started answers (it could write its own directories).
    assert answers("127.0.0.1", amqp_port)
    epmd_port = int((paths.run / EPMD_PORT_FILE).read_text())
    assert answers("127.0.0.1", epmd_port)

    status = make("status", env)
    assert status.returncode == 0, status.stdout + status.stderr
    states = dict(line.split()[:2] for line in status.stdout.splitlines() if line.strip())
    assert {"bot-1", "bot-2", "nginx", "rabbitmq", "worker"} <= set(states)
    assert set(states.values()) == {"RUNNING"}, status.stdout

    down = make("down", env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert processes_under(paths.run) == []
    assert not answers("127.0.0.1", amqp_port), "the RabbitMQ outlived `make down`"
    assert not answers("127.0.0.1", epmd_port), "the RabbitMQ's epmd outlived `make down`"
    after = make("status", env)
    assert after.returncode != 0 and "stack not running" in after.stdout


@pytest.mark.parametrize("answering", [True, False], ids=["answering", "silent"])
def test_make_up_names_a_port_another_process_holds(
    make_env: dict[str, str], answering: bool
) -> None:
    """A foreign service on one of the stack's ports (Debian's own Prometheus on 9090, say)
    is named, not taken for ours; so is one that holds a port without answering (a broker
    out of file descriptors), where the runner would otherwise start its own and time out."""
    settings = load_settings(make_env)
    port, name = (settings.stub_port, "stub") if answering else (free_port(), "rabbitmq")
    env = make_env if answering else {**make_env, "AMQP_URL": f"amqp://127.0.0.1:{port}/"}
    with socket.socket() as foreign:
        if answering:
            # As servers do: a recent stack's connections to this port, still in TIME_WAIT,
            # do not keep a listener from binding it.
            foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        foreign.bind(("127.0.0.1", port))
        if answering:
            foreign.listen()
        up = make("up", env)
    assert up.returncode != 0
    assert f"{port} ({name})" in up.stderr, up.stdout + up.stderr
    assert processes_under(Path(make_env["BOT_RUN_DIR"])) == []


def test_make_tells_a_sudo_less_user_which_debian_packages_are_missing() -> None:
    """Without root nothing can be installed: one line names what is missing, and make stops
    before it tries to build the venv without python3-venv."""
    cmd = ["make", "-s", "-C", str(ROOT), "system-deps", "APT_PACKAGES=curl bot-no-such-package"]
    if os.geteuid() == 0:  # as root make would install them: ask as the stack's own user
        if not users.reaches(users.RUN_USER, ROOT / "Makefile"):
            pytest.skip(f"{users.RUN_USER} cannot read {ROOT}")
        cmd = ["runuser", "-u", users.RUN_USER, "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert done.stderr.splitlines()[0] == (
        "make: missing Debian packages: bot-no-such-package "
        "(as root: apt-get install bot-no-such-package)"
    ), done.stderr


def test_a_rabbitmq_of_our_own_runs_as_root_where_its_user_cannot_reach_the_run_dir() -> None:
    """A checkout under a private home (/root/bot on a fresh Debian box): `rabbitmq` cannot
    enter the run directory, so its node could not read its own cookie and never came up.
    It then runs as the runner does; elsewhere it keeps its own user."""
    if os.geteuid() != 0:
        pytest.skip("only root hands programs to other users")
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        pytest.skip("no rabbitmq user on this machine")
    settings = load_settings({"AMQP_URL": f"amqp://127.0.0.1:{free_port()}/"})
    with stack_dir() as base:
        for mode, runs_as in ((0o755, "rabbitmq"), (0o700, None)):
            home = base / f"home-{mode:o}"
            home.mkdir()
            home.chmod(mode)
            paths = Paths(home / "bot" / ".run")
            paths.run.mkdir(parents=True)
            progs = programs.data_programs(settings, paths, {})
            [rabbit] = [p for p in progs if p.name == "rabbitmq"]
            assert users.user_of(rabbit, None) == runs_as, oct(mode)

"""Who the stack's processes run as when `make up` runs as root.

Everything that does not need root runs as the unprivileged `RUN_USER` (created when
missing), or as a user of its own where Debian's service has one (RabbitMQ as `rabbitmq`, when it
can reach its directories: not under a private home such as /root);
each gets its data directories, since it writes them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
from pathlib import Path

from infra.common import ROOT, VENV_BIN, Paths
from infra.programs import Program

# The user every unprivileged program runs as when `make up` runs as root.
RUN_USER = "botstack"


def run_user(paths: Paths) -> str | None:
    """`RUN_USER` when the runner is root and that user can reach the code and the run dir.

    Creates the (system, login-less) user when missing. A repo or run directory the user cannot
    reach (a checkout under a private home, say) keeps the processes as root, with one line
    saying why.
    """
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(RUN_USER)
    except KeyError:
        # Another `up` may create it at the same moment: its failure is harmless.
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
             "/nonexistent", "--shell", "/usr/sbin/nologin", RUN_USER],
            check=False, capture_output=True,
        )  # fmt: skip
        pwd.getpwnam(RUN_USER)
    if not reaches(RUN_USER, VENV_BIN / "python", ROOT / "bot" / "__init__.py", paths.run):
        print(
            f"warning: user {RUN_USER} cannot read {ROOT} or {paths.run}: the stack's "
            "processes run as root (make them readable by others to fix it)"
        )
        return None
    return RUN_USER


def reaches(user: str, *paths: Path) -> bool:
    """Whether `user` may enter these directories, run these programs and read these files."""
    test: list[str] = []
    for path in paths:
        test += [*(["-a"] if test else []), "-x" if os.access(path, os.X_OK) else "-r"]
        test.append(str(path))
    return subprocess.run(["runuser", "-u", user, "--", "test", *test], check=False).returncode == 0


def user_of(program: Program, user: str | None) -> str | None:
    """Who `program` runs as: root's choice for it, or None to run as the runner does."""
    if os.geteuid() != 0 or program.privileged:
        return None
    if program.owner:
        with contextlib.suppress(KeyError):
            owner = pwd.getpwnam(program.owner).pw_name
            # It must reach its data directories: under a private home (a checkout in /root)
            # it cannot, and runs as the other programs do.
            if reaches(owner, *(path.parent for path in program.writable)):
                return owner
    return user


def hand_over(programs: list[Program], user: str | None) -> None:
    """Give each program's data directories to the user it runs as (only root can)."""
    for program in programs:
        owner = user_of(program, user)
        if not owner:
            continue
        try:
            entry = pwd.getpwnam(owner)
        except KeyError:
            continue  # no such user here: the program runs as root, which writes anything
        for top in program.writable:
            for path in [top, *top.rglob("*")]:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)

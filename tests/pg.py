"""A throwaway PostgreSQL server for tests: initdb into a temporary folder, start, yield a URL, stop, delete.

Uses the server binaries of Debian's `postgresql` package (/usr/lib/postgresql/<version>/bin, installed by .ci/run)
or, failing that, initdb/pg_ctl/postgres found on PATH. PostgreSQL refuses to run as root, so when the tests run as
root (as CI does) the server runs as the system user PG_SYSTEM_USER, created on first use.

The server is tuned for speed, not durability (fsync off, no full-page writes): its data is deleted on exit anyway.
It listens on 127.0.0.1 only, on a free port, with no Unix socket, and trusts every local connection.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psycopg

PG_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
PG_SYSTEM_USER = "roadlabel-pg"
PG_SUPERUSER = "postgres"
PG_DATABASE = "roadlabel"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
# Attempts at starting on a free port: another process may take the port between our probe and the server's bind.
PORT_ATTEMPTS = 3
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",  # TCP only: no socket in /var/run/postgresql, no socket path length limit
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "50",
    "max_wal_size": "256MB",  # no checkpoint storms while tests create and drop schemas
}


def find_pg_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: Debian's newest /usr/lib/postgresql/<v>/bin, else PATH's."""
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.name == "bin" and p.parent.name.isdigit()]
    for bin_dir in sorted(debian, key=lambda p: int(p.parent.name), reverse=True):
        if all(os.access(bin_dir / name, os.X_OK) for name in PG_SERVER_BINARIES):
            return bin_dir
    found = [shutil.which(name) for name in PG_SERVER_BINARIES]
    if all(found):
        # Resolve links (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb): all three must agree.
        dirs = {Path(p).resolve().parent for p in found if p}
        if len(dirs) == 1:
            return dirs.pop()
    return None


@dataclass(frozen=True)
class _RunAs:
    """Who runs the server: the current user, or (as root) PG_SYSTEM_USER."""

    uid: int
    gid: int
    name: str

    @property
    def is_other(self) -> bool:
        return self.uid != os.geteuid()

    def popen(self, cmd: list[str], cwd: Path, env: Mapping[str, str], out: IO[bytes] | int) -> subprocess.Popen[bytes]:
        """Start `cmd` as this user (dropping root's groups), stdin closed, stdout and stderr to `out`."""
        other = self.is_other
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            user=self.uid if other else None,
            group=self.gid if other else None,
            extra_groups=[] if other else None,
        )

    def run(self, cmd: list[str], cwd: Path, env: Mapping[str, str], timeout: float) -> tuple[int, str]:
        """Run `cmd` as this user: its exit status and output."""
        with self.popen(cmd, cwd, env, subprocess.PIPE) as proc:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            return proc.returncode, out.decode(errors="replace")


def _run_as() -> _RunAs:
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return _RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        cmd = [shutil.which("useradd") or "/usr/sbin/useradd", "--system", "--user-group", "--no-create-home"]
        cmd += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            failure = f"exit {result.returncode}: {result.stderr.strip()}"
        except OSError as e:
            failure = str(e)
        try:  # Another test process may have created it meanwhile: only its absence is an error.
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise RuntimeError(
                f"PostgreSQL cannot run as root, and creating the user {PG_SYSTEM_USER!r} to run it failed ({failure})"
            ) from None
    return _RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)


def _traversable_by_others(path: Path) -> bool:
    """Whether every folder from / down to `path` lets any user through (o+x)."""
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def _env() -> dict[str, str]:
    """The environment for the server programs: no PG* variables (PGDATA, PGPORT...) leaking in, C messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


def _wait_until_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode} while starting; its log:\n{_tail(log)}")
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user=PG_SUPERUSER, dbname="postgres", connect_timeout=2):
                return
        except psycopg.OperationalError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres did not accept connections on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s "
                    f"({e}); its log:\n{_tail(log)}"
                ) from e
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], pg_ctl: Path, data: Path, run_as: _RunAs, env: Mapping[str, str]) -> None:
    """Immediate shutdown (the data is thrown away); kill the postmaster if pg_ctl cannot stop it."""
    if proc.poll() is None:
        cmd = [str(pg_ctl), "stop", "-D", str(data), "-m", "immediate", "-w", "-t", str(int(STOP_TIMEOUT_S))]
        run_as.run(cmd, data.parent, env, timeout=STOP_TIMEOUT_S + 5)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start(
    bin_dir: Path, data: Path, run_as: _RunAs, env: Mapping[str, str], log: Path, log_file: IO[bytes]
) -> tuple[subprocess.Popen[bytes], int]:
    """Start postgres on a free port: the running postmaster and its port."""
    attempt = 0
    while True:
        attempt += 1
        port = _free_port()
        cmd = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port)]
        for key, value in SERVER_SETTINGS.items():
            cmd += ["-c", f"{key}={value}"]
        log_file.write(f"--- attempt {attempt}: {' '.join(cmd)}\n".encode())
        log_file.flush()
        proc = run_as.popen(cmd, data.parent, env, log_file)
        try:
            _wait_until_ready(proc, port, log)
        except RuntimeError:
            _stop(proc, bin_dir / "pg_ctl", data, run_as, env)
            if attempt < PORT_ATTEMPTS and "could not bind" in _tail(log, 10):
                continue
            raise
        return proc, port


@contextmanager
def temporary_postgres(tmp_dir: Path) -> Iterator[str]:
    """Run a fresh PostgreSQL server for the duration of the block; yields its SQLAlchemy URL.

    The URL is `postgresql+psycopg://postgres@127.0.0.1:PORT/roadlabel`: superuser `postgres`, no password (trust),
    database `roadlabel` created empty. The server log is `tmp_dir/postgres.log`; the data folder lives in `tmp_dir`,
    or, when the server runs as another user who could not reach `tmp_dir` (pytest's tmp folders are 0700), in a
    fresh 0755 folder under /tmp. Both the server and its data are gone after the block.
    """
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise RuntimeError(f"PostgreSQL server binaries ({', '.join(PG_SERVER_BINARIES)}) not found")
    tmp_dir = tmp_dir.resolve()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    run_as = _run_as()
    env = _env()
    log = tmp_dir / "postgres.log"

    # Parent of the data folder: must let the server's user through every folder above it.
    own_parent: Path | None = None
    if run_as.is_other and not _traversable_by_others(tmp_dir):
        own_parent = Path(tempfile.mkdtemp(prefix="roadlabel-pg-", dir="/tmp"))
        own_parent.chmod(0o755)
    data = (own_parent or tmp_dir) / "pgdata"
    try:
        data.mkdir(mode=0o700)
        if run_as.is_other:
            os.chown(data, run_as.uid, run_as.gid)
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", PG_SUPERUSER, "--auth=trust"]
        initdb += ["--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        status, output = run_as.run(initdb, data.parent, env, timeout=120)
        if status != 0:
            raise RuntimeError(f"initdb failed (exit {status}): {' '.join(initdb)}\n{output}")
        with log.open("ab") as log_file:
            proc, port = _start(bin_dir, data, run_as, env, log, log_file)
            try:
                with psycopg.connect(
                    host="127.0.0.1", port=port, user=PG_SUPERUSER, dbname="postgres", autocommit=True
                ) as conn:
                    conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')
                yield f"postgresql+psycopg://{PG_SUPERUSER}@127.0.0.1:{port}/{PG_DATABASE}"
            finally:
                _stop(proc, bin_dir / "pg_ctl", data, run_as, env)
    finally:
        shutil.rmtree(own_parent or data, ignore_errors=True)

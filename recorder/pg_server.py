"""A throwaway PostgreSQL server for tests and benchmarks: data in a temp dir, loopback only.

Uses the binaries of Debian's `postgresql` package. initdb and pg_ctl refuse to run as root, so when we
are root they run as the `postgres` OS user.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL binaries or the server would not start; the message says what to do."""


def find_pg_bindir() -> Path:
    """The folder holding initdb and pg_ctl: $PG_BINDIR, the PATH, or the newest /usr/lib/postgresql/*/bin."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install them with "
        "`apt-get install -y postgresql` or point PG_BINDIR at their folder"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThrowawayPostgres:
    """Start with `start()`, connect with `url`, stop with `stop()`; `start()` again reuses the data.

    `base_dir` (default: the system temp dir) must be reachable by the `postgres` user when running as root.
    """

    def __init__(self, base_dir: str | Path | None = None, port: int | None = None, timeout_s: float = 60) -> None:
        self.bindir = find_pg_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="ziggurat-pg-", dir=base_dir))
        self.data_dir = self.root / "data"
        self.port = port or free_port()
        self.timeout_s = timeout_s
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, user="postgres", group="postgres")
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale")
        self.running = False

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout_s + 30)
        if result.returncode != 0:
            tail = (self.root / "server.log").read_text()[-1500:] if (self.root / "server.log").exists() else ""
            raise PostgresUnavailable(
                f"`{tool} {' '.join(args)}` failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-1500:]}\n{tail}"
            )

    @property
    def _wait(self) -> str:
        return str(int(self.timeout_s))

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the `postgres` database (psycopg 3 driver, trust auth, loopback)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        log_file = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", log_file, "-o", options, "-w", "-t", self._wait, "start")
        self.running = True
        log.info("throwaway PostgreSQL on 127.0.0.1:%d (data in %s)", self.port, self.data_dir)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast` rolls back open transactions; `immediate` is a crash-like stop)."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", self._wait, "stop")
            self.running = False

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        connection = psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        )
        with connection as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        """Stop the server and delete its data."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

"""A real PostgreSQL server for tests, on a loopback port and a private socket folder.

initdb refuses to run as root, so as root the server runs as the `postgres` user (docs/platform.md).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType


def find_pg_bin() -> Path | None:
    """The folder with initdb and pg_ctl, or None."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """initdb + pg_ctl start in a temp dir; stop and delete on exit. With `ssl` (a certificate
    and its key), the server accepts TCP connections over SSL only."""

    def __init__(self, ssl: tuple[Path, Path] | None = None) -> None:
        self.ssl = ssl
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb) not found")
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="pocketlora-pg-"))
        self.port = _free_port()
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]

    def _pg(self, *args: str) -> None:
        subprocess.run([*self.run_as, *args], check=True, capture_output=True, timeout=60)

    def __enter__(self) -> PostgresServer:
        self._pg(str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        (self.dir / "sock").mkdir()
        if self.run_as:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir / "sock", pw.pw_uid, pw.pw_gid)
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir / 'sock'} -c fsync=on -c max_connections=200"
        if self.ssl is not None:
            self._enable_ssl(*self.ssl)
            opts += " -c ssl=on"
        self._pg(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.dir / "data"),
            "-l",
            str(self.dir / "log"),
            "-w",
            "-o",
            opts,
            "start",
        )
        return self

    def _enable_ssl(self, cert: Path, key: Path) -> None:
        """server.crt/server.key in the data dir (the key private to the server's user), and a
        pg_hba.conf that refuses TCP connections without SSL."""
        data = self.dir / "data"
        for src, name in ((cert, "server.crt"), (key, "server.key")):
            shutil.copyfile(src, data / name)
            (data / name).chmod(0o600)
            if self.run_as:
                shutil.chown(data / name, "postgres", "postgres")
        (data / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n"
        )

    def url(self, dbname: str = "postgres") -> str:
        """A connection URL."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._pg(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        time.sleep(0.1)
        shutil.rmtree(self.dir, ignore_errors=True)

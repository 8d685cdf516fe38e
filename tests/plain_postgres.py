"""A stock PostgreSQL (Debian's postgresql-15: no pgvector) for the storage fallback tests.

Started with initdb/pg_ctl into a temporary folder, on a Unix socket only. As
root, the server runs as the `postgres` system user (initdb refuses root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

# Debian's package; PLAIN_PG_BIN points elsewhere for another layout.
DEFAULT_BIN = Path("/usr/lib/postgresql/15/bin")
SYSTEM_USER = "postgres"


def plain_pg_bin() -> Path:
    return Path(os.environ.get("PLAIN_PG_BIN", DEFAULT_BIN))


class PlainPostgres:
    def __init__(self, root: Path, bin_dir: Path | None = None, port: int = 54315) -> None:
        self.root = Path(root).resolve()
        self.bin = bin_dir or plain_pg_bin()
        self.port = port
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", SYSTEM_USER, "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        out = subprocess.run(
            [*self._as_owner(), *args], capture_output=True, text=True, check=False, timeout=120
        )
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {out.stderr.strip() or out.stdout.strip()}")

    def start(self) -> str:
        if not (self.bin / "pg_ctl").is_file():
            raise FileNotFoundError(
                f"no PostgreSQL binaries at {self.bin} "
                "(apt-get install -y postgresql-15, or set PLAIN_PG_BIN)"
            )
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(SYSTEM_USER)
            for p in (self.root, self.socket_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            # The system user must be able to reach the folder through its parents.
            for parent in self.root.parents:
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        opts = (
            f"-c listen_addresses='' -c unix_socket_directories={self.socket_dir} -p {self.port} -c fsync=off"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-o", opts, "-w", "start",
        )  # fmt: skip
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

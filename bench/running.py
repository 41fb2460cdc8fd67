"""What every bench needs: mkat started as `python mkat.py` on a fresh database and a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench"
AUTH = ("admin", PASSWORD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mkat(folder: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    """Start mkat logging to folder/mkat.log with these MKAT_* settings; (process, base URL) once healthy."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MKAT_")}
    env.update(
        MKAT_HOST="127.0.0.1",
        MKAT_PORT=str(port),
        MKAT_PASSWORD=PASSWORD,
        MKAT_DATABASE_PATH=str(folder / "bench.db"),
        MKAT_LOG_LEVEL="WARNING",
        **settings,
    )
    log = (folder / "mkat.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "mkat.py")], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(url + "/health", timeout=1).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("mkat did not start: " + (folder / "mkat.log").read_text())

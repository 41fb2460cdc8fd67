"""mkat — is my stuff still working?

mkat is a small self-hosted monitor. Services own monitors that are fed from outside: webhooks
(`POST /webhook/{token}/fail|recover`) and heartbeats (`POST /heartbeat/{token}`, DOWN when one
is missed). The service state is derived from its monitors, and every transition worth telling
someone about becomes an alert row that a dispatcher delivers. One process: a waitress HTTP
server, a `schedule` thread for the periodic jobs, SQLite underneath. The contract is SPEC.md.

Sections, each using only the ones above it:

    1. Imports & logging         structured key=value or JSON lines
    2. Constants & enums         the API's integer enums
    3. Configuration             the MKAT_* variables, one declared table
    4. Utilities & clock         ids, tokens, instants, durations
    5. Errors                    MkatError: one refusal shape for the whole API
    6. Database                  connections, transactions, migrations
    7. Queries                   all SQL outside schema.sql
    8. Domain: state rules       pure functions: derived state, which alert
    9. Domain: services          create, update, pause, mute, transitions
   10. Domain: monitors          add, update, delete, push events, missed deadlines
   11. Domain: alerts & setup    acknowledge, the instance's defaults
   12. Workers                   job_* functions and the scheduler thread
   13. HTTP plumbing             JSON in/out, validation, auth, errors, headers
   14. HTTP: API v1              api_* routes and the to_api/from_api adapters
   15. HTTP: push & health       push_* routes, /health
   16. HTTP: UI                  the static single page
   17. App assembly & main       Context, routes, server, signals
"""

###############################################################################
# Imports & logging ###########################################################
###############################################################################

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hmac
import json
import logging
import math
import os
import queue
import re
import secrets
import signal
import socket
import sqlite3
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from enum import IntEnum
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import bottle
import schedule
import waitress.adjustments
import waitress.server

LOG = logging.getLogger("mkat")


def log_event(level: int, event: str, **fields: Any) -> None:
    """Log one event with its fields; the formatter renders them as key=value or JSON."""
    if LOG.isEnabledFor(level):
        LOG.log(level, event, extra={"fields": fields})


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(ch in text for ch in ' ="\\\n\r\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("\r", "\\r").replace("\t", "\\t") + '"'


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": iso(record.created),
        "level": record.levelname.lower(),
        "event": record.getMessage(),
    }
    if record.name != LOG.name:
        fields["logger"] = record.name
    fields.update(getattr(record, "fields", {}))
    if record.exc_info:
        fields["error"] = "".join(traceback.format_exception(*record.exc_info)).strip()
    return fields


class TextFormatter(logging.Formatter):
    """One line per event: `ts=… level=info event=service_created name="web 1"`."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _record_fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_record_fields(record), default=str, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    """Send every logger (ours, waitress's) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # waitress warns "Task queue depth is N" for every request that waits for a thread. Under
    # load that is one line per request, and waiting briefly is normal: keep only its errors.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


###############################################################################
# Constants & enums ###########################################################
###############################################################################

VERSION = "0.1.0"
HERE = Path(__file__).resolve().parent
SCHEMA_PATH = HERE / "schema.sql"
STATIC_DIR = HERE / "mkat_static"

MAX_BODY_BYTES = 64 * 1024
MAX_INTERVAL_SECONDS = 604_800  # one week
MAX_MUTE_MINUTES = 43_200  # thirty days
MAX_MONITORS_PER_SERVICE = 100
DEFAULT_INTERVAL_SECONDS = 60
TOKEN_PATTERN = re.compile(r"[0-9a-f]{32}")
# How many due rows one worker pass handles per transaction, so pushes are never held up long.
JOB_BATCH = 200
# The most write operations the writer commits together (one fsync for all of them).
WRITE_BATCH = 64


class ApiEnum(IntEnum):
    """An enum that travels as its integer and is also accepted by name on input."""

    @classmethod
    def parse(cls, value: Any) -> ApiEnum:
        """Return the member for an integer, a digit string or a case-insensitive name."""
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                value = int(text)
            else:
                key = text.replace("_", "").lower()
                for member in cls:
                    if member.name.replace("_", "").lower() == key:
                        return member
                raise ValueError(f"must be one of {cls.names()}")
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(f"must be one of {cls.names()}")

    @classmethod
    def names(cls) -> str:
        return ", ".join(f"{m.value} ({m.label})" for m in cls)

    @property
    def label(self) -> str:
        """The name as the original API spells it: `MissedHeartbeat`."""
        return "".join(part.capitalize() for part in self.name.split("_"))


class State(ApiEnum):
    UNKNOWN = 0
    UP = 1
    DOWN = 2
    PAUSED = 3


class Severity(ApiEnum):
    LOW = 0
    MEDIUM = 1
    HIGH = 2
    CRITICAL = 3


class MonitorType(ApiEnum):
    WEBHOOK = 0
    HEARTBEAT = 1
    HEALTH_CHECK = 2
    METRIC = 3


class AlertType(ApiEnum):
    FAILURE = 0
    RECOVERY = 1
    MISSED_HEARTBEAT = 2
    FAILED_HEALTH_CHECK = 3


class ThresholdStrategy(ApiEnum):
    IMMEDIATE = 0
    CONSECUTIVE_COUNT = 1
    TIME_DURATION_AVERAGE = 2
    SAMPLE_COUNT_AVERAGE = 3


class ChannelType(ApiEnum):
    TELEGRAM = 0
    EMAIL = 1
    WEBHOOK = 2


# Monitor types that can be created today; the others are refused until they are built.
AVAILABLE_MONITOR_TYPES = (MonitorType.WEBHOOK, MonitorType.HEARTBEAT)


###############################################################################
# Configuration ###############################################################
###############################################################################


class ConfigError(Exception):
    """A bad MKAT_* value; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8080
    base_path: str = ""
    public_url: str | None = None
    trust_proxy: bool = False
    database_path: str = "mkat.db"
    username: str = "admin"
    password: str | None = None
    telegram_bot_token: str | None = None
    telegram_chat_id: str | None = None
    telegram_api_url: str = "https://api.telegram.org"
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_from: str | None = None
    smtp_tls: str = "starttls"
    log_level: str = "INFO"
    log_format: str = "text"
    min_interval_seconds: int = 30
    min_grace_seconds: int = 60
    instance_name: str = dataclasses.field(default_factory=socket.gethostname)
    peer_heartbeat_seconds: int = 30
    threads: int = 16


def _text(value: str) -> str:
    return value


def _integer(lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, got {value!r}") from None
        if not lo <= number <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {number}")
        return number

    return parse


def _choice(*choices: str, upper: bool = False) -> Callable[[str], str]:
    def parse(value: str) -> str:
        text = value.strip().upper() if upper else value.strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _flag(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be 1 or 0, got {value!r}")


def _url(value: str) -> str:
    text = value.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", text):
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    return text


def _base_path(value: str) -> str:
    text = "/" + value.strip().strip("/")
    if text == "/":
        return ""
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", text):
        raise ValueError(f"must be a URL path like /mkat, got {value!r}")
    return text


# variable -> (Config field, parser). Unset or empty variables keep the Config default.
CONFIG_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "MKAT_HOST": ("host", _text),
    "MKAT_PORT": ("port", _integer(1, 65535)),
    "MKAT_BASE_PATH": ("base_path", _base_path),
    "MKAT_PUBLIC_URL": ("public_url", _url),
    "MKAT_TRUST_PROXY": ("trust_proxy", _flag),
    "MKAT_DATABASE_PATH": ("database_path", _text),
    "MKAT_USERNAME": ("username", _text),
    "MKAT_PASSWORD": ("password", _text),
    "MKAT_TELEGRAM_BOT_TOKEN": ("telegram_bot_token", _text),
    "MKAT_TELEGRAM_CHAT_ID": ("telegram_chat_id", _text),
    "MKAT_TELEGRAM_API_URL": ("telegram_api_url", _url),
    "MKAT_SMTP_HOST": ("smtp_host", _text),
    "MKAT_SMTP_PORT": ("smtp_port", _integer(1, 65535)),
    "MKAT_SMTP_USERNAME": ("smtp_username", _text),
    "MKAT_SMTP_PASSWORD": ("smtp_password", _text),
    "MKAT_SMTP_FROM": ("smtp_from", _text),
    "MKAT_SMTP_TLS": ("smtp_tls", _choice("starttls", "ssl", "none")),
    "MKAT_LOG_LEVEL": ("log_level", _choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True)),
    "MKAT_LOG_FORMAT": ("log_format", _choice("text", "json")),
    "MKAT_MIN_INTERVAL_SECONDS": ("min_interval_seconds", _integer(1, MAX_INTERVAL_SECONDS)),
    "MKAT_MIN_GRACE_SECONDS": ("min_grace_seconds", _integer(0, MAX_INTERVAL_SECONDS)),
    "MKAT_INSTANCE_NAME": ("instance_name", _text),
    "MKAT_PEER_HEARTBEAT_SECONDS": ("peer_heartbeat_seconds", _integer(1, 86_400)),
    "MKAT_THREADS": ("threads", _integer(1, 256)),
}


def load_config(environ: dict[str, str]) -> Config:
    """Return the configuration from MKAT_* variables; raise ConfigError naming a bad one."""
    values: dict[str, Any] = {}
    for variable, (field, parse) in CONFIG_VARIABLES.items():
        raw = environ.get(variable, "")
        if raw.strip() == "":
            continue
        try:
            values[field] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{variable} {exc}") from None
    return Config(**values)


###############################################################################
# Utilities & clock ###########################################################
###############################################################################

Clock = Callable[[], float]  # epoch seconds; time.time in production, a fake in tests


def new_id() -> str:
    return str(uuid.uuid4())


def new_token() -> str:
    """A push token: 32 lowercase hex characters from the OS's CSPRNG."""
    return secrets.token_hex(16)


def is_uuid(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return len(text) == 36


def iso(ts: float | None) -> str | None:
    """Format epoch seconds as ISO 8601 UTC with milliseconds and a Z; None stays None."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_instant(text: str) -> float:
    """Return epoch seconds for an ISO 8601 string; no zone means UTC. Raises ValueError."""
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def format_duration(seconds: float) -> str:
    """A short human duration: 45s, 5m, 1h 30m, 2d 3h."""
    total = max(0, round(seconds))
    parts = []
    for unit in ("d", "h", "m", "s"):
        amount, total = divmod(total, DURATION_UNITS[unit])
        if amount:
            parts.append(f"{amount}{unit}")
    return " ".join(parts[:2]) or "0s"


def casefold_name(name: str) -> str:
    """The key under which names are unique and sorted, whatever their case."""
    return name.casefold()


###############################################################################
# Errors ######################################################################
###############################################################################


class MkatError(Exception):
    """A refusal reported as {"error", "code", "details"}; the HTTP layer maps code to status."""

    def __init__(self, code: str, message: str, details: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


STATUS_OF_CODE = {
    "VALIDATION_ERROR": 400,
    "INVALID_JSON": 400,
    "SERVICE_NOT_PAUSED": 400,
    "ALREADY_ACKNOWLEDGED": 400,
    "LAST_MONITOR": 400,
    "LAST_CONTACT": 400,
    "DEFAULT_CONTACT": 400,
    "WRONG_MONITOR_TYPE": 400,
    "UNAUTHORIZED": 401,
    "NOT_FOUND": 404,
    "SERVICE_NOT_FOUND": 404,
    "MONITOR_NOT_FOUND": 404,
    "ALERT_NOT_FOUND": 404,
    "CONTACT_NOT_FOUND": 404,
    "CHANNEL_NOT_FOUND": 404,
    "PEER_NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "DUPLICATE_NAME": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "INTERNAL_ERROR": 500,
}


def not_found(kind: str) -> MkatError:
    """The specific 404 for a kind of resource: not_found("service") → SERVICE_NOT_FOUND."""
    return MkatError(f"{kind.upper()}_NOT_FOUND", f"{kind.capitalize()} not found")


def invalid(field: str, message: str) -> MkatError:
    """A validation error about one field."""
    return MkatError("VALIDATION_ERROR", "Validation failed", {field: [message]})


###############################################################################
# Database ####################################################################
###############################################################################

SCHEMA_VERSION = 1

# Ordered migrations for databases made by an older mkat: (version it brings, SQL). A fresh
# database gets schema.sql at SCHEMA_VERSION directly. Never edit a released entry; append.
MIGRATIONS: list[tuple[int, str]] = []


class Connection(sqlite3.Connection):
    """A connection that also collects the events of its transaction, published after commit."""

    events: list[tuple[str, dict[str, Any]]]

    def emit(self, kind: str, **data: Any) -> None:
        self.events.append((kind, data))


def connect(path: str) -> Connection:
    """Open a connection with mkat's settings: autocommit mode (explicit BEGIN), rows by name."""
    c = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=Connection, timeout=5)
    c.row_factory = sqlite3.Row
    c.events = []
    c.execute("PRAGMA foreign_keys = ON")
    # FULL makes each COMMIT reach the disk before a push endpoint answers 200 (bench/push.py
    # measures what it costs; with one writer at a time it is cheap).
    c.execute("PRAGMA synchronous = FULL")
    c.execute("PRAGMA cache_size = -1024")
    return c


def migrate(c: Connection) -> int:
    """Bring the database to SCHEMA_VERSION; return the version it had before."""
    version = c.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"it was made by a newer mkat (schema {version}, this one knows {SCHEMA_VERSION})"
        )
    steps = [sql for to_version, sql in MIGRATIONS if to_version > version] if version else []
    script = "\n".join(["BEGIN IMMEDIATE;", *steps, SCHEMA_PATH.read_text()])
    # executescript commits any open transaction first, so the script carries its own.
    try:
        c.executescript(f"{script}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")
    except BaseException:
        if c.in_transaction:
            c.execute("ROLLBACK")
        raise
    return version


class WriteJob:
    """One write operation waiting for the writer: fn(c, *args), then its result or error."""

    __slots__ = ("args", "done", "error", "events", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple):
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.events: list[tuple[str, dict[str, Any]]] = []


class Database:
    """One SQLite file: a connection per thread for reads, one writer thread for every write.

    Writes are group-committed: the writer takes every operation that is waiting, runs each in
    its own SAVEPOINT inside one transaction, and COMMITs once, so one fsync (synchronous=FULL)
    covers many heartbeats. An operation that raises is rolled back alone. With a single writer,
    SQLite's busy-wait (sleeps of up to 100 ms, then "database is locked") never happens.
    """

    def __init__(self, path: str, on_commit: Callable[[list], None] | None = None):
        self.path = path
        # Called on the writer thread after each commit with an operation's events; must not write.
        self.on_commit = on_commit or (lambda events: None)
        self._local = threading.local()
        self._connections: list[Connection] = []
        self._connections_lock = threading.Lock()
        first = self.connection()
        try:
            first.execute("PRAGMA journal_mode = WAL")
            self.migrated_from = migrate(first)
        except BaseException:
            first.close()
            raise
        self._queue: queue.SimpleQueue[WriteJob | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="mkat-writer", daemon=True)
        self._writer.start()

    def connection(self) -> Connection:
        """This thread's connection, opened on first use."""
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = connect(self.path)
            with self._connections_lock:
                self._connections.append(c)
        return c

    def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(c, *args) in a write transaction and return its result once it is on disk."""
        if threading.current_thread() is self._writer:
            raise RuntimeError("Database.write called from the writer thread")
        job = WriteJob(fn, args)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(c, *args) in a read transaction: one consistent snapshot."""
        c = self.connection()
        c.execute("BEGIN")
        try:
            return fn(c, *args)
        finally:
            if c.in_transaction:  # an error inside may already have ended it
                c.execute("COMMIT")

    def _write_loop(self) -> None:
        c = self.connection()
        while (job := self._queue.get()) is not None:
            batch = [job]
            while len(batch) < WRITE_BATCH and (job := self._next_job()) is not None:
                batch.append(job)
            self._commit(c, batch)
        while (job := self._next_job()) is not None:  # closing: nobody may wait forever
            job.error = sqlite3.ProgrammingError("the database is closed")
            job.done.set()

    def _next_job(self) -> WriteJob | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def _commit(self, c: Connection, batch: list[WriteJob]) -> None:
        """Run a batch in one transaction, each job in its own savepoint; then wake them all.

        Never raises: the writer thread must outlive any error, or every later write would wait
        forever.
        """
        try:
            c.execute("BEGIN IMMEDIATE")
            for job in batch:
                self._run(c, job)
            c.execute("COMMIT")
        except Exception as exc:  # the transaction is lost: so is every job's work in it
            LOG.exception("write_failed", extra={"fields": {"operations": len(batch)}})
            with contextlib.suppress(sqlite3.Error):
                if c.in_transaction:
                    c.execute("ROLLBACK")
            for job in batch:
                job.error, job.events = job.error or exc, []
        for job in batch:
            if job.events:
                try:
                    self.on_commit(job.events)
                except Exception:
                    LOG.exception("publish_failed")
            job.done.set()

    @staticmethod
    def _run(c: Connection, job: WriteJob) -> None:
        c.events = []
        c.execute("SAVEPOINT job")
        try:
            job.result = job.fn(c, *job.args)
        except Exception as exc:
            job.error = exc
            c.execute("ROLLBACK TO job")
        c.execute("RELEASE job")
        job.events = [] if job.error else c.events

    def close(self) -> None:
        """Stop the writer (after the writes already queued) and close every connection."""
        self._queue.put(None)
        self._writer.join(timeout=5)
        with self._connections_lock:
            for c in self._connections:
                c.close()
            self._connections.clear()
        self._local = threading.local()


###############################################################################
# Queries #####################################################################
###############################################################################

Row = sqlite3.Row

# -- settings -------------------------------------------------------------------


def find_setting(c: Connection, key: str) -> str | None:
    row = c.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def upsert_setting(c: Connection, key: str, value: str) -> None:
    c.execute(
        """
        INSERT INTO settings (key, value) VALUES (?, ?)
        ON CONFLICT (key) DO UPDATE SET value = excluded.value
        """,
        (key, value),
    )


# -- services -------------------------------------------------------------------

# Columns an update may set; anything else is refused before it reaches SQL.
SERVICE_UPDATABLE = ("name", "name_key", "description", "severity")


def find_service(c: Connection, service_id: str) -> Row | None:
    return c.execute("SELECT * FROM services WHERE id = ?", (service_id,)).fetchone()


def find_service_id_by_name(c: Connection, name_key: str) -> str | None:
    row = c.execute("SELECT id FROM services WHERE name_key = ?", (name_key,)).fetchone()
    return row[0] if row else None


def _service_filter(search: str | None, state: State | None) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if search:
        escaped = re.sub(r"([\\%_])", r"\\\1", casefold_name(search))
        clauses.append("name_key LIKE ? ESCAPE '\\'")
        params.append(f"%{escaped}%")
    if state is not None:
        clauses.append("state = ?")
        params.append(int(state))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def count_services(c: Connection, search: str | None, state: State | None) -> int:
    where, params = _service_filter(search, state)
    return c.execute("SELECT count(*) FROM services" + where, params).fetchone()[0]


def list_services(
    c: Connection, search: str | None, state: State | None, limit: int, offset: int
) -> list[Row]:
    where, params = _service_filter(search, state)
    sql = f"SELECT * FROM services{where} ORDER BY name_key, id LIMIT ? OFFSET ?"
    return c.execute(sql, [*params, limit, offset]).fetchall()


def insert_service(c: Connection, row: dict[str, Any]) -> None:
    c.execute(
        """
        INSERT INTO services (id, name, name_key, description, severity, state,
                              state_changed_at, created_at, updated_at)
        VALUES (:id, :name, :name_key, :description, :severity, :state,
                :created_at, :created_at, :created_at)
        """,
        row,
    )


def update_service_columns(c: Connection, service_id: str, changes: dict[str, Any], now: float) -> None:
    columns = [name for name in SERVICE_UPDATABLE if name in changes]
    assignments = "".join(f"{name} = :{name}, " for name in columns)
    c.execute(
        f"UPDATE services SET {assignments}updated_at = :now WHERE id = :id",
        {**{name: changes[name] for name in columns}, "now": now, "id": service_id},
    )


def delete_service_row(c: Connection, service_id: str) -> bool:
    return c.execute("DELETE FROM services WHERE id = ?", (service_id,)).rowcount == 1


def swap_service_state(c: Connection, service_id: str, old: State, new: State, now: float) -> bool:
    """Compare-and-swap the service state; False when someone else changed it first."""
    cursor = c.execute(
        """
        UPDATE services SET state = ?, state_changed_at = ?, updated_at = ?
        WHERE id = ? AND state = ?
        """,
        (int(new), now, now, service_id, int(old)),
    )
    return cursor.rowcount == 1


def update_service_pause(
    c: Connection,
    service_id: str,
    paused_at: float | None,
    until: float | None,
    auto_resume: bool,
    now: float,
) -> None:
    c.execute(
        """
        UPDATE services SET paused_at = ?, paused_until = ?, auto_resume = ?, updated_at = ?
        WHERE id = ?
        """,
        (paused_at, until, int(auto_resume), now, service_id),
    )


def update_service_mute(
    c: Connection, service_id: str, until: float | None, reason: str | None, now: float
) -> None:
    c.execute(
        "UPDATE services SET muted_until = ?, mute_reason = ?, updated_at = ? WHERE id = ?",
        (until, reason, now, service_id),
    )


def list_services_to_resume(c: Connection, now: float, limit: int) -> list[str]:
    rows = c.execute(
        """
        SELECT id FROM services
        WHERE auto_resume = 1 AND paused_until <= ?
        ORDER BY paused_until LIMIT ?
        """,
        (now, limit),
    )
    return [row[0] for row in rows]


def list_ended_mutes(c: Connection, now: float, limit: int) -> list[str]:
    rows = c.execute(
        "SELECT id FROM services WHERE muted_until <= ? ORDER BY muted_until LIMIT ?",
        (now, limit),
    )
    return [row[0] for row in rows]


# -- monitors -------------------------------------------------------------------

MONITOR_UPDATABLE = ("interval_seconds", "grace_seconds", "deadline_at")


def find_monitor(c: Connection, monitor_id: str) -> Row | None:
    return c.execute("SELECT * FROM monitors WHERE id = ?", (monitor_id,)).fetchone()


def find_push_target(c: Connection, token: str) -> Row | None:
    """The monitor with this token, with its service's pause flag: all a push event needs."""
    return c.execute(
        """
        SELECT m.id, m.service_id, m.type, m.state, m.interval_seconds, m.grace_seconds,
               s.paused_at IS NOT NULL AS paused
        FROM monitors m JOIN services s ON s.id = m.service_id
        WHERE m.token = ?
        """,
        (token,),
    ).fetchone()


def list_monitors(c: Connection, service_ids: list[str]) -> list[Row]:
    marks = ",".join("?" * len(service_ids))
    sql = f"SELECT * FROM monitors WHERE service_id IN ({marks}) ORDER BY created_at, rowid"
    return c.execute(sql, service_ids).fetchall()


def find_monitor_states(c: Connection, service_id: str) -> set[int]:
    """The distinct states among a service's monitors (read from the index alone)."""
    rows = c.execute("SELECT DISTINCT state FROM monitors WHERE service_id = ?", (service_id,))
    return {row[0] for row in rows}


def count_monitors(c: Connection, service_id: str) -> int:
    sql = "SELECT count(*) FROM monitors WHERE service_id = ?"
    return c.execute(sql, (service_id,)).fetchone()[0]


def insert_monitor(c: Connection, row: dict[str, Any]) -> None:
    c.execute(
        """
        INSERT INTO monitors (id, service_id, type, token, state, interval_seconds,
                              grace_seconds, armed_at, deadline_at, created_at)
        VALUES (:id, :service_id, :type, :token, :state, :interval_seconds,
                :grace_seconds, :armed_at, :deadline_at, :created_at)
        """,
        row,
    )


def update_monitor_columns(c: Connection, monitor_id: str, changes: dict[str, Any]) -> None:
    columns = [name for name in MONITOR_UPDATABLE if name in changes]
    if columns:
        assignments = ", ".join(f"{name} = :{name}" for name in columns)
        params = {**{name: changes[name] for name in columns}, "id": monitor_id}
        c.execute(f"UPDATE monitors SET {assignments} WHERE id = :id", params)


def delete_monitor_row(c: Connection, monitor_id: str) -> None:
    c.execute("DELETE FROM monitors WHERE id = ?", (monitor_id,))


def update_check_in(c: Connection, monitor_id: str, now: float, deadline_at: float | None) -> None:
    """Record a push event: the check-in time and (heartbeats) the next deadline."""
    c.execute(
        "UPDATE monitors SET last_check_in_at = ?, armed_at = ?, deadline_at = ? WHERE id = ?",
        (now, now, deadline_at, monitor_id),
    )


def update_monitor_state(c: Connection, monitor_id: str, state: State) -> None:
    # Only on a change: state is in an index, and heartbeats should not rewrite it each time.
    c.execute("UPDATE monitors SET state = ? WHERE id = ?", (int(state), monitor_id))


def update_last_check_in(c: Connection, monitor_id: str, now: float) -> None:
    """Record that a push arrived while paused: the time only, no state."""
    c.execute("UPDATE monitors SET last_check_in_at = ? WHERE id = ?", (now, monitor_id))


def disarm_monitors(c: Connection, service_id: str) -> None:
    c.execute("UPDATE monitors SET deadline_at = NULL WHERE service_id = ?", (service_id,))


def reset_monitors(c: Connection, service_id: str, now: float) -> None:
    """Every monitor back to UNKNOWN; heartbeats wait a full interval from now."""
    c.execute(
        """
        UPDATE monitors
        SET state = ?,
            armed_at = CASE WHEN type = ? THEN ? END,
            deadline_at = CASE WHEN type = ? THEN ? + interval_seconds + grace_seconds END
        WHERE service_id = ?
        """,
        (int(State.UNKNOWN), int(MonitorType.HEARTBEAT), now, int(MonitorType.HEARTBEAT), now, service_id),
    )


def list_due_monitors(c: Connection, now: float, limit: int) -> list[str]:
    rows = c.execute(
        "SELECT id FROM monitors WHERE deadline_at <= ? ORDER BY deadline_at LIMIT ?",
        (now, limit),
    )
    return [row[0] for row in rows]


def miss_deadline(c: Connection, monitor_id: str, now: float) -> Row | None:
    """Mark a heartbeat DOWN if its deadline has passed (compare-and-swap); the monitor or None."""
    return c.execute(
        """
        UPDATE monitors SET state = ?, deadline_at = NULL
        WHERE id = ? AND deadline_at <= ?
        RETURNING *
        """,
        (int(State.DOWN), monitor_id, now),
    ).fetchone()


# -- alerts ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AlertFilter:
    service_id: str | None = None
    type: AlertType | None = None
    acknowledged: bool | None = None
    suppressed: bool | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if self.service_id is not None:
            clauses.append("a.service_id = ?")
            params.append(self.service_id)
        if self.type is not None:
            clauses.append("a.type = ?")
            params.append(int(self.type))
        if self.acknowledged is not None:
            clauses.append(f"a.acknowledged_at IS {'NOT ' if self.acknowledged else ''}NULL")
        if self.suppressed is not None:
            clauses.append("a.suppressed = ?")
            params.append(int(self.suppressed))
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


ALERT_SELECT = """
    SELECT a.*, s.name AS service_name
    FROM alerts a JOIN services s ON s.id = a.service_id
"""


def insert_alert(c: Connection, row: dict[str, Any]) -> None:
    c.execute(
        """
        INSERT INTO alerts (id, service_id, monitor_id, type, severity, message, created_at,
                            suppressed, suppression_reason)
        VALUES (:id, :service_id, :monitor_id, :type, :severity, :message, :created_at,
                :suppressed, :suppression_reason)
        """,
        row,
    )


def find_alert(c: Connection, alert_id: str) -> Row | None:
    return c.execute(ALERT_SELECT + " WHERE a.id = ?", (alert_id,)).fetchone()


def count_alerts(c: Connection, f: AlertFilter) -> int:
    where, params = f.where()
    return c.execute("SELECT count(*) FROM alerts a" + where, params).fetchone()[0]


def list_alerts(c: Connection, f: AlertFilter, limit: int, offset: int) -> list[Row]:
    where, params = f.where()
    sql = f"{ALERT_SELECT}{where} ORDER BY a.created_at DESC, a.rowid DESC LIMIT ? OFFSET ?"
    return c.execute(sql, [*params, limit, offset]).fetchall()


def acknowledge_alert_row(c: Connection, alert_id: str, now: float, by: str) -> bool:
    """Compare-and-swap: True when this call acknowledged the alert."""
    cursor = c.execute(
        """
        UPDATE alerts SET acknowledged_at = ?, acknowledged_by = ?
        WHERE id = ? AND acknowledged_at IS NULL
        """,
        (now, by, alert_id),
    )
    return cursor.rowcount == 1


# -- contacts -------------------------------------------------------------------


def find_default_contact_id(c: Connection) -> str | None:
    row = c.execute("SELECT id FROM contacts WHERE is_default = 1").fetchone()
    return row[0] if row else None


def insert_contact(c: Connection, row: dict[str, Any]) -> None:
    c.execute(
        """
        INSERT INTO contacts (id, name, name_key, is_default, created_at)
        VALUES (:id, :name, :name_key, :is_default, :created_at)
        """,
        row,
    )


def insert_service_contact(c: Connection, service_id: str, contact_id: str) -> None:
    c.execute(
        "INSERT OR IGNORE INTO service_contacts (service_id, contact_id) VALUES (?, ?)",
        (service_id, contact_id),
    )


def list_contact_ids(c: Connection, service_ids: list[str]) -> dict[str, list[str]]:
    """service id -> ids of its contacts, for the given services."""
    marks = ",".join("?" * len(service_ids))
    rows = c.execute(
        f"""
        SELECT sc.service_id, sc.contact_id
        FROM service_contacts sc JOIN contacts ct ON ct.id = sc.contact_id
        WHERE sc.service_id IN ({marks})
        ORDER BY ct.name_key
        """,
        service_ids,
    )
    result: dict[str, list[str]] = {sid: [] for sid in service_ids}
    for row in rows:
        result[row[0]].append(row[1])
    return result


###############################################################################
# Domain: state rules #########################################################
###############################################################################


def derive_state(paused: bool, monitor_states: Collection[int]) -> State:
    """The service state: PAUSED if paused, else DOWN if any monitor is, else UP if any, else UNKNOWN."""
    if paused:
        return State.PAUSED
    if State.DOWN in monitor_states:
        return State.DOWN
    if State.UP in monitor_states:
        return State.UP
    return State.UNKNOWN


def alert_type_for(old: State, new: State, missed_heartbeat: bool) -> AlertType | None:
    """The alert a service transition calls for, or None (UNKNOWN → UP, pause, resume, …)."""
    if new == State.DOWN and old in (State.UNKNOWN, State.UP):
        return AlertType.MISSED_HEARTBEAT if missed_heartbeat else AlertType.FAILURE
    if new == State.UP and old == State.DOWN:
        return AlertType.RECOVERY
    return None


def default_grace_seconds(interval_seconds: int, min_grace_seconds: int) -> int:
    """max(60, interval // 10), never below the configured minimum."""
    return max(60, interval_seconds // 10, min_grace_seconds)


def heartbeat_deadline(armed_at: float, interval_seconds: int, grace_seconds: int) -> float:
    return armed_at + interval_seconds + grace_seconds


###############################################################################
# Domain: services ############################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class Cause:
    """What moved a monitor: used to pick the alert type and write its message."""

    monitor_id: str | None
    missed_heartbeat: bool = False
    message: str = ""


def get_service(c: Connection, service_id: str) -> Row:
    row = find_service(c, service_id) if is_uuid(service_id) else None
    if row is None:
        raise not_found("service")
    return row


def ensure_unique_name(c: Connection, name: str, service_id: str | None = None) -> None:
    owner = find_service_id_by_name(c, casefold_name(name))
    if owner is not None and owner != service_id:
        raise MkatError("DUPLICATE_NAME", f"A service named {name!r} already exists", {"name": ["is taken"]})


def create_service(c: Connection, now: float, spec: dict[str, Any], monitors: list[dict[str, Any]]) -> str:
    """Create a service with its monitors and the default contact; return its id."""
    ensure_unique_name(c, spec["name"])
    service_id = new_id()
    insert_service(
        c,
        {
            "id": service_id,
            "name": spec["name"],
            "name_key": casefold_name(spec["name"]),
            "description": spec.get("description"),
            "severity": int(spec.get("severity", Severity.MEDIUM)),
            "state": int(State.UNKNOWN),
            "created_at": now,
        },
    )
    for monitor in monitors:
        insert_new_monitor(c, now, service_id, monitor)
    default_contact = find_default_contact_id(c)
    if default_contact:
        insert_service_contact(c, service_id, default_contact)
    log_event(logging.INFO, "service_created", service=service_id, name=spec["name"])
    return service_id


def update_service(c: Connection, now: float, service_id: str, changes: dict[str, Any]) -> None:
    get_service(c, service_id)
    if "name" in changes:
        ensure_unique_name(c, changes["name"], service_id)
        changes = {**changes, "name_key": casefold_name(changes["name"])}
    update_service_columns(c, service_id, changes, now)


def delete_service(c: Connection, service_id: str) -> None:
    """Delete a service; its monitors, alerts and deliveries go with it (ON DELETE CASCADE)."""
    if not is_uuid(service_id) or not delete_service_row(c, service_id):
        raise not_found("service")
    log_event(logging.INFO, "service_deleted", service=service_id)


def refresh_service(c: Connection, now: float, service_id: str, cause: Cause | None) -> str | None:
    """Re-derive the service state; on a transition record it and its alert. The alert id or None."""
    service = get_service(c, service_id)
    old = State(service["state"])
    new = derive_state(service["paused_at"] is not None, find_monitor_states(c, service_id))
    if new == old or not swap_service_state(c, service_id, old, new, now):
        return None
    c.emit("state_changed", serviceId=service_id, state=int(new), previousState=int(old))
    log_event(
        logging.INFO, "state_changed", service=service_id, name=service["name"], old=old.name, new=new.name
    )
    kind = alert_type_for(old, new, bool(cause and cause.missed_heartbeat))
    if kind is None:
        return None
    return record_alert(c, now, service, kind, cause)


def record_alert(c: Connection, now: float, service: Row, kind: AlertType, cause: Cause | None) -> str:
    """Insert an alert for a service transition; suppressed when the service is muted."""
    muted = service["muted_until"] is not None and service["muted_until"] > now
    if kind == AlertType.RECOVERY:
        message = f"Back up after {format_duration(now - service['state_changed_at'])} down"
    else:
        message = cause.message if cause and cause.message else "Service is down"
    alert = {
        "id": new_id(),
        "service_id": service["id"],
        "monitor_id": cause.monitor_id if cause else None,
        "type": int(kind),
        "severity": service["severity"],
        "message": message,
        "created_at": now,
        "suppressed": int(muted),
        "suppression_reason": "muted" if muted else None,
    }
    insert_alert(c, alert)
    c.emit(
        "alert_created",
        alertId=alert["id"],
        serviceId=service["id"],
        type=int(kind),
        severity=service["severity"],
        suppressed=muted,
    )
    log_event(
        logging.WARNING if kind != AlertType.RECOVERY else logging.INFO,
        "alert_created",
        alert=alert["id"],
        service=service["id"],
        name=service["name"],
        type=kind.label,
        suppressed=muted,
    )
    return alert["id"]


def pause_service(c: Connection, now: float, service_id: str, until: float | None, auto_resume: bool) -> None:
    """Pause (or re-pause with a new end): no checks, no state changes, no alerts until resumed."""
    service = get_service(c, service_id)
    if until is not None and until <= now:
        raise invalid("until", "must be in the future")
    if auto_resume and until is None:
        raise invalid("autoResume", "needs an until time")
    paused_at = service["paused_at"] if service["paused_at"] is not None else now
    update_service_pause(c, service_id, paused_at, until, auto_resume, now)
    disarm_monitors(c, service_id)
    refresh_service(c, now, service_id, None)


def resume_service(c: Connection, now: float, service_id: str) -> None:
    """End a pause: every monitor and the service start over from UNKNOWN."""
    service = get_service(c, service_id)
    if service["paused_at"] is None:
        raise MkatError("SERVICE_NOT_PAUSED", "The service is not paused")
    update_service_pause(c, service_id, None, None, False, now)
    reset_monitors(c, service_id, now)
    refresh_service(c, now, service_id, None)


def mute_service(c: Connection, now: float, service_id: str, minutes: int, reason: str | None) -> float:
    """Mute notifications for `minutes` (replacing any mute); return the end time."""
    get_service(c, service_id)
    until = now + minutes * 60
    update_service_mute(c, service_id, until, reason, now)
    return until


def end_mute(c: Connection, now: float, service_id: str) -> bool:
    """End a mute now; True when the service is still DOWN (worth a "still down" notice)."""
    service = get_service(c, service_id)
    if service["muted_until"] is None:
        return False
    update_service_mute(c, service_id, None, None, now)
    still_down = service["state"] == State.DOWN
    c.emit("mute_ended", serviceId=service_id, stillDown=still_down)
    return still_down


###############################################################################
# Domain: monitors ############################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class PushResult:
    alert_id: str | None
    next_deadline: float | None = None


def get_monitor(c: Connection, service_id: str, monitor_id: str) -> Row:
    get_service(c, service_id)
    row = find_monitor(c, monitor_id) if is_uuid(monitor_id) else None
    if row is None or row["service_id"] != service_id:
        raise not_found("monitor")
    return row


def insert_new_monitor(c: Connection, now: float, service_id: str, spec: dict[str, Any]) -> str:
    """Insert a monitor from a validated spec; heartbeats are armed from now."""
    kind = MonitorType(spec["type"])
    armed = kind == MonitorType.HEARTBEAT
    row = {
        "id": new_id(),
        "service_id": service_id,
        "type": int(kind),
        "token": new_token(),
        "state": int(State.UNKNOWN),
        "interval_seconds": spec["interval_seconds"],
        "grace_seconds": spec["grace_seconds"],
        "armed_at": now if armed else None,
        "deadline_at": heartbeat_deadline(now, spec["interval_seconds"], spec["grace_seconds"])
        if armed
        else None,
        "created_at": now,
    }
    insert_monitor(c, row)
    return row["id"]


def add_monitor(c: Connection, now: float, service_id: str, spec: dict[str, Any]) -> str:
    service = get_service(c, service_id)
    if count_monitors(c, service_id) >= MAX_MONITORS_PER_SERVICE:
        raise invalid("monitors", f"a service has at most {MAX_MONITORS_PER_SERVICE} monitors")
    monitor_id = insert_new_monitor(c, now, service_id, spec)
    if service["paused_at"] is not None:
        disarm_monitors(c, service_id)
    refresh_service(c, now, service_id, None)
    return monitor_id


def update_monitor(
    c: Connection, now: float, service_id: str, monitor_id: str, changes: dict[str, Any]
) -> None:
    """Change a monitor's timing; an armed heartbeat's deadline moves with it."""
    monitor = get_monitor(c, service_id, monitor_id)
    if "type" in changes and changes["type"] != monitor["type"]:
        raise invalid("type", "cannot change; delete the monitor and add a new one")
    if monitor["deadline_at"] is not None:
        changes = {
            **changes,
            "deadline_at": heartbeat_deadline(
                monitor["armed_at"],
                changes.get("interval_seconds", monitor["interval_seconds"]),
                changes.get("grace_seconds", monitor["grace_seconds"]),
            ),
        }
    update_monitor_columns(c, monitor_id, changes)


def delete_monitor(c: Connection, now: float, service_id: str, monitor_id: str) -> None:
    """Delete a monitor (never the last one) and re-derive the service state."""
    get_monitor(c, service_id, monitor_id)
    if count_monitors(c, service_id) <= 1:
        raise MkatError("LAST_MONITOR", "A service needs at least one monitor")
    delete_monitor_row(c, monitor_id)
    refresh_service(c, now, service_id, None)


def get_push_target(c: Connection, token: str, kind: MonitorType) -> Row:
    monitor = find_push_target(c, token) if TOKEN_PATTERN.fullmatch(token) else None
    if monitor is None:
        raise not_found("monitor")
    if monitor["type"] != kind:
        raise MkatError(
            "WRONG_MONITOR_TYPE", f"This token belongs to a {MonitorType(monitor['type']).label} monitor"
        )
    return monitor


def record_push(c: Connection, now: float, monitor: Row, state: State, cause: Cause) -> PushResult:
    """Apply a push event to a monitor; the service follows. Paused services only note the time."""
    if monitor["paused"]:
        update_last_check_in(c, monitor["id"], now)
        return PushResult(None)
    deadline = None
    if monitor["type"] == MonitorType.HEARTBEAT:
        deadline = heartbeat_deadline(now, monitor["interval_seconds"], monitor["grace_seconds"])
    update_check_in(c, monitor["id"], now, deadline)
    if monitor["state"] == state:
        return PushResult(None, deadline)
    update_monitor_state(c, monitor["id"], state)
    return PushResult(refresh_service(c, now, monitor["service_id"], cause), deadline)


def record_webhook(c: Connection, now: float, token: str, failed: bool) -> PushResult:
    """`fail` → monitor DOWN, `recover` → monitor UP."""
    monitor = get_push_target(c, token, MonitorType.WEBHOOK)
    cause = Cause(monitor["id"], message="Webhook reported a failure" if failed else "")
    return record_push(c, now, monitor, State.DOWN if failed else State.UP, cause)


def record_heartbeat(c: Connection, now: float, token: str) -> PushResult:
    """A check-in: monitor UP and the deadline moves to now + interval + grace."""
    monitor = get_push_target(c, token, MonitorType.HEARTBEAT)
    return record_push(c, now, monitor, State.UP, Cause(monitor["id"]))


def miss_heartbeat(c: Connection, now: float, monitor_id: str) -> str | None:
    """Mark a heartbeat whose deadline passed DOWN; return the alert made, if any."""
    monitor = miss_deadline(c, monitor_id, now)
    if monitor is None:  # a check-in moved the deadline since it was listed
        return None
    last = iso(monitor["last_check_in_at"]) if monitor["last_check_in_at"] else "never"
    message = (
        f"No heartbeat within {format_duration(monitor['interval_seconds'])} "
        f"(+{format_duration(monitor['grace_seconds'])} grace); last check-in: {last}"
    )
    log_event(logging.INFO, "heartbeat_missed", monitor=monitor_id, service=monitor["service_id"])
    cause = Cause(monitor_id, missed_heartbeat=True, message=message)
    return refresh_service(c, now, monitor["service_id"], cause)


###############################################################################
# Domain: alerts & setup ######################################################
###############################################################################


def acknowledge_alert(c: Connection, now: float, alert_id: str, by: str) -> None:
    alert = find_alert(c, alert_id) if is_uuid(alert_id) else None
    if alert is None:
        raise not_found("alert")
    if not acknowledge_alert_row(c, alert_id, now, by):
        raise MkatError("ALREADY_ACKNOWLEDGED", "The alert was already acknowledged")
    c.emit(
        "alert_updated",
        alertId=alert_id,
        serviceId=alert["service_id"],
        acknowledgedAt=iso(now),
        dispatchedAt=iso(alert["dispatched_at"]),
    )


def ensure_instance(c: Connection, now: float, configured_password: str | None) -> tuple[str, bool]:
    """Create what a fresh instance needs (default contact, password); return (password, generated)."""
    if find_default_contact_id(c) is None:
        insert_contact(
            c,
            {"id": new_id(), "name": "Default", "name_key": "default", "is_default": 1, "created_at": now},
        )
    if configured_password:
        return configured_password, False
    password = find_setting(c, "password")
    if password is None:
        password = secrets.token_urlsafe(18)
        upsert_setting(c, "password", password)
    return password, True


###############################################################################
# Workers #####################################################################
###############################################################################


def _drain(ctx: Context, now: float, list_due: Callable, handle: Callable) -> int:
    """Handle due rows in batches of JOB_BATCH, one write transaction per batch; return the count.

    A cheap read first, so a pass with nothing due never takes the write lock; the batch is
    listed again inside the write transaction, so it never acts on a stale row.
    """

    def handle_batch(c: Connection) -> int:
        due = list_due(c, now, JOB_BATCH)
        for row_id in due:
            handle(c, now, row_id)
        return len(due)

    done = 0
    while not ctx.stop.is_set() and ctx.db.read(list_due, now, 1):
        handled = ctx.db.write(handle_batch)
        done += handled
        if handled < JOB_BATCH:
            break
    return done


def job_check_deadlines(ctx: Context, now: float) -> int:
    """Heartbeats whose deadline has passed go DOWN; return how many."""
    return _drain(ctx, now, list_due_monitors, miss_heartbeat)


def job_auto_resume(ctx: Context, now: float) -> int:
    """Paused services whose `until` has come resume when they asked to; return how many."""
    return _drain(ctx, now, list_services_to_resume, resume_service)


def job_end_mutes(ctx: Context, now: float) -> int:
    """Mutes whose time is up end; return how many."""
    return _drain(ctx, now, list_ended_mutes, end_mute)


def run_job(ctx: Context, job: Callable[[Context, float], int]) -> None:
    """Run one pass of a job; an exception is logged and the scheduler goes on."""
    try:
        job(ctx, ctx.clock())
    except Exception:
        LOG.exception("job_failed", extra={"fields": {"job": job.__name__}})


def run_scheduler(ctx: Context) -> None:
    """The scheduler thread: periodic jobs until ctx.stop is set."""
    scheduler = schedule.Scheduler()
    # Half a second keeps missed heartbeats and auto-resumes within 1 s of their time; a pass
    # with nothing due costs one indexed read.
    for job in (job_check_deadlines, job_auto_resume, job_end_mutes):
        scheduler.every(0.5).seconds.do(run_job, ctx, job)
    while not ctx.stop.is_set():
        scheduler.run_pending()
        ctx.stop.wait(min(max(scheduler.idle_seconds or 0, 0.01), 0.5))


###############################################################################
# HTTP plumbing ###############################################################
###############################################################################

request = bottle.request

SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    (
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
        "frame-ancestors 'none'",
    ),
]


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def json_response(data: Any, status: int = 200, **headers: str) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json_bytes(data), status, {"Content-Type": "application/json", **headers})


def error_body(error: MkatError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": error.message, "code": error.code}
    if error.details:
        body["details"] = error.details
    return body


def error_response(error: MkatError, **headers: str) -> bottle.HTTPResponse:
    """The one place that turns a refusal into a response."""
    return json_response(error_body(error), STATUS_OF_CODE[error.code], **headers)


def body_length() -> int:
    """The request body's length (waitress sets it for chunked bodies too); 413 beyond the limit."""
    try:
        length = int(request.environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > MAX_BODY_BYTES:
        raise MkatError("PAYLOAD_TOO_LARGE", f"The body is over {MAX_BODY_BYTES} bytes")
    return max(0, length)


def read_body_bytes() -> bytes:
    length = body_length()
    return request.environ["wsgi.input"].read(length) if length else b""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json(optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object (any Content-Type); {} when optional and empty."""
    raw = read_body_bytes()
    if not raw.strip():
        if optional:
            return {}
        raise MkatError("INVALID_JSON", "A JSON object body is required")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise MkatError("INVALID_JSON", f"The body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MkatError("INVALID_JSON", "The body must be a JSON object")
    return data


def query_params() -> dict[str, str]:
    """Query parameters decoded as UTF-8; the last value wins."""
    return dict(parse_qsl(request.environ.get("QUERY_STRING", ""), keep_blank_values=True))


# -- validation -----------------------------------------------------------------

MISSING: Any = object()


def text_value(max_length: int, min_length: int = 1, multiline: bool = False) -> Callable[[Any], str]:
    """A string parser: trimmed, length-checked, printable, encodable as UTF-8."""
    allowed = "\n\t" if multiline else ""

    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        text = value.strip()
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text") from None
        if any((ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0) and ch not in allowed for ch in text):
            raise ValueError("must not contain control characters")
        if not min_length <= len(text) <= max_length:
            if min_length and not text:
                raise ValueError("must not be empty")
            raise ValueError(f"must be at most {max_length} characters")
        return text

    return parse


def integer_value(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a whole number")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("must be a whole number")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return int(value)

    return parse


def boolean_value(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def instant_value(value: Any) -> float:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 time string")
    try:
        return parse_instant(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 time, e.g. 2030-01-31T12:00:00Z") from None


def enum_value(enum: type[ApiEnum]) -> Callable[[Any], ApiEnum]:
    return enum.parse


class Fields:
    """Reads the fields of one JSON object, collecting every problem before refusing.

    `get` returns the parsed value, the default when the field is absent, or MISSING after
    recording an error. `check()` raises one VALIDATION_ERROR with all of them.
    """

    def __init__(self, data: dict[str, Any], prefix: str = "", errors: dict | None = None):
        self.data = data
        self.prefix = prefix
        self.errors: dict[str, list[str]] = {} if errors is None else errors

    def error(self, key: str, message: str) -> Any:
        self.errors.setdefault(self.prefix + key, []).append(message)
        return MISSING

    def get(
        self,
        key: str,
        parse: Callable[[Any], Any],
        *,
        required: bool = False,
        nullable: bool = False,
        default: Any = MISSING,
    ) -> Any:
        if key not in self.data:
            return self.error(key, "is required") if required else default
        value = self.data[key]
        if value is None:
            return None if nullable else self.error(key, "must not be null")
        try:
            return parse(value)
        except ValueError as exc:
            return self.error(key, str(exc))

    def changes(self, spec: dict[str, tuple[str, Callable[[Any], Any], bool]]) -> dict[str, Any]:
        """For updates: {column: value} of the fields present. spec: field -> (column, parse, nullable)."""
        result = {}
        for key, (column, parse, nullable) in spec.items():
            value = self.get(key, parse, nullable=nullable)
            if value is not MISSING:
                result[column] = value
        return result

    def nested(self, key: str) -> Fields:
        return Fields(self.data.get(key) or {}, f"{self.prefix}{key}.", self.errors)

    def check(self) -> None:
        if self.errors:
            raise MkatError("VALIDATION_ERROR", "Validation failed", self.errors)


def query_value(params: dict[str, str], key: str, parse: Callable[[str], Any], default: Any = None) -> Any:
    """A query parameter parsed, or a 400 naming it."""
    if key not in params or params[key] == "":
        return default
    try:
        return parse(params[key])
    except ValueError as exc:
        raise invalid(key, str(exc)) from None


def query_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ValueError("must be true or false")


def query_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None


def query_uuid(text: str) -> str:
    if not is_uuid(text):
        raise ValueError("must be a UUID")
    return text.lower()


def pagination(params: dict[str, str]) -> tuple[int, int]:
    """(page, pageSize): page < 1 becomes 1, pageSize is clamped to 1..100."""
    page = max(1, query_value(params, "page", query_int, 1))
    size = min(100, max(1, query_value(params, "pageSize", query_int, 20)))
    return page, size


def paginated(items: list[Any], page: int, size: int, total: int) -> dict[str, Any]:
    pages = math.ceil(total / size)
    return {
        "items": items,
        "page": page,
        "pageSize": size,
        "totalCount": total,
        "totalPages": pages,
        "hasNextPage": page < pages,
        "hasPreviousPage": page > 1,
    }


# -- auth, base URL, error pages ------------------------------------------------


def check_auth(ctx: Context) -> str:
    """The authenticated user name; 401 unless the Basic credentials match (constant time)."""
    user, password = request.auth or (None, None)
    if user is not None and password is not None:
        user_ok = hmac.compare_digest(user.encode(), ctx.config.username.encode())
        password_ok = hmac.compare_digest(password.encode(), ctx.password.encode())
        if user_ok & password_ok:
            return user
    headers = {}
    if request.get_header("X-Requested-With") != "mkat-ui":
        headers["WWW-Authenticate"] = 'Basic realm="mkat"'
    raise bottle.HTTPResponse(
        json_bytes(error_body(MkatError("UNAUTHORIZED", "Authentication required"))),
        401,
        {"Content-Type": "application/json", **headers},
    )


def public_base_url(ctx: Context) -> str:
    """The URL others reach mkat at: MKAT_PUBLIC_URL, else the request's own.

    bottle's urlparts reads X-Forwarded-Proto/Host; waitress removes those headers unless
    MKAT_TRUST_PROXY=1 (see proxy_settings), so only a trusted proxy can set them.
    """
    if ctx.config.public_url:
        return ctx.config.public_url
    return request.urlparts.scheme + "://" + request.urlparts.netloc + request.script_name.rstrip("/")


def error_page(error: bottle.HTTPError) -> bottle.HTTPResponse:
    """bottle's own errors (no route, wrong method, 500) in the API's error shape."""
    status = error.status_code
    if status in (403, 404):  # 403: bottle's static_file refusing a path outside the UI folder
        return error_response(MkatError("NOT_FOUND", "No such resource"))
    if status == 405:
        allow = error.get_header("Allow") or ""
        return error_response(MkatError("METHOD_NOT_ALLOWED", "Method not allowed"), Allow=allow)
    if status == 413:
        return error_response(MkatError("PAYLOAD_TOO_LARGE", "The body is too large"))
    LOG.error("http_error", extra={"fields": {"status": status, "path": request.path}})
    return error_response(MkatError("INTERNAL_ERROR", "Internal error"))


class ApiPlugin:
    """Wraps every route: auth where the route asks for it, errors → JSON, results → JSON."""

    name = "mkat"
    api = 2

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        ctx = self.ctx
        needs_auth = route.config.get("auth", False)

        def wrapper(**url_args: Any) -> Any:
            try:
                body_length()
                if needs_auth:
                    check_auth(ctx)
                result = callback(ctx, **url_args)
            except bottle.HTTPResponse:
                raise
            except MkatError as exc:
                return error_response(exc)
            except Exception:
                request_id = secrets.token_hex(4)
                LOG.exception(
                    "request_failed",
                    extra={
                        "fields": {"request_id": request_id, "method": request.method, "path": request.path}
                    },
                )
                error = MkatError("INTERNAL_ERROR", f"Internal error (request id {request_id})")
                return error_response(error, **{"X-Request-Id": request_id})
            if isinstance(result, bottle.HTTPResponse):
                return result
            if result is None:
                return bottle.HTTPResponse(status=204)
            return json_response(result)

        return wrapper


def wrap_wsgi(app: Callable, base_path: str) -> Callable:
    """Security headers on every response, and the base path: routes live under it."""
    health_paths = ("/health", "/health/ready")

    def application(environ: dict, start_response: Callable) -> Any:
        def start(status: str, headers: list, exc_info: Any = None) -> Any:
            return start_response(status, headers + SECURITY_HEADERS, exc_info)

        path = environ.get("PATH_INFO", "")
        if base_path and path not in health_paths:
            if path == base_path:
                start("301 Moved Permanently", [("Location", base_path + "/"), ("Content-Length", "0")])
                return [b""]
            if not path.startswith(base_path + "/"):
                body = json_bytes(error_body(MkatError("NOT_FOUND", f"mkat lives under {base_path}/")))
                start(
                    "404 Not Found",
                    [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
                return [body]
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + base_path
            environ["PATH_INFO"] = path[len(base_path) :]
        try:
            return app(environ, start)
        finally:
            # bottle copies the body into its thread-local response, which keeps it until the
            # thread's next request: with 16 threads that pins 16 large bodies. Let go of it.
            bottle.response.body = b""

    return application


###############################################################################
# HTTP: API v1 ################################################################
###############################################################################

# -- adapters: rows out ----------------------------------------------------------


def to_api_monitor(m: Row, base_url: str) -> dict[str, Any]:
    kind = MonitorType(m["type"])
    token = m["token"]
    return {
        "id": m["id"],
        "serviceId": m["service_id"],
        "type": int(kind),
        "token": token,
        "state": m["state"],
        "intervalSeconds": m["interval_seconds"],
        "gracePeriodSeconds": m["grace_seconds"],
        "lastCheckIn": iso(m["last_check_in_at"]),
        "nextExpectedBefore": iso(m["deadline_at"]),
        "webhookFailUrl": f"{base_url}/webhook/{token}/fail" if kind == MonitorType.WEBHOOK else None,
        "webhookRecoverUrl": f"{base_url}/webhook/{token}/recover" if kind == MonitorType.WEBHOOK else None,
        "heartbeatUrl": f"{base_url}/heartbeat/{token}" if kind == MonitorType.HEARTBEAT else None,
        "metricUrl": f"{base_url}/metric/{token}" if kind == MonitorType.METRIC else None,
        "minValue": m["min_value"],
        "maxValue": m["max_value"],
        "thresholdStrategy": m["threshold_strategy"],
        "thresholdCount": m["threshold_count"],
        "windowSeconds": m["window_seconds"],
        "windowSampleCount": m["window_sample_count"],
        "retentionDays": m["retention_days"],
        "lastMetricValue": m["last_metric_value"],
        "lastMetricAt": iso(m["last_metric_at"]),
        "createdAt": iso(m["created_at"]),
    }


def to_api_service(s: Row, monitors: list[Row], contact_ids: list[str], base_url: str) -> dict[str, Any]:
    return {
        "id": s["id"],
        "name": s["name"],
        "description": s["description"],
        "state": s["state"],
        "severity": s["severity"],
        "pausedUntil": iso(s["paused_until"]),
        "autoResume": bool(s["auto_resume"]),
        "mutedUntil": iso(s["muted_until"]),
        "muteReason": s["mute_reason"],
        "stateChangedAt": iso(s["state_changed_at"]),
        "createdAt": iso(s["created_at"]),
        "updatedAt": iso(s["updated_at"]),
        "monitors": [to_api_monitor(m, base_url) for m in monitors],
        "contactIds": contact_ids,
    }


def to_api_alert(a: Row) -> dict[str, Any]:
    return {
        "id": a["id"],
        "serviceId": a["service_id"],
        "serviceName": a["service_name"],
        "monitorId": a["monitor_id"],
        "type": a["type"],
        "severity": a["severity"],
        "message": a["message"],
        "createdAt": iso(a["created_at"]),
        "acknowledgedAt": iso(a["acknowledged_at"]),
        "dispatchedAt": iso(a["dispatched_at"]),
        "suppressed": bool(a["suppressed"]),
        "suppressionReason": a["suppression_reason"],
    }


def load_api_services(c: Connection, services: list[Row], base_url: str) -> list[dict[str, Any]]:
    """Services with their monitors and contacts, in two queries whatever their number."""
    ids = [s["id"] for s in services]
    if not ids:
        return []
    monitors: dict[str, list[Row]] = {sid: [] for sid in ids}
    for m in list_monitors(c, ids):
        monitors[m["service_id"]].append(m)
    contacts = list_contact_ids(c, ids)
    return [to_api_service(s, monitors[s["id"]], contacts[s["id"]], base_url) for s in services]


def load_api_service(c: Connection, service_id: str, base_url: str) -> dict[str, Any]:
    return load_api_services(c, [get_service(c, service_id)], base_url)[0]


# -- adapters: requests in --------------------------------------------------------

NAME = text_value(100)
DESCRIPTION = text_value(500, min_length=0, multiline=True)


def from_api_monitor(ctx: Context, f: Fields) -> dict[str, Any]:
    """A validated monitor spec for a new monitor (defaults filled in)."""
    kind = f.get("type", enum_value(MonitorType), required=True)
    if kind is not MISSING and kind not in AVAILABLE_MONITOR_TYPES:
        f.error("type", f"{kind.label} monitors are not available yet")
    interval = f.get(
        "intervalSeconds",
        integer_value(ctx.config.min_interval_seconds, MAX_INTERVAL_SECONDS),
        required=kind == MonitorType.HEARTBEAT,
        default=DEFAULT_INTERVAL_SECONDS,
    )
    grace = f.get("gracePeriodSeconds", integer_value(ctx.config.min_grace_seconds, MAX_INTERVAL_SECONDS))
    if grace is MISSING and interval is not MISSING:
        grace = default_grace_seconds(interval, ctx.config.min_grace_seconds)
    return {"type": kind, "interval_seconds": interval, "grace_seconds": grace}


def monitor_changes(ctx: Context, f: Fields) -> dict[str, Any]:
    return f.changes(
        {
            "type": ("type", enum_value(MonitorType), False),
            "intervalSeconds": (
                "interval_seconds",
                integer_value(ctx.config.min_interval_seconds, MAX_INTERVAL_SECONDS),
                False,
            ),
            "gracePeriodSeconds": (
                "grace_seconds",
                integer_value(ctx.config.min_grace_seconds, MAX_INTERVAL_SECONDS),
                False,
            ),
        }
    )


SERVICE_FIELDS = {
    "name": ("name", NAME, False),
    "description": ("description", DESCRIPTION, True),
    "severity": ("severity", enum_value(Severity), False),
}


def from_api_new_service(ctx: Context, data: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    f = Fields(data)
    if "name" not in data:
        f.error("name", "is required")
    spec = f.changes(SERVICE_FIELDS)
    if spec.get("description") == "":
        spec["description"] = None
    monitors = data.get("monitors")
    specs = []
    if not isinstance(monitors, list) or not monitors:
        f.error("monitors", "must be a list with at least one monitor")
    elif len(monitors) > MAX_MONITORS_PER_SERVICE:
        f.error("monitors", f"must have at most {MAX_MONITORS_PER_SERVICE} monitors")
    else:
        for i, item in enumerate(monitors):
            if not isinstance(item, dict):
                f.error(f"monitors[{i}]", "must be an object")
                continue
            specs.append(from_api_monitor(ctx, Fields(item, f"monitors[{i}].", f.errors)))
    f.check()
    return spec, specs


# -- routes -----------------------------------------------------------------------


def api_list_services(ctx: Context) -> dict[str, Any]:
    params = query_params()
    page, size = pagination(params)
    search = query_value(params, "search", str)
    state = query_value(params, "state", State.parse)
    base_url = public_base_url(ctx)

    def load(c: Connection) -> dict[str, Any]:
        total = count_services(c, search, state)
        rows = list_services(c, search, state, size, (page - 1) * size)
        return paginated(load_api_services(c, rows, base_url), page, size, total)

    return ctx.db.read(load)


def api_create_service(ctx: Context) -> bottle.HTTPResponse:
    spec, monitors = from_api_new_service(ctx, read_json())
    service_id = ctx.db.write(create_service, ctx.clock(), spec, monitors)
    service = ctx.db.read(load_api_service, service_id, public_base_url(ctx))
    return json_response(service, 201)


def api_get_service(ctx: Context, service_id: str) -> dict[str, Any]:
    return ctx.db.read(load_api_service, service_id, public_base_url(ctx))


def api_update_service(ctx: Context, service_id: str) -> dict[str, Any]:
    f = Fields(read_json())
    changes = f.changes(SERVICE_FIELDS)
    f.check()
    if changes.get("description") == "":
        changes["description"] = None
    ctx.db.write(update_service, ctx.clock(), service_id, changes)
    return api_get_service(ctx, service_id)


def api_delete_service(ctx: Context, service_id: str) -> None:
    ctx.db.write(delete_service, service_id)


def api_pause_service(ctx: Context, service_id: str) -> dict[str, Any]:
    f = Fields(read_json(optional=True))
    until = f.get("until", instant_value, nullable=True, default=None)
    auto_resume = f.get("autoResume", boolean_value, default=False)
    f.check()
    ctx.db.write(pause_service, ctx.clock(), service_id, until, auto_resume)
    return {"paused": True, "until": iso(until)}


def api_resume_service(ctx: Context, service_id: str) -> dict[str, Any]:
    ctx.db.write(resume_service, ctx.clock(), service_id)
    return {"resumed": True}


def api_mute_service(ctx: Context, service_id: str) -> dict[str, Any]:
    f = Fields(read_json())
    minutes = f.get("durationMinutes", integer_value(1, MAX_MUTE_MINUTES), required=True)
    reason = f.get("reason", text_value(200, min_length=0), nullable=True, default=None)
    f.check()
    until = ctx.db.write(mute_service, ctx.clock(), service_id, minutes, reason or None)
    return {"muted": True, "until": iso(until)}


def api_unmute_service(ctx: Context, service_id: str) -> None:
    ctx.db.write(end_mute, ctx.clock(), service_id)


def api_add_monitor(ctx: Context, service_id: str) -> bottle.HTTPResponse:
    f = Fields(read_json())
    spec = from_api_monitor(ctx, f)
    f.check()
    monitor_id = ctx.db.write(add_monitor, ctx.clock(), service_id, spec)
    row = ctx.db.read(find_monitor, monitor_id)
    return json_response(to_api_monitor(row, public_base_url(ctx)), 201)


def api_update_monitor(ctx: Context, service_id: str, monitor_id: str) -> dict[str, Any]:
    f = Fields(read_json())
    changes = monitor_changes(ctx, f)
    f.check()
    ctx.db.write(update_monitor, ctx.clock(), service_id, monitor_id, changes)
    return to_api_monitor(ctx.db.read(get_monitor, service_id, monitor_id), public_base_url(ctx))


def api_delete_monitor(ctx: Context, service_id: str, monitor_id: str) -> None:
    ctx.db.write(delete_monitor, ctx.clock(), service_id, monitor_id)


def api_list_alerts(ctx: Context) -> dict[str, Any]:
    params = query_params()
    page, size = pagination(params)
    f = AlertFilter(
        service_id=query_value(params, "serviceId", query_uuid),
        type=query_value(params, "type", AlertType.parse),
        acknowledged=query_value(params, "acknowledged", query_bool),
        suppressed=query_value(params, "suppressed", query_bool),
    )

    def load(c: Connection) -> dict[str, Any]:
        rows = list_alerts(c, f, size, (page - 1) * size)
        return paginated([to_api_alert(a) for a in rows], page, size, count_alerts(c, f))

    return ctx.db.read(load)


def api_get_alert(ctx: Context, alert_id: str) -> dict[str, Any]:
    alert = ctx.db.read(find_alert, alert_id) if is_uuid(alert_id) else None
    if alert is None:
        raise not_found("alert")
    return to_api_alert(alert)


def api_acknowledge_alert(ctx: Context, alert_id: str) -> dict[str, Any]:
    ctx.db.write(acknowledge_alert, ctx.clock(), alert_id, request.auth[0])
    return {"acknowledged": True}


###############################################################################
# HTTP: push & health #########################################################
###############################################################################


def push_webhook_fail(ctx: Context, token: str) -> dict[str, Any]:
    result = ctx.db.write(record_webhook, ctx.clock(), token, True)
    return {"received": True, "alertCreated": result.alert_id is not None}


def push_webhook_recover(ctx: Context, token: str) -> dict[str, Any]:
    result = ctx.db.write(record_webhook, ctx.clock(), token, False)
    return {"received": True, "alertCreated": result.alert_id is not None}


def push_heartbeat(ctx: Context, token: str) -> dict[str, Any]:
    result = ctx.db.write(record_heartbeat, ctx.clock(), token)
    return {
        "received": True,
        "nextExpectedBefore": iso(result.next_deadline),
        "alertCreated": result.alert_id is not None,
    }


def health(ctx: Context) -> dict[str, Any]:
    return {"status": "healthy", "timestamp": iso(ctx.clock())}


def health_ready(ctx: Context) -> Any:
    try:
        ctx.db.read(lambda c: c.execute("SELECT count(*) FROM services").fetchone())
    except sqlite3.Error as exc:
        log_event(logging.ERROR, "not_ready", error=str(exc))
        return json_response({"status": "unavailable", "timestamp": iso(ctx.clock())}, 503)
    return {"status": "ready", "timestamp": iso(ctx.clock())}


###############################################################################
# HTTP: UI ####################################################################
###############################################################################


def ui_static_file(ctx: Context, path: str) -> bottle.HTTPResponse:
    response = bottle.static_file(path, root=str(STATIC_DIR))
    # Revalidate every time (cheap with Last-Modified) so an upgrade is never half-cached.
    response.set_header("Cache-Control", "no-cache")
    return response


def ui_index(ctx: Context) -> bottle.HTTPResponse:
    return ui_static_file(ctx, "index.html")


###############################################################################
# App assembly & main #########################################################
###############################################################################


class Context:
    """Everything the routes and workers share: configuration, database, clock, stop signal."""

    def __init__(self, config: Config, clock: Clock = time.time):
        self.config = config
        self.clock = clock
        self.stop = threading.Event()
        # Set after a commit that created an alert: the dispatcher's doorbell.
        self.alerts_pending = threading.Event()
        self.db = Database(config.database_path, on_commit=self.publish)
        self.password, self.password_generated = self.db.write(ensure_instance, clock(), config.password)

    def publish(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Called after each commit with the events it carried."""
        if any(kind == "alert_created" and not data["suppressed"] for kind, data in events):
            self.alerts_pending.set()


ROUTES: list[tuple[str, str, Callable, bool]] = [
    # method, path, handler, needs Basic auth
    ("GET", "/health", health, False),
    ("GET", "/health/ready", health_ready, False),
    ("GET", "/api/v1/services", api_list_services, True),
    ("POST", "/api/v1/services", api_create_service, True),
    ("GET", "/api/v1/services/<service_id>", api_get_service, True),
    ("PUT", "/api/v1/services/<service_id>", api_update_service, True),
    ("DELETE", "/api/v1/services/<service_id>", api_delete_service, True),
    ("POST", "/api/v1/services/<service_id>/pause", api_pause_service, True),
    ("POST", "/api/v1/services/<service_id>/resume", api_resume_service, True),
    ("POST", "/api/v1/services/<service_id>/mute", api_mute_service, True),
    ("DELETE", "/api/v1/services/<service_id>/mute", api_unmute_service, True),
    ("POST", "/api/v1/services/<service_id>/monitors", api_add_monitor, True),
    ("PUT", "/api/v1/services/<service_id>/monitors/<monitor_id>", api_update_monitor, True),
    ("DELETE", "/api/v1/services/<service_id>/monitors/<monitor_id>", api_delete_monitor, True),
    ("GET", "/api/v1/alerts", api_list_alerts, True),
    ("GET", "/api/v1/alerts/<alert_id>", api_get_alert, True),
    ("POST", "/api/v1/alerts/<alert_id>/ack", api_acknowledge_alert, True),
    ("POST", "/webhook/<token>/fail", push_webhook_fail, False),
    ("POST", "/webhook/<token>/recover", push_webhook_recover, False),
    ("GET", "/heartbeat/<token>", push_heartbeat, False),
    ("POST", "/heartbeat/<token>", push_heartbeat, False),
    ("GET", "/", ui_index, False),
    ("GET", "/static/<path:path>", ui_static_file, False),
]


def build_app(ctx: Context) -> Callable:
    """The WSGI application: bottle routes inside the headers/base-path wrapper."""
    app = bottle.Bottle(catchall=True)
    app.install(ApiPlugin(ctx))
    for method, path, handler, auth in ROUTES:
        app.route(path, method, handler, auth=auth)
    app.default_error_handler = error_page
    return wrap_wsgi(app, ctx.config.base_path)


def buffered_sends() -> dict[str, Any]:
    """Let waitress's I/O thread send small responses, headers and body in one go.

    waitress's default (send_bytes=1, deprecated but still the default in 3.0) makes the worker
    thread send the headers and the body itself, two syscalls holding the GIL: bench/push.py
    measured 2 100 → 2 400 requests/s at 8 connections and 2 100 → 3 400 at 64. Skipped if a
    later waitress drops the setting.
    """
    if not hasattr(waitress.adjustments.Adjustments, "send_bytes"):
        return {}
    return {"send_bytes": 18_000}


def proxy_settings(config: Config) -> dict[str, Any]:
    """waitress applies X-Forwarded-* only when told to trust the proxy (and drops them otherwise)."""
    if not config.trust_proxy:
        return {}
    return {
        "trusted_proxy": "*",
        "trusted_proxy_headers": {
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-forwarded-port",
            "x-forwarded-for",
        },
    }


class HttpServer:
    """waitress on a listening socket, run in short slices so a stop is noticed quickly."""

    def __init__(self, ctx: Context, host: str, port: int):
        self.ctx = ctx
        with warnings.catch_warnings():  # buffered_sends() uses a setting waitress deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            self.server = waitress.server.create_server(
                build_app(ctx),
                host=host,
                port=port,
                threads=ctx.config.threads,
                ident="mkat",
                # waitress buffers a whole body before the app sees it; the app refuses anything
                # over 64 KiB with a JSON 413, this only bounds what a client can make us store.
                max_request_body_size=1024 * 1024,
                **proxy_settings(ctx.config),
                **buffered_sends(),
            )

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    def serve(self, stop: threading.Event) -> None:
        """Serve until stop is set, then let in-flight requests finish (≤ 3 s) and close."""
        srv = self.server
        while not stop.is_set():
            srv.asyncore.loop(timeout=0.05, map=srv._map, count=1)
        srv.accepting = False
        give_up = time.monotonic() + 3
        while time.monotonic() < give_up and any(
            ch.requests or ch.total_outbufs_len for ch in list(srv.active_channels.values())
        ):
            srv.asyncore.loop(timeout=0.05, map=srv._map, count=1)
        srv.task_dispatcher.shutdown(timeout=1)
        srv.asyncore.close_all(srv._map)
        srv.trigger.close()


def limit_malloc_arenas() -> None:
    """Give glibc's malloc at most two arenas instead of one per thread (up to 8 per core).

    The GIL serialises Python threads anyway, and per-thread arenas each keep the peak of the
    requests they served: after a few large responses 16 threads held ~180 MB, with two arenas
    ~80 MB. A no-op where libc has no mallopt (musl, macOS).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(-8, 2)  # M_ARENA_MAX


def start_workers(ctx: Context) -> list[threading.Thread]:
    threads = [threading.Thread(target=run_scheduler, args=(ctx,), name="mkat-scheduler", daemon=True)]
    for thread in threads:
        thread.start()
    return threads


def fail(variable: str, message: str) -> int:
    """Report a startup problem in one line and return the exit status."""
    print(f"mkat: {variable}: {message}", file=sys.stderr)
    return 2


def main() -> int:
    limit_malloc_arenas()
    try:
        config = load_config(dict(os.environ))
    except ConfigError as exc:
        print(f"mkat: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    try:
        ctx = Context(config)
    except sqlite3.Error as exc:
        return fail("MKAT_DATABASE_PATH", f"cannot use {config.database_path!r}: {exc}")
    try:
        server = HttpServer(ctx, config.host, config.port)
    except OSError as exc:
        return fail("MKAT_PORT", f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: ctx.stop.set())

    shown_host = "localhost" if config.host in ("0.0.0.0", "::") else config.host
    log_event(
        logging.INFO,
        "started",
        version=VERSION,
        url=f"http://{shown_host}:{server.port}{config.base_path}/",
        database=config.database_path,
        threads=config.threads,
    )
    if ctx.password_generated:
        log_event(
            logging.WARNING,
            "generated_password",
            username=config.username,
            password=ctx.password,
            hint="set MKAT_PASSWORD to choose your own",
        )
    workers = start_workers(ctx)
    server.serve(ctx.stop)
    for thread in workers:
        thread.join(timeout=2)
    ctx.db.close()
    log_event(logging.INFO, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

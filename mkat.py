"""mkat — is my stuff still working?

mkat is a small self-hosted monitor. Services own monitors that are fed from outside: webhooks
(`POST /webhook/{token}/fail|recover`) and heartbeats (`POST /heartbeat/{token}`, DOWN when one
is missed). The service state is derived from its monitors, and every transition worth telling
someone about becomes an alert row, fanned out to deliveries for the channels (Telegram, e-mail,
webhook) of the service's contacts, which a dispatcher sends and retries. One process: a waitress
HTTP server, a `schedule` thread for the periodic jobs, the dispatcher and the Telegram bot
threads, SQLite underneath with one writer thread. The contract is SPEC.md.

Sections, each using only the ones above it:

    1. Imports & logging           structured key=value or JSON lines
    2. Constants & enums           the API's integer enums, limits
    3. Configuration               the MKAT_* variables, one declared table
    4. Utilities & clock           ids, tokens, instants, durations
    5. Errors                      MkatError: one refusal shape for the whole API
    6. Database                    read pool, the group-committing writer, migrations
    7. Queries                     all SQL outside schema.sql
    8. Domain: state rules         pure functions: derived state, which alert
    9. Domain: contacts & routing  contacts, channels, fan-out of alerts into deliveries
   10. Domain: services            create, update, pause, mute, transitions, alerts
   11. Domain: monitors            add, update, delete, push events, missed deadlines
   12. Domain: alerts & setup      acknowledge, the instance's defaults
   13. Telegram Bot API client     the few methods mkat calls
   14. Notifications               formatting, senders, the dispatcher, channel tests, the bot
   15. Workers                     job_* functions and the scheduler thread
   16. HTTP plumbing               JSON in/out, validation, auth, errors, headers, event streams
   17. HTTP: API v1                api_* routes and the to_api/from_api adapters
   18. HTTP: push & health         push_* routes, /health
   19. HTTP: UI                    the static single page
   20. App assembly & main         Context, routes, server, signals
"""

###############################################################################
# Imports & logging ###########################################################
###############################################################################

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import fcntl
import hmac
import html
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
from collections.abc import Callable, Collection, Iterator
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
READ_CONNECTIONS = 4  # shared by all threads; a read holds one for a few milliseconds

# Delivery: retry after 1 s, doubling, at most every 5 min, for a day; then give up.
RETRY_FIRST_SECONDS = 1
RETRY_MAX_SECONDS = 300
GIVE_UP_AFTER_SECONDS = 86_400
# A sender mostly waits (on the receiver, then on the commit): 8 of them keep a burst of 200 alerts
# under 100 ms at p99 (bench/alert_latency.py); more would only meet Telegram's rate limit sooner.
SENDER_THREADS = 8
NETWORK_TIMEOUT_SECONDS = 10
TELEGRAM_POLL_SECONDS = 25
TELEGRAM_MAX_TEXT = 4096
MUTE_BUTTONS = ((15, "Mute 15m"), (60, "Mute 1h"), (1440, "Mute 24h"))  # under a Telegram alert
EVENT_KEEPALIVE_SECONDS = 15


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


class ChannelType(ApiEnum):
    TELEGRAM = 0
    EMAIL = 1
    WEBHOOK = 2


class DeliveryKind(IntEnum):
    """What a delivery sends: the alert, a re-rendered Telegram card, or a "still down" notice."""

    ALERT = 0
    UPDATE = 1
    STILL_DOWN = 2


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
    "TOO_MANY_STREAMS": 503,
}


def not_found(kind: str) -> MkatError:
    """The specific 404 for a kind of resource: not_found("service") → SERVICE_NOT_FOUND."""
    return MkatError(f"{kind.upper()}_NOT_FOUND", f"{kind.capitalize()} not found")


def invalid(field: str, message: str) -> MkatError:
    """A validation error about one field."""
    return MkatError("VALIDATION_ERROR", "Validation failed", {field: [message]})


def ensure_name_free(kind: str, name: str, owner_id: str | None, own_id: str | None = None) -> None:
    """409 DUPLICATE_NAME unless the name is free, or already this row's own (owner_id: who has it)."""
    if owner_id is not None and owner_id != own_id:
        raise MkatError("DUPLICATE_NAME", f"A {kind} named {name!r} already exists", {"name": ["is taken"]})


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


def claim_database(path: str) -> Any:
    """Hold an exclusive lock on `<path>.lock` for as long as the returned file stays open.

    Two mkat processes on one database would both send every alert. The lock is on a file of its
    own, so it never meddles with SQLite's locks on the database itself.
    """
    try:
        lock_file = open(f"{path}.lock", "a")  # noqa: SIM115 - held open until Database.close()
    except OSError as exc:
        raise sqlite3.OperationalError(f"unable to open database file ({exc.strerror})") from None
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.close()
        raise sqlite3.OperationalError("another mkat is already using this database") from None
    return lock_file


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
    """One SQLite file: a small pool of connections for reads, one writer thread for every write.

    Reads take a pooled connection rather than one per thread: each connection keeps its own
    page and statement caches (~0.75 MB after a few lists), and 16 HTTP threads holding one
    each cost 12 MB for nothing, since reads are short.

    Writes are group-committed: the writer takes every operation that is waiting, runs each in
    its own SAVEPOINT inside one transaction, and COMMITs once, so one fsync (synchronous=FULL)
    covers many heartbeats. An operation that raises is rolled back alone. With a single writer,
    SQLite's busy-wait (sleeps of up to 100 ms, then "database is locked") never happens.
    """

    def __init__(self, path: str, on_commit: Callable[[list], None] | None = None):
        self.path = path
        # Called on the writer thread after each commit with an operation's events; must not write.
        self.on_commit = on_commit or (lambda events: None)
        self._lock_file = claim_database(path)
        try:
            self._writer_connection = connect(path)
        except BaseException:
            self._lock_file.close()
            raise
        try:
            self._writer_connection.execute("PRAGMA journal_mode = WAL")
            self.migrated_from = migrate(self._writer_connection)
        except BaseException:
            self._writer_connection.close()
            self._lock_file.close()
            raise
        self._readers: queue.LifoQueue[Connection] = queue.LifoQueue()  # the warmest on top
        self._all_readers: list[Connection] = []
        self._pool_lock = threading.Lock()
        self._queue: queue.SimpleQueue[WriteJob | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # no write may slip in behind close()
        self._writer = threading.Thread(target=self._write_loop, name="mkat-writer", daemon=True)
        self._writer.start()

    def _take_reader(self) -> Connection:
        """A free read connection: an idle one, a new one while fewer than READ_CONNECTIONS
        exist, else the next one given back."""
        try:
            return self._readers.get_nowait()
        except queue.Empty:
            pass
        with self._pool_lock:
            if len(self._all_readers) < READ_CONNECTIONS:
                c = connect(self.path)
                self._all_readers.append(c)
                return c
        return self._readers.get()

    def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(c, *args) in a write transaction and return its result once it is on disk."""
        if threading.current_thread() is self._writer:
            raise RuntimeError("Database.write called from the writer thread")
        job = WriteJob(fn, args)
        with self._closing:
            if self._closed:
                raise sqlite3.ProgrammingError("the database is closed")
            self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(c, *args) in a read transaction: one consistent snapshot."""
        c = self._take_reader()
        try:
            c.execute("BEGIN")
            try:
                return fn(c, *args)
            finally:
                if c.in_transaction:  # an error inside may already have ended it
                    c.execute("COMMIT")
        finally:
            self._readers.put(c)

    def _write_loop(self) -> None:
        c = self._writer_connection
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
        with self._closing:
            self._closed = True
            self._queue.put(None)
        self._writer.join(timeout=5)
        with self._pool_lock:
            for c in [self._writer_connection, *self._all_readers]:
                c.close()
            self._all_readers.clear()
        self._lock_file.close()  # releases the claim


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


# -- updates of chosen columns ----------------------------------------------------

# The columns an update may set, per table: column names reach SQL only from here.
UPDATABLE = {
    "services": ("name", "name_key", "description", "severity", "updated_at"),
    "monitors": ("interval_seconds", "grace_seconds", "deadline_at"),
    "channels": ("configuration", "is_enabled"),
}


def update_columns(c: Connection, table: str, row_id: str, changes: dict[str, Any]) -> None:
    """UPDATE one row's columns that `changes` names and UPDATABLE allows; others are ignored."""
    values = {name: changes[name] for name in UPDATABLE[table] if name in changes}
    if values:
        assignments = ", ".join(f"{name} = :{name}" for name in values)
        c.execute(f"UPDATE {table} SET {assignments} WHERE id = :id", {**values, "id": row_id})


# -- services -------------------------------------------------------------------


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


def find_contact(c: Connection, contact_id: str) -> Row | None:
    return c.execute("SELECT * FROM contacts WHERE id = ?", (contact_id,)).fetchone()


def find_contact_id_by_name(c: Connection, name_key: str) -> str | None:
    row = c.execute("SELECT id FROM contacts WHERE name_key = ?", (name_key,)).fetchone()
    return row[0] if row else None


def find_default_contact_id(c: Connection) -> str | None:
    row = c.execute("SELECT id FROM contacts WHERE is_default = 1").fetchone()
    return row[0] if row else None


def list_contacts(c: Connection, contact_ids: list[str] | None = None) -> list[Row]:
    """Contacts (all, or these) with their service counts: the default first, then by name."""
    where = f"WHERE ct.id IN ({','.join('?' * len(contact_ids))})" if contact_ids is not None else ""
    return c.execute(
        f"""
        SELECT ct.*, (SELECT count(*) FROM service_contacts sc WHERE sc.contact_id = ct.id) AS service_count
        FROM contacts ct
        {where}
        ORDER BY ct.is_default DESC, ct.name_key
        """,
        contact_ids or [],
    ).fetchall()


def insert_contact(c: Connection, row: dict[str, Any]) -> None:
    c.execute(
        """
        INSERT INTO contacts (id, name, name_key, is_default, created_at)
        VALUES (:id, :name, :name_key, :is_default, :created_at)
        """,
        row,
    )


def update_contact_name(c: Connection, contact_id: str, name: str) -> None:
    c.execute(
        "UPDATE contacts SET name = ?, name_key = ? WHERE id = ?",
        (name, casefold_name(name), contact_id),
    )


def delete_contact_row(c: Connection, contact_id: str) -> None:
    c.execute("DELETE FROM contacts WHERE id = ?", (contact_id,))


def count_services_only_reaching(c: Connection, contact_id: str) -> int:
    """How many services have this contact as their only one."""
    return c.execute(
        """
        SELECT count(*) FROM service_contacts sc
        WHERE sc.contact_id = ?
          AND NOT EXISTS (SELECT 1 FROM service_contacts other
                          WHERE other.service_id = sc.service_id AND other.contact_id <> sc.contact_id)
        """,
        (contact_id,),
    ).fetchone()[0]


def insert_service_contact(c: Connection, service_id: str, contact_id: str) -> None:
    c.execute(
        "INSERT OR IGNORE INTO service_contacts (service_id, contact_id) VALUES (?, ?)",
        (service_id, contact_id),
    )


def delete_service_contacts(c: Connection, service_id: str) -> None:
    c.execute("DELETE FROM service_contacts WHERE service_id = ?", (service_id,))


def list_contact_ids(c: Connection, service_ids: list[str]) -> dict[str, list[str]]:
    """service id -> ids of its contacts, for the given services."""
    marks = ",".join("?" * len(service_ids))
    rows = c.execute(
        f"""
        SELECT sc.service_id, sc.contact_id
        FROM service_contacts sc JOIN contacts ct ON ct.id = sc.contact_id
        WHERE sc.service_id IN ({marks})
        ORDER BY ct.is_default DESC, ct.name_key
        """,
        service_ids,
    )
    result: dict[str, list[str]] = {sid: [] for sid in service_ids}
    for row in rows:
        result[row[0]].append(row[1])
    return result


# -- channels -------------------------------------------------------------------


def find_channel(c: Connection, channel_id: str) -> Row | None:
    return c.execute("SELECT * FROM channels WHERE id = ?", (channel_id,)).fetchone()


def list_channels(c: Connection, contact_ids: list[str] | None = None) -> list[Row]:
    """Channels (all, or those of these contacts), oldest first."""
    where = f"WHERE contact_id IN ({','.join('?' * len(contact_ids))})" if contact_ids is not None else ""
    sql = f"SELECT * FROM channels {where} ORDER BY created_at, rowid"
    return c.execute(sql, contact_ids or []).fetchall()


def insert_channel(c: Connection, row: dict[str, Any]) -> None:
    c.execute(
        """
        INSERT INTO channels (id, contact_id, type, configuration, is_enabled, created_at)
        VALUES (:id, :contact_id, :type, :configuration, :is_enabled, :created_at)
        """,
        row,
    )


def delete_channel_row(c: Connection, channel_id: str) -> None:
    c.execute("DELETE FROM channels WHERE id = ?", (channel_id,))


def update_channel_error(c: Connection, channel_id: str, error: str | None, now: float | None) -> None:
    c.execute(
        "UPDATE channels SET last_error = ?, last_error_at = ? WHERE id = ?",
        (error, now, channel_id),
    )


def clear_channel_error(c: Connection, channel_id: str) -> None:
    c.execute(
        "UPDATE channels SET last_error = NULL, last_error_at = NULL WHERE id = ? AND last_error IS NOT NULL",
        (channel_id,),
    )


def list_routes(c: Connection, service_id: str) -> list[Row]:
    """The enabled channels that reach a service's contacts, each once."""
    return c.execute(
        """
        SELECT DISTINCT ch.* FROM channels ch
        JOIN service_contacts sc ON sc.contact_id = ch.contact_id
        WHERE sc.service_id = ? AND ch.is_enabled = 1
        ORDER BY ch.created_at, ch.id
        """,
        (service_id,),
    ).fetchall()


def list_telegram_chats(c: Connection) -> set[str]:
    """The chat ids of enabled Telegram channels: the chats the bot obeys."""
    rows = c.execute(
        "SELECT json_extract(configuration, '$.chatId') FROM channels WHERE type = ? AND is_enabled = 1",
        (int(ChannelType.TELEGRAM),),
    )
    return {str(row[0]) for row in rows}


def find_telegram_channel_for_chat(c: Connection, chat_id: str) -> Row | None:
    return c.execute(
        "SELECT * FROM channels WHERE type = ? AND json_extract(configuration, '$.chatId') = ?",
        (int(ChannelType.TELEGRAM), chat_id),
    ).fetchone()


# -- deliveries -----------------------------------------------------------------


def insert_delivery(
    c: Connection, alert_id: str, channel_id: str, service_id: str, kind: DeliveryKind, now: float
) -> None:
    c.execute(
        """
        INSERT INTO deliveries (alert_id, channel_id, service_id, kind, next_attempt_at, created_at)
        VALUES (?, ?, ?, ?, ?, ?)
        """,
        (alert_id, channel_id, service_id, int(kind), now, now),
    )


def find_delivery(c: Connection, delivery_id: int) -> Row | None:
    return c.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()


def list_due_deliveries(c: Connection, now: float, limit: int) -> list[int]:
    """Pending deliveries that are due, each the oldest pending one of its service on its channel,
    so a recovery never overtakes the failure it follows."""
    rows = c.execute(
        """
        SELECT d.id FROM deliveries d
        WHERE d.next_attempt_at <= ?
          AND NOT EXISTS (SELECT 1 FROM deliveries older
                          WHERE older.channel_id = d.channel_id AND older.service_id = d.service_id
                            AND older.next_attempt_at IS NOT NULL AND older.id < d.id)
        ORDER BY d.next_attempt_at, d.id
        LIMIT ?
        """,
        (now, limit),
    )
    return [row[0] for row in rows]


def find_next_attempt_at(c: Connection) -> float | None:
    return c.execute(
        "SELECT min(next_attempt_at) FROM deliveries WHERE next_attempt_at IS NOT NULL"
    ).fetchone()[0]


def list_cards(c: Connection, alert_id: str, channel_id: str | None = None) -> list[Row]:
    """The Telegram messages about an alert (sent, or still to send), on one channel or all."""
    return c.execute(
        """
        SELECT d.* FROM deliveries d JOIN channels ch ON ch.id = d.channel_id
        WHERE d.alert_id = ? AND (? IS NULL OR d.channel_id = ?) AND ch.type = ?
          AND d.kind IN (?, ?) AND d.failed_at IS NULL
        ORDER BY d.id
        """,
        (
            alert_id,
            channel_id,
            channel_id,
            int(ChannelType.TELEGRAM),
            int(DeliveryKind.ALERT),
            int(DeliveryKind.STILL_DOWN),
        ),
    ).fetchall()


def has_pending_update(c: Connection, alert_id: str, channel_id: str) -> bool:
    row = c.execute(
        """
        SELECT 1 FROM deliveries
        WHERE alert_id = ? AND channel_id = ? AND kind = ? AND next_attempt_at IS NOT NULL
        """,
        (alert_id, channel_id, int(DeliveryKind.UPDATE)),
    ).fetchone()
    return row is not None


def mark_delivery_sent(c: Connection, delivery_id: int, now: float, message_id: int | None) -> None:
    c.execute(
        """
        UPDATE deliveries SET sent_at = ?, next_attempt_at = NULL, attempts = attempts + 1,
                              message_id = coalesce(?, message_id), last_error = NULL
        WHERE id = ?
        """,
        (now, message_id, delivery_id),
    )


def mark_delivery_failed(c: Connection, delivery_id: int, now: float, error: str) -> None:
    c.execute(
        """
        UPDATE deliveries SET failed_at = ?, next_attempt_at = NULL, attempts = attempts + 1, last_error = ?
        WHERE id = ?
        """,
        (now, error, delivery_id),
    )


def reschedule_delivery(c: Connection, delivery_id: int, at: float, error: str) -> None:
    c.execute(
        "UPDATE deliveries SET next_attempt_at = ?, attempts = attempts + 1, last_error = ? WHERE id = ?",
        (at, error, delivery_id),
    )


def count_unsent_alert_deliveries(c: Connection, alert_id: str) -> int:
    return c.execute(
        "SELECT count(*) FROM deliveries WHERE alert_id = ? AND kind = ? AND sent_at IS NULL",
        (alert_id, int(DeliveryKind.ALERT)),
    ).fetchone()[0]


def update_alert_dispatched(c: Connection, alert_id: str, now: float) -> None:
    c.execute("UPDATE alerts SET dispatched_at = ? WHERE id = ? AND dispatched_at IS NULL", (now, alert_id))


def resolve_down_alerts(c: Connection, service_id: str, now: float) -> list[str]:
    """Mark a service's open down alerts resolved; their ids."""
    rows = c.execute(
        """
        UPDATE alerts SET resolved_at = ?
        WHERE service_id = ? AND resolved_at IS NULL AND type IN (?, ?, ?)
        RETURNING id
        """,
        (
            now,
            service_id,
            int(AlertType.FAILURE),
            int(AlertType.MISSED_HEARTBEAT),
            int(AlertType.FAILED_HEALTH_CHECK),
        ),
    )
    return [row[0] for row in rows]


def find_open_down_alert(c: Connection, service_id: str) -> Row | None:
    """The service's latest unresolved down alert."""
    return c.execute(
        """
        SELECT * FROM alerts
        WHERE service_id = ? AND resolved_at IS NULL AND type IN (?, ?, ?)
        ORDER BY created_at DESC, rowid DESC LIMIT 1
        """,
        (
            service_id,
            int(AlertType.FAILURE),
            int(AlertType.MISSED_HEARTBEAT),
            int(AlertType.FAILED_HEALTH_CHECK),
        ),
    ).fetchone()


def count_services_by_state(c: Connection) -> dict[State, int]:
    counts = dict.fromkeys(State, 0)
    for state, n in c.execute("SELECT state, count(*) FROM services GROUP BY state"):
        counts[State(state)] = n
    return counts


def list_service_names_and_states(c: Connection, state: State | None = None) -> list[Row]:
    sql = "SELECT id, name, state FROM services WHERE (? IS NULL OR state = ?) ORDER BY name_key"
    return c.execute(sql, (None if state is None else int(state),) * 2).fetchall()


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
# Domain: contacts & routing ##################################################
###############################################################################

# -- contacts -------------------------------------------------------------------


def get_contact(c: Connection, contact_id: str) -> Row:
    row = find_contact(c, contact_id) if is_uuid(contact_id) else None
    if row is None:
        raise not_found("contact")
    return row


def create_contact(c: Connection, now: float, name: str) -> str:
    ensure_name_free("contact", name, find_contact_id_by_name(c, casefold_name(name)))
    contact_id = new_id()
    insert_contact(
        c,
        {"id": contact_id, "name": name, "name_key": casefold_name(name), "is_default": 0, "created_at": now},
    )
    return contact_id


def rename_contact(c: Connection, contact_id: str, name: str) -> None:
    get_contact(c, contact_id)
    ensure_name_free("contact", name, find_contact_id_by_name(c, casefold_name(name)), contact_id)
    update_contact_name(c, contact_id, name)


def delete_contact(c: Connection, contact_id: str) -> None:
    """Delete a contact and its channels; never the default, nor a service's only contact."""
    contact = get_contact(c, contact_id)
    if contact["is_default"]:
        raise MkatError("DEFAULT_CONTACT", "The default contact cannot be deleted")
    stranded = count_services_only_reaching(c, contact_id)
    if stranded:
        raise MkatError(
            "LAST_CONTACT", f"This is the only contact of {stranded} service(s): give them another one first"
        )
    delete_contact_row(c, contact_id)


# -- channels -------------------------------------------------------------------


def get_channel(c: Connection, channel_id: str, contact_id: str | None = None) -> Row:
    """A channel, of the given contact when one is named (404 otherwise)."""
    if contact_id is not None:
        get_contact(c, contact_id)
    row = find_channel(c, channel_id) if is_uuid(channel_id) else None
    if row is None or (contact_id is not None and row["contact_id"] != contact_id):
        raise not_found("channel")
    return row


def add_channel(
    c: Connection, now: float, contact_id: str, kind: ChannelType, config: dict, enabled: bool
) -> str:
    get_contact(c, contact_id)
    channel_id = new_id()
    insert_channel(
        c,
        {
            "id": channel_id,
            "contact_id": contact_id,
            "type": int(kind),
            "configuration": json.dumps(config),
            "is_enabled": int(enabled),
            "created_at": now,
        },
    )
    return channel_id


def update_channel(
    c: Connection, channel_id: str, changes: dict[str, Any], contact_id: str | None = None
) -> None:
    get_channel(c, channel_id, contact_id)
    if "configuration" in changes:
        changes = {**changes, "configuration": json.dumps(changes["configuration"])}
    if "is_enabled" in changes:
        changes = {**changes, "is_enabled": int(changes["is_enabled"])}
    update_columns(c, "channels", channel_id, changes)


def delete_channel(c: Connection, channel_id: str, contact_id: str | None = None) -> None:
    get_channel(c, channel_id, contact_id)
    delete_channel_row(c, channel_id)


def ensure_chat_channel(c: Connection, now: float, chat_id: str) -> None:
    """MKAT_TELEGRAM_CHAT_ID: the default contact reaches that chat, unless some channel already does."""
    if find_telegram_channel_for_chat(c, chat_id) is None:
        add_channel(c, now, find_default_contact_id(c), ChannelType.TELEGRAM, {"chatId": chat_id}, True)


# -- routing: what an alert sends where ---------------------------------------------


def fan_out(c: Connection, now: float, alert_id: str, service_id: str, kind: DeliveryKind) -> int:
    """Queue one delivery per enabled channel of the service's contacts; how many."""
    routes = list_routes(c, service_id)
    for channel in routes:
        insert_delivery(c, alert_id, channel["id"], service_id, kind, now)
    if routes:
        c.emit("deliveries_queued", alertId=alert_id, count=len(routes))
    return len(routes)


def refresh_cards(c: Connection, now: float, alert_id: str) -> None:
    """Queue a re-render of every Telegram message about an alert (acknowledged, muted, resolved).

    One pending update per channel is enough: it renders the alert as it is when it goes out.
    """
    queued = 0
    channels = {card["channel_id"]: card["service_id"] for card in list_cards(c, alert_id)}
    for channel_id, service_id in channels.items():
        if not has_pending_update(c, alert_id, channel_id):
            insert_delivery(c, alert_id, channel_id, service_id, DeliveryKind.UPDATE, now)
            queued += 1
    if queued:
        c.emit("deliveries_queued", alertId=alert_id, count=queued)


###############################################################################
# Domain: services ############################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class Cause:
    """What moved a monitor: used to pick the alert type and write its message."""

    monitor_id: str | None
    missed_heartbeat: bool = False
    message: str = ""


def emit_alert_updated(c: Connection, alert_id: str) -> None:
    """Tell the event streams what an alert looks like now."""
    alert = find_alert(c, alert_id)
    c.emit(
        "alert_updated",
        alertId=alert_id,
        serviceId=alert["service_id"],
        acknowledgedAt=iso(alert["acknowledged_at"]),
        dispatchedAt=iso(alert["dispatched_at"]),
        resolvedAt=iso(alert["resolved_at"]),
    )


def get_service(c: Connection, service_id: str) -> Row:
    row = find_service(c, service_id) if is_uuid(service_id) else None
    if row is None:
        raise not_found("service")
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


def create_service(c: Connection, now: float, spec: dict[str, Any], monitors: list[dict[str, Any]]) -> str:
    """Create a service with its monitors and the default contact; return its id."""
    ensure_name_free("service", spec["name"], find_service_id_by_name(c, casefold_name(spec["name"])))
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


def set_service_contacts(c: Connection, service_id: str, contact_ids: list[str]) -> int:
    """Route a service to exactly these contacts (at least one, all existing); how many."""
    get_service(c, service_id)
    unknown = [cid for cid in contact_ids if find_contact(c, cid) is None]
    if unknown:
        raise invalid("contactIds", f"no such contact: {', '.join(unknown)}")
    delete_service_contacts(c, service_id)
    for contact_id in contact_ids:
        insert_service_contact(c, service_id, contact_id)
    return len(contact_ids)


def update_service(c: Connection, now: float, service_id: str, changes: dict[str, Any]) -> None:
    get_service(c, service_id)
    if "name" in changes:
        owner = find_service_id_by_name(c, casefold_name(changes["name"]))
        ensure_name_free("service", changes["name"], owner, service_id)
        changes = {**changes, "name_key": casefold_name(changes["name"])}
    update_columns(c, "services", service_id, {**changes, "updated_at": now})


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
    if kind == AlertType.RECOVERY:
        for resolved_id in resolve_down_alerts(c, service["id"], now):
            emit_alert_updated(c, resolved_id)
            refresh_cards(c, now, resolved_id)
    insert_alert(c, alert)
    if not muted:
        fan_out(c, now, alert["id"], service["id"], DeliveryKind.ALERT)
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
    open_alert = find_open_down_alert(c, service_id)
    if open_alert is not None:
        refresh_cards(c, now, open_alert["id"])  # its Telegram cards show the mute
    return until


def end_mute(c: Connection, now: float, service_id: str) -> bool:
    """End a mute now; when the service is still DOWN, queue one "still down" notice. True then."""
    service = get_service(c, service_id)
    if service["muted_until"] is None:
        return False
    update_service_mute(c, service_id, None, None, now)
    open_alert = find_open_down_alert(c, service_id)
    still_down = service["state"] == State.DOWN and open_alert is not None
    if open_alert is not None:
        refresh_cards(c, now, open_alert["id"])  # the mute line and buttons change
    if still_down:
        fan_out(c, now, open_alert["id"], service_id, DeliveryKind.STILL_DOWN)
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
    update_columns(c, "monitors", monitor_id, changes)


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
    refresh_cards(c, now, alert_id)
    emit_alert_updated(c, alert_id)


def ensure_instance(c: Connection, now: float, config: Config) -> tuple[str, bool]:
    """Create what the instance needs: the default contact (reaching MKAT_TELEGRAM_CHAT_ID when
    set) and a password; return (password, generated)."""
    if find_default_contact_id(c) is None:
        insert_contact(
            c,
            {"id": new_id(), "name": "Default", "name_key": "default", "is_default": 1, "created_at": now},
        )
    if config.telegram_chat_id:
        ensure_chat_channel(c, now, config.telegram_chat_id)
    if config.password:
        return config.password, False
    password = find_setting(c, "password")
    if password is None:
        password = secrets.token_urlsafe(18)
        upsert_setting(c, "password", password)
    return password, True


###############################################################################
# Telegram Bot API client #####################################################
###############################################################################


def http_client() -> Any:
    """The `requests` module, imported on first use: it costs 6 MB resident (half of it
    charset_normalizer), which an instance that never sends a notification need not carry."""
    import requests

    return requests


class TelegramError(Exception):
    """A refused or failed Bot API call. code 0 means the network failed before Telegram answered."""

    def __init__(self, code: int, description: str, retry_after: float | None = None):
        super().__init__(f"{code} {description}" if code else description)
        self.code = code
        self.description = description
        self.retry_after = retry_after


class TelegramClient:
    """The few Bot API methods mkat uses: JSON in, the `result` of the {"ok": …} envelope out."""

    def __init__(self, api_url: str, token: str):
        self.base_url = f"{api_url}/bot{token}/"
        self.token = token
        self._local = threading.local()  # a requests session per thread

    def call(self, method: str, *, http_timeout: float = NETWORK_TIMEOUT_SECONDS, **params: Any) -> Any:
        requests = http_client()
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            response = session.post(self.base_url + method, json=params, timeout=http_timeout)
            body = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise TelegramError(0, self.scrub(f"{type(exc).__name__}: {exc}")) from None
        if body.get("ok"):
            return body.get("result")
        retry_after = (body.get("parameters") or {}).get("retry_after")
        description = str(body.get("description") or f"HTTP {response.status_code}")
        raise TelegramError(
            body.get("error_code") or response.status_code, self.scrub(description), retry_after
        )

    def scrub(self, text: str) -> str:
        """Errors from requests quote the URL, and the URL holds the bot token."""
        return text.replace(self.token, "<bot token>")


###############################################################################
# Notifications ###############################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one attempt at a delivery gave."""

    ok: bool
    error: str | None = None
    permanent: bool = False  # retrying will not help (chat not found, bot blocked, bad address)
    retry_after: float | None = None  # the receiver said when to come back (429)
    message_id: int | None = None


# -- formatting -----------------------------------------------------------------


def esc(text: Any) -> str:
    """Escape user text for Telegram's HTML parse mode."""
    return html.escape(str(text), quote=False)


def clock_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def headline(alert: Row, service: Row, notice: bool = False) -> str:
    """One line saying what happened, as plain text: `web is DOWN`."""
    kind = AlertType(alert["type"])
    if notice:
        return f"{service['name']} is still DOWN"
    if kind == AlertType.RECOVERY:
        return f"{service['name']} is back UP"
    if kind == AlertType.MISSED_HEARTBEAT:
        return f"{service['name']} is DOWN: missed heartbeat"
    return f"{service['name']} is DOWN"


def render_card(alert: Row, service: Row, now: float, notice: bool = False) -> tuple[str, dict | None]:
    """A Telegram message about an alert as it stands now: HTML text and inline keyboard."""
    kind = AlertType(alert["type"])
    icon = "✅" if kind == AlertType.RECOVERY else "🔴"
    title = esc(headline(alert, service, notice)).replace(
        esc(service["name"]), f"<b>{esc(service['name'])}</b>", 1
    )
    lines = [
        f"{icon} {title}",
        f"{kind.label} · severity {Severity(alert['severity']).label}",
        esc(alert["message"]),
        f"🕒 {clock_text(alert['created_at'])}",
    ]
    if notice:
        lines.append(f"⏰ The mute has ended; down for {format_duration(now - alert['created_at'])}")
    if alert["resolved_at"] is not None:
        down_for = format_duration(alert["resolved_at"] - alert["created_at"])
        lines.append(f"✅ Resolved {clock_text(alert['resolved_at'])} after {down_for} down")
    if alert["acknowledged_at"] is not None:
        lines.append(
            f"👤 Acknowledged by {esc(alert['acknowledged_by'])} · {clock_text(alert['acknowledged_at'])}"
        )
    muted = service["muted_until"] is not None and service["muted_until"] > now
    if muted:
        lines.append(f"🔕 Muted until {clock_text(service['muted_until'])}")
    rows = []
    if kind != AlertType.RECOVERY and alert["resolved_at"] is None:
        if alert["acknowledged_at"] is None:
            rows.append([{"text": "Acknowledge", "callback_data": f"ack:{alert['id']}"}])
        if not muted:
            rows.append(
                [{"text": label, "callback_data": f"mute:{service['id']}:{m}"} for m, label in MUTE_BUTTONS]
            )
    return "\n".join(lines), ({"inline_keyboard": rows} if rows else None)


def render_email(alert: Row, service: Row, now: float, notice: bool = False) -> tuple[str, str]:
    """(subject, plain-text body) of an alert e-mail."""
    kind = AlertType(alert["type"])
    lines = [
        headline(alert, service, notice),
        "",
        f"Alert:    {kind.label}",
        f"Severity: {Severity(alert['severity']).label}",
        f"Message:  {alert['message']}",
        f"Time:     {clock_text(alert['created_at'])}",
    ]
    if notice:
        lines.append(f"The mute has ended; down for {format_duration(now - alert['created_at'])}.")
    return f"[mkat] {headline(alert, service, notice)}", "\n".join(lines) + "\n"


# The alert as the API shows it; webhooks receive the same.
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
        "resolvedAt": iso(a["resolved_at"]),
        "suppressed": bool(a["suppressed"]),
        "suppressionReason": a["suppression_reason"],
    }


def webhook_payload(alert: Row, service: Row, notice: bool = False) -> dict[str, Any]:
    return {
        "event": "still_down" if notice else "alert",
        "alert": to_api_alert(alert),
        "service": {
            "id": service["id"],
            "name": service["name"],
            "state": service["state"],
            "severity": service["severity"],
        },
    }


def split_message(text: str, limit: int = TELEGRAM_MAX_TEXT) -> list[str]:
    """Split at line ends into messages Telegram accepts."""
    chunks, current = [], ""
    for line in text.split("\n"):
        while len(line) > limit:  # a single overlong line: cut it
            chunks.append(line[:limit])
            line = line[limit:]
        if current and len(current) + 1 + len(line) > limit:
            chunks.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    return [*chunks, current] if current or not chunks else chunks


# -- senders ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeliveryJob:
    """Everything one delivery needs, read before any network call."""

    delivery: Row
    kind: DeliveryKind
    alert: Row
    service: Row
    channel: Row
    config: dict[str, Any]
    cards: list[Row]  # for an UPDATE: the messages to edit


def load_delivery_job(c: Connection, delivery_id: int) -> DeliveryJob | None:
    """The job for a pending delivery, or None once it is done or gone."""
    delivery = find_delivery(c, delivery_id)
    if delivery is None or delivery["next_attempt_at"] is None:
        return None
    kind = DeliveryKind(delivery["kind"])
    channel = find_channel(c, delivery["channel_id"])
    return DeliveryJob(
        delivery=delivery,
        kind=kind,
        alert=find_alert(c, delivery["alert_id"]),
        service=find_service(c, delivery["service_id"]),
        channel=channel,
        config=json.loads(channel["configuration"]),
        cards=list_cards(c, delivery["alert_id"], delivery["channel_id"])
        if kind == DeliveryKind.UPDATE
        else [],
    )


def telegram_outcome(error: TelegramError) -> Outcome:
    if error.code == 429:
        return Outcome(False, error.description, retry_after=float(error.retry_after or RETRY_FIRST_SECONDS))
    return Outcome(False, error.description, permanent=error.code in (400, 403))


def telegram_target(config: dict[str, Any]) -> dict[str, Any]:
    target = {"chat_id": config["chatId"]}
    if config.get("messageThreadId"):
        target["message_thread_id"] = config["messageThreadId"]
    return target


def send_telegram(ctx: Context, job: DeliveryJob) -> Outcome:
    if ctx.telegram is None:
        return Outcome(False, "Telegram is not configured: set MKAT_TELEGRAM_BOT_TOKEN", permanent=True)
    now = ctx.clock()
    if job.kind == DeliveryKind.UPDATE:
        return edit_telegram_cards(ctx, job, now)
    text, keyboard = render_card(job.alert, job.service, now, notice=job.kind == DeliveryKind.STILL_DOWN)
    params = {**telegram_target(job.config), "text": text, "parse_mode": "HTML"}
    if keyboard:
        params["reply_markup"] = keyboard
    try:
        message = ctx.telegram.call("sendMessage", **params)
    except TelegramError as error:
        return telegram_outcome(error)
    return Outcome(True, message_id=message.get("message_id"))


def edit_telegram_cards(ctx: Context, job: DeliveryJob, now: float) -> Outcome:
    """Re-render the messages already sent about the alert; unsent ones will render fresh."""
    for card in job.cards:
        if card["message_id"] is None:
            continue
        text, keyboard = render_card(
            job.alert, job.service, now, notice=card["kind"] == DeliveryKind.STILL_DOWN
        )
        params = {
            "chat_id": job.config["chatId"],
            "message_id": card["message_id"],
            "text": text,
            "parse_mode": "HTML",
            "reply_markup": keyboard or {"inline_keyboard": []},
        }
        try:
            ctx.telegram.call("editMessageText", **params)
        except TelegramError as error:
            # Unchanged, deleted or too old to edit: nothing more to do for that message.
            if error.code == 400 and any(
                phrase in error.description for phrase in ("not modified", "not found", "can't be edited")
            ):
                continue
            return telegram_outcome(error)
    return Outcome(True)


EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")


def smtp_send(config: Config, to: str, subject: str, body: str) -> None:
    """Send one plain-text e-mail with the MKAT_SMTP_* settings; smtplib and OS errors propagate.

    smtplib and the email package (~5 MB resident) are imported on first use, like requests.
    """
    import smtplib
    from email.message import EmailMessage

    message = EmailMessage()
    message["From"] = config.smtp_from or config.smtp_username or f"mkat@{config.instance_name}"
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    kind = smtplib.SMTP_SSL if config.smtp_tls == "ssl" else smtplib.SMTP
    with kind(config.smtp_host, config.smtp_port, timeout=NETWORK_TIMEOUT_SECONDS) as smtp:
        if config.smtp_tls == "starttls":
            smtp.starttls()
        if config.smtp_username:
            smtp.login(config.smtp_username, config.smtp_password or "")
        smtp.send_message(message)


def email_outcome(ctx: Context, to: str, subject: str, body: str) -> Outcome:
    if not ctx.config.smtp_host:
        return Outcome(False, "E-mail is not configured: set MKAT_SMTP_HOST", permanent=True)
    if not EMAIL_PATTERN.fullmatch(to):
        return Outcome(False, f"Not an e-mail address: {to}", permanent=True)
    import smtplib

    try:
        smtp_send(ctx.config, to, subject, body)
    except smtplib.SMTPRecipientsRefused as exc:
        return Outcome(False, f"Recipient refused: {exc.recipients}", permanent=True)
    except smtplib.SMTPResponseException as exc:
        text = (
            exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
        )
        return Outcome(False, f"SMTP {exc.smtp_code}: {text}", permanent=exc.smtp_code >= 500)
    except (smtplib.SMTPException, OSError) as exc:
        return Outcome(False, f"SMTP: {type(exc).__name__}: {exc}")
    return Outcome(True)


def send_email(ctx: Context, job: DeliveryJob) -> Outcome:
    subject, body = render_email(
        job.alert, job.service, ctx.clock(), notice=job.kind == DeliveryKind.STILL_DOWN
    )
    return email_outcome(ctx, job.config["address"], subject, body)


def post_webhook(url: str, payload: dict[str, Any]) -> Outcome:
    requests = http_client()
    try:
        response = requests.post(url, json=payload, timeout=NETWORK_TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        return Outcome(False, f"{type(exc).__name__}: {exc}")
    if response.ok:
        return Outcome(True)
    error = f"HTTP {response.status_code} from the webhook"
    if response.status_code == 429:
        try:
            retry_after = float(response.headers.get("Retry-After", RETRY_FIRST_SECONDS))
        except ValueError:
            retry_after = RETRY_FIRST_SECONDS
        return Outcome(False, error, retry_after=retry_after)
    return Outcome(False, error, permanent=400 <= response.status_code < 500 and response.status_code != 408)


def send_webhook(ctx: Context, job: DeliveryJob) -> Outcome:
    return post_webhook(
        job.config["url"], webhook_payload(job.alert, job.service, job.kind == DeliveryKind.STILL_DOWN)
    )


SENDERS: dict[ChannelType, Callable[[Context, DeliveryJob], Outcome]] = {
    ChannelType.TELEGRAM: send_telegram,
    ChannelType.EMAIL: send_email,
    ChannelType.WEBHOOK: send_webhook,
}


# -- dispatch ---------------------------------------------------------------------


def retry_delay(attempts: int) -> float:
    """1 s after the first failure, doubling, at most RETRY_MAX_SECONDS."""
    return min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (attempts - 1))


def record_outcome(c: Connection, now: float, delivery_id: int, outcome: Outcome) -> None:
    """Write down what an attempt gave: sent, given up, or when to try again."""
    delivery = find_delivery(c, delivery_id)
    if delivery is None or delivery["next_attempt_at"] is None:
        return
    channel_id, alert_id = delivery["channel_id"], delivery["alert_id"]
    if outcome.ok:
        mark_delivery_sent(c, delivery_id, now, outcome.message_id)
        clear_channel_error(c, channel_id)
        if delivery["kind"] == DeliveryKind.ALERT and count_unsent_alert_deliveries(c, alert_id) == 0:
            update_alert_dispatched(c, alert_id, now)
            emit_alert_updated(c, alert_id)
        return
    error = outcome.error or "failed"
    update_channel_error(c, channel_id, error, now)
    attempts = delivery["attempts"] + 1
    retry_at = now + (outcome.retry_after if outcome.retry_after is not None else retry_delay(attempts))
    if outcome.permanent or retry_at - delivery["created_at"] > GIVE_UP_AFTER_SECONDS:
        mark_delivery_failed(c, delivery_id, now, error)
        c.emit("delivery_failed", deliveryId=delivery_id, channelId=channel_id, error=error)
        log_event(logging.WARNING, "delivery_failed", delivery=delivery_id, channel=channel_id, error=error)
    else:
        reschedule_delivery(c, delivery_id, retry_at, error)
        log_event(logging.INFO, "delivery_retry", delivery=delivery_id, attempts=attempts, error=error)


def drop_delivery(c: Connection, now: float, delivery_id: int, reason: str) -> None:
    """Give up a delivery that should no longer be sent; the channel did nothing wrong."""
    mark_delivery_failed(c, delivery_id, now, reason)


def deliver(ctx: Context, delivery_id: int) -> Outcome | None:
    """One attempt at one delivery: read, send (no transaction open), record. None if nothing was due."""
    job = ctx.db.read(load_delivery_job, delivery_id)
    if job is None:
        return None
    if not job.channel["is_enabled"]:  # disabled since it was queued: nothing more goes there
        ctx.db.write(drop_delivery, ctx.clock(), delivery_id, "the channel was disabled")
        return None
    try:
        outcome = SENDERS[ChannelType(job.channel["type"])](ctx, job)
    except Exception as exc:  # a bug in a sender must not lose the delivery: it is retried
        LOG.exception("send_failed", extra={"fields": {"delivery": delivery_id}})
        outcome = Outcome(False, f"internal error: {type(exc).__name__}")
    ctx.db.write(record_outcome, ctx.clock(), delivery_id, outcome)
    return outcome


def dispatch_due(ctx: Context, now: float, submit: Callable[[int], Any]) -> float:
    """Hand every due delivery to submit(); return how long to wait before looking again."""
    for delivery_id in ctx.db.read(list_due_deliveries, now, 100):
        submit(delivery_id)
    next_at = ctx.db.read(find_next_attempt_at)
    if next_at is None or next_at <= now:  # nothing waits, or it is being sent: a finished send wakes us
        return 1.0
    return min(1.0, next_at - now)


class Dispatcher:
    """Sends deliveries as soon as they are queued: a dispatcher thread woken by
    ctx.deliveries_pending, and SENDER_THREADS senders so one slow receiver does not hold up the
    rest. A delivery is in flight on one sender at a time; rows stay pending in the database
    until their outcome is written, so nothing is lost if mkat stops mid-send."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.work: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # None: stop
        self.in_flight: set[int] = set()
        self.lock = threading.Lock()

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.run, name="mkat-dispatcher", daemon=True)]
        threads += [
            threading.Thread(target=self.send_loop, name=f"mkat-sender-{i}", daemon=True)
            for i in range(SENDER_THREADS)
        ]
        for thread in threads:
            thread.start()
        return threads

    def submit(self, delivery_id: int) -> None:
        with self.lock:
            if delivery_id in self.in_flight:
                return
            self.in_flight.add(delivery_id)
        self.work.put(delivery_id)

    def run(self) -> None:
        ctx = self.ctx
        while not ctx.stop.is_set():
            ctx.deliveries_pending.clear()
            try:
                wait = dispatch_due(ctx, ctx.clock(), self.submit)
            except Exception:
                LOG.exception("dispatch_failed")
                wait = 1.0
            ctx.deliveries_pending.wait(wait)
        for _ in range(SENDER_THREADS):
            self.work.put(None)

    def send_loop(self) -> None:
        while (delivery_id := self.work.get()) is not None:
            try:
                deliver(self.ctx, delivery_id)
            except Exception:
                LOG.exception("delivery_crashed", extra={"fields": {"delivery": delivery_id}})
            finally:
                with self.lock:
                    self.in_flight.discard(delivery_id)
                    idle = not self.in_flight
                # With a backlog, the dispatcher looks again once its batch is out, not after every
                # send: a pass lists up to 100 due rows, which is work to do 200 times for 200 alerts.
                # A delivery that waited behind this one is due now: one pass finds them all.
                if idle:
                    self.ctx.deliveries_pending.set()


# -- channel tests ------------------------------------------------------------------


def send_test_message(ctx: Context, channel: Row) -> Outcome:
    """Really send a short test message on a channel."""
    config = json.loads(channel["configuration"])
    kind = ChannelType(channel["type"])
    text = f"mkat test message from {ctx.config.instance_name}: this channel works."
    if kind == ChannelType.TELEGRAM:
        if ctx.telegram is None:
            return Outcome(False, "Telegram is not configured: set MKAT_TELEGRAM_BOT_TOKEN", permanent=True)
        try:
            ctx.telegram.call("sendMessage", **telegram_target(config), text=esc(text), parse_mode="HTML")
        except TelegramError as error:
            return telegram_outcome(error)
        return Outcome(True)
    if kind == ChannelType.EMAIL:
        return email_outcome(ctx, config["address"], "[mkat] test message", text + "\n")
    return post_webhook(config["url"], {"event": "test", "message": text})


def record_test(c: Connection, now: float, channel_id: str, outcome: Outcome) -> None:
    """A test's outcome shows on the channel like a delivery's."""
    update_channel_error(c, channel_id, None if outcome.ok else outcome.error, None if outcome.ok else now)


def try_channel(ctx: Context, channel_id: str, contact_id: str | None = None) -> dict[str, Any]:
    channel = ctx.db.read(get_channel, channel_id, contact_id)
    outcome = send_test_message(ctx, channel)
    ctx.db.write(record_test, ctx.clock(), channel_id, outcome)
    if outcome.ok:
        return {"success": True, "message": "Test message sent"}
    return {"success": False, "message": outcome.error}


# -- the Telegram bot -----------------------------------------------------------------

BOT_HELP = """<b>mkat</b>: is my stuff still working?
/status: how many services are up and down, and which are down
/list: every service and its state
/mute &lt;service&gt; &lt;duration&gt;: silence a service, e.g. /mute web 1h or /mute "my web" 30m
/help: this message"""

STATE_ICON = {State.UNKNOWN: "⚪", State.UP: "🟢", State.DOWN: "🔴", State.PAUSED: "⏸"}
DURATION_PATTERN = re.compile(r"(\d+)\s*([mhdw])", re.IGNORECASE)


def parse_mute_minutes(text: str) -> int:
    """Minutes for "15m", "2h", "1d", "1w"; ValueError outside 1..MAX_MUTE_MINUTES."""
    match = DURATION_PATTERN.fullmatch(text.strip())
    if not match:
        raise ValueError("use a duration like 15m, 2h or 1d")
    minutes = int(match.group(1)) * DURATION_UNITS[match.group(2).lower()] // 60
    if not 1 <= minutes <= MAX_MUTE_MINUTES:
        raise ValueError("a mute lasts from 1 minute to 30 days")
    return minutes


def tg_status(c: Connection, now: float, args: str) -> str:
    counts = count_services_by_state(c)
    total = sum(counts.values())
    summary = ", ".join(f"{counts[state]} {state.name.lower()}" for state in State)
    lines = [f"📊 {total} service{'s' if total != 1 else ''}: {summary}"]
    down = list_service_names_and_states(c, State.DOWN)
    if down:
        lines.append("🔴 Down: " + ", ".join(f"<b>{esc(s['name'])}</b>" for s in down))
    elif total:
        lines.append("All good: nothing is down.")
    return "\n".join(lines)


def tg_list(c: Connection, now: float, args: str) -> str:
    services = list_service_names_and_states(c)
    if not services:
        return "No services yet. Create one in the web interface or with the API."
    return "\n".join(
        f"{STATE_ICON[State(s['state'])]} {esc(s['name'])}: {State(s['state']).name}" for s in services
    )


def tg_mute(c: Connection, now: float, args: str) -> str:
    usage = 'Usage: /mute &lt;service&gt; &lt;duration&gt;, e.g. /mute web 1h or /mute "my web" 30m'
    match = re.fullmatch(r"""\s*(?:"([^"]+)"|'([^']+)'|(.+?))\s+(\S+)\s*""", args)
    if not match:
        return usage
    name = next(group for group in match.groups()[:3] if group is not None).strip()
    try:
        minutes = parse_mute_minutes(match.group(4))
    except ValueError as exc:
        return f"{esc(str(exc).capitalize())}. {usage}"
    service_id = find_service_id_by_name(c, casefold_name(name))
    if service_id is None:
        return f"No service is named <b>{esc(name)}</b>. /list shows them all."
    until = mute_service(c, now, service_id, minutes, "muted from Telegram")
    return f"🔕 Muted <b>{esc(name)}</b> until {clock_text(until)}"


def tg_help(c: Connection, now: float, args: str) -> str:
    return BOT_HELP


BOT_COMMANDS: dict[str, Callable[[Connection, float, str], str]] = {
    "status": tg_status,
    "list": tg_list,
    "mute": tg_mute,
    "help": tg_help,
    "start": tg_help,
}


def is_authorised(c: Connection, config: Config, chat_id: str) -> bool:
    """The bot obeys the chats of enabled Telegram channels (and MKAT_TELEGRAM_CHAT_ID), no one else."""
    return chat_id == config.telegram_chat_id or chat_id in list_telegram_chats(c)


def person(user: dict[str, Any]) -> str:
    name = " ".join(part for part in (user.get("first_name"), user.get("last_name")) if part) or "someone"
    return f"{name} (@{user['username']})" if user.get("username") else name


def tg_callback(c: Connection, now: float, data: str, user: dict[str, Any]) -> str:
    """Act on a button; the short answer Telegram shows."""
    action, _, rest = data.partition(":")
    try:
        if action == "ack":
            acknowledge_alert(c, now, rest, person(user))
            return "Acknowledged"
        if action == "mute":
            service_id, _, minutes = rest.partition(":")
            until = mute_service(c, now, service_id, int(minutes), "muted from Telegram")
            return f"Muted until {clock_text(until)}"
    except MkatError as exc:
        return {"ALREADY_ACKNOWLEDGED": "Already acknowledged"}.get(exc.code, exc.message)
    except ValueError:
        pass
    return "Unknown button"


def handle_update(ctx: Context, update: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Apply one update and persist the offset in the same transaction; return the replies to send.

    Updates from chats the bot does not obey are skipped without a word.
    """

    def act(c: Connection) -> list[tuple[str, dict[str, Any]]]:
        upsert_setting(c, "telegram_offset", str(update["update_id"]))
        now = ctx.clock()
        if "callback_query" in update:
            query = update["callback_query"]
            chat = str(((query.get("message") or {}).get("chat") or {}).get("id"))
            if not is_authorised(c, ctx.config, chat):
                return []
            answer = tg_callback(c, now, str(query.get("data") or ""), query.get("from") or {})
            return [("answerCallbackQuery", {"callback_query_id": query["id"], "text": answer})]
        message = update.get("message") or {}
        chat = str((message.get("chat") or {}).get("id"))
        text = (message.get("text") or "").strip()
        if not text.startswith("/") or not is_authorised(c, ctx.config, chat):
            return []
        command, _, args = text[1:].partition(" ")
        handler = BOT_COMMANDS.get(command.split("@")[0].lower())
        reply = handler(c, now, args) if handler else "I do not know that command.\n\n" + BOT_HELP
        target = {"chat_id": (message.get("chat") or {}).get("id")}
        if message.get("message_thread_id"):
            target["message_thread_id"] = message["message_thread_id"]
        return [
            ("sendMessage", {**target, "text": chunk, "parse_mode": "HTML"}) for chunk in split_message(reply)
        ]

    return ctx.db.write(act)


def run_bot(ctx: Context) -> None:
    """The bot thread: long-poll getUpdates, handle each update once, answer."""
    offset = int(ctx.db.read(find_setting, "telegram_offset") or 0)
    backoff = 1.0
    while not ctx.stop.is_set():
        try:
            updates = ctx.telegram.call(
                "getUpdates",
                offset=offset + 1,
                timeout=TELEGRAM_POLL_SECONDS,
                allowed_updates=["message", "callback_query"],
                http_timeout=TELEGRAM_POLL_SECONDS + NETWORK_TIMEOUT_SECONDS,
            )
        except TelegramError as error:
            log_event(logging.WARNING, "telegram_poll_failed", error=str(error), retry_in=backoff)
            ctx.stop.wait(backoff)
            backoff = min(backoff * 2, 60.0)
            continue
        backoff = 1.0
        if ctx.stop.is_set():  # unconfirmed, they go to whoever polls next
            break
        for update in updates or []:
            try:
                replies = handle_update(ctx, update)
            except Exception:
                LOG.exception("telegram_update_failed", extra={"fields": {"update": update.get("update_id")}})
                ctx.db.write(upsert_setting, "telegram_offset", str(update["update_id"]))
                replies = []
            offset = max(offset, int(update["update_id"]))
            for method, params in replies:
                try:
                    ctx.telegram.call(method, **params)
                except TelegramError as error:
                    log_event(logging.WARNING, "telegram_reply_failed", method=method, error=str(error))


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


def uuid_value(value: Any) -> str:
    if not is_uuid(value):
        raise ValueError("must be a UUID")
    return value.lower()


def list_of(parse: Callable[[Any], Any], min_length: int = 0, max_length: int = 100) -> Callable[[Any], list]:
    def parse_list(value: Any) -> list:
        if not isinstance(value, list):
            raise ValueError("must be a list")
        if not min_length <= len(value) <= max_length:
            raise ValueError(f"must have {min_length} to {max_length} items")
        items = []
        for i, item in enumerate(value):
            try:
                items.append(parse(item))
            except ValueError as exc:
                raise ValueError(f"item {i} {exc}") from None
        return items

    return parse_list


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


# -- event streams ------------------------------------------------------------------


class EventHub:
    """Hands committed events to the open event streams; a stream too slow to keep up is dropped
    (the browser reconnects) rather than holding the writer."""

    def __init__(self, limit: int):
        self.limit = limit
        self.lock = threading.Lock()
        self.streams: set[queue.Queue] = set()

    def open(self) -> queue.Queue | None:
        """A new stream's queue, or None when `limit` streams are open."""
        with self.lock:
            if len(self.streams) >= self.limit:
                return None
            stream: queue.Queue = queue.Queue(maxsize=1000)
            self.streams.add(stream)
            return stream

    def close(self, stream: queue.Queue) -> None:
        with self.lock:
            self.streams.discard(stream)

    def is_open(self, stream: queue.Queue) -> bool:
        return stream in self.streams

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        with self.lock:
            for stream in list(self.streams):
                try:
                    stream.put_nowait((kind, data))
                except queue.Full:
                    self.streams.discard(stream)


def unbuffer_stream(environ: dict[str, Any]) -> None:
    """Make this connection send each write at once.

    buffered_sends() lets waitress hold small writes until a response ends, and an event stream
    never ends. waitress exposes its channel only through this callable; where it does not, the
    stream still works, with events sent in larger batches.
    """
    channel = getattr(environ.get("waitress.client_disconnected"), "__self__", None)
    if channel is not None and getattr(channel.adj, "send_bytes", 1) > 1:
        channel.adj = copy.copy(channel.adj)
        channel.adj.send_bytes = 1


def event_stream(ctx: Context, stream: queue.Queue, environ: dict[str, Any]) -> Iterator[bytes]:
    """Server-Sent Events from a hub queue, a keep-alive comment when quiet, until mkat stops or
    the client goes away."""
    try:
        yield b"retry: 3000\n\n"  # sent at once, so the response starts before any event
        quiet_since = time.monotonic()
        gone = environ.get("waitress.client_disconnected", lambda: False)
        while not ctx.stop.is_set() and ctx.hub.is_open(stream) and not gone():
            try:
                kind, data = stream.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() - quiet_since >= EVENT_KEEPALIVE_SECONDS:
                    quiet_since = time.monotonic()
                    yield b": keep-alive\n\n"
                continue
            quiet_since = time.monotonic()
            yield f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
    finally:
        ctx.hub.close(stream)


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


def to_api_channel(ch: Row) -> dict[str, Any]:
    return {
        "id": ch["id"],
        "contactId": ch["contact_id"],
        "type": ch["type"],
        "configuration": json.loads(ch["configuration"]),
        "isEnabled": bool(ch["is_enabled"]),
        "createdAt": iso(ch["created_at"]),
        "lastError": ch["last_error"],
        "lastErrorAt": iso(ch["last_error_at"]),
    }


def load_api_contacts(c: Connection, contact_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Contacts (all, or these) with their channels, in two queries."""
    contacts = list_contacts(c, contact_ids)
    channels: dict[str, list[dict[str, Any]]] = {ct["id"]: [] for ct in contacts}
    for ch in list_channels(c, list(channels)):
        channels[ch["contact_id"]].append(to_api_channel(ch))
    return [
        {
            "id": ct["id"],
            "name": ct["name"],
            "isDefault": bool(ct["is_default"]),
            "createdAt": iso(ct["created_at"]),
            "channels": channels[ct["id"]],
            "serviceCount": ct["service_count"],
        }
        for ct in contacts
    ]


def load_api_contact(c: Connection, contact_id: str) -> dict[str, Any]:
    get_contact(c, contact_id)
    return load_api_contacts(c, [contact_id])[0]


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


CHAT_ID_PATTERN = re.compile(r"-?\d{1,20}|@[A-Za-z0-9_]{5,32}")
URL_PATTERN = re.compile(r"https?://[^\s/?#]+[^\s]*")


def chat_id_value(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not CHAT_ID_PATTERN.fullmatch(value.strip()):
        raise ValueError("must be a Telegram chat id such as -1001234567890 or @channelname")
    return value.strip()


def email_value(value: Any) -> str:
    text = text_value(254)(value)
    if not EMAIL_PATTERN.fullmatch(text):
        raise ValueError("must be an e-mail address")
    return text


def url_value(value: Any) -> str:
    text = text_value(2048)(value)
    if not URL_PATTERN.fullmatch(text):
        raise ValueError("must be an http:// or https:// URL")
    return text


def from_api_configuration(f: Fields, kind: ChannelType) -> dict[str, Any]:
    """A channel's configuration for its type (an object, or a JSON string holding one)."""
    raw = f.data.get("configuration")
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            raw = json.loads(raw)
    if not isinstance(raw, dict):
        return f.error("configuration", "must be an object")
    cf = Fields(raw, "configuration.", f.errors)
    if kind == ChannelType.TELEGRAM:
        config = {"chatId": cf.get("chatId", chat_id_value, required=True)}
        thread = cf.get("messageThreadId", integer_value(1, 2**31 - 1), nullable=True, default=None)
        if thread is not None:
            config["messageThreadId"] = thread
    elif kind == ChannelType.EMAIL:
        config = {"address": cf.get("address", email_value, required=True)}
    else:
        config = {"url": cf.get("url", url_value, required=True)}
    return MISSING if MISSING in config.values() else config


CONTACT_NAME = text_value(100)


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


def api_get_service_contacts(ctx: Context, service_id: str) -> list[dict[str, Any]]:
    def load(c: Connection) -> list[dict[str, Any]]:
        get_service(c, service_id)
        return load_api_contacts(c, list_contact_ids(c, [service_id])[service_id])

    return ctx.db.read(load)


def api_set_service_contacts(ctx: Context, service_id: str) -> dict[str, Any]:
    f = Fields(read_json())
    ids = f.get("contactIds", list_of(uuid_value, min_length=1), required=True)
    f.check()
    return {"assigned": ctx.db.write(set_service_contacts, service_id, list(dict.fromkeys(ids)))}


def api_list_contacts(ctx: Context) -> list[dict[str, Any]]:
    return ctx.db.read(load_api_contacts)


def api_create_contact(ctx: Context) -> bottle.HTTPResponse:
    f = Fields(read_json())
    name = f.get("name", CONTACT_NAME, required=True)
    f.check()
    contact_id = ctx.db.write(create_contact, ctx.clock(), name)
    return json_response(ctx.db.read(load_api_contact, contact_id), 201)


def api_get_contact(ctx: Context, contact_id: str) -> dict[str, Any]:
    return ctx.db.read(load_api_contact, contact_id)


def api_update_contact(ctx: Context, contact_id: str) -> dict[str, Any]:
    f = Fields(read_json())
    name = f.get("name", CONTACT_NAME)
    f.check()
    if name is not MISSING:
        ctx.db.write(rename_contact, contact_id, name)
    return ctx.db.read(load_api_contact, contact_id)


def api_delete_contact(ctx: Context, contact_id: str) -> None:
    ctx.db.write(delete_contact, contact_id)


def api_add_channel(ctx: Context, contact_id: str) -> bottle.HTTPResponse:
    f = Fields(read_json())
    kind = f.get("type", enum_value(ChannelType), required=True)
    config = from_api_configuration(f, kind) if kind is not MISSING else MISSING
    enabled = f.get("isEnabled", boolean_value, default=True)
    f.check()
    channel_id = ctx.db.write(add_channel, ctx.clock(), contact_id, kind, config, enabled)
    return json_response(to_api_channel(ctx.db.read(find_channel, channel_id)), 201)


def api_update_channel(ctx: Context, channel_id: str, contact_id: str | None = None) -> dict[str, Any]:
    data = read_json()
    channel = ctx.db.read(get_channel, channel_id, contact_id)
    kind = ChannelType(channel["type"])
    f = Fields(data)
    changes: dict[str, Any] = {}
    if f.get("type", enum_value(ChannelType)) not in (MISSING, kind):
        f.error("type", "cannot change; delete the channel and add a new one")
    if "configuration" in data:
        changes["configuration"] = from_api_configuration(f, kind)
    enabled = f.get("isEnabled", boolean_value)
    if enabled is not MISSING:
        changes["is_enabled"] = enabled
    f.check()
    ctx.db.write(update_channel, channel_id, changes, contact_id)
    return to_api_channel(ctx.db.read(find_channel, channel_id))


def api_delete_channel(ctx: Context, contact_id: str, channel_id: str) -> None:
    ctx.db.write(delete_channel, channel_id, contact_id)


def api_test_channel(ctx: Context, channel_id: str, contact_id: str | None = None) -> dict[str, Any]:
    return try_channel(ctx, channel_id, contact_id)


def api_list_channels(ctx: Context) -> list[dict[str, Any]]:
    return [to_api_channel(ch) for ch in ctx.db.read(list_channels)]


def api_event_stream(ctx: Context) -> bottle.HTTPResponse:
    stream = ctx.hub.open()
    if stream is None:
        raise MkatError("TOO_MANY_STREAMS", f"At most {ctx.hub.limit} event streams can be open at once")
    unbuffer_stream(request.environ)
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return bottle.HTTPResponse(event_stream(ctx, stream, request.environ), 200, headers)


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


STREAM_EVENTS = ("state_changed", "alert_created", "alert_updated")


class Context:
    """Everything the routes and workers share: configuration, database, clock, stop signal,
    the Telegram client, the dispatcher's doorbell and the open event streams."""

    def __init__(self, config: Config, clock: Clock = time.time):
        self.config = config
        self.clock = clock
        self.stop = threading.Event()
        # Set after a commit that queued deliveries: the dispatcher's doorbell.
        self.deliveries_pending = threading.Event()
        # Each open stream holds a worker thread: a quarter of them at most.
        self.hub = EventHub(max(1, config.threads // 4))
        self.telegram = (
            TelegramClient(config.telegram_api_url, config.telegram_bot_token)
            if config.telegram_bot_token
            else None
        )
        self.db = Database(config.database_path, on_commit=self.publish)
        self.password, self.password_generated = self.db.write(ensure_instance, clock(), config)

    def publish(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Called after each commit with the events it carried."""
        for kind, data in events:
            if kind == "deliveries_queued":
                self.deliveries_pending.set()
            elif kind in STREAM_EVENTS:
                self.hub.publish(kind, data)


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
    ("GET", "/api/v1/services/<service_id>/contacts", api_get_service_contacts, True),
    ("PUT", "/api/v1/services/<service_id>/contacts", api_set_service_contacts, True),
    ("GET", "/api/v1/contacts", api_list_contacts, True),
    ("POST", "/api/v1/contacts", api_create_contact, True),
    ("GET", "/api/v1/contacts/<contact_id>", api_get_contact, True),
    ("PUT", "/api/v1/contacts/<contact_id>", api_update_contact, True),
    ("DELETE", "/api/v1/contacts/<contact_id>", api_delete_contact, True),
    ("POST", "/api/v1/contacts/<contact_id>/channels", api_add_channel, True),
    ("PUT", "/api/v1/contacts/<contact_id>/channels/<channel_id>", api_update_channel, True),
    ("DELETE", "/api/v1/contacts/<contact_id>/channels/<channel_id>", api_delete_channel, True),
    ("POST", "/api/v1/contacts/<contact_id>/channels/<channel_id>/test", api_test_channel, True),
    ("GET", "/api/v1/channels", api_list_channels, True),
    ("PUT", "/api/v1/channels/<channel_id>", api_update_channel, True),
    ("POST", "/api/v1/channels/<channel_id>/test", api_test_channel, True),
    ("GET", "/api/v1/events/stream", api_event_stream, True),
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
                # Keep reading a connection while its request runs, so a browser that closes an
                # event stream is noticed at once, not at the next write.
                channel_request_lookahead=1,
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


def tune_malloc() -> None:
    """Keep glibc's malloc lean; a no-op where libc lacks these calls (musl, macOS).

    1. At most two arenas instead of one per thread (up to 8 per core): the GIL serialises
       Python threads anyway, and per-thread arenas each keep the peak of the requests they
       served (after a few large responses 16 threads held ~180 MB; with two arenas ~80 MB).
    2. Give back what compiling this file left behind: `python mkat.py` compiles it afresh
       (a script gets no .pyc), and the freed syntax tree kept ~10 MB resident.
    """
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def start_workers(ctx: Context) -> list[threading.Thread]:
    """The scheduler, the dispatcher and its senders, and the Telegram bot when configured."""
    threads = [threading.Thread(target=run_scheduler, args=(ctx,), name="mkat-scheduler", daemon=True)]
    if ctx.telegram is not None:
        threads.append(threading.Thread(target=run_bot, args=(ctx,), name="mkat-telegram", daemon=True))
    for thread in threads:
        thread.start()
    return threads + Dispatcher(ctx).start()


def stop_workers(ctx: Context, workers: list[threading.Thread], timeout: float = 2.0) -> None:
    """Wake the workers and wait for them (2 s at most in all). The Telegram poller may be in a
    long poll: it is a daemon, and whatever it fetched but did not handle, Telegram hands out
    again, since its offset was not confirmed."""
    ctx.stop.set()
    ctx.deliveries_pending.set()
    give_up = time.monotonic() + timeout
    for thread in workers:
        if thread.name != "mkat-telegram":
            thread.join(timeout=max(0.0, give_up - time.monotonic()))


def fail(variable: str, message: str) -> int:
    """Report a startup problem in one line and return the exit status."""
    print(f"mkat: {variable}: {message}", file=sys.stderr)
    return 2


def main() -> int:
    tune_malloc()
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
    stop_workers(ctx, workers)
    ctx.db.close()
    log_event(logging.INFO, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

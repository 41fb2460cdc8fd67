-- mkat's database: the whole schema, idempotent (safe to run at every start).
--
-- Conventions: ids are UUID strings; instants are epoch seconds (REAL, UTC) ending in _at;
-- durations are whole seconds ending in _seconds; enums are the integers of mkat.py's IntEnums.
-- Changes after a release go in mkat.py's MIGRATIONS list as well as here.

-- One row per instance setting: the generated password, the Telegram update offset, ...
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- One row per monitored service. `state` is derived from the monitors (and the pause) and kept
-- here so lists can filter on it; mkat.py changes it only by compare-and-swap.
CREATE TABLE IF NOT EXISTS services (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    name_key     TEXT NOT NULL UNIQUE,          -- casefolded name: uniqueness and sorting
    description  TEXT CHECK (description IS NULL OR length(description) <= 500),
    severity     INTEGER NOT NULL DEFAULT 1 CHECK (severity BETWEEN 0 AND 3),
    state        INTEGER NOT NULL DEFAULT 0 CHECK (state BETWEEN 0 AND 3),
    state_changed_at REAL NOT NULL,             -- when `state` last changed ("down for 5m")
    paused_at    REAL,                          -- not NULL while paused
    paused_until REAL,
    auto_resume  INTEGER NOT NULL DEFAULT 0 CHECK (auto_resume IN (0, 1)),
    muted_until  REAL,                          -- not NULL while muted
    mute_reason  TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
) STRICT;

-- job_auto_resume: paused services whose end time has come.
CREATE INDEX IF NOT EXISTS services_resume_due ON services (paused_until) WHERE auto_resume = 1;
-- job_end_mutes: mutes whose end time has come.
CREATE INDEX IF NOT EXISTS services_mute_due ON services (muted_until) WHERE muted_until IS NOT NULL;

-- One row per monitor of a service. A heartbeat monitor is "armed" while deadline_at is set:
-- it goes DOWN when deadline_at passes. armed_at is when the current wait began (creation,
-- check-in or resume), so a changed interval can move the deadline.
CREATE TABLE IF NOT EXISTS monitors (
    id                  TEXT PRIMARY KEY,
    service_id          TEXT NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    type                INTEGER NOT NULL CHECK (type BETWEEN 0 AND 3),
    token               TEXT NOT NULL UNIQUE,   -- the push credential; the UNIQUE index serves push lookups
    state               INTEGER NOT NULL DEFAULT 0 CHECK (state BETWEEN 0 AND 2),
    interval_seconds    INTEGER NOT NULL CHECK (interval_seconds > 0),
    grace_seconds       INTEGER NOT NULL CHECK (grace_seconds >= 0),
    last_check_in_at    REAL,
    armed_at            REAL,
    deadline_at         REAL,
    min_value           REAL,
    max_value           REAL,
    threshold_strategy  INTEGER NOT NULL DEFAULT 0 CHECK (threshold_strategy BETWEEN 0 AND 3),
    threshold_count     INTEGER,
    window_seconds      INTEGER,
    window_sample_count INTEGER,
    retention_days      INTEGER NOT NULL DEFAULT 7 CHECK (retention_days BETWEEN 1 AND 365),
    last_metric_value   REAL,
    last_metric_at      REAL,
    created_at          REAL NOT NULL
) STRICT;

-- A service's monitors (service pages); with state, derives the service state from the index alone.
CREATE INDEX IF NOT EXISTS monitors_service ON monitors (service_id, state);
-- job_check_deadlines: armed heartbeats whose deadline has passed, without scanning the rest.
CREATE INDEX IF NOT EXISTS monitors_deadline ON monitors (deadline_at) WHERE deadline_at IS NOT NULL;

-- One row per alert: a service transition worth telling someone about. An alert that is not
-- suppressed fans out to deliveries, which the dispatcher claims and sends.
CREATE TABLE IF NOT EXISTS alerts (
    id                 TEXT PRIMARY KEY,
    service_id         TEXT NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    monitor_id         TEXT REFERENCES monitors (id) ON DELETE SET NULL,
    type               INTEGER NOT NULL CHECK (type BETWEEN 0 AND 3),
    severity           INTEGER NOT NULL CHECK (severity BETWEEN 0 AND 3),
    message            TEXT NOT NULL,
    created_at         REAL NOT NULL,
    acknowledged_at    REAL,
    acknowledged_by    TEXT,
    dispatched_at      REAL,                    -- every channel has the alert
    resolved_at        REAL,                    -- a down alert whose service came back up
    suppressed         INTEGER NOT NULL DEFAULT 0 CHECK (suppressed IN (0, 1)),
    suppression_reason TEXT
) STRICT;

-- The alerts list, newest first.
CREATE INDEX IF NOT EXISTS alerts_newest ON alerts (created_at);
-- A service's alerts, newest first (service page, serviceId filter, the alert a recovery resolves).
CREATE INDEX IF NOT EXISTS alerts_service ON alerts (service_id, created_at);

-- One row per named recipient. Exactly one is the default, which new services get.
CREATE TABLE IF NOT EXISTS contacts (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    name_key   TEXT NOT NULL UNIQUE,
    is_default INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1)),
    created_at REAL NOT NULL
) STRICT;

-- Enforces "exactly one default" together with the code that creates it.
CREATE UNIQUE INDEX IF NOT EXISTS contacts_one_default ON contacts (is_default) WHERE is_default = 1;

-- One row per way of reaching a contact: Telegram chat, e-mail address or webhook URL.
CREATE TABLE IF NOT EXISTS channels (
    id            TEXT PRIMARY KEY,
    contact_id    TEXT NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    type          INTEGER NOT NULL CHECK (type BETWEEN 0 AND 2),
    configuration TEXT NOT NULL CHECK (json_valid(configuration)),
    is_enabled    INTEGER NOT NULL DEFAULT 1 CHECK (is_enabled IN (0, 1)),
    created_at    REAL NOT NULL,
    last_error    TEXT,
    last_error_at REAL
) STRICT;

-- A contact's channels.
CREATE INDEX IF NOT EXISTS channels_contact ON channels (contact_id);

-- Which contacts a service's alerts go to.
CREATE TABLE IF NOT EXISTS service_contacts (
    service_id TEXT NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    contact_id TEXT NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    PRIMARY KEY (service_id, contact_id)
) STRICT, WITHOUT ROWID;

-- The services of a contact (contact deletion rules, serviceCount).
CREATE INDEX IF NOT EXISTS service_contacts_contact ON service_contacts (contact_id);

-- The outbox: one row per message to send on one channel about one alert. kind 0 is the alert
-- itself, 1 re-renders a Telegram card already sent (acknowledged, muted, resolved), 2 is the
-- "still down" notice when a mute ends. A row is pending while next_attempt_at is set; it ends
-- sent (sent_at) or given up (failed_at). The dispatcher claims due rows, sends, records.
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY,
    alert_id        TEXT NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    channel_id      TEXT NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    service_id      TEXT NOT NULL,              -- the alert's, so one service's messages keep their order
    kind            INTEGER NOT NULL CHECK (kind BETWEEN 0 AND 2),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    sent_at         REAL,
    failed_at       REAL,
    last_error      TEXT,
    message_id      INTEGER,                    -- the Telegram message of a sent card, for edits
    created_at      REAL NOT NULL
) STRICT;

-- The dispatcher: pending deliveries in the order they fall due.
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
-- An alert's deliveries on a channel (dispatchedAt, card edits, message lookups).
CREATE INDEX IF NOT EXISTS deliveries_alert ON deliveries (alert_id, channel_id);
-- Ordering: the oldest pending delivery of a service on a channel goes first.
CREATE INDEX IF NOT EXISTS deliveries_pending_order ON deliveries (channel_id, service_id, id)
    WHERE next_attempt_at IS NOT NULL;

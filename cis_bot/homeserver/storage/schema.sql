-- The embedded homeserver's schema (version 1). One SQLite file in WAL mode.
--
-- One global stream: events, account data and receipts take their positions from the same
-- counter, so a sync token is that position (plus the in-memory typing serial).

CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    password_hash TEXT,              -- NULL: cannot log in with a password (appservice users)
    admin INTEGER NOT NULL DEFAULT 0,
    appservice_id TEXT,              -- set when registered by (and exclusive to) an appservice
    displayname TEXT,
    avatar_url TEXT,
    created_ts INTEGER NOT NULL,
    deactivated INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS access_tokens (
    token TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    created_ts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS access_tokens_user ON access_tokens (user_id, device_id);

CREATE TABLE IF NOT EXISTS devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    display_name TEXT,
    last_seen_ts INTEGER,
    last_seen_ip TEXT,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE IF NOT EXISTS rooms (
    room_id TEXT PRIMARY KEY,
    room_version TEXT NOT NULL,
    creator TEXT NOT NULL,
    is_public INTEGER NOT NULL DEFAULT 0,
    created_ts INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS events (
    stream_ordering INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT,
    sender TEXT NOT NULL,
    depth INTEGER NOT NULL,
    origin_server_ts INTEGER NOT NULL,
    json TEXT NOT NULL,
    txn_id TEXT,
    txn_scope TEXT,
    prev_state TEXT,
    redacted_by TEXT
);
CREATE INDEX IF NOT EXISTS events_room ON events (room_id, stream_ordering);
CREATE UNIQUE INDEX IF NOT EXISTS events_txn ON events (room_id, txn_scope, txn_id)
    WHERE txn_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS current_state (
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, type, state_key)
);

-- Every membership event, for "what changed for this user since token X".
CREATE TABLE IF NOT EXISTS membership_history (
    stream_ordering INTEGER PRIMARY KEY,
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    membership TEXT NOT NULL,
    event_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS membership_history_user ON membership_history (user_id, stream_ordering);

-- The latest membership of each user in each room (the member state of current_state, indexed by
-- user).
CREATE TABLE IF NOT EXISTS current_membership (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    membership TEXT NOT NULL,
    event_id TEXT NOT NULL,
    stream_ordering INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id)
);
CREATE INDEX IF NOT EXISTS current_membership_room ON current_membership (room_id, membership);

CREATE TABLE IF NOT EXISTS room_aliases (
    alias TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    creator TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS room_aliases_room ON room_aliases (room_id);

CREATE TABLE IF NOT EXISTS filters (
    user_id TEXT NOT NULL,
    filter_id INTEGER NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (user_id, filter_id)
);

CREATE TABLE IF NOT EXISTS account_data (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,           -- '' for global account data
    type TEXT NOT NULL,
    content TEXT NOT NULL,
    stream_id INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, type)
);

CREATE TABLE IF NOT EXISTS receipts (
    room_id TEXT NOT NULL,
    receipt_type TEXT NOT NULL,
    user_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,         -- '' for unthreaded
    event_id TEXT NOT NULL,
    data TEXT NOT NULL,
    stream_id INTEGER NOT NULL,
    PRIMARY KEY (room_id, receipt_type, user_id, thread_id)
);
CREATE INDEX IF NOT EXISTS receipts_stream ON receipts (room_id, stream_id);

CREATE TABLE IF NOT EXISTS media (
    media_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    content_type TEXT NOT NULL,
    upload_name TEXT,
    size INTEGER NOT NULL,
    created_ts INTEGER NOT NULL
);

-- Responses of idempotent non-event requests (createRoom/join/... PUT with a txn id).
CREATE TABLE IF NOT EXISTS request_txns (
    scope TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_ts INTEGER NOT NULL,
    PRIMARY KEY (scope, path)
);

-- Appservice delivery: the highest stream position already sorted into transactions, and the
-- transactions not yet acknowledged with a 2xx (re-sent after a restart with the same id).
CREATE TABLE IF NOT EXISTS appservice_state (
    as_id TEXT PRIMARY KEY,
    last_stream INTEGER NOT NULL,
    next_txn_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS appservice_txns (
    as_id TEXT NOT NULL,
    txn_id INTEGER NOT NULL,
    event_streams TEXT NOT NULL,     -- JSON list of stream orderings, in order
    PRIMARY KEY (as_id, txn_id)
);

CREATE TABLE IF NOT EXISTS push_rules (
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    rule TEXT NOT NULL,              -- JSON of a user-defined rule, or {} for a default override
    enabled INTEGER,                 -- NULL: default
    actions TEXT,                    -- NULL: default
    priority INTEGER NOT NULL,
    PRIMARY KEY (user_id, kind, rule_id)
);

-- End-to-end encryption, stored and relayed (the server verifies no signature and decrypts
-- nothing). Positions in the global stream: device list changes, to-device messages,
-- cross-signing signature changes, presence.
CREATE TABLE IF NOT EXISTS e2e_device_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    key_json TEXT NOT NULL,          -- canonical JSON, compared to detect a change
    PRIMARY KEY (user_id, device_id)
);
CREATE TABLE IF NOT EXISTS e2e_one_time_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    added INTEGER PRIMARY KEY AUTOINCREMENT,  -- claimed oldest first, as Synapse does
    UNIQUE (user_id, device_id, algorithm, key_id)
);
CREATE TABLE IF NOT EXISTS e2e_fallback_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, device_id, algorithm)
);
CREATE TABLE IF NOT EXISTS e2e_cross_signing_keys (
    user_id TEXT NOT NULL,
    key_type TEXT NOT NULL,          -- master, self_signing, user_signing
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);
-- Signatures uploaded through /keys/signatures/upload, merged into the keys they sign.
CREATE TABLE IF NOT EXISTS e2e_cross_signing_signatures (
    user_id TEXT NOT NULL,           -- the signer
    key_id TEXT NOT NULL,            -- the signer's key, "ed25519:<public key>"
    target_user_id TEXT NOT NULL,
    target_device_id TEXT NOT NULL,  -- a device id, or a cross-signing key's public key
    signature TEXT NOT NULL,
    PRIMARY KEY (user_id, key_id, target_user_id, target_device_id)
);
-- "user_id's devices or cross-signing keys changed at stream_id", told to everyone who shares a
-- room with user_id, or to ``audience`` alone (a user's own user-signing key, and the keys of
-- others that user signed).
CREATE TABLE IF NOT EXISTS device_list_changes (
    stream_id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    audience TEXT
);
CREATE TABLE IF NOT EXISTS device_inbox (
    stream_id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    message_json TEXT NOT NULL       -- {"sender", "type", "content"}
);
CREATE INDEX IF NOT EXISTS device_inbox_device ON device_inbox (user_id, device_id, stream_id);
CREATE TABLE IF NOT EXISTS e2e_room_keys_versions (
    user_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    algorithm TEXT NOT NULL,
    auth_data TEXT NOT NULL,
    etag INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, version)
);
CREATE TABLE IF NOT EXISTS e2e_room_keys (
    user_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    room_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    first_message_index INTEGER NOT NULL,
    forwarded_count INTEGER NOT NULL,
    is_verified INTEGER NOT NULL,
    session_data TEXT NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id)
);
CREATE TABLE IF NOT EXISTS presence (
    user_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    status_msg TEXT,
    last_active_ts INTEGER NOT NULL,
    currently_active INTEGER NOT NULL,
    stream_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS presence_stream ON presence (stream_id);

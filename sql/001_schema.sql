-- picloud storage. Every primary key and unique constraint leads with app_id so the schema
-- can be distributed by app (each event's work stays on one shard).

-- Apps: the tenants. Postgres roles act on them through app_roles.
CREATE TABLE picloud.apps (
    app_id      uuid        NOT NULL DEFAULT gen_random_uuid(),
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  name        NOT NULL DEFAULT current_user,
    CONSTRAINT apps_pkey PRIMARY KEY (app_id),
    CONSTRAINT apps_name_length CHECK (length(name) BETWEEN 1 AND 200)
);

-- Who may do what in an app. 'admin' manages triggers, handlers and dead letters (the
-- AppManageTriggers and AppDeadLetterManage capabilities) and may enqueue; 'producer' may
-- only enqueue. Capabilities belong to the exact role named (act as it with SET ROLE).
CREATE TABLE picloud.app_roles (
    app_id      uuid        NOT NULL,
    role_name   name        NOT NULL,
    capability  text        NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    granted_by  name        NOT NULL DEFAULT current_user,
    CONSTRAINT app_roles_pkey PRIMARY KEY (app_id, role_name, capability),
    CONSTRAINT app_roles_capability_valid CHECK (capability IN ('admin', 'producer')),
    CONSTRAINT app_roles_app_fkey FOREIGN KEY (app_id)
        REFERENCES picloud.apps (app_id) ON DELETE CASCADE
);
CREATE INDEX app_roles_role_idx ON picloud.app_roles (role_name);

-- Handlers ("scripts"): what a trigger runs. kind 'sql' targets a function taking jsonb,
-- 'http' a URL the supervisor POSTs to, 'command' a command name defined in the supervisor's
-- own configuration (never a program path chosen by a tenant).
CREATE TABLE picloud.scripts (
    app_id                  uuid        NOT NULL,
    script_id               uuid        NOT NULL DEFAULT gen_random_uuid(),
    name                    text        NOT NULL,
    kind                    text        NOT NULL,
    target                  text        NOT NULL,
    sql_function            regprocedure,
    timeout_ms              integer     NOT NULL DEFAULT 30000,
    registered_by_principal name        NOT NULL DEFAULT current_user,
    created_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT scripts_pkey PRIMARY KEY (app_id, script_id),
    CONSTRAINT scripts_name_unique UNIQUE (app_id, name),
    CONSTRAINT scripts_name_length CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT scripts_kind_valid CHECK (kind IN ('sql', 'http', 'command')),
    CONSTRAINT scripts_target_length CHECK (length(target) BETWEEN 1 AND 2048),
    CONSTRAINT scripts_sql_function_iff_sql CHECK ((kind = 'sql') = (sql_function IS NOT NULL)),
    CONSTRAINT scripts_timeout_range CHECK (timeout_ms BETWEEN 1 AND 3600000),
    CONSTRAINT scripts_app_fkey FOREIGN KEY (app_id)
        REFERENCES picloud.apps (app_id) ON DELETE CASCADE
);
-- The lanes' first question (picloud._lock_lane): is there any handler of their kind at all.
CREATE INDEX scripts_kind_idx ON picloud.scripts (kind);

-- Handlers with a concurrency limit: at most max_concurrency of the handler's events run at
-- once, across every supervisor (picloud_set_handler_max_concurrency; see picloud_claim). A
-- table of its own rather than a column of scripts: app admins set it, while a handler's other
-- columns (who it runs as) are only ever written by the role that registered it.
CREATE TABLE picloud.handler_limits (
    app_id           uuid        NOT NULL,
    script_id        uuid        NOT NULL,
    max_concurrency  integer     NOT NULL,
    set_by           name        NOT NULL DEFAULT current_user,
    set_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT handler_limits_pkey PRIMARY KEY (app_id, script_id),
    CONSTRAINT handler_limits_range CHECK (max_concurrency BETWEEN 1 AND 100000),
    CONSTRAINT handler_limits_script_fkey FOREIGN KEY (app_id, script_id)
        REFERENCES picloud.scripts (app_id, script_id) ON DELETE CASCADE
);

-- Triggers: the parent row of every registered trigger; per-kind details hang off it 1:1.
CREATE TABLE picloud.triggers (
    app_id                  uuid        NOT NULL,
    trigger_id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    kind                    text        NOT NULL,
    script_id               uuid        NOT NULL,
    enabled                 boolean     NOT NULL DEFAULT true,
    registered_by_principal name        NOT NULL DEFAULT current_user,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    -- The priority of the events the trigger enqueues (picloud_set_trigger_priority); a
    -- producer's p_priority overrides it.
    priority                smallint    NOT NULL DEFAULT 0,
    CONSTRAINT triggers_pkey PRIMARY KEY (app_id, trigger_id),
    CONSTRAINT triggers_kind_valid CHECK (kind IN ('kv', 'dead_letter', 'cron')),
    CONSTRAINT triggers_app_fkey FOREIGN KEY (app_id)
        REFERENCES picloud.apps (app_id) ON DELETE CASCADE,
    -- A handler still used by a trigger cannot be dropped by accident.
    CONSTRAINT triggers_script_fkey FOREIGN KEY (app_id, script_id)
        REFERENCES picloud.scripts (app_id, script_id) ON DELETE RESTRICT
);
CREATE INDEX triggers_script_idx ON picloud.triggers (app_id, script_id);

-- KV trigger details. match_key encodes the pattern so that matching is an index probe:
-- '*' for every collection, '>prefix:' for 'prefix:*', '=name' for an exact name.
CREATE TABLE picloud.kv_trigger_details (
    app_id              uuid   NOT NULL,
    trigger_id          uuid   NOT NULL,
    collection_pattern  text   NOT NULL,
    match_key           text   NOT NULL,
    ops                 text[] NOT NULL,
    -- Ordered delivery (docs/sql-api.md, "Ordered delivery"): events take the ordering key
    -- collection || ':' || key; on_dead_letter says whether a dead-lettered event blocks it.
    ordered             boolean NOT NULL DEFAULT false,
    on_dead_letter      text   NOT NULL DEFAULT 'continue',
    CONSTRAINT kv_trigger_details_pkey PRIMARY KEY (app_id, trigger_id),
    CONSTRAINT kv_trigger_details_on_dead_letter_valid CHECK (on_dead_letter IN ('continue', 'block')),
    CONSTRAINT kv_trigger_details_ops_valid
        CHECK (cardinality(ops) >= 1 AND ops <@ ARRAY['insert', 'update', 'delete', 'set']::text[]),
    CONSTRAINT kv_trigger_details_trigger_fkey FOREIGN KEY (app_id, trigger_id)
        REFERENCES picloud.triggers (app_id, trigger_id) ON DELETE CASCADE
);
CREATE INDEX kv_trigger_details_match_idx ON picloud.kv_trigger_details (app_id, match_key);

-- Dead-letter trigger details: which dead letters fire it. NULL filters match anything.
CREATE TABLE picloud.dead_letter_trigger_details (
    app_id          uuid NOT NULL,
    trigger_id      uuid NOT NULL,
    source_filter   text,
    script_filter   uuid,
    CONSTRAINT dead_letter_trigger_details_pkey PRIMARY KEY (app_id, trigger_id),
    CONSTRAINT dead_letter_trigger_details_trigger_fkey FOREIGN KEY (app_id, trigger_id)
        REFERENCES picloud.triggers (app_id, trigger_id) ON DELETE CASCADE
);
CREATE INDEX dead_letter_trigger_details_match_idx
    ON picloud.dead_letter_trigger_details (app_id, source_filter);

-- What an outbox row's values must be, as domains: a known source, an op of 1 to 200
-- characters, a depth and an attempt count that are not negative. Domains and not a CHECK on
-- the table because Postgres prepares a table's CHECK expressions afresh for every INSERT or
-- UPDATE statement (about 2 µs, 3-4% of a one-event enqueue transaction, measured) and a
-- domain's once per session. That a row is claimed exactly when it has a lease is kept by the
-- claim functions, the only writers of those columns, and for every role subject to row-level
-- security by the outbox's restrictive policy (sql/090_privileges.sql).
CREATE DOMAIN picloud.event_source AS text
    CHECK (VALUE IN ('kv', 'cron', 'pubsub', 'queue', 'email', 'dead_letter', 'enqueue'));
CREATE DOMAIN picloud.event_op AS text CHECK (length(VALUE) BETWEEN 1 AND 200);
-- Depth and attempt count stay far below integer overflow (their settings allow at most 1,000),
-- so arithmetic on a stored value can never overflow, whoever wrote the row.
CREATE DOMAIN picloud.non_negative_int AS integer
    CONSTRAINT non_negative_int_check CHECK (VALUE BETWEEN 0 AND 1000000);
-- Due times and leases are finite and within a sane window, whoever wrote the row: an
-- infinite or absurd time would make every reader's arithmetic on it fail.
CREATE DOMAIN picloud.event_time AS timestamptz
    CONSTRAINT event_time_check
    CHECK (VALUE BETWEEN '1970-01-01 00:00:00+00' AND '2200-01-01 00:00:00+00');

-- Cron trigger details (sql/022_cron.sql): the schedule, and where it stands. next_fire_at is
-- the first tick not yet enqueued (NULL: the schedule has no further tick); the housekeeper
-- enqueues due ticks and moves next_fire_at past them in one transaction, on this row locked,
-- so each tick is enqueued exactly once.
CREATE TABLE picloud.cron_trigger_details (
    app_id              uuid        NOT NULL,
    trigger_id          uuid        NOT NULL,
    schedule            text        NOT NULL,
    timezone            text        NOT NULL,
    payload             jsonb       NOT NULL,
    catch_up            text        NOT NULL,
    catch_up_limit      integer     NOT NULL,
    skip_if_running     boolean     NOT NULL,
    next_fire_at        picloud.event_time,
    last_scheduled_for  timestamptz,
    last_fired_at       timestamptz,
    last_event_id       uuid,
    fired_count         bigint      NOT NULL DEFAULT 0,
    skipped_count       bigint      NOT NULL DEFAULT 0,
    CONSTRAINT cron_trigger_details_pkey PRIMARY KEY (app_id, trigger_id),
    CONSTRAINT cron_trigger_details_catch_up_valid CHECK (catch_up IN ('none', 'last', 'all')),
    CONSTRAINT cron_trigger_details_catch_up_limit_valid CHECK (catch_up_limit BETWEEN 1 AND 10000),
    CONSTRAINT cron_trigger_details_trigger_fkey FOREIGN KEY (app_id, trigger_id)
        REFERENCES picloud.triggers (app_id, trigger_id) ON DELETE CASCADE
);
-- The housekeeper's look for the next due tick.
CREATE INDEX cron_trigger_details_next_idx ON picloud.cron_trigger_details (next_fire_at);

-- Whether an outbox row waits for a claim, in a form the planner takes as opaque (Rust,
-- extension/src/api/outbox.rs); the indexes over waiting rows are declared with it.
CREATE FUNCTION picloud._unclaimed(claimed_by text) RETURNS boolean
IMMUTABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'picloud_unclaimed';

-- The outbox: the one async dispatch substrate. A row is claimed by a supervisor under a
-- lease, and either completed (deleted), rescheduled, or moved to dead_letters.
CREATE TABLE picloud.outbox (
    app_id            uuid        NOT NULL,
    -- Time-ordered (see extension/src/api/admission.rs): new rows append to the index.
    event_id          uuid        NOT NULL DEFAULT picloud._new_event_id(),
    source            picloud.event_source NOT NULL,
    op                picloud.event_op NOT NULL,
    trigger_id        uuid,
    script_id         uuid        NOT NULL,
    payload           jsonb       NOT NULL,
    depth             picloud.non_negative_int NOT NULL DEFAULT 0,
    attempt_count     picloud.non_negative_int NOT NULL DEFAULT 0,
    due_at            picloud.event_time NOT NULL DEFAULT now(),
    claimed_by        text,
    lease_expires_at  picloud.event_time,
    first_attempt_at  timestamptz,
    last_attempt_at   timestamptz,
    last_error        text,
    reply_to          text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- Ordered delivery: events of one (app_id, ordering_key) run one at a time in ordering_seq
    -- order (picloud.ordering_seq, taken at enqueue under the key's lock); ordering_blocks:
    -- once dead-lettered, the event blocks its key until the dead letter is resolved.
    ordering_key      text,
    ordering_seq      bigint,
    ordering_blocks   boolean,
    -- Lower runs first within the app (picloud_claim); events of one ordering key keep their
    -- key's order whatever their priorities.
    priority          smallint    NOT NULL DEFAULT 0,
    CONSTRAINT outbox_pkey PRIMARY KEY (app_id, event_id)
) WITH (
    -- A queue table churns: every row is inserted, updated once or twice and deleted.
    -- Vacuum it early and often. (No fillfactor reserve: claim and retry updates change
    -- indexed columns, so they are never HOT updates and free space would only be wasted.)
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
-- No foreign keys on the outbox: they would cost a lookup per enqueue and a lock on the
-- parent row; the enqueue functions check the handler instead, and deleting an app or a
-- handler removes its pending events explicitly.

-- Claim path: due, unclaimed rows in due order. The indexes over waiting rows say "unclaimed"
-- as picloud._unclaimed(claimed_by), which the planner does not see through: its estimate of
-- `claimed_by IS NULL` follows whatever the last ANALYZE of this churning table saw (see
-- extension/src/api/outbox.rs). Queries that should use them must say it the same way.
CREATE INDEX outbox_due_idx ON picloud.outbox (due_at) WHERE picloud._unclaimed(claimed_by);
-- Claim path and sql lanes, within one app: its unordered waiting rows of a priority other
-- than the default, by priority, then due time (claims and lanes merge them with the app's
-- rows of priority 0 from outbox_due_idx). Events of priority 0 never enter it, so they cost
-- no index write of their own.
CREATE INDEX outbox_app_priority_idx ON picloud.outbox (app_id, priority, due_at)
    WHERE priority <> 0 AND ordering_key IS NULL AND picloud._unclaimed(claimed_by);
-- Lease rescue: claimed rows by lease expiry.
CREATE INDEX outbox_lease_idx ON picloud.outbox (lease_expires_at) WHERE claimed_by IS NOT NULL;
-- Ordered delivery: an event of a key may run only when no earlier event of its key is in the
-- outbox, one probe of this index.
CREATE INDEX outbox_ordering_idx ON picloud.outbox (app_id, ordering_key, ordering_seq)
    WHERE ordering_key IS NOT NULL;
-- Order of the events of each key, across apps and sessions: nextval is taken while the
-- enqueueing transaction holds its key's lock, so per key it is commit order.
CREATE SEQUENCE picloud.ordering_seq;

-- Idempotency keys outlive their outbox row (which is deleted on completion), so a retry of
-- the same request after the event ran still enqueues nothing.
CREATE TABLE picloud.idempotency_keys (
    app_id           uuid        NOT NULL,
    idempotency_key  text        NOT NULL,
    event_id         uuid        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (app_id, idempotency_key),
    CONSTRAINT idempotency_keys_key_length CHECK (length(idempotency_key) BETWEEN 1 AND 512)
);
CREATE INDEX idempotency_keys_created_idx ON picloud.idempotency_keys (created_at);

CREATE TABLE picloud.dead_letters (
    app_id             uuid        NOT NULL,
    dead_letter_id     uuid        NOT NULL DEFAULT gen_random_uuid(),
    original_event_id  uuid        NOT NULL,
    source             text        NOT NULL,
    op                 text        NOT NULL,
    trigger_id         uuid,
    script_id          uuid,
    payload            jsonb       NOT NULL,
    depth              integer     NOT NULL DEFAULT 0,
    attempt_count      integer     NOT NULL,
    first_attempt_at   timestamptz,
    last_attempt_at    timestamptz,
    last_error         text        NOT NULL DEFAULT '',
    reply_to           text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    resolved_at        timestamptz,
    resolved_by        name,
    resolution         text,
    -- The ordered event's key and place (see the outbox), kept for a replay.
    ordering_key       text,
    ordering_seq       bigint,
    ordering_blocks    boolean,
    -- The event's priority, kept for a replay.
    priority           smallint    NOT NULL DEFAULT 0,
    CONSTRAINT dead_letters_pkey PRIMARY KEY (app_id, dead_letter_id),
    CONSTRAINT dead_letters_resolution_valid
        CHECK (resolution IN ('replayed', 'ignored', 'handled_by_script', 'handler_failed')),
    CONSTRAINT dead_letters_resolved_consistent CHECK ((resolved_at IS NULL) = (resolution IS NULL)),
    CONSTRAINT dead_letters_app_fkey FOREIGN KEY (app_id)
        REFERENCES picloud.apps (app_id) ON DELETE CASCADE
);
-- The per-app unresolved-count badge and the unresolved list.
CREATE INDEX dead_letters_unresolved_idx ON picloud.dead_letters (app_id, created_at)
    WHERE resolved_at IS NULL;
-- The full list, newest first.
CREATE INDEX dead_letters_app_created_idx ON picloud.dead_letters (app_id, created_at);
-- Retention GC by age (only resolved rows are ever collected).
CREATE INDEX dead_letters_gc_idx ON picloud.dead_letters (created_at) WHERE resolved_at IS NOT NULL;

-- Ordering keys held back by a dead letter (on_dead_letter 'block') until it is resolved: its
-- replay runs first, any other resolution releases the key. Read through picloud.blocked_keys.
CREATE TABLE picloud.key_blocks (
    app_id          uuid        NOT NULL,
    ordering_key    text        NOT NULL,
    dead_letter_id  uuid        NOT NULL,
    blocked_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT key_blocks_pkey PRIMARY KEY (app_id, ordering_key),
    -- No foreign key to the dead letter: one would cost every deleted dead letter a lookup here
    -- (the housekeeper deletes them by the million), and a resolved dead letter, the only kind
    -- it deletes, has released its key already.
    CONSTRAINT key_blocks_app_fkey FOREIGN KEY (app_id)
        REFERENCES picloud.apps (app_id) ON DELETE CASCADE
);
CREATE INDEX key_blocks_dead_letter_idx ON picloud.key_blocks (app_id, dead_letter_id);

-- Synchronous-call inboxes: a caller LISTENs on channel and waits until expires_at. The
-- owner's backend pid and start time tell whether the caller is still connected.
CREATE TABLE picloud.inboxes (
    app_id          uuid        NOT NULL,
    channel         text        NOT NULL,
    owner_role      name        NOT NULL DEFAULT current_user,
    owner_pid       integer     NOT NULL,
    owner_started   timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    CONSTRAINT inboxes_pkey PRIMARY KEY (app_id, channel),
    CONSTRAINT inboxes_app_fkey FOREIGN KEY (app_id)
        REFERENCES picloud.apps (app_id) ON DELETE CASCADE
);
CREATE INDEX inboxes_expires_idx ON picloud.inboxes (expires_at);

-- Forensics: a handler finished for a synchronous caller whose inbox was already gone.
CREATE TABLE picloud.abandoned_executions (
    app_id          uuid        NOT NULL,
    abandoned_id    uuid        NOT NULL DEFAULT gen_random_uuid(),
    event_id        uuid        NOT NULL,
    trigger_id      uuid,
    script_id       uuid,
    reply_to        text        NOT NULL,
    succeeded       boolean     NOT NULL,
    result          jsonb,
    error           text,
    reason          text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT abandoned_executions_pkey PRIMARY KEY (app_id, abandoned_id),
    CONSTRAINT abandoned_executions_app_fkey FOREIGN KEY (app_id)
        REFERENCES picloud.apps (app_id) ON DELETE CASCADE
);
CREATE INDEX abandoned_executions_app_idx ON picloud.abandoned_executions (app_id, created_at);
CREATE INDEX abandoned_executions_gc_idx ON picloud.abandoned_executions (created_at);

-- Outcome counts for picloud.stats: how many events completed, failed an attempt or were
-- dead-lettered, per app, source and minute. One row per writing backend (backend_pid), so
-- concurrent supervisor connections never wait on each other's counter rows. Unlogged: the
-- counts are for watching a running system, cost no WAL, and are empty after a crash.
-- The housekeeper drops minutes older than a day.
CREATE UNLOGGED TABLE picloud.event_counts (
    app_id         uuid        NOT NULL,
    source         text        NOT NULL,
    minute         timestamptz NOT NULL,
    backend_pid    integer     NOT NULL,
    completed      bigint      NOT NULL DEFAULT 0,
    failed         bigint      NOT NULL DEFAULT 0,
    dead_lettered  bigint      NOT NULL DEFAULT 0,
    CONSTRAINT event_counts_pkey PRIMARY KEY (app_id, source, minute, backend_pid)
);
CREATE INDEX event_counts_minute_idx ON picloud.event_counts (minute);

//! The benchmark database: the app, its scripts, the plain outboxes.

use crate::config::{pg_err, Cfg, Res};
use crate::db::{ensure_db, exec};
use crate::http::{start_http_server, NoopServer};
use postgres::Client;
use uuid::Uuid;

/// A tenant's producer role in the bench app (`Main::app`): E1 also enqueues as it, the way
/// applications do, through row-level security (a superuser passes it by).
pub const PRODUCER: &str = "bench_producer";

pub struct Main {
    pub app: Uuid,
    pub noop: Uuid,
    pub stamp: Uuid,
    pub http: Uuid,
    pub https: Uuid,
    pub server: NoopServer,
}

pub fn setup_main(cfg: &Cfg) -> Res<Main> {
    let mut c = ensure_db(cfg, &cfg.db)?;
    let server = start_http_server(&cfg.out)?;
    exec(
        &mut c,
        "DROP TABLE IF EXISTS bench_outbox, bench_plain_outbox, lat, lat_sent, lat_plain, lat_plain_sent;
         -- The plain outbox the targets compare with: the strongest a user would write by
         -- hand (a bigserial key, so every insert appends to the right of both indexes).
         CREATE TABLE bench_outbox (id bigserial PRIMARY KEY, payload jsonb NOT NULL,
                                    run_at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX bench_outbox_run_at_idx ON bench_outbox (run_at);
         -- The earlier baseline, kept as a second reference: a random UUID key (every insert
         -- lands on a random page of the primary key).
         CREATE TABLE bench_plain_outbox (
             id uuid DEFAULT gen_random_uuid() PRIMARY KEY,
             app_id uuid, source text, op text, payload jsonb,
             due_at timestamptz DEFAULT now(),
             created_at timestamptz DEFAULT now());
         -- The one partial index on due rows, the counterpart of picloud's outbox_due_idx
         -- (the plain table has no claim column, so its predicate holds for every row).
         CREATE INDEX bench_plain_outbox_due_idx ON bench_plain_outbox (due_at) WHERE due_at IS NOT NULL;
         CREATE TABLE lat (event_id uuid PRIMARY KEY, started timestamptz NOT NULL);
         CREATE TABLE lat_sent (event_id uuid PRIMARY KEY, sent timestamptz NOT NULL);
         -- L1's minimal LISTEN/NOTIFY worker on bench_outbox: its handler and its stamps.
         CREATE TABLE lat_plain (id bigint PRIMARY KEY, started timestamptz NOT NULL);
         CREATE TABLE lat_plain_sent (id bigint PRIMARY KEY, sent timestamptz NOT NULL);
         CREATE OR REPLACE FUNCTION stamp_plain(id bigint, payload jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO lat_plain(id, started) VALUES (id, clock_timestamp()) $$;
         CREATE OR REPLACE FUNCTION noop(e jsonb) RETURNS void LANGUAGE sql AS '';
         CREATE OR REPLACE FUNCTION stamp(e jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO lat(event_id, started) VALUES ((e->>'event_id')::uuid, clock_timestamp()) $$;
         DELETE FROM picloud.outbox;
         DELETE FROM picloud.apps WHERE name = 'bench';",
    )?;
    let app: Uuid = c
        .query_one("SELECT picloud.picloud_create_app('bench')", &[])
        .map_err(pg_err("create app"))?
        .get(0);
    let script = |c: &mut Client, name: &str, kind: &str, target: &str| -> Res<Uuid> {
        Ok(c.query_one(
            "SELECT picloud.picloud_create_script($1, $2, $3, $4)",
            &[&app, &name, &kind, &target],
        )
        .map_err(pg_err(&format!("create script {name}")))?
        .get(0))
    };
    let noop = script(&mut c, "noop", "sql", "noop")?;
    let stamp = script(&mut c, "stamp", "sql", "stamp")?;
    let http = script(
        &mut c,
        "http-noop",
        "http",
        &format!("http://127.0.0.1:{}/hook", server.port),
    )?;
    let https = script(
        &mut c,
        "https-noop",
        "http",
        &format!("https://127.0.0.1:{}/hook", server.tls_port),
    )?;
    exec(
        &mut c,
        &format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{PRODUCER}') THEN
                     CREATE ROLE {PRODUCER} LOGIN;
                 END IF;
             END $$;
             GRANT picloud_user TO {PRODUCER};"
        ),
    )?;
    c.execute(
        "SELECT picloud.picloud_grant_app_role($1, $2, 'producer')",
        &[&app, &PRODUCER],
    )
    .map_err(pg_err("grant the producer role"))?;
    Ok(Main {
        app,
        noop,
        stamp,
        http,
        https,
        server,
    })
}

pub fn reset_queues(c: &mut Client) -> Res<()> {
    exec(
        c,
        "TRUNCATE picloud.outbox; TRUNCATE bench_plain_outbox; TRUNCATE bench_outbox",
    )
}

/// Enqueues `n` events for `script` with picloud_enqueue_bulk, 10,000 per statement.
pub fn bulk_enqueue(c: &mut Client, app: Uuid, script: Uuid, n: i64) -> Res<()> {
    let mut done = 0i64;
    while done < n {
        let k = (n - done).min(10_000);
        c.execute(
            "SELECT count(*) FROM picloud.picloud_enqueue_bulk($1, 'queue', 'x',
                 ARRAY(SELECT jsonb_build_object('i', g) FROM generate_series($2::bigint + 1, $2::bigint + $3::bigint) g), $4)",
            &[&app, &done, &k, &script],
        )
        .map_err(pg_err("enqueue_bulk"))?;
        done += k;
    }
    Ok(())
}

pub fn plain_fill(c: &mut Client, app: Uuid, n: i64) -> Res<()> {
    c.execute(
        "INSERT INTO bench_plain_outbox (app_id, source, op, payload)
         SELECT $1, 'queue', 'x', jsonb_build_object('i', g) FROM generate_series(1, $2::bigint) g",
        &[&app, &n],
    )
    .map_err(pg_err("fill plain outbox"))?;
    Ok(())
}

/// Fills the bigserial plain outbox with `n` rows of the same payloads.
pub fn bigserial_fill(c: &mut Client, n: i64) -> Res<()> {
    c.execute(
        "INSERT INTO bench_outbox (payload)
         SELECT jsonb_build_object('i', g) FROM generate_series(1, $1::bigint) g",
        &[&n],
    )
    .map_err(pg_err("fill bigserial outbox"))?;
    Ok(())
}

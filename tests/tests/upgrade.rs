//! Upgrades: a database created at each earlier released version, with data in every table,
//! moved on with ALTER EXTENSION picloud UPDATE, keeps every row, ends with exactly the schema
//! of a fresh install, and works: a real supervisor runs what was pending before the upgrade
//! and what is enqueued after it.

use picloud_tests::*;
use std::collections::BTreeSet;
use std::time::Duration;
use uuid::Uuid;

/// The releases before this one, oldest first; each one's install script is
/// sql/upgrades/picloud--VERSION.sql, and each has an upgrade script to the next.
const RELEASED: [&str; 3] = ["0.1.0", "0.2.0", "0.3.0"];
const CURRENT: &str = env!("CARGO_PKG_VERSION");

/// Tables of the current schema that a released version does not have yet.
fn added_since(version: &str) -> &'static [&'static str] {
    match version {
        "0.1.0" => &[
            "event_counts",
            "handler_secrets",
            "cron_trigger_details",
            "key_blocks",
            "handler_limits",
        ],
        _ => &[
            "handler_secrets",
            "cron_trigger_details",
            "key_blocks",
            "handler_limits",
        ],
    }
}

fn tables_of(version: &str) -> impl Iterator<Item = &'static str> {
    let added = added_since(version);
    TABLES.into_iter().filter(move |t| !added.contains(t))
}

fn catalog(c: &mut postgres::Client) -> BTreeSet<String> {
    let sql = include_str!("../sql/catalog_fingerprint.sql");
    c.query(sql, &[])
        .expect("catalog fingerprint")
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            )
        })
        .collect()
}

/// Every row of every table the version has, as text, per table: the columns that version's
/// tables have (in the database as it is now), so that columns an upgrade adds, with their
/// defaults, do not count as changes.
fn contents(c: &mut postgres::Client, version: &str) -> Vec<(String, i64, String)> {
    tables_of(version)
        .map(|t| {
            let columns: Vec<String> = c
                .query(
                    "SELECT quote_ident(attname) FROM pg_attribute
                     WHERE attrelid = ('picloud.' || $1)::regclass AND attnum > 0 AND NOT attisdropped
                       AND attname <> ALL ($2)
                     ORDER BY attnum",
                    &[&t, &ADDED_IN_0_4_0.as_slice()],
                )
                .expect("columns")
                .iter()
                .map(|r| r.get(0))
                .collect();
            let row = format!("row({})::text", columns.join(", "));
            let r = c
                .query_one(
                    &format!(
                        "SELECT count(*), md5(coalesce(string_agg({row}, '|' ORDER BY {row}), '')) FROM picloud.{t} x"
                    ),
                    &[],
                )
                .expect("table contents");
            (t.to_string(), r.get(0), r.get(1))
        })
        .collect()
}

/// Columns the upgrade to 0.4.0 adds to existing tables (ordered delivery, priorities), with
/// their defaults; checked apart after the upgrade.
const ADDED_IN_0_4_0: [&str; 6] = [
    "ordering_key",
    "ordering_seq",
    "ordering_blocks",
    "ordered",
    "on_dead_letter",
    "priority",
];

fn version(c: &mut postgres::Client) -> String {
    c.query_one(
        "SELECT extversion FROM pg_extension WHERE extname = 'picloud'",
        &[],
    )
    .expect("extversion")
    .get(0)
}

fn difference(a: &BTreeSet<String>, b: &BTreeSet<String>) -> String {
    let mut out = String::new();
    for line in a.difference(b).take(20) {
        out.push_str(&format!(
            "\n  only upgraded: {}",
            &line[..line.len().min(300)]
        ));
    }
    for line in b.difference(a).take(20) {
        out.push_str(&format!(
            "\n  only fresh:    {}",
            &line[..line.len().min(300)]
        ));
    }
    out
}

#[test]
fn upgrade_from_0_1_0_keeps_every_row_and_matches_a_fresh_install() {
    upgrade_from("0.1.0");
}

#[test]
fn upgrade_from_0_2_0_keeps_every_row_and_matches_a_fresh_install() {
    upgrade_from("0.2.0");
}

#[test]
fn upgrade_from_0_3_0_keeps_every_row_and_matches_a_fresh_install() {
    upgrade_from("0.3.0");
}

fn upgrade_from(previous: &str) {
    assert!(
        !RELEASED.contains(&CURRENT),
        "add the released version to RELEASED and freeze its install script when releasing"
    );
    let tag = previous.replace('.', "_");
    let (db, mut c) = fresh_db_at_version(&format!("upgrade_{tag}"), previous);
    assert_eq!(version(&mut c), previous);
    let previous_catalog = catalog(&mut c);

    // Data in every table, made through the previous version's API.
    let (app, script) = ledger_app(&mut c);
    let role = format!("upgrade_producer_{tag}_{}", std::process::id());
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN"
    ))
    .expect("role");
    c.execute(
        "SELECT picloud_grant_app_role($1, $2, 'producer')",
        &[&app, &role],
    )
    .expect("grant");
    c.execute(
        "SELECT picloud_create_kv_trigger($1, 'orders:*', $2, ARRAY['insert', 'update'])",
        &[&app, &script],
    )
    .expect("kv trigger");
    c.execute(
        "SELECT picloud_create_dead_letter_trigger($1, $2, 'queue')",
        &[&app, &script],
    )
    .expect("dead letter trigger");
    let emitted: i32 = c
        .query_one(
            "SELECT picloud_emit_kv($1, 'orders:eu', 'insert', '1', '{\"id\": 1}')",
            &[&app],
        )
        .expect("emit")
        .get(0);
    assert_eq!(emitted, 1);
    for i in 0..5 {
        c.execute(
            "SELECT picloud_enqueue($1, 'queue', 'op', jsonb_build_object('i', $2::int), $3, p_idempotency_key => 'k' || $2::text)",
            &[&app, &i, &script],
        )
        .expect("enqueue");
    }
    c.execute(
        "SELECT picloud_enqueue($1, 'queue', 'later', '{}', $2, p_run_at => now() + interval '1 day')",
        &[&app, &script],
    )
    .expect("delayed");
    // Two events dead-lettered (one resolved), one held under a lease.
    c.batch_execute("SET picloud.retry_max_attempts = 1")
        .expect("one attempt");
    let claimed: Vec<(Uuid, Uuid)> = c
        .query(
            "SELECT app_id, event_id FROM picloud_claim('before-upgrade', 3, 600000)",
            &[],
        )
        .expect("claim")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(claimed.len(), 3);
    let mut dead = Vec::new();
    for (a, e) in &claimed[..2] {
        let id: Uuid = c
            .query_one(
                "SELECT dead_letter_id FROM picloud_fail($1, $2, 'before-upgrade', 'failed before the upgrade')",
                &[a, e],
            )
            .expect("fail")
            .get(0);
        dead.push(id);
    }
    c.execute(
        "SELECT picloud_resolve_dead_letter($1, $2, 'ignored')",
        &[&app, &dead[0]],
    )
    .expect("resolve");
    c.execute("SELECT picloud_open_inbox($1, '1 hour')", &[&app])
        .expect("inbox");
    c.execute(
        "SELECT picloud_record_abandoned_execution($1, $2, 'gone', true, '{}', NULL, 'caller gone')",
        &[&app, &Uuid::new_v4()],
    )
    .expect("abandoned");
    c.batch_execute("RESET picloud.retry_max_attempts")
        .expect("reset");
    let before = contents(&mut c, previous);
    for (table, rows, _) in &before {
        assert!(*rows > 0, "table {table} has data before the upgrade");
    }

    c.batch_execute("ALTER EXTENSION picloud UPDATE")
        .expect("ALTER EXTENSION picloud UPDATE");
    assert_eq!(version(&mut c), CURRENT);
    assert_eq!(
        contents(&mut c, previous),
        before,
        "no row lost or changed by the upgrade"
    );
    // What the upgrade added holds its defaults: every event and trigger from before is
    // unordered and of priority 0, no key is blocked and no handler limited.
    for (what, sql) in [
        ("outbox", "SELECT count(*) FROM picloud.outbox WHERE ordering_key IS NOT NULL OR ordering_seq IS NOT NULL OR ordering_blocks IS NOT NULL"),
        ("dead letters", "SELECT count(*) FROM picloud.dead_letters WHERE ordering_key IS NOT NULL OR ordering_seq IS NOT NULL OR ordering_blocks IS NOT NULL"),
        ("kv triggers", "SELECT count(*) FROM picloud.kv_trigger_details WHERE ordered OR on_dead_letter <> 'continue'"),
        ("blocked keys", "SELECT count(*) FROM picloud.key_blocks"),
        ("priorities", "SELECT (SELECT count(*) FROM picloud.outbox WHERE priority <> 0)
                              + (SELECT count(*) FROM picloud.dead_letters WHERE priority <> 0)
                              + (SELECT count(*) FROM picloud.triggers WHERE priority <> 0)"),
        ("handler limits", "SELECT count(*) FROM picloud.handler_limits"),
    ] {
        assert_eq!(count(&mut c, sql), 0, "{what} after the upgrade");
    }

    // The upgraded schema is the fresh install's, object for object (definitions, columns,
    // constraints, indexes, views, policies, privileges, extension membership).
    let (_fresh, mut f) = fresh_db(&format!("upgrade_reference_{tag}"));
    let fresh_catalog = catalog(&mut f);
    let upgraded_catalog = catalog(&mut c);
    assert!(
        upgraded_catalog == fresh_catalog,
        "upgraded schema differs from a fresh install:{}",
        difference(&upgraded_catalog, &fresh_catalog)
    );
    // ... and the comparison can tell the versions apart.
    assert_ne!(previous_catalog, fresh_catalog);

    // Everything still works. The held event comes back; a real supervisor runs everything
    // that was due before the upgrade, and the new runbook replays the unresolved dead letter.
    let (held_app, held_event) = claimed[2];
    c.execute(
        "SELECT picloud_release($1, $2, 'before-upgrade')",
        &[&held_app, &held_event],
    )
    .expect("release");
    let due_before = count(
        &mut c,
        "SELECT count(*) FROM picloud.outbox WHERE due_at <= now()",
    );
    // At least the kv event, the enqueued ones not dead-lettered and the released one.
    assert!(due_before >= 4, "due before: {due_before}");
    // The current enqueue path, as the owner and as a producer.
    c.execute(
        "SELECT picloud_enqueue($1, 'queue', 'after-upgrade', '{}', $2)",
        &[&app, &script],
    )
    .expect("enqueue after the upgrade");
    c.batch_execute(&format!("SET ROLE {role}"))
        .expect("set role");
    c.execute(
        "SELECT picloud_enqueue($1, 'queue', 'after-upgrade', '{}', $2)",
        &[&app, &script],
    )
    .expect("enqueue as a producer after the upgrade");
    c.batch_execute("RESET ROLE").expect("reset role");
    let due: BTreeSet<Uuid> = c
        .query(
            "SELECT event_id FROM picloud.outbox WHERE due_at <= now()",
            &[],
        )
        .expect("due")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        due.len() as i64,
        due_before + 2,
        "two enqueued after the upgrade"
    );
    let replay: Uuid = c
        .query_one(
            "SELECT replay_event_id FROM picloud_resolve_dead_letters($1, 'replayed', p_error_contains => 'before the upgrade')",
            &[&app],
        )
        .expect("replay")
        .get::<_, Option<Uuid>>(0)
        .expect("replay id");
    let sup = Supervisor::start(&db, &["--poll-interval-ms", "200"]);
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut c,
            "SELECT count(*) FROM picloud.outbox WHERE due_at <= now()"
        ) == 0),
        "pending events did not run; log: {}",
        sup.log()
    );
    let ran: BTreeSet<Uuid> = c
        .query("SELECT event_id FROM ledger", &[])
        .expect("ledger")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expected = due.clone();
    expected.insert(replay);
    assert_eq!(ran, expected);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.outbox"),
        1,
        "the delayed event waits"
    );
    let completed = count(
        &mut c,
        "SELECT coalesce(sum(completed), 0)::bigint FROM picloud.stats",
    );
    assert_eq!(
        completed,
        due.len() as i64 + 1,
        "every due event and the replay"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT coalesce(sum(unresolved), 0)::bigint FROM picloud.dead_letter_summary"
        ),
        0
    );
    drop(sup);
    c.batch_execute(&format!("DROP OWNED BY {role} CASCADE; DROP ROLE {role}"))
        .expect("drop role");
}

#[test]
fn every_upgrade_script_is_installed_beside_the_release_scripts() {
    // CREATE EXTENSION ... VERSION and ALTER EXTENSION ... UPDATE find their scripts only if
    // scripts/install-extension.sh copied them; the available versions show it.
    let mut c = connect("postgres");
    let versions: Vec<String> = c
        .query(
            "SELECT version FROM pg_available_extension_versions WHERE name = 'picloud' ORDER BY version",
            &[],
        )
        .expect("versions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expected: Vec<String> = RELEASED.iter().map(|v| v.to_string()).collect();
    expected.push(CURRENT.to_string());
    assert_eq!(versions, expected);
    // Each release updates to the current version through every release after it.
    for (i, from) in RELEASED.iter().enumerate() {
        let path: Vec<String> = c
            .query(
                "SELECT path FROM pg_extension_update_paths('picloud') WHERE source = $1 AND target = $2",
                &[from, &CURRENT],
            )
            .expect("update paths")
            .iter()
            .filter_map(|r| r.get::<_, Option<String>>(0))
            .collect();
        assert_eq!(path, vec![expected[i..].join("--")], "from {from}");
    }
}

/// Between installing a new version and ALTER EXTENSION UPDATE, the current supervisor runs a
/// database still at the previous release: without sql lanes (it says so and why), every event
/// through claims, each exactly once.
#[test]
fn current_supervisor_runs_a_database_not_yet_updated() {
    for previous in &RELEASED[1..] {
        runs_a_database_at(previous);
    }
}

fn runs_a_database_at(previous: &str) {
    let tag = format!("not_updated_{}", previous.replace('.', "_"));
    let (db, mut c) = fresh_db_at_version(&tag, previous);
    assert_eq!(version(&mut c), previous);
    let (app, script) = ledger_app(&mut c);
    c.execute(
        "SELECT count(*) FROM generate_series(1, 50) g,
             LATERAL picloud_enqueue($1, 'queue', 'op', jsonb_build_object('i', g), $2) e",
        &[&app, &script],
    )
    .expect("enqueue at the previous release");
    let sup = Supervisor::start(&db, &["--poll-interval-ms", "200"]);
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut c,
            "SELECT count(*) FROM picloud.outbox"
        ) == 0),
        "events did not run; log: {}",
        sup.log()
    );
    assert_eq!(
        count(&mut c, "SELECT count(DISTINCT event_id) FROM ledger"),
        50
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM ledger"),
        50,
        "once each"
    );
    if previous == "0.2.0" {
        assert!(
            sup.log().contains("has no sql lanes"),
            "the supervisor says why it runs without lanes; log: {}",
            sup.log()
        );
    }
    assert_eq!(version(&mut c), previous, "nothing updated the schema");
}

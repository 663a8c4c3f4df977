//! Security, direct table access: what row-level security and table privileges let each role
//! see and change in picloud's tables.
//!
//! The cast: tenant_a administers app A, tenant_b administers app B, `admin` is a member of
//! picloud_admin, `producer` may only enqueue into app A, and `nobody` is a LOGIN role with no
//! picloud rights at all. Roles are cluster-wide, so every test creates its own, named uniquely
//! per run, and drops them (with what they own in the test database) when it ends.

#[path = "security/harness.rs"]
mod harness;

use harness::*;
use picloud_tests::*;
use uuid::Uuid;

/// Seeds one row per table (two triggers) for app A and app B.
fn seed_tables(t: &mut Tenancy) {
    let (a, b, ta, tb) = (t.app_a, t.app_b, t.tenant_a.clone(), t.tenant_b.clone());
    // Each app's handler and triggers are registered by its tenant.
    for (app, owner) in [(a, &ta), (b, &tb)] {
        t.su.batch_execute(&format!(
            "WITH s AS (INSERT INTO picloud.scripts (app_id, name, kind, target, registered_by_principal)
                        VALUES ('{app}', 'seed', 'command', 'noop', '{owner}') RETURNING script_id),
                  k AS (INSERT INTO picloud.triggers (app_id, kind, script_id, registered_by_principal)
                        SELECT '{app}', 'kv', script_id, '{owner}' FROM s RETURNING trigger_id),
                  d AS (INSERT INTO picloud.triggers (app_id, kind, script_id, registered_by_principal)
                        SELECT '{app}', 'dead_letter', script_id, '{owner}' FROM s RETURNING trigger_id),
                  c AS (INSERT INTO picloud.triggers (app_id, kind, script_id, registered_by_principal)
                        SELECT '{app}', 'cron', script_id, '{owner}' FROM s RETURNING trigger_id),
                  cd AS (INSERT INTO picloud.cron_trigger_details (app_id, trigger_id, schedule, timezone, payload,
                                                                  catch_up, catch_up_limit, skip_if_running, next_fire_at)
                         SELECT '{app}', trigger_id, '@yearly', 'UTC', '{{}}', 'last', 1, false, now() + interval '1 day' FROM c),
                  kd AS (INSERT INTO picloud.kv_trigger_details (app_id, trigger_id, collection_pattern, match_key, ops)
                         SELECT '{app}', trigger_id, 'seed', '=seed', ARRAY['set'] FROM k),
                  dd AS (INSERT INTO picloud.dead_letter_trigger_details (app_id, trigger_id) SELECT '{app}', trigger_id FROM d),
                  hl AS (INSERT INTO picloud.handler_limits (app_id, script_id, max_concurrency) SELECT '{app}', script_id, 5 FROM s)
             INSERT INTO picloud.outbox (app_id, source, op, script_id, payload) SELECT '{app}', 'queue', 'seed', script_id, '{{}}' FROM s;
             INSERT INTO picloud.idempotency_keys (app_id, idempotency_key, event_id) VALUES ('{app}', 'seed', gen_random_uuid());
             WITH dl AS (INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, payload, attempt_count,
                                                           ordering_key, ordering_seq, ordering_blocks)
                         VALUES ('{app}', gen_random_uuid(), 'queue', 'seed', '{{}}', 1, 'seed', 1, true)
                         RETURNING app_id, dead_letter_id)
             INSERT INTO picloud.key_blocks (app_id, ordering_key, dead_letter_id) SELECT app_id, 'seed', dead_letter_id FROM dl;
             INSERT INTO picloud.inboxes (app_id, channel, owner_role, owner_pid, owner_started, expires_at)
               VALUES ('{app}', 'seed', '{owner}', 0, now(), now() + interval '1 hour');
             INSERT INTO picloud.abandoned_executions (app_id, event_id, reply_to, succeeded, reason)
               VALUES ('{app}', gen_random_uuid(), 'seed', true, 'seed');
             INSERT INTO picloud.event_counts (app_id, source, minute, backend_pid, completed)
               VALUES ('{app}', 'queue', date_trunc('minute', now()), 0, 1);"
        ))
        .expect("seed");
    }
    // Another caller's inbox in app A: inboxes belong to their caller, not to the app's admins.
    let producer = t.producer_role.clone();
    t.su.batch_execute(&format!(
        "INSERT INTO picloud.inboxes (app_id, channel, owner_role, owner_pid, owner_started, expires_at)
         VALUES ('{a}', 'producers', '{producer}', 0, now(), now() + interval '1 hour')"
    ))
    .unwrap();
}

// What a tenant role (a member of picloud_user) may write straight into picloud's tables: only
// what the API functions write with the caller's rights. Row-level security then narrows each
// write to the tenant's own apps; everything else is refused with 42501 "permission denied for
// table ..." before a row is looked at, the tenant's own rows included.

fn tenant_may_insert(table: &str) -> bool {
    matches!(
        table,
        "scripts"
            | "triggers"
            | "kv_trigger_details"
            | "dead_letter_trigger_details"
            | "cron_trigger_details"
            | "inboxes"
            | "outbox"
            | "idempotency_keys"
            | "handler_limits"
    )
}

fn tenant_may_delete(table: &str) -> bool {
    matches!(
        table,
        "scripts"
            | "triggers"
            | "kv_trigger_details"
            | "dead_letter_trigger_details"
            | "cron_trigger_details"
            | "inboxes"
            // Resolving a dead letter releases the ordering key it blocked.
            | "key_blocks"
            | "handler_limits"
    )
}

/// The columns a tenant may UPDATE (comma-separated, sorted), if any.
fn tenant_update_columns(table: &str) -> Option<&'static str> {
    match table {
        "triggers" => Some("enabled,priority,updated_at"),
        "handler_limits" => Some("max_concurrency,set_at,set_by"),
        "cron_trigger_details" => {
            Some("catch_up,catch_up_limit,next_fire_at,payload,schedule,skip_if_running,timezone")
        }
        "dead_letters" => Some("resolution,resolved_at,resolved_by"),
        _ => None,
    }
}

/// An UPDATE that sets every column a tenant may update to itself (so changes nothing).
fn noop_update_of_tenant_columns(table: &str) -> Option<String> {
    tenant_update_columns(table).map(|cols| {
        format!(
            "UPDATE picloud.{table} SET {}",
            cols.split(',')
                .map(|c| format!("{c} = {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// SELECT, UPDATE, DELETE and INSERT straight on every picloud table: tenant_a sees only app A's
/// rows; it writes only where it holds the privilege and only app A's rows there; every other
/// write is refused (42501) and changes nothing, in app B or in app A.
#[test]
fn tables_show_and_touch_only_the_roles_own_apps() {
    let mut t = Tenancy::new("sectables");
    seed_tables(&mut t);
    let (a, b, ta, tb) = (t.app_a, t.app_b, t.tenant_a.clone(), t.tenant_b.clone());
    let b_before = fingerprint(&mut t.su, &format!("x.app_id = '{b}'"));
    assert!(
        b_before.iter().all(|(_, n, _)| *n >= 1),
        "every table has rows of app B: {b_before:?}"
    );
    let mut failures = Vec::new();

    // The catalog grants tenant_a (through picloud_user) exactly the writes listed above.
    for table in TABLES {
        let got = text(
            &mut t.su,
            &format!(
                "SELECT concat_ws(' ',
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'SELECT') THEN 'SELECT' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'INSERT') THEN 'INSERT' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'UPDATE') THEN 'UPDATE' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'DELETE') THEN 'DELETE' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'TRUNCATE') THEN 'TRUNCATE' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'REFERENCES') THEN 'REFERENCES' END,
                        CASE WHEN has_table_privilege('{ta}', 'picloud.{table}', 'TRIGGER') THEN 'TRIGGER' END,
                        (SELECT 'INSERT(' || string_agg(attname::text, ',' ORDER BY attname) || ')'
                         FROM pg_attribute
                         WHERE attrelid = 'picloud.{table}'::regclass AND attnum > 0 AND NOT attisdropped
                           AND NOT has_table_privilege('{ta}', 'picloud.{table}', 'INSERT')
                           AND has_column_privilege('{ta}', attrelid, attnum, 'INSERT')),
                        (SELECT 'UPDATE(' || string_agg(attname::text, ',' ORDER BY attname) || ')'
                         FROM pg_attribute
                         WHERE attrelid = 'picloud.{table}'::regclass AND attnum > 0 AND NOT attisdropped
                           AND has_column_privilege('{ta}', attrelid, attnum, 'UPDATE')))"
            ),
        )
        .unwrap_or_default();
        let mut want = vec!["SELECT".to_string()];
        if tenant_may_insert(table) && table != "outbox" {
            want.push("INSERT".to_string());
        }
        if tenant_may_delete(table) {
            want.push("DELETE".to_string());
        }
        if table == "outbox" {
            // Only the columns an enqueue writes: never a claim, a lease or an attempt count.
            want.push(
                "INSERT(app_id,depth,due_at,event_id,op,ordering_blocks,ordering_key,ordering_seq,payload,priority,reply_to,script_id,source,trigger_id)"
                    .to_string(),
            );
        }
        if let Some(cols) = tenant_update_columns(table) {
            want.push(format!("UPDATE({cols})"));
        }
        let want = want.join(" ");
        if got != want {
            failures.push(format!(
                "privileges of tenant_a on {table}: {got:?}, expected {want:?}"
            ));
        }
    }

    // What tenant_a may see of each table, as the superuser counts it.
    let visible = |t: &mut Tenancy, table: &str| -> i64 {
        let filter = match table {
            "app_roles" => format!("role_name = '{ta}'"),
            "inboxes" => format!("app_id = '{a}' AND owner_role = '{ta}'"),
            _ => format!("app_id = '{a}'"),
        };
        count(
            &mut t.su,
            &format!("SELECT count(*) FROM picloud.{table} WHERE {filter}"),
        )
    };

    let a_before = fingerprint(&mut t.su, &format!("x.app_id = '{a}'"));
    for table in TABLES {
        let want = visible(&mut t, table);
        let all = count(&mut t.a, &format!("SELECT count(*) FROM picloud.{table}"));
        let of_b = count(
            &mut t.a,
            &format!("SELECT count(*) FROM picloud.{table} WHERE app_id = '{b}'"),
        );
        let not_a = count(
            &mut t.a,
            &format!("SELECT count(*) FROM picloud.{table} WHERE app_id <> '{a}'"),
        );
        if all != want || of_b != 0 || not_a != 0 || want == 0 {
            failures.push(format!("SELECT {table}: sees {all} rows (expected {want}), {of_b} of app B, {not_a} not of app A"));
        }
        // No tenant may UPDATE app_id anywhere: B's rows, its own rows, or moving its own rows
        // into app B are all refused outright.
        for sql in [
            format!("UPDATE picloud.{table} SET app_id = app_id WHERE app_id = '{b}'"),
            format!("UPDATE picloud.{table} SET app_id = app_id"),
            format!("UPDATE picloud.{table} SET app_id = '{b}' WHERE app_id = '{a}'"),
        ] {
            let got = affected(&mut t.a, &sql);
            if !no_privilege(&got, table) {
                failures.push(format!(
                    "{sql}: {got:?}, expected 42501 permission denied for table {table}"
                ));
            }
        }
        // Where some columns may be updated: B's rows are out of reach, A's rows are updated.
        if let Some(update) = noop_update_of_tenant_columns(table) {
            match affected(&mut t.a, &format!("{update} WHERE app_id = '{b}'")) {
                Ok(0) => {}
                other => failures.push(format!(
                    "{update} of app B's rows: {other:?}, expected 0 rows"
                )),
            }
            match affected(&mut t.a, &update) {
                Ok(n) if n == want as u64 => {}
                other => failures.push(format!(
                    "{update} (all rows): {other:?}, expected {want} rows (app A's)"
                )),
            }
        }
        // DELETE of B's rows reaches nothing where tenants may delete, and is refused elsewhere.
        let sql = format!("DELETE FROM picloud.{table} WHERE app_id = '{b}'");
        let got = affected(&mut t.a, &sql);
        let ok = if tenant_may_delete(table) {
            got == Ok(0)
        } else {
            no_privilege(&got, table)
        };
        if !ok {
            failures.push(format!(
                "{sql}: {got:?}, expected {}",
                if tenant_may_delete(table) {
                    "0 rows".to_string()
                } else {
                    format!("42501 permission denied for table {table}")
                }
            ));
        }
    }
    let changed = changed_tables(
        &a_before,
        &fingerprint(&mut t.su, &format!("x.app_id = '{a}'")),
    );
    if !changed.is_empty() {
        failures.push(format!(
            "tenant_a's UPDATEs and refused writes changed app A's rows: {changed:?}"
        ));
    }

    // INSERT: rows for app A where tenant_a may insert (refused for lack of privilege
    // elsewhere); anything for app B is refused (42501), by the policies where the privilege
    // exists.
    let script_a = id(
        &mut t.su,
        &format!("SELECT script_id FROM picloud.scripts WHERE app_id = '{a}'"),
    );
    let script_b = id(
        &mut t.su,
        &format!("SELECT script_id FROM picloud.scripts WHERE app_id = '{b}'"),
    );
    let trig_b = id(
        &mut t.su,
        &format!(
            "SELECT trigger_id FROM picloud.triggers WHERE app_id = '{b}' AND kind = 'dead_letter'"
        ),
    );
    let (new_t1, new_t2, new_t3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let inserts: Vec<(&str, String, String)> = vec![
        (
            "apps",
            format!("INSERT INTO picloud.apps (app_id, name) VALUES ('{}', 'mine')", Uuid::new_v4()),
            format!("INSERT INTO picloud.apps (app_id, name) VALUES ('{}', 'B2')", Uuid::new_v4()),
        ),
        (
            "app_roles",
            format!("INSERT INTO picloud.app_roles (app_id, role_name, capability) VALUES ('{a}', '{tb}', 'admin')"),
            format!("INSERT INTO picloud.app_roles (app_id, role_name, capability) VALUES ('{b}', '{ta}', 'admin')"),
        ),
        (
            "scripts",
            format!("INSERT INTO picloud.scripts (app_id, name, kind, target) VALUES ('{a}', 'ins', 'command', 'noop')"),
            format!("INSERT INTO picloud.scripts (app_id, name, kind, target) VALUES ('{b}', 'ins', 'command', 'noop')"),
        ),
        (
            "triggers",
            format!(
                "INSERT INTO picloud.triggers (app_id, trigger_id, kind, script_id) VALUES ('{a}', '{new_t1}', 'kv', '{script_a}'),
                        ('{a}', '{new_t2}', 'dead_letter', '{script_a}'), ('{a}', '{new_t3}', 'cron', '{script_a}')"
            ),
            format!("INSERT INTO picloud.triggers (app_id, kind, script_id) VALUES ('{b}', 'kv', '{script_b}')"),
        ),
        (
            "kv_trigger_details",
            format!(
                "INSERT INTO picloud.kv_trigger_details (app_id, trigger_id, collection_pattern, match_key, ops)
                 VALUES ('{a}', '{new_t1}', 'ins', '=ins', ARRAY['set'])"
            ),
            format!(
                "INSERT INTO picloud.kv_trigger_details (app_id, trigger_id, collection_pattern, match_key, ops)
                 VALUES ('{b}', '{trig_b}', 'ins', '=ins', ARRAY['set'])"
            ),
        ),
        (
            "dead_letter_trigger_details",
            format!("INSERT INTO picloud.dead_letter_trigger_details (app_id, trigger_id) VALUES ('{a}', '{new_t2}')"),
            format!(
                "INSERT INTO picloud.dead_letter_trigger_details (app_id, trigger_id) VALUES ('{b}', '{trig_b}')"
            ),
        ),
        (
            "cron_trigger_details",
            format!(
                "INSERT INTO picloud.cron_trigger_details (app_id, trigger_id, schedule, timezone, payload, catch_up, catch_up_limit, skip_if_running)
                 VALUES ('{a}', '{new_t3}', '@daily', 'UTC', '{{}}', 'last', 1, false)"
            ),
            format!(
                "INSERT INTO picloud.cron_trigger_details (app_id, trigger_id, schedule, timezone, payload, catch_up, catch_up_limit, skip_if_running)
                 VALUES ('{b}', '{trig_b}', '@daily', 'UTC', '{{}}', 'last', 1, false)"
            ),
        ),
        (
            "handler_limits",
            format!(
                "INSERT INTO picloud.handler_limits (app_id, script_id, max_concurrency)
                 SELECT '{a}', script_id, 2 FROM picloud.scripts WHERE app_id = '{a}' AND name = 'ins'"
            ),
            format!("INSERT INTO picloud.handler_limits (app_id, script_id, max_concurrency) VALUES ('{b}', '{script_b}', 2)"),
        ),
        (
            "outbox",
            format!("INSERT INTO picloud.outbox (app_id, source, op, script_id, payload) VALUES ('{a}', 'queue', 'ins', '{script_a}', '{{}}')"),
            format!("INSERT INTO picloud.outbox (app_id, source, op, script_id, payload) VALUES ('{b}', 'queue', 'ins', '{script_b}', '{{}}')"),
        ),
        (
            "idempotency_keys",
            format!("INSERT INTO picloud.idempotency_keys (app_id, idempotency_key, event_id) VALUES ('{a}', 'ins', gen_random_uuid())"),
            format!("INSERT INTO picloud.idempotency_keys (app_id, idempotency_key, event_id) VALUES ('{b}', 'ins', gen_random_uuid())"),
        ),
        (
            "dead_letters",
            format!(
                "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, payload, attempt_count)
                 VALUES ('{a}', gen_random_uuid(), 'queue', 'ins', '{{}}', 1)"
            ),
            format!(
                "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, payload, attempt_count)
                 VALUES ('{b}', gen_random_uuid(), 'queue', 'ins', '{{}}', 1)"
            ),
        ),
        (
            "inboxes",
            format!(
                "INSERT INTO picloud.inboxes (app_id, channel, owner_pid, owner_started, expires_at)
                 VALUES ('{a}', 'ins', 0, now(), now() + interval '1 hour')"
            ),
            format!(
                "INSERT INTO picloud.inboxes (app_id, channel, owner_pid, owner_started, expires_at)
                 VALUES ('{b}', 'ins', 0, now(), now() + interval '1 hour')"
            ),
        ),
        (
            "abandoned_executions",
            format!(
                "INSERT INTO picloud.abandoned_executions (app_id, event_id, reply_to, succeeded, reason)
                 VALUES ('{a}', gen_random_uuid(), 'ins', true, 'ins')"
            ),
            format!(
                "INSERT INTO picloud.abandoned_executions (app_id, event_id, reply_to, succeeded, reason)
                 VALUES ('{b}', gen_random_uuid(), 'ins', true, 'ins')"
            ),
        ),
    ];
    for (table, into_a, into_b) in &inserts {
        let table = *table;
        let before = fingerprint(&mut t.su, "true");
        let got = affected(&mut t.a, into_a);
        let refused_a = got.is_err();
        match (&got, tenant_may_insert(table)) {
            (Ok(n), true) if *n >= 1 => {}
            (got, false) if no_privilege(got, table) => {}
            _ => failures.push(format!(
                "INSERT {table} for app A: {got:?}, expected {}",
                if tenant_may_insert(table) {
                    "success".to_string()
                } else {
                    format!("42501 permission denied for table {table}")
                }
            )),
        }
        if refused_a {
            let changed = changed_tables(&before, &fingerprint(&mut t.su, "true"));
            if !changed.is_empty() {
                failures.push(format!(
                    "refused INSERT {table} for app A changed {changed:?}"
                ));
            }
        }
        let before = fingerprint(&mut t.su, "true");
        let got = affected(&mut t.a, into_b);
        let ok = if tenant_may_insert(table) {
            rls_refused(&got, table)
        } else {
            no_privilege(&got, table)
        };
        if !ok {
            failures.push(format!(
                "INSERT {table} for app B: {got:?}, expected 42501 ({})",
                if tenant_may_insert(table) {
                    "row-level security".to_string()
                } else {
                    format!("permission denied for table {table}")
                }
            ));
        }
        let changed = changed_tables(&before, &fingerprint(&mut t.su, "true"));
        if !changed.is_empty() {
            failures.push(format!(
                "refused INSERT {table} for app B changed {changed:?}"
            ));
        }
    }
    // An inbox in tenant_a's own app, but in someone else's name.
    let got = affected(
        &mut t.a,
        &format!(
            "INSERT INTO picloud.inboxes (app_id, channel, owner_role, owner_pid, owner_started, expires_at)
             VALUES ('{a}', 'forged', '{tb}', 0, now(), now() + interval '1 hour')"
        ),
    );
    if !rls_refused(&got, "inboxes") {
        failures.push(format!(
            "INSERT inboxes owned by tenant_b: {got:?}, expected 42501 (row-level security)"
        ));
    }
    if count(
        &mut t.su,
        "SELECT count(*) FROM picloud.inboxes WHERE channel = 'forged'",
    ) != 0
    {
        failures.push("the forged inbox exists".to_string());
    }

    // DELETE everything tenant_a can: only app A's rows go (children before parents). Where
    // tenants may not delete, even app A's own rows are refused and stay.
    let order = [
        "key_blocks",
        "handler_limits",
        "kv_trigger_details",
        "dead_letter_trigger_details",
        "cron_trigger_details",
        "triggers",
        "scripts",
        "outbox",
        "idempotency_keys",
        "dead_letters",
        "inboxes",
        "abandoned_executions",
        "app_roles",
        "apps",
    ];
    for table in order {
        let own = visible(&mut t, table);
        let got = affected(&mut t.a, &format!("DELETE FROM picloud.{table}"));
        if tenant_may_delete(table) {
            if got != Ok(own as u64) {
                failures.push(format!(
                    "DELETE FROM {table}: {got:?}, expected {own} rows (app A's)"
                ));
            }
        } else {
            if !no_privilege(&got, table) {
                failures.push(format!("DELETE FROM {table}: {got:?}, expected 42501 permission denied for table {table}"));
            }
            let left = visible(&mut t, table);
            if left != own || own == 0 {
                failures.push(format!(
                    "{table}: refused DELETE left {left} of app A's {own} rows"
                ));
            }
        }
    }
    let b_after = fingerprint(&mut t.su, &format!("x.app_id = '{b}'"));
    let changed = changed_tables(&b_before, &b_after);
    if !changed.is_empty() {
        failures.push(format!("app B's rows changed under tenant_a: {changed:?}"));
    }
    for table in TABLES {
        if tenant_may_delete(table) && visible(&mut t, table) != 0 {
            failures.push(format!("{table}: app A's rows survived tenant_a's DELETE"));
        }
    }
    // The other caller's inbox in app A was never tenant_a's to delete.
    if count(
        &mut t.su,
        "SELECT count(*) FROM picloud.inboxes WHERE channel = 'producers'",
    ) != 1
    {
        failures.push("tenant_a deleted the producer's inbox".to_string());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The unprivileged role has no way into the schema; a picloud user without app rights sees
/// and changes nothing (its writes are refused for want of privilege, or reach no row); a
/// producer sees what enqueueing needs and changes nothing but its own.
#[test]
fn outsiders_and_producers_reach_no_rows() {
    let mut t = Tenancy::new("secoutsiders");
    seed_tables(&mut t);
    let stranger = t.roles.create(&mut t.su, "stranger");
    t.su.batch_execute(&format!("GRANT picloud_user TO {stranger}"))
        .unwrap();
    let mut s = login(&t.db, &stranger);
    let everything = fingerprint(&mut t.su, "true");
    let mut failures = Vec::new();
    for table in TABLES {
        let statements = [
            format!("SELECT count(*) FROM picloud.{table}"),
            format!("UPDATE picloud.{table} SET app_id = app_id"),
            format!("DELETE FROM picloud.{table}"),
            format!("INSERT INTO picloud.{table} SELECT * FROM picloud.{table}"),
        ];
        for sql in &statements {
            match affected(&mut t.nobody, sql) {
                Err((code, message))
                    if code == "42501"
                        && message.contains("permission denied for schema picloud") => {}
                other => failures.push(format!("nobody: {sql}: {other:?}")),
            }
        }
        let seen = count(&mut s, &format!("SELECT count(*) FROM picloud.{table}"));
        // No write reaches a row: refused outright where picloud_user holds no privilege,
        // 0 rows (row-level security) where it does.
        let updated = affected(
            &mut s,
            &format!("UPDATE picloud.{table} SET app_id = app_id"),
        );
        let deleted = affected(&mut s, &format!("DELETE FROM picloud.{table}"));
        let deleted_ok = if tenant_may_delete(table) {
            deleted == Ok(0)
        } else {
            no_privilege(&deleted, table)
        };
        if seen != 0 || !no_privilege(&updated, table) || !deleted_ok {
            failures.push(format!(
                "stranger on {table}: sees {seen}, UPDATE {updated:?}, DELETE {deleted:?}"
            ));
        }
        if let Some(update) = noop_update_of_tenant_columns(table) {
            let got = affected(&mut s, &update);
            if got != Ok(0) {
                failures.push(format!("stranger: {update}: {got:?}, expected 0 rows"));
            }
        }
    }
    // A producer of app A sees app A's handlers and triggers (enqueue resolves them with its
    // rights) but not its pending events, dead letters or other callers' inboxes.
    let a = t.app_a;
    let producer_sees: [(&str, i64); 14] = [
        ("apps", 1),
        ("app_roles", 1),
        ("scripts", 1),
        ("triggers", 3),
        ("kv_trigger_details", 1),
        ("dead_letter_trigger_details", 1),
        ("cron_trigger_details", 1),
        ("outbox", 0),
        ("idempotency_keys", 1),
        ("dead_letters", 0),
        ("inboxes", 1),
        ("abandoned_executions", 0),
        ("key_blocks", 0),
        ("handler_limits", 1),
    ];
    for (table, want) in producer_sees {
        let all = count(
            &mut t.producer,
            &format!("SELECT count(*) FROM picloud.{table}"),
        );
        let of_a = count(
            &mut t.producer,
            &format!("SELECT count(*) FROM picloud.{table} WHERE app_id = '{a}'"),
        );
        if all != want || of_a != want {
            failures.push(format!(
                "producer on {table}: sees {all} rows ({of_a} of app A), expected {want}"
            ));
        }
    }
    // Inboxes are the producer's own business (it opens them); every other table is checked.
    for table in TABLES.into_iter().filter(|table| *table != "inboxes") {
        let updated = affected(
            &mut t.producer,
            &format!("UPDATE picloud.{table} SET app_id = app_id"),
        );
        let deleted = affected(&mut t.producer, &format!("DELETE FROM picloud.{table}"));
        let deleted_ok = if tenant_may_delete(table) {
            deleted == Ok(0)
        } else {
            no_privilege(&deleted, table)
        };
        if !no_privilege(&updated, table) || !deleted_ok {
            failures.push(format!(
                "producer on {table}: UPDATE {updated:?}, DELETE {deleted:?}, expected 42501 permission denied for table {table} \
                 (0 rows where the privilege exists)"
            ));
        }
        if let Some(update) = noop_update_of_tenant_columns(table) {
            let got = affected(&mut t.producer, &update);
            if got != Ok(0) {
                failures.push(format!("producer: {update}: {got:?}, expected 0 rows"));
            }
        }
    }
    let changed = changed_tables(&everything, &fingerprint(&mut t.su, "true"));
    if !changed.is_empty() {
        failures.push(format!("outsiders changed {changed:?}"));
    }
    drop(s);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

//! Security, principals: a SQL handler runs with exactly its principal's rights, and nobody
//! borrows another role's rights through handlers, triggers, hand-made rows or dead letters.
//!
//! The cast: tenant_a administers app A, tenant_b administers app B, `admin` is a member of
//! picloud_admin, `producer` may only enqueue into app A, and `nobody` is a LOGIN role with no
//! picloud rights at all. Roles are cluster-wide, so every test creates its own, named uniquely
//! per run, and drops them (with what they own in the test database) when it ends.

#[path = "security/harness.rs"]
mod harness;

use harness::*;
use picloud_tests::*;
use postgres::Client;
use uuid::Uuid;

/// The outcome of running one claimed event as the supervisor would.
#[derive(Debug)]
struct Ran {
    event: Uuid,
    principal: Option<String>,
    principal_error: Option<String>,
    /// Ok(result) or Err((SQLSTATE, message)).
    outcome: Result<Option<serde_json::Value>, (String, String)>,
}

/// Claims every due event as the superuser (the supervisor) and runs each SQL handler in a
/// transaction of its own, committed on success and rolled back on error.
fn claim_and_run(su: &mut Client) -> Vec<Ran> {
    let claimed = su
        .query(
            "SELECT app_id, event_id, principal::text, principal_error FROM picloud.picloud_claim('sec-worker', 1000, 600000)",
            &[],
        )
        .expect("claim");
    let mut ran = Vec::new();
    for row in claimed {
        let (app, event): (Uuid, Uuid) = (row.get(0), row.get(1));
        let mut tx = su.transaction().expect("begin");
        let outcome = match tx.query_one(
            "SELECT picloud.picloud_run_sql_handler($1, $2, 'sec-worker')",
            &[&app, &event],
        ) {
            Ok(r) => {
                let result: Option<serde_json::Value> = r.get(0);
                tx.commit().expect("commit");
                Ok(result)
            }
            Err(e) => {
                let failure = code_and_message(&e);
                tx.rollback().expect("rollback");
                Err(failure)
            }
        };
        let me: String = su
            .query_one("SELECT current_user::text", &[])
            .unwrap()
            .get(0);
        assert_eq!(
            me, "postgres",
            "the supervisor's session is back to its own user"
        );
        ran.push(Ran {
            event,
            principal: row.get(2),
            principal_error: row.get(3),
            outcome,
        });
    }
    ran
}

/// Handlers of tenant_a, in a_schema: `peek` reads tenant_b's b_secret and records what it saw
/// (and as whom) in a_schema.leak.
fn tenant_a_handlers(t: &mut Tenancy) {
    t.a.batch_execute(
        "CREATE TABLE a_schema.leak (who text, secrets bigint);
         CREATE TABLE a_schema.own (n int);
         INSERT INTO a_schema.own VALUES (1), (2), (3);
         CREATE FUNCTION a_schema.peek(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO a_schema.leak SELECT current_user, count(*) FROM public.b_secret;
             RETURN NULL;
         END $$;",
    )
    .expect("tenant_a's handlers");
}

fn leaks(t: &mut Tenancy) -> Vec<String> {
    t.su.query(
        "SELECT who || ' read ' || secrets || ' row(s) of b_secret' FROM a_schema.leak",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A SQL handler runs with its principal's rights only: tenant_a's handler cannot read
/// tenant_b's table, cannot switch back to the supervisor's user, and cannot end the switch
/// without the token.
#[test]
fn sql_handlers_run_with_their_principals_rights_only() {
    let mut t = Tenancy::new("sechandler");
    tenant_a_handlers(&mut t);
    let (a, b) = (t.app_a, t.app_b);
    t.a.batch_execute(&format!(
        "CREATE TABLE a_schema.seen (who text, session_who text, own_rows bigint, visible_apps bigint, visible_b_scripts bigint);
         CREATE FUNCTION a_schema.read_own(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO a_schema.seen SELECT current_user, session_user, (SELECT count(*) FROM a_schema.own),
                 (SELECT count(*) FROM picloud.apps),
                 (SELECT count(*) FROM picloud.scripts WHERE app_id = '{b}');
             RETURN jsonb_build_object('rows', (SELECT count(*) FROM a_schema.own));
         END $$;
         CREATE FUNCTION a_schema.read_b(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
             SELECT jsonb_build_object('secrets', (SELECT count(*) FROM public.b_secret))
         $$;
         CREATE FUNCTION a_schema.reset_role(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN RESET ROLE; INSERT INTO a_schema.leak SELECT current_user, count(*) FROM public.b_secret; RETURN NULL; END $$;
         CREATE FUNCTION a_schema.set_role(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN SET ROLE postgres; INSERT INTO a_schema.leak SELECT current_user, count(*) FROM public.b_secret; RETURN NULL; END $$;
         CREATE FUNCTION a_schema.set_config_role(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN PERFORM set_config('role', 'postgres', false); RETURN NULL; END $$;
         CREATE FUNCTION a_schema.session_auth(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN SET SESSION AUTHORIZATION postgres; RETURN NULL; END $$;
         CREATE FUNCTION a_schema.unbecome(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN PERFORM picloud._unbecome(12345); INSERT INTO a_schema.leak SELECT current_user, count(*) FROM public.b_secret; RETURN NULL; END $$;
         CREATE FUNCTION a_schema.become(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN PERFORM picloud._become_event(gen_random_uuid(), gen_random_uuid()); INSERT INTO a_schema.leak SELECT current_user, count(*) FROM public.b_secret; RETURN NULL; END $$;"
    ))
    .expect("handlers");
    // tenant_b's own handler may read b_secret: the refusals below are about the principal.
    t.b.batch_execute(
        "CREATE FUNCTION b_schema.read_b(e jsonb) RETURNS jsonb LANGUAGE sql AS $$
             SELECT jsonb_build_object('secrets', (SELECT count(*) FROM public.b_secret))
         $$;",
    )
    .expect("tenant_b's handler");
    let handlers: [(&str, &str, Uuid); 9] = [
        ("read_own", "a_schema.read_own", a),
        ("read_b", "a_schema.read_b", a),
        ("peek", "a_schema.peek", a),
        ("reset_role", "a_schema.reset_role", a),
        ("set_role", "a_schema.set_role", a),
        ("set_config_role", "a_schema.set_config_role", a),
        ("session_auth", "a_schema.session_auth", a),
        ("unbecome", "a_schema.unbecome", a),
        ("become", "a_schema.become", a),
    ];
    let mut events = std::collections::HashMap::new();
    for (name, function, app) in handlers {
        let script = id(
            &mut t.a,
            &format!("SELECT picloud_create_script('{app}', '{name}', 'sql', '{function}')"),
        );
        let event = id(
            &mut t.a,
            &format!("SELECT picloud_enqueue('{app}', 'queue', 'run', '{{}}', '{script}')"),
        );
        events.insert(event, name);
    }
    let script = id(
        &mut t.b,
        &format!("SELECT picloud_create_script('{b}', 'read_b', 'sql', 'b_schema.read_b')"),
    );
    let event = id(
        &mut t.b,
        &format!("SELECT picloud_enqueue('{b}', 'queue', 'run', '{{}}', '{script}')"),
    );
    events.insert(event, "tenant_b's read_b");

    let ran = claim_and_run(&mut t.su);
    assert_eq!(ran.len(), events.len(), "{ran:?}");
    let mut failures = Vec::new();
    for r in &ran {
        let name = events[&r.event];
        if r.principal_error.is_some() {
            failures.push(format!(
                "{name}: unexpected principal_error {:?}",
                r.principal_error
            ));
        }
        let expected_principal = if name.starts_with("tenant_b") {
            &t.tenant_b
        } else {
            &t.tenant_a
        };
        if r.principal.as_ref() != Some(expected_principal) {
            failures.push(format!(
                "{name}: principal {:?}, expected {expected_principal}",
                r.principal
            ));
        }
        let (want_code, needle) = match name {
            "read_own" | "tenant_b's read_b" => ("", ""),
            "read_b" | "peek" => ("42501", "permission denied for table b_secret"),
            "reset_role" | "set_role" | "set_config_role" => {
                ("42501", "cannot set parameter \"role\"")
            }
            "session_auth" => ("42501", "cannot set parameter \"session_authorization\""),
            "unbecome" => ("22023", "token"),
            "become" => ("42501", "permission denied for function _become_event"),
            _ => unreachable!(),
        };
        match (&r.outcome, want_code) {
            (Ok(_), "") => {}
            (Err((code, message)), want) if code == want && message.contains(needle) => {}
            (outcome, _) => failures.push(format!(
                "{name}: {outcome:?}, expected {want_code} {needle:?}"
            )),
        }
    }
    // The one handler that ran did so as tenant_a, seeing only app A.
    let seen =
        t.su.query(
            "SELECT who, session_who, own_rows, visible_apps, visible_b_scripts FROM a_schema.seen",
            &[],
        )
        .unwrap();
    if seen.len() != 1 {
        failures.push(format!("read_own ran {} times", seen.len()));
    } else {
        let row = &seen[0];
        let got: (String, String, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        if got != (t.tenant_a.clone(), "postgres".to_string(), 3, 1, 0) {
            failures.push(format!(
                "read_own saw (user, session user, own rows, apps, B's handlers) = {got:?}"
            ));
        }
    }
    let leaked = leaks(&mut t);
    if !leaked.is_empty() {
        failures.push(format!("b_secret leaked: {leaked:?}"));
    }
    // Failed events were rolled back and stay in the outbox; the two that ran are gone.
    let left = count(&mut t.su, "SELECT count(*) FROM picloud.outbox");
    if left != events.len() as i64 - 2 {
        failures.push(format!(
            "{left} events left in the outbox, expected {}",
            events.len() - 2
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Inserting handlers or triggers in someone else's name is refused by the policies' WITH
/// CHECK; renaming one's own to someone else is refused outright (tenants hold no UPDATE on
/// who a handler or trigger runs as).
#[test]
fn nobody_registers_a_handler_that_runs_as_someone_else() {
    let mut t = Tenancy::new("secregister");
    tenant_a_handlers(&mut t);
    let a = t.app_a;
    let (tb, adm) = (t.tenant_b.clone(), t.admin_role.clone());
    let own_script = id(
        &mut t.a,
        &format!("SELECT picloud_create_script('{a}', 'peek', 'sql', 'a_schema.peek')"),
    );
    let own_trigger = id(
        &mut t.a,
        &format!("SELECT picloud_create_kv_trigger('{a}', 'mine', '{own_script}')"),
    );
    let before = fingerprint(&mut t.su, "true");
    let mut failures = Vec::new();
    for other in ["postgres", tb.as_str(), adm.as_str()] {
        // (statement, table, refused by row-level security rather than for want of privilege)
        let attempts = [
            (
                format!(
                    "INSERT INTO picloud.triggers (app_id, kind, script_id, registered_by_principal) VALUES ('{a}', 'kv', '{own_script}', '{other}')"
                ),
                "triggers",
                true,
            ),
            (
                format!(
                    "INSERT INTO picloud.scripts (app_id, name, kind, target, sql_function, registered_by_principal)
                     VALUES ('{a}', 'as_{other}', 'sql', 'a_schema.peek', 'a_schema.peek(jsonb)', '{other}')"
                ),
                "scripts",
                true,
            ),
            (
                format!("UPDATE picloud.scripts SET registered_by_principal = '{other}' WHERE script_id = '{own_script}'"),
                "scripts",
                false,
            ),
        ];
        for (sql, table, by_policy) in &attempts {
            let outcome = affected(&mut t.a, sql);
            let ok = if *by_policy {
                rls_refused(&outcome, table)
            } else {
                no_privilege(&outcome, table)
            };
            if !ok {
                let want = if *by_policy {
                    "row-level security".to_string()
                } else {
                    format!("permission denied for table {table}")
                };
                failures.push(format!("{sql}: {outcome:?}, expected 42501 ({want})"));
            }
        }
    }
    let changed = changed_tables(&before, &fingerprint(&mut t.su, "true"));
    if !changed.is_empty() {
        failures.push(format!("refused registrations changed {changed:?}"));
    }
    // In one's own name it works.
    let ok = affected(
        &mut t.a,
        &format!("INSERT INTO picloud.triggers (app_id, kind, script_id) VALUES ('{a}', 'kv', '{own_script}')"),
    );
    if ok != Ok(1) {
        failures.push(format!("inserting a trigger in one's own name: {ok:?}"));
    }
    // Renaming one's own trigger to another principal must be refused just the same.
    for other in ["postgres", adm.as_str()] {
        let sql = format!("UPDATE picloud.triggers SET registered_by_principal = '{other}' WHERE trigger_id = '{own_trigger}'");
        let outcome = affected(&mut t.a, &sql);
        if !no_privilege(&outcome, "triggers") {
            failures.push(format!(
                "{sql}: {outcome:?}, expected 42501 permission denied for table triggers"
            ));
        }
    }
    let principal = text(&mut t.su, &format!("SELECT registered_by_principal::text FROM picloud.triggers WHERE trigger_id = '{own_trigger}'"));
    if principal.as_deref() != Some(t.tenant_a.as_str()) {
        failures.push(format!("tenant_a's trigger now runs as {principal:?}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The operator (superuser) registered a handler and a KV trigger in app A; tenant_a has its
/// `peek` handler registered. Returns (operator's script, operator's trigger, peek script).
fn operator_and_peek(t: &mut Tenancy) -> (Uuid, Uuid, Uuid) {
    tenant_a_handlers(t);
    let a = t.app_a;
    t.su.batch_execute(
        "CREATE FUNCTION public.operator_handler(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT NULL::jsonb $$;
         REVOKE ALL ON FUNCTION public.operator_handler(jsonb) FROM PUBLIC;",
    )
    .unwrap();
    let op_script = id(
        &mut t.su,
        &format!(
            "SELECT picloud_create_script('{a}', 'operator', 'sql', 'public.operator_handler')"
        ),
    );
    let op_trigger = id(
        &mut t.su,
        &format!("SELECT picloud_create_kv_trigger('{a}', 'ops', '{op_script}')"),
    );
    let peek = id(
        &mut t.a,
        &format!("SELECT picloud_create_script('{a}', 'peek', 'sql', 'a_schema.peek')"),
    );
    (op_script, op_trigger, peek)
}

/// After an attempt to borrow someone else's rights: whatever ran, nothing ran with more than
/// tenant_a's rights (a_schema.leak stays empty).
fn assert_no_escalation(
    t: &mut Tenancy,
    attempt: &str,
    outcome: Result<u64, (String, String)>,
    ran: &[Ran],
) {
    let leaked = leaks(t);
    let ran_as: Vec<String> = ran
        .iter()
        .map(|r| {
            format!(
                "principal {:?} (error {:?}) -> {:?}",
                r.principal, r.principal_error, r.outcome
            )
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "privilege escalation: {attempt} -> {outcome:?}; the handler then ran as {ran_as:?} and {leaked:?}"
    );
}

/// An admin of app A re-points its own trigger's principal to a superuser.
#[test]
fn repointing_a_triggers_principal_gains_no_rights() {
    let mut t = Tenancy::new("secrepoint");
    let (_, _, peek) = operator_and_peek(&mut t);
    let a = t.app_a;
    let mine = id(
        &mut t.a,
        &format!("SELECT picloud_create_kv_trigger('{a}', 'mine', '{peek}')"),
    );
    let attempt = format!("UPDATE picloud.triggers SET registered_by_principal = 'postgres' WHERE trigger_id = '{mine}'");
    let outcome = affected(&mut t.a, &attempt);
    t.a.query_one(
        &format!("SELECT picloud_emit_kv('{a}', 'mine', 'set', 'k', '{{}}')"),
        &[],
    )
    .unwrap();
    let ran = claim_and_run(&mut t.su);
    assert_no_escalation(&mut t, &attempt, outcome.clone(), &ran);
    assert!(
        no_privilege(&outcome, "triggers"),
        "{attempt}: {outcome:?}, expected 42501 permission denied for table triggers"
    );
    let principal = text(&mut t.su, &format!("SELECT registered_by_principal::text FROM picloud.triggers WHERE trigger_id = '{mine}'"));
    assert_eq!(
        principal.as_deref(),
        Some(t.tenant_a.as_str()),
        "tenant_a's trigger changed principal"
    );
    // Its event still ran, as tenant_a (and so could not read b_secret).
    assert!(
        ran.len() == 1
            && ran[0].principal.as_deref() == Some(t.tenant_a.as_str())
            && ran[0].principal_error.is_none(),
        "{ran:?}"
    );
    assert!(
        matches!(&ran[0].outcome, Err((code, m)) if code == "42501" && m.contains("b_secret")),
        "{ran:?}"
    );
}

/// tenant_a attempts `attempt` against the operator's handler or trigger, then an event of
/// the operator's trigger runs: the attempt must be refused for lack of privilege on `table`,
/// change nothing, and the operator's trigger must still run the operator's handler as the
/// operator.
fn assert_takeover_refused(t: &mut Tenancy, attempt: &str, table: &str) {
    let a = t.app_a;
    let before = fingerprint(&mut t.su, "true");
    let outcome = affected(&mut t.a, attempt);
    let changed = changed_tables(&before, &fingerprint(&mut t.su, "true"));
    t.a.query_one(
        &format!("SELECT picloud_emit_kv('{a}', 'ops', 'set', 'k', '{{}}')"),
        &[],
    )
    .unwrap();
    let ran = claim_and_run(&mut t.su);
    assert_no_escalation(t, attempt, outcome.clone(), &ran);
    assert!(
        no_privilege(&outcome, table),
        "{attempt}: {outcome:?}, expected 42501 permission denied for table {table}"
    );
    assert!(
        changed.is_empty(),
        "{attempt} was refused, yet changed {changed:?}"
    );
    assert!(
        ran.len() == 1
            && ran[0].principal.as_deref() == Some("postgres")
            && ran[0].principal_error.is_none()
            && ran[0].outcome.is_ok(),
        "{ran:?}"
    );
}

/// An admin of app A points the operator's trigger at its own handler.
#[test]
fn swapping_the_handler_of_someone_elses_trigger_gains_no_rights() {
    let mut t = Tenancy::new("secswap");
    let (_, op_trigger, peek) = operator_and_peek(&mut t);
    let attempt = format!(
        "UPDATE picloud.triggers SET script_id = '{peek}' WHERE trigger_id = '{op_trigger}'"
    );
    assert_takeover_refused(&mut t, &attempt, "triggers");
}

/// An admin of app A rewrites the operator's handler (taking it over in its own name) while
/// the operator's trigger still uses it.
#[test]
fn rewriting_a_handler_used_by_someone_elses_trigger_gains_no_rights() {
    let mut t = Tenancy::new("secrewrite");
    let (op_script, _, _) = operator_and_peek(&mut t);
    let attempt = format!(
        "UPDATE picloud.scripts SET target = 'a_schema.peek', sql_function = 'a_schema.peek(jsonb)',
                registered_by_principal = current_user WHERE script_id = '{op_script}'"
    );
    assert_takeover_refused(&mut t, &attempt, "scripts");
}

/// An admin (and a mere producer) of app A writes outbox rows by hand that name the operator's
/// trigger but tenant_a's handler.
#[test]
fn a_hand_made_outbox_row_cannot_borrow_a_triggers_principal() {
    let mut t = Tenancy::new("secoutbox");
    let (_, op_trigger, peek) = operator_and_peek(&mut t);
    let a = t.app_a;
    let attempt = format!(
        "INSERT INTO picloud.outbox (app_id, source, op, trigger_id, script_id, payload)
         VALUES ('{a}', 'queue', 'x', '{op_trigger}', '{peek}', '{{}}')"
    );
    let by_admin = affected(&mut t.a, &attempt);
    let by_producer = affected(&mut t.producer, &attempt);
    let ran = claim_and_run(&mut t.su);
    assert_no_escalation(
        &mut t,
        &attempt,
        by_admin.clone().and(by_producer.clone()),
        &ran,
    );
    // Producers may insert outbox rows (the enqueue functions do so with their rights), so
    // both rows exist; the pairing is caught when they are claimed: no principal, PC005.
    assert_eq!((by_admin, by_producer), (Ok(1), Ok(1)), "{attempt}");
    assert_eq!(ran.len(), 2, "{ran:?}");
    let needle = format!("handler {peek} is not the handler of trigger {op_trigger}");
    for r in &ran {
        assert!(
            r.principal.is_none(),
            "a hand-made row got principal {:?}: {r:?}",
            r.principal
        );
        assert!(
            r.principal_error
                .as_deref()
                .is_some_and(|e| e.contains(&needle)),
            "principal_error: {r:?}"
        );
        assert!(
            matches!(&r.outcome, Err((code, message)) if code == "PC005" && message.contains(&needle)),
            "run of a hand-made row: {r:?}, expected PC005"
        );
    }
    assert_eq!(
        count(&mut t.su, "SELECT count(*) FROM picloud.outbox"),
        2,
        "refused events stay in the outbox"
    );
}

/// An admin of app A writes a dead letter by hand naming the operator's trigger but its own
/// handler, then replays it.
#[test]
fn a_hand_made_dead_letter_cannot_borrow_a_triggers_principal() {
    let mut t = Tenancy::new("secdeadletter");
    let (_, op_trigger, peek) = operator_and_peek(&mut t);
    let a = t.app_a;
    let attempt = format!(
        "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, trigger_id, script_id, payload, attempt_count)
         VALUES ('{a}', gen_random_uuid(), 'kv', 'set', '{op_trigger}', '{peek}', '{{}}', 1) RETURNING dead_letter_id"
    );
    let outcome = match t.a.query_one(attempt.as_str(), &[]) {
        Ok(row) => {
            let dl: Uuid = row.get(0);
            affected(
                &mut t.a,
                &format!("SELECT picloud_replay_dead_letter('{a}', '{dl}')"),
            )
        }
        Err(e) => Err(code_and_message(&e)),
    };
    let ran = claim_and_run(&mut t.su);
    assert_no_escalation(&mut t, &attempt, outcome.clone(), &ran);
    // Tenants hold no INSERT on dead_letters: nothing was written, nothing replayed or ran.
    assert!(
        no_privilege(&outcome, "dead_letters"),
        "{attempt}: {outcome:?}, expected 42501 permission denied for table dead_letters"
    );
    assert_eq!(
        count(&mut t.su, "SELECT count(*) FROM picloud.dead_letters"),
        0
    );
    assert!(ran.is_empty(), "{ran:?}");
}

/// A principal that was dropped, or is no longer an admin of the app, runs nothing: the claim
/// reports principal_error and picloud_run_sql_handler refuses with PC005.
#[test]
fn dropped_or_demoted_principals_run_nothing() {
    let mut t = Tenancy::new("secprincipal");
    let a = t.app_a;
    let demoted = t.roles.create(&mut t.su, "demoted");
    let dropped = t.roles.create(&mut t.su, "dropped");
    t.su.batch_execute(&format!(
        "CREATE TABLE public.ran (who text);
         GRANT INSERT, SELECT ON public.ran TO PUBLIC;
         CREATE SCHEMA demoted_schema AUTHORIZATION {demoted};
         CREATE SCHEMA dropped_schema AUTHORIZATION {dropped};
         SELECT picloud_grant_app_role('{a}', '{demoted}', 'admin');
         SELECT picloud_grant_app_role('{a}', '{dropped}', 'admin');"
    ))
    .unwrap();
    // Each of tenant_a, demoted and dropped registers a handler and a KV trigger, and each
    // handler also gets a direct (trigger-less) event.
    let setup = |c: &mut Client, schema: &str, collection: &str| -> (Uuid, Uuid) {
        c.batch_execute(&format!(
            "CREATE FUNCTION {schema}.h(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ INSERT INTO public.ran VALUES (current_user) RETURNING NULL::jsonb $$;"
        ))
        .unwrap();
        let script = id(
            c,
            &format!("SELECT picloud_create_script('{a}', '{collection}', 'sql', '{schema}.h')"),
        );
        let trigger = id(
            c,
            &format!("SELECT picloud_create_kv_trigger('{a}', '{collection}', '{script}')"),
        );
        id(
            c,
            &format!("SELECT picloud_enqueue('{a}', 'queue', 'direct', '{{}}', '{script}')"),
        );
        (script, trigger)
    };
    let mut c_demoted = login(&t.db, &demoted);
    let mut c_dropped = login(&t.db, &dropped);
    setup(&mut t.a, "a_schema", "by_a");
    setup(&mut c_demoted, "demoted_schema", "by_demoted");
    setup(&mut c_dropped, "dropped_schema", "by_dropped");
    drop(c_demoted);
    drop(c_dropped);
    for collection in ["by_a", "by_demoted", "by_dropped"] {
        let n: i32 = t
            .producer
            .query_one(
                &format!("SELECT picloud_emit_kv('{a}', '{collection}', 'set', 'k', '{{}}')"),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{collection}");
    }
    // demoted keeps a producer role, but is no longer an admin of app A.
    t.su.batch_execute(&format!(
        "SELECT picloud_grant_app_role('{a}', '{demoted}', 'producer')"
    ))
    .unwrap();
    let revoked: bool = t
        .admin
        .query_one(
            &format!("SELECT picloud_revoke_app_role('{a}', '{demoted}', 'admin')"),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(revoked);
    t.su.batch_execute(&format!(
        "REASSIGN OWNED BY {dropped} TO postgres; DROP OWNED BY {dropped}; DROP ROLE {dropped};"
    ))
    .unwrap();

    let ran = claim_and_run(&mut t.su);
    assert_eq!(ran.len(), 6, "{ran:?}");
    let mut failures = Vec::new();
    for r in &ran {
        let principal = r.principal.clone().unwrap_or_default();
        if principal == t.tenant_a {
            if r.principal_error.is_some() || r.outcome.is_err() {
                failures.push(format!("tenant_a's handler should run: {r:?}"));
            }
            continue;
        }
        let needle = if principal == demoted {
            "is no longer an administrator of app"
        } else if principal == dropped {
            "no longer exists"
        } else {
            failures.push(format!("unexpected principal: {r:?}"));
            continue;
        };
        let error = r.principal_error.clone().unwrap_or_default();
        if !(error.contains(needle) && error.contains(&principal)) {
            failures.push(format!(
                "claim of {principal}'s event: principal_error {:?}, expected {needle:?}",
                r.principal_error
            ));
        }
        match &r.outcome {
            Err((code, message)) if code == "PC005" && message.contains(needle) => {}
            other => failures.push(format!(
                "run of {principal}'s event: {other:?}, expected PC005"
            )),
        }
    }
    let ran_as: Vec<String> =
        t.su.query("SELECT who FROM public.ran", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    if ran_as != vec![t.tenant_a.clone(), t.tenant_a.clone()] {
        failures.push(format!(
            "handlers ran as {ran_as:?}, expected tenant_a's two only"
        ));
    }
    // Refused events stay claimed in the outbox (their transactions rolled back).
    let left = count(&mut t.su, "SELECT count(*) FROM picloud.outbox");
    if left != 4 {
        failures.push(format!("{left} events left, expected the 4 refused ones"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One sql lane batch holds events of several triggers of one handler: each event runs as its
/// own trigger's registrant, and the events of the triggers one role registered share a group
/// (one statement and one principal switch for them, as a hundred cron triggers firing at once
/// need).
#[test]
fn a_lane_batch_runs_each_event_as_its_triggers_registrant() {
    let mut t = Tenancy::new("seclanegroups");
    let a = t.app_a;
    t.a.batch_execute(
        "CREATE TABLE a_schema.ran (who text, trigger_id uuid);
         CREATE FUNCTION a_schema.whoami(e jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO a_schema.ran VALUES (current_user, (e->>'trigger_id')::uuid) $$;",
    )
    .expect("handler");
    let script = id(
        &mut t.a,
        &format!("SELECT picloud_create_script('{a}', 'whoami', 'sql', 'a_schema.whoami')"),
    );
    let trigger = |c: &mut Client| {
        id(
            c,
            &format!("SELECT picloud_create_kv_trigger('{a}', 'lanes', '{script}')"),
        )
    };
    let tenant_triggers = [trigger(&mut t.a), trigger(&mut t.a)];
    let superuser_trigger = trigger(&mut t.su);
    // One write, one event per trigger.
    t.su.execute(
        &format!("SELECT picloud_emit_kv('{a}', 'lanes', 'set', 'k', '{{}}'::jsonb)"),
        &[],
    )
    .expect("emit");

    let mut tx = t.su.transaction().expect("begin");
    let locked = tx
        .query(
            "SELECT * FROM picloud.picloud_lock_sql_lane_for_run(500)",
            &[],
        )
        .expect("lock");
    assert_eq!(locked.len(), 3, "the lane locked the three events");
    let groups: Vec<(String, i64)> = tx
        .query(
            "SELECT principal::text, cardinality(event_ids)::bigint
             FROM picloud._sql_lane_groups(ARRAY(SELECT ctid FROM picloud.outbox WHERE app_id = $1))
             ORDER BY 1",
            &[&a],
        )
        .expect("groups")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut expected = vec![("postgres".to_string(), 1), (t.tenant_a.clone(), 2)];
    expected.sort();
    assert_eq!(groups, expected, "one group per principal");
    let ran: i32 = tx
        .query_one("SELECT ran FROM picloud.picloud_run_sql_lane_locked()", &[])
        .expect("run")
        .get(0);
    assert_eq!(ran, 3);
    tx.commit().expect("commit");

    let mut who_ran: Vec<(String, Uuid)> =
        t.su.query("SELECT who, trigger_id FROM a_schema.ran", &[])
            .expect("ran")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    who_ran.sort();
    let mut expected: Vec<(String, Uuid)> = tenant_triggers
        .iter()
        .map(|&trigger| (t.tenant_a.clone(), trigger))
        .chain([("postgres".to_string(), superuser_trigger)])
        .collect();
    expected.sort();
    assert_eq!(
        who_ran, expected,
        "each event ran as its trigger's registrant"
    );
    assert!(
        !flag(
            &mut t.su,
            &format!("SELECT EXISTS (SELECT 1 FROM picloud.outbox WHERE app_id = '{a}')")
        ),
        "the batch's events are done"
    );
}

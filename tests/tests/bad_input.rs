//! Bad input: every refusal has a clear error and SQLSTATE and leaves the data unchanged;
//! and a property test of collection patterns against a reference model.

use picloud_tests::*;
use postgres::types::ToSql;
use postgres::Client;
use proptest::prelude::*;
use uuid::Uuid;

fn snapshot(c: &mut Client) -> Vec<i64> {
    TABLES
        .iter()
        .map(|t| count(c, &format!("SELECT count(*) FROM picloud.{t}")))
        .collect()
}

#[test]
fn every_bad_call_is_refused_and_changes_nothing() {
    let (_db, mut c) = fresh_db("badinput");
    let (app, script) = ledger_app(&mut c);
    let trigger: Uuid = c
        .query_one(
            "SELECT picloud_create_kv_trigger($1, '*', $2)",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    c.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
        &[&app, &script],
    )
    .unwrap();
    let mb = "n".repeat(1024 * 1024);
    let unknown = Uuid::new_v4();
    let null_uuid: Option<Uuid> = None;
    let null_text: Option<String> = None;
    let cases: Vec<(&str, Vec<&(dyn ToSql + Sync)>, &str)> = vec![
        // NULLs
        ("SELECT picloud_create_app($1)", vec![&null_text], "22004"),
        (
            "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
            vec![&null_uuid, &script],
            "22004",
        ),
        (
            "SELECT picloud_enqueue($1, $2, 'x', '{}', $3)",
            vec![&app, &null_text, &script],
            "22004",
        ),
        (
            "SELECT picloud_emit_kv($1, $2, 'set', 'k', '{}')",
            vec![&app, &null_text],
            "22004",
        ),
        (
            "SELECT picloud_create_kv_trigger($1, $2, $3)",
            vec![&app, &null_text, &script],
            "22004",
        ),
        (
            "SELECT picloud_resolve_dead_letter($1, $2, 'ignored')",
            vec![&app, &null_uuid],
            "22004",
        ),
        (
            "SELECT picloud_drop_trigger($1, $2)",
            vec![&app, &null_uuid],
            "22004",
        ),
        (
            "SELECT * FROM picloud_claim($1, 10, 1000)",
            vec![&null_text],
            "22004",
        ),
        // Empty strings
        ("SELECT picloud_create_app('')", vec![], "22023"),
        (
            "SELECT picloud_create_kv_trigger($1, '', $2)",
            vec![&app, &script],
            "22023",
        ),
        (
            "SELECT picloud_emit_kv($1, '', 'set', 'k', '{}')",
            vec![&app],
            "22023",
        ),
        (
            "SELECT picloud_enqueue($1, '', 'x', '{}', $2)",
            vec![&app, &script],
            "22023",
        ),
        (
            "SELECT picloud_enqueue($1, 'queue', '', '{}', $2)",
            vec![&app, &script],
            "22023",
        ),
        ("SELECT * FROM picloud_claim('', 10, 1000)", vec![], "22023"),
        // 1 MB names
        ("SELECT picloud_create_app($1)", vec![&mb], "22023"),
        (
            "SELECT picloud_create_kv_trigger($1, $2, $3)",
            vec![&app, &mb, &script],
            "22023",
        ),
        (
            "SELECT picloud_emit_kv($1, $2, 'set', 'k', '{}')",
            vec![&app, &mb],
            "22023",
        ),
        (
            "SELECT picloud_create_script($1, $2, 'sql', 'ledger_handler')",
            vec![&app, &mb],
            "22023",
        ),
        (
            "SELECT picloud_enqueue($1, 'queue', $2, '{}', $3)",
            vec![&app, &mb, &script],
            "22023",
        ),
        (
            "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2, p_idempotency_key => $3)",
            vec![&app, &script, &mb],
            "22023",
        ),
        (
            "SELECT picloud_collection_matches($1, 'x')",
            vec![&mb],
            "22023",
        ),
        // Invalid JSON where text is parsed
        (
            "SELECT picloud_enqueue($1, 'queue', 'x', $2::text::jsonb, $3)",
            vec![&app, &"{\"a\":", &script],
            "22P02",
        ),
        ("SELECT picloud.capture()", vec![], "0A000"),
        // Unknown ids
        (
            "SELECT picloud_get_trigger($1, $2)",
            vec![&app, &unknown],
            "P0002",
        ),
        (
            "SELECT picloud_drop_trigger($1, $2)",
            vec![&app, &unknown],
            "P0002",
        ),
        (
            "SELECT picloud_get_dead_letter($1, $2)",
            vec![&app, &unknown],
            "P0002",
        ),
        (
            "SELECT picloud_replay_dead_letter($1, $2)",
            vec![&app, &unknown],
            "P0002",
        ),
        (
            "SELECT picloud_resolve_dead_letter($1, $2, 'ignored')",
            vec![&app, &unknown],
            "P0002",
        ),
        (
            "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
            vec![&unknown, &script],
            "P0002",
        ),
        (
            "SELECT picloud_create_kv_trigger($1, 'x', $2)",
            vec![&app, &unknown],
            "P0002",
        ),
        (
            "SELECT picloud_complete($1, $2, 'w')",
            vec![&app, &unknown],
            "PC002",
        ),
        (
            "SELECT * FROM picloud_fail($1, $2, 'w', 'e')",
            vec![&app, &unknown],
            "PC002",
        ),
        ("SELECT picloud_drop_app($1)", vec![&unknown], "P0002"),
        // Negative and out-of-range limits
        (
            "SELECT * FROM picloud_list_dead_letters($1, true, -1, 0)",
            vec![&app],
            "22023",
        ),
        (
            "SELECT * FROM picloud_list_dead_letters($1, true, 10, -1)",
            vec![&app],
            "22023",
        ),
        (
            "SELECT * FROM picloud_list_abandoned_executions($1, 100000, 0)",
            vec![&app],
            "22023",
        ),
        (
            "SELECT * FROM picloud_list_outbox($1, -5, 0)",
            vec![&app],
            "22023",
        ),
        ("SELECT * FROM picloud_claim('w', 0, 1000)", vec![], "22023"),
        (
            "SELECT * FROM picloud_claim('w', -3, 1000)",
            vec![],
            "22023",
        ),
        ("SELECT * FROM picloud_claim('w', 10, -1)", vec![], "22023"),
        (
            "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2, p_depth => -1)",
            vec![&app, &script],
            "22023",
        ),
        (
            "SELECT picloud_open_inbox($1, interval '-1 second')",
            vec![&app],
            "22023",
        ),
        (
            "SELECT picloud_create_script($1, 'neg', 'command', 'ok', -1)",
            vec![&app],
            "22023",
        ),
        // Out-of-range settings
        ("SET picloud.max_trigger_depth = -1", vec![], "22023"),
        ("SET picloud.retry_max_attempts = 0", vec![], "22023"),
        ("SET picloud.retry_base_delay = '-5s'", vec![], "22023"),
        ("SET picloud.max_payload_bytes = 10", vec![], "22023"),
        ("SET picloud.gc_interval = '10s'", vec![], "55P02"),
        ("SET picloud.database = 'other'", vec![], "55P02"),
    ];
    let before = snapshot(&mut c);
    for (sql, params, code) in &cases {
        let got = sqlstate(c.query(*sql, params));
        assert_eq!(&got, code, "{sql}");
        assert_eq!(snapshot(&mut c), before, "{sql} changed data");
    }
    // The trigger and the event are still there and intact.
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM picloud.triggers WHERE trigger_id = '{trigger}'")
        ),
        1
    );
    println!(
        "bad-input: {} refused calls, data unchanged after each",
        cases.len()
    );
}

#[test]
fn a_100_mb_payload_is_refused_not_swallowed() {
    let (_db, mut c) = fresh_db("bigpayload");
    let (app, script) = ledger_app(&mut c);
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(100 * 1024 * 1024));
    let err = c.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', $2::text::jsonb, $3)",
        &[&app, &big, &script],
    );
    let message = error_message(c.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', $2::text::jsonb, $3)",
        &[&app, &big, &script],
    ));
    assert_eq!(sqlstate(err), "PC004");
    assert!(
        message.contains("exceeds picloud.max_payload_bytes"),
        "{message}"
    );
    let big_value: serde_json::Value = serde_json::json!({ "blob": "y".repeat(2 * 1024 * 1024) });
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT picloud_emit_kv($1, 'c', 'set', 'k', $2)",
            &[&app, &big_value]
        )),
        "PC004"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
    // Still usable afterwards.
    c.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
        &[&app, &script],
    )
    .unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 1);
}

/// The reference model of collection patterns the extension must agree with.
fn model(pattern: &str, name: &str) -> Option<bool> {
    if pattern.is_empty() || pattern.len() > 1024 {
        return None;
    }
    if pattern == "*" {
        return Some(true);
    }
    let stars = pattern.matches('*').count();
    if stars == 0 {
        return Some(pattern == name);
    }
    if stars == 1 && pattern.ends_with(":*") && pattern.len() > 2 {
        return Some(name.starts_with(&pattern[..pattern.len() - 1]));
    }
    None
}

fn fragment() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec!["a", "b", ":", "*", "é", " ", "名", "ab:", "a:"]),
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

#[test]
fn collection_matching_agrees_with_the_model() {
    let (db, _c) = fresh_db("proptest");
    let client = std::cell::RefCell::new(connect(&db));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (fragment(), fragment(), any::<bool>());
    runner
        .run(&strategy, |(pattern, suffix, derive_name)| {
            // Half the names are built from the pattern so that matches are common.
            let name = if derive_name {
                format!("{}{}", pattern.replace('*', ""), suffix)
            } else {
                suffix.clone()
            };
            let mut c = client.borrow_mut();
            let result = c.query_one(
                "SELECT picloud.picloud_collection_matches($1, $2)",
                &[&pattern, &name],
            );
            match model(&pattern, &name) {
                Some(expected) => {
                    let got: bool = result
                        .map_err(|e| TestCaseError::fail(format!("{pattern:?} {name:?}: {e}")))?
                        .get(0);
                    prop_assert_eq!(got, expected, "pattern {:?} name {:?}", pattern, name);
                    // Registration accepts exactly the valid patterns, and the stored key finds it.
                    let keys: Vec<String> = c
                        .query_one("SELECT picloud._collection_match_keys($1)", &[&name])
                        .map_err(|e| TestCaseError::fail(e.to_string()))?
                        .get(0);
                    let key: String = c
                        .query_one("SELECT picloud._pattern_match_key($1)", &[&pattern])
                        .map_err(|e| TestCaseError::fail(e.to_string()))?
                        .get(0);
                    prop_assert_eq!(
                        keys.contains(&key),
                        expected,
                        "index keys disagree for {:?} {:?}",
                        pattern,
                        name
                    );
                }
                None => {
                    let code = result
                        .err()
                        .and_then(|e| e.code().map(|s| s.code().to_string()));
                    prop_assert_eq!(
                        code,
                        Some("22023".to_string()),
                        "pattern {:?} must be refused",
                        pattern
                    );
                }
            }
            Ok(())
        })
        .unwrap();
}

/// picloud's C-convention functions read their arguments by position as raw datums. A
/// declaration out of step with their code (made by hand, or a reordered parameter) is refused
/// with 42P13 and a message naming both signatures, never read as the wrong types.
#[test]
fn a_declaration_out_of_step_with_the_c_code_is_refused_not_a_crash() {
    let (_db, mut c) = fresh_db("declaration");
    let (app, script) = ledger_app(&mut c);
    c.batch_execute(
        "CREATE FUNCTION public.enqueue_swapped(text, uuid, text, jsonb, uuid, uuid, integer, timestamptz, text, text)
             RETURNS uuid LANGUAGE c AS '$libdir/picloud', 'picloud_enqueue';
         CREATE FUNCTION public.enqueue_short(uuid, text, text, jsonb, uuid)
             RETURNS uuid LANGUAGE c AS '$libdir/picloud', 'picloud_enqueue';
         CREATE FUNCTION public.event_swapped(uuid, uuid, text, text, jsonb, integer, integer, uuid, text)
             RETURNS jsonb LANGUAGE c AS '$libdir/picloud', 'picloud_event_jsonb';",
    )
    .unwrap();
    let swapped = c.query(
        "SELECT public.enqueue_swapped('queue', $1, 'x', '{}', $2, NULL, NULL, NULL, NULL, NULL)",
        &[&app, &script],
    );
    let message = error_message(c.query(
        "SELECT public.enqueue_swapped('queue', $1, 'x', '{}', $2, NULL, NULL, NULL, NULL, NULL)",
        &[&app, &script],
    ));
    assert_eq!(sqlstate(swapped), "42P13");
    assert!(
        message.contains("declared with arguments (text, uuid, text")
            && message.contains("reads (uuid, text, text"),
        "{message}"
    );
    assert_eq!(
        sqlstate(c.query(
            "SELECT public.enqueue_short($1, 'queue', 'x', '{}', $2)",
            &[&app, &script]
        )),
        "42P13"
    );
    assert_eq!(
        sqlstate(c.query(
            "SELECT public.event_swapped(gen_random_uuid(), $1, 'queue', 'x', '{}', 0, 1, NULL, 'x')",
            &[&app]
        )),
        "42P13"
    );
    // The backend is sound and the real declaration still works, on the same connection.
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
    c.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
        &[&app, &script],
    )
    .unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 1);
}

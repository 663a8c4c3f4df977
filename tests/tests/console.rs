//! The console: a real picloud-console against a cluster of its own whose pg_hba.conf makes
//! the signing-in roles prove their password with scram-sha-256. The API is checked endpoint
//! by endpoint (status and SQLSTATE); the dashboard in headless Chromium with a real supervisor
//! replaying what the console asked for.
//!
//! Ports: 55480-55489 are this suite's.

use picloud_tests::console::*;
use picloud_tests::*;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

/// The tenants every test starts from: apps A and B, an admin of each, a producer of A and an
/// owner; a handler of A that fails until `switch.ok` is set, and a KV trigger on it.
struct Tenants {
    a: Uuid,
    b: Uuid,
    script_a: Uuid,
    script_b: Uuid,
    trigger_a: Uuid,
}

fn tenants(cluster: &ScramCluster) -> Tenants {
    for role in ["admin_a", "admin_b", "producer_a", "owner_o"] {
        cluster.create_role(role);
    }
    let mut su = cluster.superuser();
    su.batch_execute(
        "GRANT picloud_admin TO owner_o;
         CREATE TABLE switch (ok boolean NOT NULL); INSERT INTO switch VALUES (false);
         CREATE TABLE effects (payload jsonb, at timestamptz DEFAULT clock_timestamp());
         GRANT SELECT ON switch TO PUBLIC; GRANT INSERT ON effects TO PUBLIC;
         CREATE FUNCTION flaky(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN
             IF NOT (SELECT ok FROM public.switch) THEN
                 RAISE EXCEPTION 'flaky handler refused order %', e->'payload'->>'order';
             END IF;
             INSERT INTO public.effects (payload) VALUES (e->'payload');
             RETURN '{}';
         END $$;",
    )
    .expect("handler schema");
    let a: Uuid = su
        .query_one("SELECT picloud_create_app('shop')", &[])
        .unwrap()
        .get(0);
    let b: Uuid = su
        .query_one("SELECT picloud_create_app('billing')", &[])
        .unwrap()
        .get(0);
    su.execute(
        "SELECT picloud_grant_app_role($1, 'admin_a', 'admin')",
        &[&a],
    )
    .unwrap();
    su.execute(
        "SELECT picloud_grant_app_role($1, 'producer_a', 'producer')",
        &[&a],
    )
    .unwrap();
    su.execute(
        "SELECT picloud_grant_app_role($1, 'admin_b', 'admin')",
        &[&b],
    )
    .unwrap();
    let mut admin_a = cluster.connect_as("admin_a");
    let script_a: Uuid = admin_a
        .query_one(
            "SELECT picloud_create_script($1, 'flaky', 'sql', 'flaky')",
            &[&a],
        )
        .unwrap()
        .get(0);
    let trigger_a: Uuid = admin_a
        .query_one(
            "SELECT picloud_create_kv_trigger($1, 'orders', $2)",
            &[&a, &script_a],
        )
        .unwrap()
        .get(0);
    let script_b: Uuid = cluster
        .connect_as("admin_b")
        .query_one(
            "SELECT picloud_create_script($1, 'flaky', 'sql', 'flaky')",
            &[&b],
        )
        .unwrap()
        .get(0);
    Tenants {
        a,
        b,
        script_a,
        script_b,
        trigger_a,
    }
}

/// `n` dead letters of `app` made directly (the API tests need many, quickly): one a second
/// apart, newest first; every third from the trigger and with a second error class.
fn dead_letters(su: &mut postgres::Client, app: Uuid, script: Uuid, trigger: Option<Uuid>, n: i32) {
    su.execute(
        "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, trigger_id, script_id,
                                           payload, attempt_count, first_attempt_at, last_attempt_at, last_error, created_at)
         SELECT $1, gen_random_uuid(), CASE WHEN i % 3 = 0 THEN 'kv' ELSE 'queue' END, 'order',
                CASE WHEN i % 3 = 0 THEN $3::uuid END, $2, jsonb_build_object('order', i), 3,
                now() - i * interval '1 minute' - interval '10 seconds', now() - i * interval '1 minute',
                CASE WHEN i % 3 = 0 THEN 'timeout after 30000 ms' ELSE 'flaky handler refused order ' || gen_random_uuid() END,
                now() - i * interval '1 minute'
         FROM generate_series(1, $4) i",
        &[&app, &script, &trigger, &n],
    )
    .expect("insert dead letters");
}

fn count_as(cluster: &ScramCluster, role: &str, app: Uuid) -> i64 {
    cluster
        .connect_as(role)
        .query_one("SELECT picloud_dead_letter_count($1)", &[&app])
        .unwrap()
        .get(0)
}

fn expect(answer: &Answer, status: u16, sqlstate: Option<&str>) {
    assert_eq!(answer.status, status, "{answer:?}");
    if let Some(s) = sqlstate {
        assert_eq!(answer.sqlstate(), Some(s), "{answer:?}");
    }
}

#[test]
fn api_every_endpoint_answers_with_its_status_and_sqlstate() {
    let cluster = ScramCluster::start("console-api", 55480);
    let t = tenants(&cluster);
    let mut su = cluster.superuser();
    dead_letters(&mut su, t.a, t.script_a, Some(t.trigger_a), 120);
    dead_letters(&mut su, t.b, t.script_b, None, 5);
    let console = Console::start(
        &cluster.url(),
        55481,
        &["--probe-role", "admin_a", "--login-per-minute", "1000"],
    );
    assert!(
        console.log().contains("refuses a wrong password"),
        "{}",
        console.log()
    );
    let base = console.base.clone();

    // Signing in: Postgres checks the password; nothing works without a session.
    let mut anon = ApiClient::new(&base);
    expect(&anon.get("/api/apps"), 401, None);
    expect(&anon.get("/api/session"), 401, None);
    assert_eq!(anon.get("/api/apps").code(), Some("not_signed_in"));
    expect(&anon.sign_in("admin_a", "wrong"), 401, Some("28P01"));
    expect(&anon.sign_in("nobody_here", "wrong"), 401, None);
    assert_eq!(
        anon.sign_in("nobody_here", "x").body["message"],
        anon.sign_in("admin_a", "x").body["message"]
    );
    expect(&anon.sign_in("", "x"), 422, Some("22P02"));
    anon.cookie = Some("picloud_session=forged".into());
    expect(&anon.get("/api/apps"), 401, None);
    let a = ApiClient::signed_in(&base, "admin_a");
    let cookie = a.cookie.clone().unwrap();
    let signed_in = anon.sign_in("admin_a", PASSWORD);
    let set_cookie = signed_in.set_cookie.join("\n");
    for attribute in ["HttpOnly", "SameSite=Strict", "Max-Age=", "Path=/"] {
        assert!(
            set_cookie.contains(attribute),
            "{attribute} missing: {set_cookie}"
        );
    }
    // A session id that was not signed by the console is refused.
    let mut tampered = ApiClient::new(&base);
    let value = cookie.trim_start_matches("picloud_session=");
    // Another first character (a session id that already began with 'x' stayed valid).
    let other = if value.starts_with('x') { 'y' } else { 'x' };
    tampered.cookie = Some(format!("picloud_session={other}{}", &value[1..]));
    expect(&tampered.get("/api/apps"), 401, None);
    expect(&a.get("/api/session"), 200, None);
    assert_eq!(a.get("/api/session").body["role"], "admin_a");

    // Apps and the badge.
    let apps = a.get("/api/apps");
    expect(&apps, 200, None);
    let listed: Vec<&Value> = apps.body["apps"].as_array().unwrap().iter().collect();
    assert_eq!(listed.len(), 1, "admin_a sees only its app: {listed:?}");
    assert_eq!(listed[0]["app_id"], json!(t.a.to_string()));
    assert_eq!(
        listed[0]["unresolved"],
        json!(count_as(&cluster, "admin_a", t.a))
    );
    assert_eq!(listed[0]["unresolved"], json!(120));
    let badge = a.get(&format!("/api/apps/{}/dead-letters/count", t.a));
    expect(&badge, 200, None);
    assert_eq!(badge.body["unresolved"], json!(120));

    // Keyset paging walks every unresolved dead letter once, newest first.
    let mut seen = Vec::new();
    let mut path = format!("/api/apps/{}/dead-letters?limit=50", t.a);
    loop {
        let page = a.get(&path);
        expect(&page, 200, None);
        for item in page.body["items"].as_array().unwrap() {
            seen.push((
                item["created_at"].as_str().unwrap().to_string(),
                item["dead_letter_id"].as_str().unwrap().to_string(),
            ));
        }
        match page.body["next"].as_str() {
            Some(next) => path = format!("/api/apps/{}/dead-letters?limit=50&after={next}", t.a),
            None => break,
        }
    }
    assert_eq!(seen.len(), 120);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(seen, sorted, "newest first");
    sorted.dedup();
    assert_eq!(sorted.len(), 120, "no dead letter twice");

    // Filters: error class, trigger, source, age.
    let list = |query: &str| a.get(&format!("/api/apps/{}/dead-letters?limit=500&{query}", t.a));
    let by_class = list("error_class=timeout%20after%2030000%20ms");
    assert_eq!(by_class.body["items"].as_array().unwrap().len(), 40);
    assert_eq!(
        list(&format!("trigger_id={}", t.trigger_a)).body["items"]
            .as_array()
            .unwrap()
            .len(),
        40
    );
    assert_eq!(
        list("source=queue").body["items"].as_array().unwrap().len(),
        80
    );
    assert_eq!(
        list("older_than_minutes=100").body["items"]
            .as_array()
            .unwrap()
            .len(),
        21
    );
    assert_eq!(
        list("newer_than_minutes=10").body["items"]
            .as_array()
            .unwrap()
            .len(),
        9
    );
    for bad in [
        "status=bogus",
        "after=garbage",
        "limit=0",
        "limit=501",
        "trigger_id=nope",
        "older_than_minutes=-1",
    ] {
        expect(&list(bad), 422, Some("22P02"));
    }
    expect(
        &a.get("/api/apps/not-a-uuid/dead-letters"),
        422,
        Some("22P02"),
    );
    let groups = a.get(&format!("/api/apps/{}/dead-letters/groups", t.a));
    expect(&groups, 200, None);
    assert_eq!(groups.body["by_error_class"].as_array().unwrap().len(), 2);
    assert_eq!(
        groups.body["by_error_class"][0]["error_class"],
        "flaky handler refused order <id>"
    );
    assert_eq!(groups.body["by_error_class"][0]["unresolved"], json!(80));
    assert_eq!(groups.body["by_trigger"].as_array().unwrap().len(), 2);
    assert_eq!(groups.body["grouped"], json!(120));
    assert_eq!(groups.body["sampled"], json!(false));

    // One dead letter, resolve, replay.
    let first = list("").body["items"][0]["dead_letter_id"]
        .as_str()
        .unwrap()
        .to_string();
    let one = a.get(&format!("/api/apps/{}/dead-letters/{first}", t.a));
    expect(&one, 200, None);
    assert_eq!(one.body["payload"]["order"], json!(1));
    assert_eq!(one.body["attempt_count"], json!(3));
    assert!(
        one.body["history"].as_array().unwrap().len() >= 3,
        "{:?}",
        one.body["history"]
    );
    expect(
        &a.get(&format!(
            "/api/apps/{}/dead-letters/{}",
            t.a,
            Uuid::new_v4()
        )),
        404,
        Some("P0002"),
    );
    let b_letter: Uuid = su
        .query_one(
            "SELECT dead_letter_id FROM picloud.dead_letters WHERE app_id = $1 LIMIT 1",
            &[&t.b],
        )
        .unwrap()
        .get(0);
    // Guessing B's id under A finds nothing; under B's app it is refused.
    expect(
        &a.get(&format!("/api/apps/{}/dead-letters/{b_letter}", t.a)),
        404,
        Some("P0002"),
    );
    expect(
        &a.get(&format!("/api/apps/{}/dead-letters/{b_letter}", t.b)),
        403,
        Some("42501"),
    );

    let resolve = |id: &str, resolution: &str| {
        a.post(
            &format!("/api/apps/{}/dead-letters/{id}/resolve", t.a),
            json!({"resolution": resolution}),
        )
    };
    expect(&resolve(&first, "forgotten"), 422, Some("23514"));
    expect(
        &a.post(
            &format!("/api/apps/{}/dead-letters/{first}/resolve", t.a),
            json!({}),
        ),
        422,
        Some("22P02"),
    );
    let refused = a.post_without_csrf(
        &format!("/api/apps/{}/dead-letters/{first}/resolve", t.a),
        json!({"resolution": "ignored"}),
    );
    expect(&refused, 403, None);
    assert_eq!(refused.code(), Some("csrf_token_invalid"));
    let mut wrong_token = ApiClient::signed_in(&base, "admin_a");
    wrong_token.csrf = a.csrf.as_ref().map(|t| format!("{t}x"));
    expect(
        &wrong_token.post(
            &format!("/api/apps/{}/dead-letters/{first}/replay", t.a),
            json!({}),
        ),
        403,
        None,
    );
    assert_eq!(
        count_as(&cluster, "admin_a", t.a),
        120,
        "refused requests change nothing"
    );
    expect(&resolve(&first, "handled_by_script"), 200, None);
    expect(&resolve(&first, "ignored"), 409, Some("PC003"));
    expect(
        &resolve(&Uuid::new_v4().to_string(), "ignored"),
        404,
        Some("P0002"),
    );
    let second = list("").body["items"][0]["dead_letter_id"]
        .as_str()
        .unwrap()
        .to_string();
    let replayed = a.post(
        &format!("/api/apps/{}/dead-letters/{second}/replay", t.a),
        json!({}),
    );
    expect(&replayed, 200, None);
    let event: Uuid = replayed.body["event_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        count(
            &mut su,
            &format!("SELECT count(*) FROM picloud.outbox WHERE event_id = '{event}'")
        ),
        1
    );
    expect(
        &a.post(
            &format!("/api/apps/{}/dead-letters/{second}/replay", t.a),
            json!({}),
        ),
        409,
        Some("PC003"),
    );
    let orphan: Uuid = su
        .query_one(
            "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, payload, attempt_count, last_error)
             VALUES ($1, gen_random_uuid(), 'queue', 'x', '{}', 1, 'no handler') RETURNING dead_letter_id",
            &[&t.a],
        )
        .unwrap()
        .get(0);
    expect(
        &a.post(
            &format!("/api/apps/{}/dead-letters/{orphan}/replay", t.a),
            json!({}),
        ),
        422,
        Some("22023"),
    );
    expect(&resolve(&orphan.to_string(), "ignored"), 200, None);
    assert_eq!(count_as(&cluster, "admin_a", t.a), 118);
    let all = list("status=all");
    assert_eq!(all.body["items"].as_array().unwrap().len(), 121);

    // Bulk resolution: the dry run changes nothing, then the same filters apply.
    let bulk = |body: Value| a.post(&format!("/api/apps/{}/dead-letters/resolve", t.a), body);
    let dry = bulk(json!({"resolution": "ignored", "error_contains": "timeout", "dry_run": true}));
    expect(&dry, 200, None);
    assert_eq!(dry.body["count"], json!(40));
    assert_eq!(dry.body["rows"][0]["applied"], json!(false));
    assert_eq!(count_as(&cluster, "admin_a", t.a), 118);
    let applied = bulk(json!({"resolution": "ignored", "error_contains": "timeout", "limit": 10}));
    expect(&applied, 200, None);
    assert_eq!(applied.body["count"], json!(10));
    assert_eq!(count_as(&cluster, "admin_a", t.a), 108);
    expect(
        &bulk(json!({"resolution": "lost", "dry_run": true})),
        422,
        Some("23514"),
    );
    expect(&bulk(json!({"dry_run": true})), 422, Some("22P02"));
    expect(
        &bulk(json!({"resolution": "ignored", "limit": 0})),
        422,
        Some("22P02"),
    );
    expect(
        &bulk(json!({"resolution": "ignored", "dry_run": "maybe"})),
        422,
        Some("22P02"),
    );
    expect(
        &a.post(
            &format!("/api/apps/{}/dead-letters/resolve", t.b),
            json!({"resolution": "ignored"}),
        ),
        403,
        Some("42501"),
    );
    expect(
        &a.post(
            &format!("/api/apps/{}/dead-letters/resolve", Uuid::new_v4()),
            json!({"resolution": "ignored"}),
        ),
        403,
        Some("42501"),
    );
    let owner = ApiClient::signed_in(&base, "owner_o");
    expect(
        &owner.post(
            &format!("/api/apps/{}/dead-letters/resolve", Uuid::new_v4()),
            json!({"resolution": "ignored"}),
        ),
        404,
        Some("P0002"),
    );

    // The outbox: due, retrying, scheduled.
    su.execute("SELECT picloud_enqueue($1, 'queue', 'later', '{}', $2, p_run_at => now() + interval '1 hour')", &[&t.a, &t.script_a]).unwrap();
    su.execute(
        "SELECT picloud_enqueue($1, 'queue', 'again', '{}', $2)",
        &[&t.a, &t.script_a],
    )
    .unwrap();
    su.execute(
        "UPDATE picloud.outbox SET attempt_count = 1, last_error = 'boom' WHERE op = 'again'",
        &[],
    )
    .unwrap();
    let outbox = a.get(&format!("/api/apps/{}/outbox", t.a));
    expect(&outbox, 200, None);
    assert_eq!(
        outbox.body["counts"],
        json!({"claimed": 0, "due": 1, "retrying": 1, "scheduled": 1})
    );
    assert_eq!(outbox.body["events"].as_array().unwrap().len(), 3);
    let retrying = a.get(&format!("/api/apps/{}/outbox?state=retrying", t.a));
    assert_eq!(retrying.body["events"][0]["last_error"], "boom");
    expect(
        &a.get(&format!("/api/apps/{}/outbox?state=lost", t.a)),
        422,
        Some("22P02"),
    );
    expect(
        &a.get(&format!("/api/apps/{}/outbox?limit=0", t.a)),
        422,
        Some("22P02"),
    );
    expect(
        &a.get(&format!("/api/apps/{}/outbox", t.b)),
        403,
        Some("42501"),
    );

    // Triggers and handlers.
    let triggers = a.get(&format!("/api/apps/{}/triggers", t.a));
    expect(&triggers, 200, None);
    assert_eq!(
        triggers.body["triggers"][0]["trigger_id"],
        json!(t.trigger_a.to_string())
    );
    assert_eq!(triggers.body["triggers"][0]["enabled"], json!(true));
    expect(
        &a.post(
            &format!("/api/apps/{}/triggers/{}/disable", t.a, t.trigger_a),
            json!({}),
        ),
        200,
        None,
    );
    assert_eq!(
        a.get(&format!("/api/apps/{}/triggers", t.a)).body["triggers"][0]["enabled"],
        json!(false)
    );
    expect(
        &a.post(
            &format!("/api/apps/{}/triggers/{}/enable", t.a, t.trigger_a),
            json!({}),
        ),
        200,
        None,
    );
    assert_eq!(
        a.get(&format!("/api/apps/{}/triggers", t.a)).body["triggers"][0]["enabled"],
        json!(true)
    );
    expect(
        &a.post(
            &format!("/api/apps/{}/triggers/{}/enable", t.a, Uuid::new_v4()),
            json!({}),
        ),
        404,
        Some("P0002"),
    );
    expect(
        &a.post_without_csrf(
            &format!("/api/apps/{}/triggers/{}/disable", t.a, t.trigger_a),
            json!({}),
        ),
        403,
        None,
    );
    let handlers = a.get(&format!("/api/apps/{}/handlers", t.a));
    expect(&handlers, 200, None);
    assert_eq!(
        handlers.body["handlers"][0]["script_id"],
        json!(t.script_a.to_string())
    );

    // Stats.
    su.execute(
        "INSERT INTO picloud.event_counts (app_id, source, minute, backend_pid, completed, failed, dead_lettered)
         VALUES ($1, 'queue', date_trunc('minute', now()), 1, 7, 3, 2)",
        &[&t.a],
    )
    .unwrap();
    let stats = a.get(&format!("/api/apps/{}/stats?minutes=30", t.a));
    expect(&stats, 200, None);
    assert_eq!(stats.body["per_minute"].as_array().unwrap().len(), 30);
    assert_eq!(stats.body["per_minute"][29]["completed"], json!(7));
    assert_eq!(stats.body["per_minute"][29]["dead_lettered"], json!(2));
    expect(
        &a.get(&format!("/api/apps/{}/stats?minutes=0", t.a)),
        422,
        Some("22P02"),
    );
    expect(
        &a.get(&format!("/api/apps/{}/stats", t.b)),
        403,
        Some("42501"),
    );

    // A producer of A and the admin of B see none of A's dead letters.
    let p = ApiClient::signed_in(&base, "producer_a");
    let p_apps = p.get("/api/apps");
    assert_eq!(p_apps.body["apps"][0]["app_id"], json!(t.a.to_string()));
    assert_eq!(p_apps.body["apps"][0]["unresolved"], Value::Null);
    let some_a: String = su
        .query_one(
            "SELECT dead_letter_id::text FROM picloud.dead_letters WHERE app_id = $1 LIMIT 1",
            &[&t.a],
        )
        .unwrap()
        .get(0);
    let b_admin = ApiClient::signed_in(&base, "admin_b");
    assert!(b_admin.get("/api/apps").body["apps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["app_id"] != json!(t.a.to_string())));
    for (who, client) in [("producer_a", &p), ("admin_b", &b_admin)] {
        for path in [
            format!("/api/apps/{}/dead-letters", t.a),
            format!("/api/apps/{}/dead-letters/count", t.a),
            format!("/api/apps/{}/dead-letters/groups", t.a),
            format!("/api/apps/{}/dead-letters/{some_a}", t.a),
            format!("/api/apps/{}/outbox", t.a),
            format!("/api/apps/{}/triggers", t.a),
            format!("/api/apps/{}/handlers", t.a),
            format!("/api/apps/{}/stats", t.a),
        ] {
            let answer = client.get(&path);
            assert_eq!(
                (answer.status, answer.sqlstate()),
                (403, Some("42501")),
                "{who} {path}: {answer:?}"
            );
            assert!(
                !answer.body.to_string().contains(&some_a),
                "{who} {path} leaks"
            );
        }
        for path in [
            format!("/api/apps/{}/dead-letters/{some_a}/replay", t.a),
            format!("/api/apps/{}/dead-letters/{some_a}/resolve", t.a),
            format!("/api/apps/{}/triggers/{}/disable", t.a, t.trigger_a),
        ] {
            let answer = client.post(&path, json!({"resolution": "ignored"}));
            assert_eq!(
                (answer.status, answer.sqlstate()),
                (403, Some("42501")),
                "{who} {path}: {answer:?}"
            );
        }
    }
    // admin_b guessing A's id under its own app finds nothing.
    expect(
        &b_admin.get(&format!("/api/apps/{}/dead-letters/{some_a}", t.b)),
        404,
        Some("P0002"),
    );
    let b_list = b_admin.get(&format!(
        "/api/apps/{}/dead-letters?status=all&limit=500",
        t.b
    ));
    assert!(b_list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["dead_letter_id"] != json!(some_a)));
    assert_eq!(
        count_as(&cluster, "admin_a", t.a),
        108,
        "nothing the others tried changed anything"
    );
    // The owner sees both apps.
    assert_eq!(
        owner.get("/api/apps").body["apps"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Badges count up to 1000 ("1000+"); the exact count is its own request.
    dead_letters(&mut su, t.b, t.script_b, None, 1001);
    let b_apps = b_admin.get("/api/apps");
    assert_eq!(b_apps.body["apps"][0]["unresolved"], json!(1000));
    assert_eq!(b_apps.body["apps"][0]["unresolved_more"], json!(true));
    assert_eq!(
        a.get("/api/apps").body["apps"][0]["unresolved_more"],
        json!(false)
    );
    assert_eq!(
        b_admin
            .get(&format!("/api/apps/{}/dead-letters/count", t.b))
            .body["unresolved"],
        json!(1006)
    );
    let (_, page) = b_admin.get_text(&format!("/apps/{}", t.b));
    assert!(page.contains(">1000+</span>"), "{page}");

    // Signing out needs the token too, and ends the session.
    // A cross-site form cannot sign anyone in: sign-in takes JSON only.
    assert_eq!(
        ApiClient::new(&base)
            .post_form(
                "/api/session",
                &[("role", "admin_a"), ("password", PASSWORD)]
            )
            .0,
        415
    );
    let mut no_token = ApiClient::signed_in(&base, "admin_a");
    no_token.csrf = None;
    expect(&no_token.delete("/api/session"), 403, None);
    expect(&a.delete("/api/session"), 204, None);
    expect(&a.get("/api/apps"), 401, None);
    expect(&a.get("/api/nothing"), 404, None);
    let log = console.log();
    assert!(
        log.contains("signed in") && log.contains("replayed a dead letter"),
        "{log}"
    );
    assert!(!log.contains(PASSWORD), "the password must never be logged");
    for secret in [
        a.csrf.clone().unwrap(),
        cookie.trim_start_matches("picloud_session=").to_string(),
    ] {
        assert!(!log.contains(&secret), "a session secret in the log");
    }
}

#[test]
fn sign_ins_are_rate_limited_trust_keeps_the_console_on_loopback_https_serves_and_postgres_tls_is_negotiated(
) {
    let cluster = ScramCluster::start("console-guard", 55482);
    cluster.create_role("admin_a");
    let console = Console::start(
        &cluster.url(),
        55483,
        &["--probe-role", "admin_a", "--login-per-minute", "3"],
    );
    let mut client = ApiClient::new(&console.base);
    for _ in 0..3 {
        expect(&client.sign_in("admin_a", "wrong"), 401, Some("28P01"));
    }
    let limited = client.sign_in("admin_a", PASSWORD);
    expect(&limited, 429, None);
    assert_eq!(limited.code(), Some("too_many_sign_ins"));

    // postgres is trusted by this cluster's pg_hba.conf: a wrong password lets it in.
    let mut refused = Console::spawn(
        &cluster.url(),
        "0.0.0.0:55484",
        &["--probe-role", "postgres"],
    );
    let status = refused
        .exited_within(Duration::from_secs(20))
        .expect("the console refuses to start");
    assert_eq!(status.code(), Some(2));
    let log = refused.log();
    assert!(
        log.contains("refusing to listen on 0.0.0.0:55484") && log.contains("wrong password"),
        "{log}"
    );
    // On loopback it starts, and says why it stays there.
    let trusting = Console::start(&cluster.url(), 55485, &["--probe-role", "postgres"]);
    assert!(
        trusting.log().contains("loopback only"),
        "{}",
        trusting.log()
    );
    drop(trusting);

    // https with rustls: the session cookie is then Secure too. (On a port picked now: a fixed
    // one inside the ephemeral range can be the local port of some connection at that moment.)
    let ca = TestCa::new("console test CA");
    let (cert, key) = ca.server_cert(&["127.0.0.1", "localhost"]);
    let dir = scratch_dir("console-https-files");
    std::fs::write(dir.join("console.crt"), cert).unwrap();
    std::fs::write(dir.join("console.key"), key).unwrap();
    let cert_path = dir.join("console.crt").to_string_lossy().into_owned();
    let key_path = dir.join("console.key").to_string_lossy().into_owned();
    let https = Console::start(
        &cluster.url(),
        free_port(),
        &[
            "--probe-role",
            "admin_a",
            "--console-tls-cert",
            &cert_path,
            "--console-tls-key",
            &key_path,
        ],
    );
    assert!(https.base.starts_with("https://"));
    let mut client = ApiClient::new(&https.base);
    let answer = client.sign_in("admin_a", PASSWORD);
    expect(&answer, 200, None);
    assert!(
        answer.set_cookie.join(";").contains("Secure"),
        "{:?}",
        answer.set_cookie
    );
    expect(&client.get("/api/session"), 200, None);
    // A role without rights in picloud is refused by Postgres itself.
    expect(&client.get("/api/apps"), 403, Some("42501"));
    // TLS to Postgres when the database asks for it: the signing-in roles may connect only
    // over TLS (hostssl), and the console's default sslmode (prefer) negotiates it.
    let (pg_cert, pg_key) = ca.server_cert(&["localhost"]);
    for (name, text) in [("server.crt", pg_cert), ("server.key", pg_key)] {
        let path = cluster.data_dir().join(name);
        std::fs::write(&path, text).unwrap();
        std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(&path)
            .status()
            .unwrap();
        std::process::Command::new("chmod")
            .arg("600")
            .arg(&path)
            .status()
            .unwrap();
    }
    let mut su = cluster.superuser();
    su.batch_execute("ALTER SYSTEM SET ssl = on").unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    cluster.set_hba(
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         hostssl all all 127.0.0.1/32 scram-sha-256\n",
    );
    let url = format!("host=127.0.0.1 port={} dbname={}", cluster.port, cluster.db);
    let over_tls = Console::start(&url, 55485, &["--probe-role", "admin_a"]);
    let mut client = ApiClient::new(&over_tls.base);
    expect(&client.sign_in("admin_a", PASSWORD), 200, None);
    let encrypted: bool = cluster
        .superuser()
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.usename = 'admin_a' AND a.application_name = 'picloud-console'
             ORDER BY a.backend_start DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(encrypted, "the session's connection is encrypted");
    drop(over_tls);
    // Without TLS the same role is turned away by the database, and the console says so.
    let plain = Console::start(
        &format!("{url} sslmode=disable"),
        55485,
        &["--probe-role", "admin_a"],
    );
    let mut client = ApiClient::new(&plain.base);
    expect(&client.sign_in("admin_a", PASSWORD), 401, Some("28000"));
    drop(plain);

    // Plain http to the https port gets no answer the client could use.
    assert!(!reqwest::blocking::get("http://127.0.0.1:55484/api/apps")
        .map(|r| r.status().is_success())
        .unwrap_or(false));
}

/// Waits until `sql` (a count) reaches `n`.
fn wait_count(su: &mut postgres::Client, sql: &str, n: i64) {
    assert!(
        eventually(Duration::from_secs(60), || count(su, sql) == n),
        "{sql} stayed at {} (wanted {n})",
        count(su, sql)
    );
}

#[test]
fn browser_an_admin_replays_and_bulk_resolves_and_other_tenants_see_nothing() {
    let cluster = ScramCluster::start("console-browser", 55486);
    let t = tenants(&cluster);
    let mut su = cluster.superuser();
    su.batch_execute(&format!(
        "ALTER DATABASE {db} SET picloud.retry_max_attempts = 2;
         ALTER DATABASE {db} SET picloud.retry_base_delay = '50ms';
         ALTER DATABASE {db} SET picloud.retry_max_delay = '100ms';",
        db = cluster.db
    ))
    .unwrap();
    let _supervisor = Supervisor::start_url(
        &format!("{} user=postgres", cluster.url()),
        "console-browser",
        &["--poll-interval-ms", "200"],
    );
    let mut admin_a = cluster.connect_as("admin_a");
    for order in 1..=5 {
        admin_a
            .execute(
                "SELECT picloud_enqueue($1, 'queue', 'order', jsonb_build_object('order', $2::int), $3)",
                &[&t.a, &order, &t.script_a],
            )
            .unwrap();
    }
    admin_a
        .execute(
            "SELECT picloud_enqueue($1, 'queue', 'order', '{\"order\": 6, \"note\": \"<script>document.title=\\\"pwned\\\"</script><img src=x onerror=alert(1)>\"}', $2)",
            &[&t.a, &t.script_a],
        )
        .unwrap();
    // The handler refuses every order: all six end in the dead letters.
    wait_count(
        &mut su,
        &format!(
            "SELECT count(*) FROM picloud.dead_letters WHERE app_id = '{}'",
            t.a
        ),
        6,
    );
    let letter = |su: &mut postgres::Client, order: i32| -> Uuid {
        su.query_one(
            "SELECT dead_letter_id FROM picloud.dead_letters WHERE app_id = $1 AND (payload->>'order')::int = $2",
            &[&t.a, &order],
        )
        .unwrap()
        .get(0)
    };
    let hostile = letter(&mut su, 6);
    let first = letter(&mut su, 1);

    let console = Console::start(
        &cluster.url(),
        55487,
        &["--probe-role", "admin_a", "--login-per-minute", "1000"],
    );
    let driver = Chromedriver::start(55488);

    // Sign in as A's admin: the badge is picloud_dead_letter_count.
    let browser = Browser::open(&driver, &console.base);
    browser.sign_in("admin_a", "wrong password");
    assert!(
        browser.text("#login-error").contains("wrong"),
        "{}",
        browser.source()
    );
    browser.sign_in("admin_a", PASSWORD);
    assert_eq!(browser.path(), "/apps");
    let badge = format!("#badge-{}", t.a);
    assert_eq!(
        browser.text(&badge),
        count_as(&cluster, "admin_a", t.a).to_string()
    );
    assert_eq!(browser.text(&badge), "6");
    assert!(
        !browser.exists(&format!("#badge-{}", t.b)),
        "B is not A's admin's to see"
    );
    browser.screenshot("apps.png");

    // The app's dead letters, grouped, with the list below.
    browser.click(&format!("a[href=\"/apps/{}\"]", t.a));
    assert_eq!(browser.count("#dead-letters tbody tr"), 6);
    assert!(browser.body_text().contains("flaky handler refused order"));
    browser.screenshot("dead-letters.png");

    // A payload with markup is shown as text, and nothing of it runs.
    browser.goto(&format!("/apps/{}/dead-letters/{hostile}", t.a));
    assert!(
        browser
            .text("#payload")
            .contains(r#"<script>document.title=\"pwned\"</script><img src=x onerror=alert(1)>"#),
        "{}",
        browser.text("#payload")
    );
    assert_eq!(browser.count("script"), 0);
    assert_eq!(browser.count("#payload img"), 0);
    assert!(browser.source().contains("&lt;script&gt;"));
    assert!(!browser.source().contains("<title>pwned"));
    browser.screenshot("dead-letter.png");

    // A state-changing request without the CSRF token is refused and changes nothing.
    let mut http = ApiClient::signed_in(&console.base, "admin_a");
    let (status, body) = http.post_form(
        &format!("/apps/{}/dead-letters/{first}/resolve", t.a),
        &[("resolution", "ignored")],
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
    let (status, _) = http.post_form(
        &format!("/apps/{}/dead-letters/{first}/replay", t.a),
        &[("csrf", "guessed")],
    );
    assert_eq!(status, 403);
    http.csrf = None;
    expect(
        &http.post(
            &format!("/api/apps/{}/dead-letters/{first}/replay", t.a),
            json!({}),
        ),
        403,
        None,
    );
    assert_eq!(count_as(&cluster, "admin_a", t.a), 6);

    // Replay one after the fault is fixed: the handler's effect lands and the badge drops.
    su.batch_execute("UPDATE switch SET ok = true").unwrap();
    browser.goto(&format!("/apps/{}/dead-letters/{first}", t.a));
    browser.click("#replay");
    assert!(
        browser.path().ends_with("/confirm?action=replay"),
        "{}",
        browser.path()
    );
    browser.screenshot("confirm.png");
    browser.click("#confirm");
    assert!(
        browser.text("#notice").contains("Replayed"),
        "{}",
        browser.source()
    );
    assert!(browser.text("#status").contains("replayed"));
    wait_count(
        &mut su,
        "SELECT count(*) FROM effects WHERE payload->>'order' = '1'",
        1,
    );
    browser.goto("/apps");
    assert_eq!(browser.text(&badge), "5");
    assert_eq!(count_as(&cluster, "admin_a", t.a), 5);

    // Bulk resolution shows the dry run's rows first, then applies exactly those.
    browser.goto(&format!("/apps/{}/bulk", t.a));
    browser.select("#bulk-resolution", "ignored");
    browser.fill("#bulk-error-contains", "refused order");
    browser.click("#dry-run");
    assert!(
        browser
            .text("#dry-run-summary")
            .contains("5 dead letter(s) would be resolved as ignored"),
        "{}",
        browser.source()
    );
    assert_eq!(browser.count("#bulk-rows tbody tr"), 5);
    assert_eq!(
        count_as(&cluster, "admin_a", t.a),
        5,
        "a dry run changes nothing"
    );
    browser.screenshot("bulk-dry-run.png");
    browser.click("#apply");
    assert!(
        browser
            .text("#applied-summary")
            .contains("5 dead letter(s) resolved as ignored"),
        "{}",
        browser.source()
    );
    assert_eq!(count_as(&cluster, "admin_a", t.a), 0);
    assert_eq!(
        count(&mut su, &format!("SELECT count(*) FROM picloud.dead_letters WHERE app_id = '{}' AND resolution = 'ignored'", t.a)),
        5
    );
    browser.goto("/apps");
    assert_eq!(browser.text(&badge), "0");

    // The outbox, the stats chart, the triggers.
    for order in [7, 8] {
        admin_a
            .execute(
                "SELECT picloud_enqueue($1, 'queue', 'order', jsonb_build_object('order', $2::int), $3, p_run_at => now() + interval '1 hour')",
                &[&t.a, &order, &t.script_a],
            )
            .unwrap();
    }
    browser.goto(&format!("/apps/{}/outbox", t.a));
    assert_eq!(browser.text("#count-scheduled"), "2");
    assert_eq!(browser.count("#outbox tbody tr"), 2);
    browser.screenshot("outbox.png");
    browser.goto(&format!("/apps/{}/stats", t.a));
    assert_eq!(browser.count("#chart polyline"), 3);
    assert!(
        browser.body_text().contains("dead-lettered 6"),
        "{}",
        browser.body_text()
    );
    browser.screenshot("stats.png");
    browser.goto(&format!("/apps/{}/triggers", t.a));
    browser.click("#triggers button");
    let enabled: bool = su
        .query_one(
            "SELECT enabled FROM picloud.triggers WHERE trigger_id = $1",
            &[&t.trigger_a],
        )
        .unwrap()
        .get(0);
    assert!(!enabled, "the Disable button disabled the trigger");
    browser.screenshot("triggers.png");
    browser.set_size(390, 844);
    browser.goto(&format!("/apps/{}", t.a));
    browser.screenshot("dead-letters-phone.png");
    browser.click("header button");
    assert_eq!(browser.path(), "/login");
    drop(browser);

    // A producer of A and the admin of B see none of A's dead letters, by link or by guess.
    let guesses = [
        format!("/apps/{}", t.a),
        format!("/apps/{}/dead-letters?status=all", t.a),
        format!("/apps/{}/dead-letters/{hostile}", t.a),
        format!("/apps/{}/dead-letters/{first}/confirm?action=replay", t.a),
        format!("/apps/{}/outbox", t.a),
        format!("/apps/{}/stats", t.a),
        format!("/apps/{}/triggers", t.a),
    ];
    for role in ["producer_a", "admin_b"] {
        let b = Browser::open(&driver, &console.base);
        // The sign-in works from the keyboard alone (no pointer, no script).
        b.sign_in_with_keyboard(role, PASSWORD);
        assert_eq!(b.path(), "/apps", "{role}: {}", b.body_text());
        assert!(!b.exists(&badge), "{role} sees no badge of A");
        for path in &guesses {
            b.goto(path);
            let source = b.source();
            assert!(
                b.text("#error-sqlstate") == "42501",
                "{role} {path}: {source}"
            );
            for secret in [
                hostile.to_string(),
                first.to_string(),
                "refused order".to_string(),
            ] {
                assert!(!source.contains(&secret), "{role} {path} shows {secret}");
            }
        }
        let api = ApiClient::signed_in(&console.base, role);
        expect(
            &api.get(&format!("/api/apps/{}/dead-letters?status=all", t.a)),
            403,
            Some("42501"),
        );
        expect(
            &api.get(&format!("/api/apps/{}/dead-letters/{hostile}", t.a)),
            403,
            Some("42501"),
        );
        if role == "admin_b" {
            b.goto(&format!("/apps/{}/dead-letters/{hostile}", t.b));
            assert_eq!(b.text("#error-sqlstate"), "P0002");
            assert!(!b.source().contains("pwned"));
            expect(
                &api.get(&format!("/api/apps/{}/dead-letters/{hostile}", t.b)),
                404,
                Some("P0002"),
            );
        } else {
            assert!(
                b.body_text().contains("not yours to see") || {
                    b.goto("/apps");
                    b.body_text().contains("not yours to see")
                }
            );
        }
    }
}

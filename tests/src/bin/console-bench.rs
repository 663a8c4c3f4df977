//! The console at 1,000,000 dead letters in one app: the dead-letter list through the API and
//! as a page, first page and 500th page (keyset cursor), 100 requests each after a warm-up.
//! Prints the console's own time per request (its Server-Timing header, database included)
//! and the client's round trip over loopback, p50/p99/max in ms.
//!   PICLOUD_CONSOLE_BENCH_PORT   cluster port (default 55480; the console takes the next)
//!   PICLOUD_CONSOLE_BIN          the console binary (default target/debug/picloud-console)
//!   BENCH_DEAD_LETTERS           how many dead letters (default 1000000)

use picloud_tests::console::*;
use std::time::Instant;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let port: u16 = std::env::var("PICLOUD_CONSOLE_BENCH_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(55480);
    let n: i32 = std::env::var("BENCH_DEAD_LETTERS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1_000_000);
    let cluster = ScramCluster::start("console-bench", port);
    cluster.create_role("bench_admin");
    let mut su = cluster.superuser();
    let app: uuid::Uuid = su
        .query_one("SELECT picloud_create_app('bench')", &[])
        .unwrap()
        .get(0);
    su.execute(
        "SELECT picloud_grant_app_role($1, 'bench_admin', 'admin')",
        &[&app],
    )
    .unwrap();
    su.batch_execute("CREATE FUNCTION bench_noop(e jsonb) RETURNS void LANGUAGE sql AS 'SELECT'")
        .unwrap();
    let script: uuid::Uuid = su
        .query_one(
            "SELECT picloud_create_script($1, 'noop', 'sql', 'bench_noop')",
            &[&app],
        )
        .unwrap()
        .get(0);
    let start = Instant::now();
    su.execute(
        "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, script_id, payload,
                                           attempt_count, last_error, created_at)
         SELECT $1, gen_random_uuid(), 'queue', 'order', $2, jsonb_build_object('order', i), 5,
                'handler failed: order ' || i || ' was refused', now() - i * interval '1 millisecond'
         FROM generate_series(1, $3) i",
        &[&app, &script, &n],
    )
    .unwrap();
    su.batch_execute("VACUUM ANALYZE picloud.dead_letters")
        .unwrap();
    eprintln!(
        "{n} dead letters inserted and analyzed in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let console = Console::start(&cluster.url(), port + 1, &["--probe-role", "bench_admin"]);
    let client = ApiClient::signed_in(&console.base, "bench_admin");
    // The 500th page of 50 starts after the 24,950th dead letter, newest first.
    let cursor: String = su
        .query_one(
            "SELECT (extract(epoch FROM created_at) * 1000000)::bigint || '_' || dead_letter_id
             FROM picloud.dead_letters WHERE app_id = $1 AND resolved_at IS NULL
             ORDER BY created_at DESC, dead_letter_id DESC OFFSET 24949 LIMIT 1",
            &[&app],
        )
        .unwrap()
        .get(0);
    let cases = [
        (
            "API list, page 1",
            format!("/api/apps/{app}/dead-letters?limit=50"),
        ),
        (
            "API list, page 500",
            format!("/api/apps/{app}/dead-letters?limit=50&after={cursor}"),
        ),
        (
            "page list, page 1",
            format!("/apps/{app}/dead-letters?limit=50"),
        ),
        (
            "page list, page 500",
            format!("/apps/{app}/dead-letters?limit=50&after={cursor}"),
        ),
        (
            "API exact count (picloud_dead_letter_count)",
            format!("/api/apps/{app}/dead-letters/count"),
        ),
        (
            "API apps with badges (capped at 1000)",
            "/api/apps".to_string(),
        ),
        (
            "API groups (newest 10,000 unresolved)",
            format!("/api/apps/{app}/dead-letters/groups"),
        ),
        (
            "page app overview (groups + page 1)",
            format!("/apps/{app}"),
        ),
    ];
    println!("| case | requests | server p50 | server p99 | server max | round trip p99 |");
    println!("|---|---|---|---|---|---|");
    for (name, path) in cases {
        // The exact count reads every dead letter (seconds at 1M).
        let requests = if name.contains("exact count") { 3 } else { 100 };
        for _ in 0..5 {
            client.timed_get(&path);
        }
        let mut server = Vec::new();
        let mut round = Vec::new();
        for _ in 0..requests {
            let (status, server_ms, round_ms) = client.timed_get(&path);
            assert_eq!(status, 200, "{path}");
            server.push(server_ms);
            round.push(round_ms);
        }
        server.sort_by(|a, b| a.total_cmp(b));
        round.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {name} | {requests} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            percentile(&server, 0.5),
            percentile(&server, 0.99),
            server[server.len() - 1],
            percentile(&round, 0.99)
        );
    }
}

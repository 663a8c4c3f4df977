//! P1-http, P1-https: http handlers.

use super::p1::drain_with_supervisor;
use crate::config::{progress, Cfg, Res};
use crate::db::{connect, count, exec, settle};
use crate::http::plain_client_posts;
use crate::report::{fmt_num, Row};
use crate::setup::{bulk_enqueue, reset_queues, Main};
use crate::stats::{median_ratio, stat};
use postgres::Client;
use std::sync::atomic::Ordering;
use uuid::Uuid;

/// Drains `n` events of `script` through a fresh supervisor allowed to reach the no-op server;
/// notes any request the server missed or any dead letter. Events/s.
pub fn drain_http(
    cfg: &Cfg,
    m: &Main,
    c: &mut Client,
    script: Uuid,
    tag: &str,
    extra: &[String],
    notes: &mut Vec<String>,
) -> Res<f64> {
    let n = cfg.p1_http_events;
    reset_queues(c)?;
    exec(c, "DELETE FROM picloud.dead_letters")?;
    bulk_enqueue(c, m.app, script, n)?;
    exec(c, "ANALYZE picloud.outbox")?;
    settle(c)?;
    let before = m.server.hits.load(Ordering::Relaxed);
    let (rate, _) = drain_with_supervisor(cfg, c, tag, n, extra, notes)?;
    let hits = m.server.hits.load(Ordering::Relaxed) - before;
    let dead = count(c, "SELECT count(*) FROM picloud.dead_letters")?;
    if hits as i64 != n || dead > 0 {
        notes.push(format!(
            "{tag}: server saw {hits} requests for {n} events; {dead} dead letters"
        ));
    }
    Ok(rate)
}

/// P1-http: http no-op handler against the keep-alive server, beside a plain reqwest client
/// posting the same number of event documents with the supervisor's concurrency (16) in the
/// same run; P1-https: the same over TLS, as a ratio to P1-http.
pub fn bench_p1_http(cfg: &Cfg, m: &Main, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    const OLD_RATE: f64 = 2_262.0;
    let mut c = connect(cfg, &cfg.db)?;
    let allow = |port: u16| vec!["--http-allow".to_string(), format!("127.0.0.1:{port}")];
    let mut https_args = allow(m.server.tls_port);
    https_args.extend([
        "--http-ca-file".to_string(),
        m.server.ca_file.display().to_string(),
    ]);
    let (mut http, mut https, mut plain) = (vec![], vec![], vec![]);
    for run in 0..cfg.runs {
        for k in 0..3 {
            match (k + run) % 3 {
                0 => {
                    let rate = drain_http(
                        cfg,
                        m,
                        &mut c,
                        m.http,
                        "p1-http",
                        &allow(m.server.port),
                        notes,
                    )?;
                    progress(&format!(
                        "P1-http run {} picloud http: {rate:.0} events/s",
                        run + 1
                    ));
                    http.push(rate);
                }
                1 => {
                    let rate = drain_http(cfg, m, &mut c, m.https, "p1-https", &https_args, notes)?;
                    progress(&format!(
                        "P1-http run {} picloud https: {rate:.0} events/s",
                        run + 1
                    ));
                    https.push(rate);
                }
                _ => {
                    let rate = plain_client_posts(&m.server, cfg.p1_http_events as u64, 16)?;
                    progress(&format!(
                        "P1-http run {} plain reqwest client: {rate:.0} events/s",
                        run + 1
                    ));
                    plain.push(rate);
                }
            }
        }
    }
    reset_queues(&mut c)?;
    let n = fmt_num(cfg.p1_http_events as f64);
    let http_median = stat(&http).median;
    Ok(vec![
        Row::new(
            "P1-http",
            &format!("process {n} ev, http no-op, keep-alive server"),
            "ev/s",
        )
        .value(&http)
        .baseline("reqwest client, 16 at once", &plain, "ev/s")
        .ratio_of(&http, &plain)
        .target(
            "≥ 5× 2,262 ev/s and ≥ 0.50× client",
            http_median >= 5.0 * OLD_RATE && median_ratio(&http, &plain) >= 0.5,
        ),
        Row::new(
            "P1-https",
            &format!("process {n} ev, https no-op (TLS)"),
            "ev/s",
        )
        .value(&https)
        .baseline("P1-http, same run", &http, "ev/s")
        .ratio_of(&https, &http),
    ])
}

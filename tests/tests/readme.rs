//! The README is the user's guide. Its tour, pasted into psql against a database set up like
//! the one scripts/run.sh serves, with a real supervisor attached, runs line by line and ends
//! in the state it describes; its SQL API reference names every public function and view.

use picloud_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// The SQL between `<!-- tour:begin -->` and `<!-- tour:end -->`, without the code fences.
fn tour_sql() -> String {
    let text = readme();
    let begin = text.find("<!-- tour:begin -->").expect("tour begin marker");
    let end = text.find("<!-- tour:end -->").expect("tour end marker");
    text[begin..end]
        .lines()
        .skip(1)
        .filter(|line| !line.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs psql as a user would: no ~/.psqlrc, stop at the first error.
fn psql(db: &str, file: &Path) -> (bool, String) {
    let out = Command::new("psql")
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "--echo-queries",
            "-h",
            "127.0.0.1",
        ])
        .args(["-p", &port().to_string(), "-U", "postgres", "-d", db, "-f"])
        .arg(file)
        .output()
        .expect("run psql");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn readme_tour_runs_line_by_line() {
    let (db, mut c) = fresh_db("tour");
    let (ok, out) = psql(&db, &repo().join("scripts/dev-database.sql"));
    assert!(ok, "dev database settings: {out}");
    // The supervisor as scripts/run.sh starts it.
    let sup = Supervisor::start(&db, &["--poll-interval-ms", "5000"]);

    let tour = repo().join(format!("target/tour-{}.sql", std::process::id()));
    std::fs::write(&tour, tour_sql()).expect("write tour");
    let (ok, out) = psql(&db, &tour);
    std::fs::remove_file(&tour).ok();
    assert!(
        ok,
        "the tour stopped with an error:\n{out}\nsupervisor log:\n{}",
        sup.log()
    );

    // Every wait in the tour saw the supervisor finish (t), none timed out (f).
    let lines: Vec<&str> = out.lines().collect();
    let waits: Vec<&str> = lines
        .windows(3)
        .filter(|w| w[0].trim() == "picloud_wait_idle")
        .map(|w| w[2].trim())
        .collect();
    assert!(waits.len() >= 3, "tour output:\n{out}");
    assert!(
        waits.iter().all(|w| *w == "t"),
        "a wait timed out: {waits:?}\n{out}"
    );
    assert!(
        out.contains("dry run: 1 dead letter(s) would be resolved as replayed; nothing changed"),
        "{out}"
    );

    // The state the tour describes: confirmations for orders 1, 3 and 5 (2 was rolled back,
    // 4 resolved by hand), three dead letters resolved, nothing left in the outbox.
    let emails: Vec<i32> = c
        .query("SELECT order_id FROM emails ORDER BY 1", &[])
        .expect("emails")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(emails, vec![1, 3, 5]);
    let resolutions: Vec<(String, String)> = c
        .query(
            "SELECT payload->'value'->'new'->>'id', resolution FROM picloud.dead_letters ORDER BY 1",
            &[],
        )
        .expect("dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        resolutions,
        vec![
            ("3".to_string(), "replayed".to_string()),
            ("4".to_string(), "ignored".to_string()),
            ("5".to_string(), "replayed".to_string()),
        ]
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
}

#[test]
fn readme_reference_names_every_public_function_and_view() {
    let (_db, mut c) = fresh_db("reference");
    let text = readme();
    let names: Vec<String> = c
        .query(
            "SELECT DISTINCT proname::text FROM pg_proc
             WHERE pronamespace = 'picloud'::regnamespace AND proname LIKE 'picloud\\_%'
             UNION
             SELECT 'picloud.' || relname FROM pg_class
             WHERE relnamespace = 'picloud'::regnamespace AND relkind = 'v'
             ORDER BY 1",
            &[],
        )
        .expect("public names")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(names.len() > 40, "{names:?}");
    // A name counts as documented where it appears whole (not as the prefix of a longer name).
    let documented = |name: &str| {
        text.match_indices(name).any(|(at, _)| {
            !text[at + name.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    let missing: Vec<&String> = names.iter().filter(|name| !documented(name)).collect();
    assert!(missing.is_empty(), "README does not document: {missing:?}");
}

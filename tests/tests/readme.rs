//! The README is the front door and docs/ the guides. The README's tour, pasted into psql
//! against a database set up like the one scripts/run.sh serves, with a real supervisor
//! attached, runs line by line and ends in the state it describes; the SQL API reference
//! (docs/sql-api.md) names every public function and view, and every link between the
//! documents leads to a file and heading that exist.

use picloud_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn readme() -> String {
    read("README.md")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
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
    let text = read("docs/sql-api.md");
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
    assert!(
        missing.is_empty(),
        "docs/sql-api.md does not document: {missing:?}"
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks).
fn anchors(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut found = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            found.push(anchor(line.trim_start_matches('#')));
        }
    }
    found
}

#[test]
fn links_between_the_documents_lead_somewhere() {
    let documents = [
        "README.md",
        "docs/sql-api.md",
        "docs/operations.md",
        "docs/security.md",
        "docs/benchmarks.md",
        "docs/layout.md",
        "docs/scaling.md",
        "docs/console.md",
    ];
    let mut broken = Vec::new();
    let mut checked = 0;
    for document in documents {
        let text = read(document);
        let dir = Path::new(document).parent().unwrap_or(Path::new(""));
        // Every `](target)` that is not a web address.
        for (at, _) in text.match_indices("](") {
            let rest = &text[at + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.starts_with("http") || target.contains(' ') {
                continue;
            }
            let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
            let path = if file.is_empty() {
                PathBuf::from(document)
            } else {
                dir.join(file)
            };
            checked += 1;
            let Ok(linked) = std::fs::read(repo().join(&path)) else {
                broken.push(format!("{document}: {target} (no such file)"));
                continue;
            };
            if !fragment.is_empty()
                && !anchors(&String::from_utf8_lossy(&linked)).contains(&fragment.to_owned())
            {
                broken.push(format!("{document}: {target} (no such heading)"));
            }
        }
    }
    assert!(checked > 20, "only {checked} links found");
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}

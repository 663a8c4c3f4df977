//! Command handlers: run a configured program directly (no shell) with the
//! event JSON on stdin. Only programs configured with --command can run; the
//! handler target from the database is just a name looked up in that table.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use serde_json::Value;

use super::{excerpt, result_from_output, MAX_ERROR_BYTES};

/// The database URL (and its password) must not leak into handler programs.
const HIDDEN_ENV: &str = "PICLOUD_DATABASE_URL";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    pub program: String,
    pub args: Vec<String>,
}

/// Configured commands by name.
pub type Commands = BTreeMap<String, CommandSpec>;

/// Command names are plain identifiers so they can never be mistaken for a
/// path or carry shell syntax.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// Parses `NAME=PROGRAM [ARG...]`; arguments are split on whitespace.
pub fn parse_spec(text: &str) -> Result<(String, CommandSpec), String> {
    let (name, rest) = text
        .split_once('=')
        .ok_or_else(|| format!("'{}': expected NAME=PROGRAM [ARG...]", text.trim()))?;
    let name = name.trim();
    if !valid_name(name) {
        return Err(format!(
            "invalid command name '{name}': use only letters, digits, '_', '.' and '-'"
        ));
    }
    let mut words = rest.split_whitespace().map(str::to_owned);
    let program = words
        .next()
        .ok_or_else(|| format!("command {name} has no program"))?;
    Ok((
        name.to_owned(),
        CommandSpec {
            program,
            args: words.collect(),
        },
    ))
}

/// Parses all command entries; empty entries are skipped, a name given twice is an error.
pub fn parse_specs(items: &[String]) -> Result<Commands, String> {
    let mut commands = Commands::new();
    for item in items {
        if item.trim().is_empty() {
            continue;
        }
        let (name, spec) = parse_spec(item)?;
        if commands.insert(name.clone(), spec).is_some() {
            return Err(format!("command {name} is configured more than once"));
        }
    }
    Ok(commands)
}

/// Runs the command called `name` with `input` on stdin, bounded by `timeout`.
pub async fn run(
    commands: &Commands,
    max_output: usize,
    name: &str,
    input: &[u8],
    timeout: Duration,
) -> Result<Option<Value>, String> {
    let spec = match commands.get(name) {
        Some(spec) if valid_name(name) => spec,
        _ => return Err(format!("command not configured: {name}")),
    };
    let mut child = Command::new(&spec.program)
        .args(&spec.args)
        .env_remove(HIDDEN_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // If this event is abandoned (lease lost, shutdown), the program must not outlive it.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("command {name} could not be started: {e}"))?;

    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let exchange = async {
        let write_input = async {
            if let Some(mut stdin) = stdin {
                // A program may exit without reading its input; the broken pipe
                // that causes is its own business and shows in its exit status.
                let _ = stdin.write_all(input).await;
                // Dropping stdin closes it so the program sees end of input.
            }
        };
        let (_, out, err, status) = tokio::join!(
            write_input,
            read_capped(stdout, max_output),
            read_capped(stderr, MAX_ERROR_BYTES),
            child.wait()
        );
        (out, err, status)
    };
    let finished = tokio::time::timeout(timeout, exchange).await;

    let (out, err, status) = match finished {
        Ok(parts) => parts,
        Err(_) => {
            if let Err(e) = child.kill().await {
                tracing::debug!(command = name, error = %e, "could not kill timed-out command");
            }
            return Err(format!(
                "command {name} timed out after {} ms",
                timeout.as_millis()
            ));
        }
    };
    let io_error = |e: std::io::Error| format!("command {name} i/o error: {e}");
    let status = status.map_err(io_error)?;
    let (stdout, stdout_overflow) = out.map_err(io_error)?;
    let (stderr, _) = err.map_err(io_error)?;
    if !status.success() {
        return Err(format!(
            "command {name} exited with {}: {}",
            describe_status(status),
            excerpt(&stderr, MAX_ERROR_BYTES)
        ));
    }
    if stdout_overflow {
        return Err(format!(
            "command {name} wrote more than {max_output} bytes to stdout"
        ));
    }
    Ok(result_from_output(&stdout))
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => code.to_string(),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "unknown status".to_owned(),
    }
}

/// Reads a pipe to its end, keeping the first `cap` bytes. The rest is read
/// and discarded so the program never blocks on a full pipe. Returns the kept
/// bytes and whether anything was discarded.
async fn read_capped<R: AsyncRead + Unpin>(
    reader: Option<R>,
    cap: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::new();
    let mut overflow = false;
    let Some(mut reader) = reader else {
        return Ok((kept, overflow));
    };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Ok((kept, overflow));
        }
        let room = cap.saturating_sub(kept.len());
        if n > room {
            overflow = true;
        }
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::test_support::block_on;
    use serde_json::json;

    #[test]
    fn validates_names() {
        assert!(valid_name("resize"));
        assert!(valid_name("send-mail_v2.1"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name("../bin/sh"));
        assert!(!valid_name("rm;ls"));
        assert!(!valid_name("$(id)"));
        assert!(!valid_name("naïve"));
    }

    #[test]
    fn parses_specs() {
        let parsed = parse_spec("resize=/usr/bin/convert  -resize 50%");
        assert_eq!(
            parsed,
            Ok((
                "resize".to_owned(),
                CommandSpec {
                    program: "/usr/bin/convert".into(),
                    args: vec!["-resize".into(), "50%".into()],
                }
            ))
        );
        assert!(parse_spec("noequals").is_err());
        assert!(parse_spec("bad name=/bin/true").is_err());
        assert!(parse_spec("empty=   ").is_err());
        let both = parse_specs(&["a=/bin/true".into(), " ".into(), "b=/bin/cat".into()]);
        assert_eq!(both.map(|c| c.len()), Ok(2));
        assert!(parse_specs(&["a=/bin/true".into(), "a=/bin/cat".into()]).is_err());
    }

    fn commands(items: &[&str]) -> Commands {
        let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
        parse_specs(&items).unwrap_or_default()
    }

    const SECOND: Duration = Duration::from_secs(5);

    #[test]
    fn unknown_or_invalid_names_run_nothing() {
        let table = commands(&["cat=/bin/cat"]);
        let result = block_on(run(&table, 1024, "other", b"{}", SECOND));
        assert_eq!(result, Err("command not configured: other".into()));
        let result = block_on(run(&table, 1024, "/bin/cat", b"{}", SECOND));
        assert_eq!(result, Err("command not configured: /bin/cat".into()));
    }

    #[test]
    fn runs_programs_with_stdin() {
        let table = commands(&["cat=/bin/cat", "sleep=/bin/sleep 5"]);
        assert_eq!(
            block_on(run(&table, 1024, "cat", b"{\"x\":1}", SECOND)),
            Ok(Some(json!({"x": 1})))
        );
        assert!(block_on(run(&table, 4, "cat", b"{\"x\":1}", SECOND))
            .is_err_and(|e| e.contains("more than 4 bytes")));
        let timed_out = block_on(run(&table, 1024, "sleep", b"", Duration::from_millis(100)));
        assert_eq!(
            timed_out,
            Err("command sleep timed out after 100 ms".into())
        );
    }

    #[test]
    fn failures_carry_exit_code_and_stderr() {
        let table = Commands::from([(
            "fail".to_owned(),
            CommandSpec {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), "echo oops >&2; exit 3".into()],
            },
        )]);
        assert_eq!(
            block_on(run(&table, 1024, "fail", b"", SECOND)),
            Err("command fail exited with 3: oops".into())
        );
    }
}

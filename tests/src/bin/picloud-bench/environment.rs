//! The machine, the source and the cluster settings a run records.

use crate::config::{pg_err, Cfg, Res};
use crate::db::connect;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory_gib": (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "loadavg_at_start": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

/// The commit the benchmark ran on, and whether the working tree had changes.
pub fn source_state() -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let changed = git(&["status", "--porcelain", "--untracked-files=no"])
        .map(|s| s.lines().count())
        .unwrap_or(0);
    json!({"commit": commit, "modified_files": changed})
}

pub fn settings(cfg: &Cfg) -> Res<Value> {
    let mut c = connect(cfg, &cfg.db)?;
    let rows = c
        .query(
            "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings
             WHERE name IN ('server_version', 'shared_buffers', 'synchronous_commit', 'fsync', 'max_connections',
                            'wal_level', 'max_wal_size', 'autovacuum', 'autovacuum_naptime', 'work_mem')
                OR name LIKE 'picloud.%'
             ORDER BY name",
            &[],
        )
        .map_err(pg_err("read settings"))?;
    let mut map = serde_json::Map::new();
    for r in rows {
        map.insert(r.get::<_, String>(0), Value::String(r.get::<_, String>(1)));
    }
    let flags = if cfg.supervisor_args.is_empty() {
        "defaults, --poll-interval-ms 5000".to_owned()
    } else {
        format!(
            "defaults, --poll-interval-ms 5000 {}",
            cfg.supervisor_args.join(" ")
        )
    };
    map.insert("supervisor flags".to_owned(), Value::String(flags));
    Ok(Value::Object(map))
}

//! Database helpers: connections, statements, a quiet disk, pgbench.

use crate::config::{err, pg_err, Cfg, Res};
use postgres::{Client, NoTls};
use std::process::Command;
use std::time::{Duration, Instant};

pub fn connect(cfg: &Cfg, db: &str) -> Res<Client> {
    let mut c =
        Client::connect(&cfg.url(db), NoTls).map_err(pg_err(&format!("connect to {db}")))?;
    c.batch_execute("SET search_path = public, picloud")
        .map_err(pg_err("set search_path"))?;
    Ok(c)
}

pub fn exec(c: &mut Client, sql: &str) -> Res<()> {
    c.batch_execute(sql)
        .map_err(pg_err(sql.lines().next().unwrap_or(sql)))
}

pub fn count(c: &mut Client, sql: &str) -> Res<i64> {
    Ok(c.query_one(sql, &[]).map_err(pg_err(sql))?.get::<_, i64>(0))
}

/// Creates `db` with the extension unless it exists.
pub fn ensure_db(cfg: &Cfg, db: &str) -> Res<Client> {
    let mut admin = connect(cfg, "postgres")?;
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .map_err(pg_err("look up database"))?
        .is_some();
    if !exists {
        exec(&mut admin, &format!("CREATE DATABASE \"{db}\""))?;
    }
    let mut c = connect(cfg, db)?;
    exec(&mut c, "CREATE EXTENSION IF NOT EXISTS picloud")?;
    Ok(c)
}

/// Before every measured step: a checkpoint, so neither side pays for the other's dirty
/// buffers and full-page writes.
/// Starts a case from a quiet disk: a checkpoint, then the kernel's dirty pages written out
/// (an earlier case's writes, flushed in the background, would otherwise compete with this
/// case's commits for the disk, which shows in commit latency).
pub fn settle(c: &mut Client) -> Res<()> {
    exec(c, "CHECKPOINT")?;
    let start = Instant::now();
    loop {
        // sync(1) flushes every dirty page of the machine and waits for it.
        let _ = Command::new("sync").status();
        if dirty_kib() < 4096 || start.elapsed() > Duration::from_secs(30) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The kernel's dirty and under-writeback memory, in KiB (0 if /proc/meminfo is unreadable).
pub fn dirty_kib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .filter(|l| l.starts_with("Dirty:") || l.starts_with("Writeback:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

pub fn supervisor_idle(c: &mut Client) -> bool {
    c.query_one("SELECT picloud.picloud_supervisor_idle()", &[])
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
}

pub struct Pgbench {
    pub tps: f64,
    pub txns: i64,
    pub failed: i64,
}

/// Runs pgbench with `script` in the query protocol `protocol` (-M simple, extended or
/// prepared).
#[allow(clippy::too_many_arguments)]
pub fn pgbench(
    cfg: &Cfg,
    db: &str,
    name: &str,
    script: &str,
    clients: u32,
    jobs: u32,
    secs: u32,
    protocol: &str,
) -> Res<Pgbench> {
    let shape = Shape {
        clients,
        jobs,
        secs,
        protocol,
    };
    pgbench_as(cfg, db, "postgres", name, script, shape)
}

/// How a pgbench run drives its script.
pub struct Shape<'a> {
    pub clients: u32,
    pub jobs: u32,
    pub secs: u32,
    pub protocol: &'a str,
}

/// `pgbench` as the role `user`.
pub fn pgbench_as(
    cfg: &Cfg,
    db: &str,
    user: &str,
    name: &str,
    script: &str,
    shape: Shape,
) -> Res<Pgbench> {
    let Shape {
        clients,
        jobs,
        secs,
        protocol,
    } = shape;
    let dir = cfg.out.join("tmp");
    std::fs::create_dir_all(&dir).map_err(err("create tmp dir"))?;
    let path = dir.join(format!("{name}.sql"));
    std::fs::write(&path, script).map_err(err("write pgbench script"))?;
    let out = Command::new("pgbench")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cfg.port.to_string(),
            "-U",
            user,
            "-n",
        ])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &jobs.to_string(),
            "-T",
            &secs.to_string(),
        ])
        .args(["-M", protocol])
        .arg("-f")
        .arg(&path)
        .arg(db)
        .output()
        .map_err(err("run pgbench"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(format!(
            "pgbench {name} failed ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    let field = |prefix: &str| -> Option<f64> {
        stdout.lines().find_map(|l| {
            l.trim()
                .strip_prefix(prefix)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
    };
    let tps =
        field("tps = ").ok_or_else(|| format!("pgbench {name}: no tps in output: {stdout}"))?;
    Ok(Pgbench {
        tps,
        txns: field("number of transactions actually processed:").unwrap_or(f64::NAN) as i64,
        failed: field("number of failed transactions:").unwrap_or(0.0) as i64,
    })
}

/// The cluster's current WAL insert position, in bytes.
pub fn wal_lsn(c: &mut Client) -> Res<f64> {
    Ok(
        c.query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8", &[])
            .map_err(pg_err("pg_current_wal_lsn"))?
            .get(0),
    )
}

/// CPU seconds the whole machine has spent busy since boot (every CPU's user, nice, system,
/// irq, softirq and steal time in /proc/stat; idle and iowait left out). The difference over
/// a run counts postgres, the supervisor, the bench's clients and pgbench alike, and also
/// whatever else the machine runs meanwhile.
pub fn busy_cpu_secs() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    });
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is inside user already)
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| fields.get(*i))
        .sum();
    busy / ticks
}

/// WAL bytes and busy CPU seconds over a stretch of work: `Meter::start`, the work, `finish`.
pub struct Meter {
    lsn: f64,
    cpu: f64,
}

impl Meter {
    pub fn start(c: &mut Client) -> Res<Meter> {
        Ok(Meter {
            lsn: wal_lsn(c)?,
            cpu: busy_cpu_secs(),
        })
    }

    /// (WAL bytes written, busy CPU seconds) since `start`.
    pub fn finish(&self, c: &mut Client) -> Res<(f64, f64)> {
        let cpu = busy_cpu_secs() - self.cpu;
        Ok((wal_lsn(c)? - self.lsn, cpu))
    }
}

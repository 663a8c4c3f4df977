//! The SQL contract with the picloud extension: every call the supervisor
//! makes, schema-qualified, plus the classification of errors into what the
//! supervisor does about them. No policy lives here; the database decides.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::{FromSql, Json};
use tokio_postgres::{Client, Row, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;
use uuid::Uuid;

use crate::schema::{Schema, Version};

use crate::metrics::Kind;

/// SQLSTATE raised by picloud_complete / picloud_fail when this worker no
/// longer holds the lease on the row.
pub const LEASE_LOST_SQLSTATE: &str = "PC002";

/// The columns of picloud.claimed_event that `Claim::from_row` reads from a 0.4.0 schema. The
/// http lanes select these rather than `*`: the database then sends each event's payload once,
/// inside `event`, instead of twice, and converts none of the columns nobody reads.
pub const CLAIM_COLUMNS: &str = "app_id, event_id, script_id, depth, attempt_count, \
     handler_kind, handler_target, timeout_ms, principal, principal_error, event, priority";

/// One claimed outbox row, as returned by picloud.picloud_claim.
/// (reply_to is not read: answering a synchronous caller is done by the
/// database when the row is completed.)
#[derive(Debug, Clone)]
pub struct Claim {
    pub app_id: Uuid,
    pub event_id: Uuid,
    pub script_id: Uuid,
    pub depth: i32,
    pub attempt_count: i32,
    pub handler: Handler,
    pub timeout_ms: i32,
    pub principal: Option<String>,
    pub principal_error: Option<String>,
    /// The document http and command handlers receive, as the database built it
    /// (picloud.claimed_event's `event`), kept as its text: it is only ever passed on. From a
    /// schema before 0.4.0, which has no such column, the same document built here.
    pub event: Box<RawValue>,
    /// Orders an app's events waiting for a slot (`crate::ready`); 0 from a schema that does
    /// not answer it.
    pub priority: i16,
}

/// A claim of `app_id` with a fresh event id, for unit tests.
#[cfg(test)]
pub fn test_claim(app_id: Uuid) -> Claim {
    Claim {
        app_id,
        event_id: Uuid::from_u128(rand::random()),
        script_id: Uuid::nil(),
        depth: 0,
        attempt_count: 1,
        handler: Handler::Sql,
        timeout_ms: 1000,
        principal: None,
        principal_error: None,
        event: RawValue::from_string("{}".to_owned()).expect("valid JSON"),
        priority: 0,
    }
}

impl Claim {
    pub fn from_row(row: &Row) -> Result<Claim, String> {
        let event: Option<Json<Box<RawValue>>> = if has_column(row, "event") {
            column(row, "event")?
        } else {
            None
        };
        let event = match event {
            Some(Json(event)) => event,
            None => Claim::event_before_0_4(row)?,
        };
        Ok(Claim {
            app_id: column(row, "app_id")?,
            event_id: column(row, "event_id")?,
            script_id: column(row, "script_id")?,
            depth: column(row, "depth")?,
            attempt_count: column(row, "attempt_count")?,
            handler: Handler::new(column(row, "handler_kind")?, column(row, "handler_target")?),
            timeout_ms: column(row, "timeout_ms")?,
            principal: column(row, "principal")?,
            principal_error: column(row, "principal_error")?,
            event,
            priority: if has_column(row, "priority") {
                column::<Option<i16>>(row, "priority")?.unwrap_or(0)
            } else {
                0
            },
        })
    }

    /// The event document from a schema before 0.4.0 (whose claims do not build it), the same
    /// as sql/031_claims.sql builds it.
    fn event_before_0_4(row: &Row) -> Result<Box<RawValue>, String> {
        let document = json!({
            "event_id": column::<Uuid>(row, "event_id")?,
            "app_id": column::<Uuid>(row, "app_id")?,
            "source": column::<String>(row, "source")?,
            "op": column::<String>(row, "op")?,
            "payload": column::<Value>(row, "payload")?,
            "depth": column::<i32>(row, "depth")?,
            "attempt": column::<i32>(row, "attempt_count")?,
            "trigger_id": column::<Option<Uuid>>(row, "trigger_id")?,
            "script_id": column::<Uuid>(row, "script_id")?,
        });
        serde_json::value::to_raw_value(&document).map_err(|e| format!("event document: {e}"))
    }
}

fn has_column(row: &Row, name: &str) -> bool {
    row.columns().iter().any(|c| c.name() == name)
}

/// What runs an event, from the claimed row's handler kind and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handler {
    Sql,
    Http {
        url: String,
    },
    Command {
        name: String,
    },
    /// The event's script was deleted after the event was enqueued.
    Missing,
    /// A kind this supervisor does not run, or an http/command handler without a target.
    Unrunnable(String),
}

impl Handler {
    pub fn new(kind: Option<String>, target: Option<String>) -> Handler {
        match (kind.as_deref(), target) {
            (Some("sql"), _) => Handler::Sql,
            (Some("http"), Some(url)) => Handler::Http { url },
            (Some("command"), Some(name)) => Handler::Command { name },
            (Some(kind @ ("http" | "command")), None) => {
                Handler::Unrunnable(format!("{kind} handler has no target"))
            }
            (Some(other), _) => Handler::Unrunnable(format!("handler kind not supported: {other}")),
            (None, _) => Handler::Missing,
        }
    }

    /// The metrics label.
    pub fn kind(&self) -> Kind {
        match self {
            Handler::Sql => Kind::Sql,
            Handler::Http { .. } => Kind::Http,
            Handler::Command { .. } => Kind::Command,
            Handler::Missing | Handler::Unrunnable(_) => Kind::Unknown,
        }
    }

    /// The URL or command name, for logs.
    pub fn target(&self) -> Option<&str> {
        match self {
            Handler::Http { url } => Some(url),
            Handler::Command { name } => Some(name),
            _ => None,
        }
    }
}

fn column<'a, T: FromSql<'a>>(row: &'a Row, name: &str) -> Result<T, String> {
    row.try_get(name).map_err(|e| format!("column {name}: {e}"))
}

/// Where the database is and how to speak TLS to it (see `tls`), and whether the supervisor is
/// waiting for a primary.
#[derive(Clone)]
pub struct Database {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    /// Set while connections find only a standby, so that the dispatcher, the lanes and the
    /// executors together say "waiting for a primary" once, not once per attempt each.
    waiting_for_primary: Arc<AtomicBool>,
    /// The picloud version the last admitted connection found (`Version::pack`); see `schema`.
    schema_version: Arc<AtomicU64>,
}

/// The connection task's type for a `Database` connection.
pub type Connection =
    tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// Why no usable connection was opened.
#[derive(Debug)]
pub enum ConnectError {
    /// No server could be reached, or it refused the connection (address, authentication,
    /// certificate, ...).
    Failed(tokio_postgres::Error),
    /// The server reached is a standby (in recovery), or with `target_session_attrs=read-write`
    /// the last host tried does not accept writes: nothing there can be claimed, and the
    /// connection was closed.
    Standby,
    /// The database has no picloud extension (not yet created, or dropped).
    NoExtension,
}

impl ConnectError {
    pub fn is_certificate_error(&self) -> bool {
        match self {
            ConnectError::Failed(e) => crate::tls::is_certificate_error(e),
            ConnectError::Standby | ConnectError::NoExtension => false,
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Failed(e) => f.write_str(&error_text(e)),
            ConnectError::Standby => f.write_str("the server is a standby (in recovery)"),
            ConnectError::NoExtension => {
                f.write_str("the database has no picloud extension (CREATE EXTENSION picloud)")
            }
        }
    }
}

impl Database {
    pub fn new(config: tokio_postgres::Config, tls: MakeRustlsConnect) -> Database {
        Database {
            config,
            tls,
            waiting_for_primary: Arc::new(AtomicBool::new(false)),
            schema_version: Arc::new(AtomicU64::new(Version::CURRENT.pack())),
        }
    }

    /// Opens a connection whose connection task runs in the background; used for
    /// executor connections (the dispatcher's own connection is opened in `wake`).
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let (client, connection) = self.open().await?;
        let in_hot_standby = reported_standby(&connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %error_text(&e), "executor connection closed with an error");
            }
        });
        self.admit(client, in_hot_standby).await
    }

    /// Connects to the first host of the connection string that answers (and, with
    /// `target_session_attrs=read-write`, accepts writes). The caller spawns the connection task
    /// and then passes the client through `admit`.
    pub async fn open(&self) -> Result<(Client, Connection), ConnectError> {
        match self.config.connect(self.tls.clone()).await {
            Ok(opened) => Ok(opened),
            Err(e) if is_read_only_refusal(&e) => {
                self.note_standby();
                Err(ConnectError::Standby)
            }
            Err(e) => Err(ConnectError::Failed(e)),
        }
    }

    /// Keeps the client only if its server is a primary, and reads which picloud version its
    /// database runs (`schema`). A standby answers every claim with an error (read-only
    /// transaction) and would never run anything, so its connection is dropped at once: the
    /// caller retries with its backoff until a primary answers. `in_hot_standby` is what the
    /// server reported at connect (PostgreSQL 14 and later); older servers are asked.
    pub async fn admit(
        &self,
        client: Client,
        in_hot_standby: Option<bool>,
    ) -> Result<Client, ConnectError> {
        // The simple query protocol: one round trip, and no prepared statement, which a
        // transaction pooler would lose between Parse and Execute (the pooler is detected and
        // reported later by `wake::warn_if_pooled`).
        let messages = client
            .simple_query(&format!(
                "SELECT pg_catalog.pg_is_in_recovery(), ({})",
                Schema::QUERY
            ))
            .await
            .map_err(ConnectError::Failed)?;
        let row = messages.iter().find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        });
        let in_recovery = row.and_then(|row| row.get(0)) == Some("t");
        if in_hot_standby.unwrap_or(in_recovery) {
            self.note_standby();
            return Err(ConnectError::Standby);
        }
        if self.waiting_for_primary.swap(false, Ordering::AcqRel) {
            tracing::info!(hosts = self.hosts(), "connected to a primary");
        }
        let version = row
            .and_then(|row| row.get(1))
            .ok_or(ConnectError::NoExtension)?;
        self.note_schema(version);
        Ok(client)
    }

    /// What the database's picloud schema offers, as the last connection admitted found it.
    pub fn schema(&self) -> Schema {
        Schema {
            version: Version::unpack(self.schema_version.load(Ordering::Acquire)),
        }
    }

    /// Records the version a connection found; says so when it changes (at start-up against
    /// an older schema, and once `ALTER EXTENSION picloud UPDATE` has run).
    fn note_schema(&self, text: &str) {
        let version = Version::parse(text).unwrap_or_else(|| {
            tracing::warn!(
                extversion = text,
                "unrecognised picloud version; assuming {}",
                Version::CURRENT
            );
            Version::CURRENT
        });
        let before = Version::unpack(self.schema_version.swap(version.pack(), Ordering::AcqRel));
        if before == version {
            return;
        }
        if version < Version::CURRENT {
            tracing::warn!(
                schema = %version,
                supervisor = %Version::CURRENT,
                "the database's picloud schema is older than this supervisor: running with what \
                 it offers (run ALTER EXTENSION picloud UPDATE)"
            );
        } else {
            tracing::info!(schema = %version, "picloud schema");
        }
    }

    /// One line for the whole wait, however many connections find the standby.
    fn note_standby(&self) {
        if !self.waiting_for_primary.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                hosts = self.hosts(),
                "waiting for a primary: the database server is a standby (in recovery); nothing \
                 is claimed until a primary answers, and connecting is retried with backoff"
            );
        }
    }

    /// The hosts and ports of the connection string, for logs (never the whole string: it may
    /// hold a password).
    pub fn hosts(&self) -> String {
        let hosts: Vec<String> = if self.config.get_hosts().is_empty() {
            self.config
                .get_hostaddrs()
                .iter()
                .map(|addr| addr.to_string())
                .collect()
        } else {
            self.config
                .get_hosts()
                .iter()
                .map(|host| match host {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                })
                .collect()
        };
        let ports = self.config.get_ports();
        hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = ports
                    .get(i)
                    .or_else(|| ports.first())
                    .copied()
                    .unwrap_or(5432);
                format!("{host}:{port}")
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What the server reported at connect about being a hot standby (PostgreSQL 14 and later
/// send `in_hot_standby`); None when it did not say.
pub fn reported_standby(connection: &Connection) -> Option<bool> {
    connection
        .parameter("in_hot_standby")
        .map(|value| value == "on")
}

/// tokio-postgres's answer when `target_session_attrs=read-write` found only servers that do
/// not accept writes (it asks `SHOW transaction_read_only` after connecting).
fn is_read_only_refusal(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::PermissionDenied
                && io.to_string().contains("does not allow writes")
            {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

/// Claims up to `batch` due rows for this worker. Rows that cannot be read
/// are returned as errors so the caller can log them; their lease expires.
/// The dispatcher's claim statements, prepared once per connection so that a claim costs one
/// round trip rather than two (prepare, then execute).
pub struct ClaimStatements {
    /// Claims with the per-app cap that can leave http events to the http lanes (0.4.0 on);
    /// None on an older schema.
    capped: Option<tokio_postgres::Statement>,
    /// `picloud_complete_many` (0.4.0 on). Prepared with the claims so that a report sent just
    /// before a claim on the same connection also runs before it (an unprepared statement
    /// would be parsed first, and the claim would overtake it).
    pub complete_many: Option<tokio_postgres::Statement>,
    all: tokio_postgres::Statement,
    /// Leaves sql-lane events to the lanes; None on a schema without sql lanes.
    outside_lane: Option<tokio_postgres::Statement>,
}

impl ClaimStatements {
    pub async fn prepare(
        client: &Client,
        schema: Schema,
    ) -> Result<ClaimStatements, tokio_postgres::Error> {
        let capped = if schema.per_app_cap() {
            Some(
                client
                    .prepare(
                        "SELECT * FROM picloud.picloud_claim($1::text, $2::int4, $3::int4, $4::bool, $5::int4, $6::bool)",
                    )
                    .await?,
            )
        } else {
            None
        };
        let all = client
            .prepare("SELECT * FROM picloud.picloud_claim($1::text, $2::int4, $3::int4)")
            .await?;
        let complete_many = if schema.complete_many() {
            Some(client.prepare(COMPLETE_MANY).await?)
        } else {
            None
        };
        let outside_lane = if schema.claim_leaves_sql_lane() {
            Some(
                client
                    .prepare(
                        "SELECT * FROM picloud.picloud_claim($1::text, $2::int4, $3::int4, true)",
                    )
                    .await?,
            )
        } else {
            None
        };
        Ok(ClaimStatements {
            capped,
            complete_many,
            all,
            outside_lane,
        })
    }
}

/// What one claim asks for.
pub struct ClaimRequest<'a> {
    pub worker: &'a str,
    /// Most rows (the free executor slots).
    pub batch: i32,
    pub lease_ms: i32,
    /// Sql lanes are connected: leave them the first attempts of sql-handler events.
    pub leave_sql_lane: bool,
    /// Http lanes are connected: leave them the first attempts of http-handler events (a
    /// schema before 0.4.0 has no http lanes).
    pub leave_http_lane: bool,
    /// Most events of one app this worker holds claimed (a schema before 0.4.0 has no cap).
    pub app_cap: i32,
}

/// Claims up to `request.batch` due rows, fairly between apps (sql/031_claims.sql).
pub async fn claim(
    client: &Client,
    statements: &ClaimStatements,
    request: &ClaimRequest<'_>,
) -> Result<Vec<Result<Claim, String>>, tokio_postgres::Error> {
    let ClaimRequest {
        worker,
        batch,
        lease_ms,
        leave_sql_lane,
        leave_http_lane,
        app_cap,
    } = request;
    if let Some(capped) = &statements.capped {
        let rows = client
            .query(
                capped,
                &[
                    worker,
                    batch,
                    lease_ms,
                    leave_sql_lane,
                    app_cap,
                    leave_http_lane,
                ],
            )
            .await?;
        return Ok(rows.iter().map(Claim::from_row).collect());
    }
    let statement = match (&statements.outside_lane, *leave_sql_lane) {
        (Some(outside_lane), true) => outside_lane,
        _ => &statements.all,
    };
    let rows = client.query(statement, &[worker, batch, lease_ms]).await?;
    Ok(rows.iter().map(Claim::from_row).collect())
}

/// Milliseconds until the next unclaimed event is due (negative if one is due already), or
/// None when the outbox holds nothing unclaimed. Computed on the database's clock, so the
/// supervisor's clock does not matter.
pub async fn next_due_in_ms(client: &Client) -> Result<Option<f64>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT (extract(epoch FROM picloud.picloud_next_due_at() - clock_timestamp()) * 1000)::float8",
            &[],
        )
        .await?;
    row.try_get(0)
}

/// The valid signing secrets of the handler `script_id` of `app_id`, newest first (none if it
/// has none).
pub async fn signing_secrets(
    client: &Client,
    app_id: Uuid,
    script_id: Uuid,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT secrets FROM picloud.picloud_signing_secrets(ARRAY[$1::uuid], ARRAY[$2::uuid])",
            &[&app_id, &script_id],
        )
        .await?;
    match row {
        Some(row) => Ok(row
            .try_get::<_, Option<Vec<String>>>(0)?
            .unwrap_or_default()),
        None => Ok(Vec::new()),
    }
}

/// Why a report (complete, fail, release) did not go through.
#[derive(Clone, Debug)]
pub enum ReportError {
    /// Another worker holds the row now; nothing more to do.
    LeaseLost(String),
    /// The connection broke; the report may or may not have landed, so it is
    /// never repeated: if it did not, the lease expires and the row returns.
    Connection(String),
    /// The database refused the call for another reason.
    Rejected(String),
}

impl ReportError {
    pub fn from_error(e: &tokio_postgres::Error) -> ReportError {
        if is_lease_lost(e) {
            ReportError::LeaseLost(error_text(e))
        } else if e.as_db_error().is_some() {
            ReportError::Rejected(error_text(e))
        } else {
            ReportError::Connection(error_text(e))
        }
    }
}

pub async fn complete(
    client: &Client,
    claim: &Claim,
    worker: &str,
    result: Option<&Value>,
) -> Result<(), ReportError> {
    client
        .execute(
            "SELECT picloud.picloud_complete($1::uuid, $2::uuid, $3::text, $4::jsonb)",
            &[&claim.app_id, &claim.event_id, &worker, &result],
        )
        .await
        .map(|_| ())
        .map_err(|e| ReportError::from_error(&e))
}

const COMPLETE_MANY: &str =
    "SELECT picloud.picloud_complete_many($1::uuid[], $2::uuid[], $3::text, $4::jsonb[])";

/// Completes finished events together in one transaction; returns the ids completed. An event
/// left out was no longer held by `worker` (its lease expired). With `statement` (prepared by
/// `ClaimStatements`) the call is pipelined in order with what follows on the connection.
pub async fn complete_many(
    client: &Client,
    statement: Option<&tokio_postgres::Statement>,
    worker: &str,
    done: &[(&Claim, Option<&Value>)],
) -> Result<HashSet<Uuid>, ReportError> {
    let app_ids: Vec<Uuid> = done.iter().map(|(claim, _)| claim.app_id).collect();
    let event_ids: Vec<Uuid> = done.iter().map(|(claim, _)| claim.event_id).collect();
    let results: Vec<Option<&Value>> = done.iter().map(|(_, result)| *result).collect();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&app_ids, &event_ids, &worker, &results];
    let rows = match statement {
        Some(statement) => client.query(statement, &params).await,
        None => client.query(COMPLETE_MANY, &params).await,
    }
    .map_err(|e| ReportError::from_error(&e))?;
    rows.iter()
        .map(|row| row.try_get::<_, Uuid>(0))
        .collect::<Result<HashSet<Uuid>, _>>()
        .map_err(|e| ReportError::Rejected(error_text(&e)))
}

/// What the database decided after a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Retry,
    DeadLetter,
}

impl Decision {
    pub fn parse(text: &str) -> Option<Decision> {
        match text {
            "retry" => Some(Decision::Retry),
            "dead_letter" => Some(Decision::DeadLetter),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Retry => "retry",
            Decision::DeadLetter => "dead_letter",
        }
    }
}

#[derive(Debug)]
pub struct FailOutcome {
    pub decision: Decision,
    pub next_due_at: Option<DateTime<Utc>>,
    pub dead_letter_id: Option<Uuid>,
}

/// Reports a failure. `retry_at` (a server's Retry-After) asks the database not to run the
/// event again before then; its retry policy still decides whether there is a next attempt.
pub async fn fail(
    client: &Client,
    claim: &Claim,
    worker: &str,
    error: &str,
    retry_at: Option<DateTime<Utc>>,
) -> Result<FailOutcome, ReportError> {
    let row =
        match &retry_at {
            None => client
                .query_one(
                    "SELECT * FROM picloud.picloud_fail($1::uuid, $2::uuid, $3::text, $4::text)",
                    &[&claim.app_id, &claim.event_id, &worker, &error],
                )
                .await,
            Some(at) => client
                .query_one(
                    "SELECT * FROM picloud.picloud_fail($1::uuid, $2::uuid, $3::text, $4::text, \
                     $5::timestamptz)",
                    &[&claim.app_id, &claim.event_id, &worker, &error, at],
                )
                .await,
        }
        .map_err(|e| ReportError::from_error(&e))?;
    let outcome: String = column(&row, "outcome").map_err(ReportError::Rejected)?;
    Ok(FailOutcome {
        decision: Decision::parse(&outcome)
            .ok_or_else(|| ReportError::Rejected(format!("picloud_fail answered '{outcome}'")))?,
        next_due_at: column(&row, "next_due_at").map_err(ReportError::Rejected)?,
        dead_letter_id: column(&row, "dead_letter_id").map_err(ReportError::Rejected)?,
    })
}

/// Returns false when the lease is lost.
pub async fn extend_lease(
    client: &Client,
    claim: &Claim,
    worker: &str,
    lease_ms: i32,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT picloud.picloud_extend_lease($1::uuid, $2::uuid, $3::text, $4::int4)",
            &[&claim.app_id, &claim.event_id, &worker, &lease_ms],
        )
        .await?;
    // A NULL answer cannot confirm the lease, so it counts as lost.
    Ok(row.try_get::<_, Option<bool>>(0)?.unwrap_or(false))
}

/// Gives a claimed row back to the queue without counting the attempt.
/// Returns false when this worker no longer held the row.
pub async fn release(client: &Client, claim: &Claim, worker: &str) -> Result<bool, ReportError> {
    let row = client
        .query_one(
            "SELECT picloud.picloud_release($1::uuid, $2::uuid, $3::text)",
            &[&claim.app_id, &claim.event_id, &worker],
        )
        .await
        .map_err(|e| ReportError::from_error(&e))?;
    let released: Option<bool> = row
        .try_get(0)
        .map_err(|e| ReportError::Rejected(error_text(&e)))?;
    Ok(released.unwrap_or(false))
}

pub fn is_lease_lost(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|code| code.code() == LEASE_LOST_SQLSTATE)
}

/// Error text for logs and for picloud_fail: the server's message, its
/// detail when present, and the SQLSTATE; or the client error otherwise.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = db.message().to_owned();
            if let Some(detail) = db.detail() {
                text.push_str("\nDETAIL: ");
                text.push_str(detail);
            }
            text.push_str(&format!(" (SQLSTATE {})", db.code().code()));
            text
        }
        None => {
            // The client error's own text is only its kind ("error connecting
            // to server"); the cause (e.g. "Connection refused") is its source.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every column a claim selects is one of picloud.claimed_event's (sql/031_claims.sql).
    #[test]
    fn claim_columns_are_claimed_event_columns() {
        let sql = include_str!("../../sql/031_claims.sql");
        let start = sql
            .find("CREATE TYPE picloud.claimed_event AS (")
            .expect("claimed_event is defined");
        let definition = &sql[start..start + sql[start..].find(");").expect("its end")];
        let defined: Vec<&str> = definition
            .split(['(', ','])
            .skip(1)
            .filter_map(|column| column.split_whitespace().next())
            .collect();
        for column in CLAIM_COLUMNS.split(", ") {
            assert!(defined.contains(&column), "{column} is not in {defined:?}");
        }
        assert!(
            defined.contains(&"event") && defined.len() > 12,
            "{defined:?}"
        );
    }

    /// A report whose connection broke (the primary died) is `Connection`: the executor never
    /// repeats it, on this connection or a new one. The row either committed its outcome before
    /// the failure (and, replicated, stays done on the new primary) or is still claimed there
    /// and comes back when its lease expires: never reported twice.
    #[tokio::test]
    async fn a_report_on_a_lost_server_is_never_repeated() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        // Nothing listens there any more: the connection is refused, as by a dead primary.
        drop(listener);
        let url = format!("host=127.0.0.1 port={port} user=picloud connect_timeout=2");
        let config: tokio_postgres::Config = url.parse().expect("config");
        let error = match config.connect(tokio_postgres::NoTls).await {
            Ok(_) => panic!("nothing listens on port {port}"),
            Err(e) => e,
        };
        assert!(matches!(
            ReportError::from_error(&error),
            ReportError::Connection(_)
        ));
        assert!(!is_read_only_refusal(&error));
    }
}

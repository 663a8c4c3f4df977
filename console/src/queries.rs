//! Every statement the console sends, run on the signed-in role's own connection: the SQL
//! API's capability checks and row-level security decide what each person sees and may do.
//! Reads that the SQL API pages by offset (dead letters, outbox) are done here on the tables
//! (which tenants may SELECT under row-level security) after the API's own capability check,
//! so that paging is by key and stays fast deep into a million rows.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};
use uuid::Uuid;

use crate::error::ConsoleError;

type Result<T> = std::result::Result<T, ConsoleError>;
type Param = Box<dyn ToSql + Sync + Send>;

/// Runs the SQL API's capability check: 42501 (as the SQL API words it) unless the role
/// holds `capability` in the app.
pub async fn require(client: &Client, app: Uuid, capability: &str) -> Result<()> {
    client
        .execute("SELECT picloud._require($1, $2)", &[&app, &capability])
        .await?;
    Ok(())
}

async fn query(client: &Client, sql: &str, params: &[Param]) -> Result<Vec<Row>> {
    let refs: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    Ok(client.query(sql, &refs).await?)
}

/// Adds a parameter and returns its placeholder.
fn bind(params: &mut Vec<Param>, value: impl ToSql + Sync + Send + 'static) -> String {
    params.push(Box::new(value));
    format!("${}", params.len())
}

// Apps ----------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct App {
    pub app_id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// The unresolved dead letters (the badge), counted up to BADGE_CAP; None where the role
    /// may not see them.
    pub unresolved: Option<i64>,
    /// True when there are more than BADGE_CAP (`unresolved` is then BADGE_CAP).
    pub unresolved_more: bool,
    pub manages_dead_letters: bool,
    pub manages_triggers: bool,
}

pub async fn apps(client: &Client) -> Result<Vec<App>> {
    let rows = client
        .query(
            "SELECT a.app_id, a.name, a.created_at,
                    picloud.picloud_has_capability(a.app_id, 'manage_dead_letters') AS dl,
                    picloud.picloud_has_capability(a.app_id, 'manage_triggers') AS tr,
                    CASE WHEN picloud.picloud_has_capability(a.app_id, 'manage_dead_letters')
                         THEN (SELECT count(*) FROM (
                                  SELECT 1 FROM picloud.dead_letters d
                                  WHERE d.app_id = a.app_id AND d.resolved_at IS NULL
                                  LIMIT $1) AS capped) END AS unresolved
             FROM picloud.picloud_list_apps() a",
            &[&(BADGE_CAP + 1)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let counted: Option<i64> = r.try_get("unresolved")?;
            Ok(App {
                app_id: r.try_get("app_id")?,
                name: r.try_get("name")?,
                created_at: r.try_get("created_at")?,
                unresolved: counted.map(|n| n.min(BADGE_CAP)),
                unresolved_more: counted.is_some_and(|n| n > BADGE_CAP),
                manages_dead_letters: r.try_get("dl")?,
                manages_triggers: r.try_get("tr")?,
            })
        })
        .collect()
}

/// The app's name as the role sees it (None when the app is not visible to it).
pub async fn app_name(client: &Client, app: Uuid) -> Result<Option<String>> {
    let row = client
        .query_opt(
            "SELECT a.name FROM picloud.picloud_list_apps() a WHERE a.app_id = $1",
            &[&app],
        )
        .await?;
    Ok(match row {
        Some(r) => Some(r.try_get(0)?),
        None => None,
    })
}

/// Badges count at most this many unresolved dead letters, then show "1000+". An exact count
/// reads every unresolved row, and row-level security evaluates its policy on each one for a
/// tenant role (about 9 s at 1,000,000 here, against 0.14 s for the superuser, to whom
/// row-level security does not apply); the exact figure
/// stays one request away (`/dead-letters/count`, picloud_dead_letter_count).
pub const BADGE_CAP: i64 = 1000;

/// The badge of one app: (unresolved up to BADGE_CAP, whether there are more).
pub async fn badge(client: &Client, app: Uuid) -> Result<(i64, bool)> {
    require(client, app, "manage_dead_letters").await?;
    let row = client
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM picloud.dead_letters d
                                   WHERE d.app_id = $1 AND d.resolved_at IS NULL LIMIT $2) AS capped",
            &[&app, &(BADGE_CAP + 1)],
        )
        .await?;
    let n: i64 = row.try_get(0)?;
    Ok((n.min(BADGE_CAP), n > BADGE_CAP))
}

/// The exact unresolved count: picloud_dead_letter_count.
pub async fn dead_letter_count(client: &Client, app: Uuid) -> Result<i64> {
    let row = client
        .query_one("SELECT picloud.picloud_dead_letter_count($1)", &[&app])
        .await?;
    Ok(row.try_get(0)?)
}

// Dead letters --------------------------------------------------------------------------------

/// Where a page of dead letters starts: after this (created_at, dead_letter_id), newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub dead_letter_id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!(
            "{}_{}",
            self.created_at.timestamp_micros(),
            self.dead_letter_id
        )
    }

    pub fn decode(text: &str) -> Option<Cursor> {
        let (micros, id) = text.split_once('_')?;
        Some(Cursor {
            created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            dead_letter_id: id.parse().ok()?,
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub include_resolved: bool,
    pub error_class: Option<String>,
    pub trigger_id: Option<Uuid>,
    pub source: Option<String>,
    /// Only dead letters at least this many minutes old.
    pub older_than_minutes: Option<i32>,
    /// Only dead letters at most this many minutes old.
    pub newer_than_minutes: Option<i32>,
    pub limit: i64,
    pub after: Option<Cursor>,
}

#[derive(Debug, Serialize)]
pub struct DeadLetterItem {
    pub dead_letter_id: Uuid,
    pub original_event_id: Uuid,
    pub source: String,
    pub op: String,
    pub trigger_id: Option<Uuid>,
    pub script_id: Option<Uuid>,
    pub attempt_count: i32,
    pub created_at: DateTime<Utc>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub error_class: String,
    /// The first 500 characters of the last error.
    pub last_error: String,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolution: Option<String>,
    pub resolved_by: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DeadLetterPage {
    pub items: Vec<DeadLetterItem>,
    /// The cursor of the next page (`after=`), None on the last one.
    pub next: Option<String>,
}

/// One page of the app's dead letters, newest first (created_at DESC, dead_letter_id DESC).
/// Served by the indexes on (app_id, created_at): unresolved only uses the partial index of
/// unresolved rows, and the cursor makes every page an index range scan of `limit` rows.
pub async fn dead_letters(
    client: &Client,
    app: Uuid,
    f: &DeadLetterFilter,
) -> Result<DeadLetterPage> {
    require(client, app, "manage_dead_letters").await?;
    let mut params: Vec<Param> = Vec::new();
    let app_p = bind(&mut params, app);
    let mut sql = format!(
        "SELECT d.dead_letter_id, d.original_event_id, d.source, d.op, d.trigger_id, d.script_id,
                d.attempt_count, d.created_at, d.last_attempt_at,
                picloud.picloud_error_class(d.last_error) AS error_class,
                left(d.last_error, 500) AS last_error, d.resolved_at, d.resolution, d.resolved_by
         FROM picloud.dead_letters d
         WHERE d.app_id = {app_p}"
    );
    if !f.include_resolved {
        sql.push_str(" AND d.resolved_at IS NULL");
    }
    if let Some(class) = &f.error_class {
        let p = bind(&mut params, class.clone());
        sql.push_str(&format!(
            " AND picloud.picloud_error_class(d.last_error) = {p}"
        ));
    }
    if let Some(trigger) = f.trigger_id {
        let p = bind(&mut params, trigger);
        sql.push_str(&format!(" AND d.trigger_id = {p}"));
    }
    if let Some(source) = &f.source {
        let p = bind(&mut params, source.clone());
        sql.push_str(&format!(" AND d.source = {p}"));
    }
    if let Some(minutes) = f.older_than_minutes {
        let p = bind(&mut params, minutes);
        sql.push_str(&format!(
            " AND d.created_at <= now() - {p}::integer * interval '1 minute'"
        ));
    }
    if let Some(minutes) = f.newer_than_minutes {
        let p = bind(&mut params, minutes);
        sql.push_str(&format!(
            " AND d.created_at >= now() - {p}::integer * interval '1 minute'"
        ));
    }
    if let Some(after) = f.after {
        let at = bind(&mut params, after.created_at);
        let id = bind(&mut params, after.dead_letter_id);
        // The first condition is the index range; the second breaks ties within it.
        sql.push_str(&format!(
            " AND d.created_at <= {at} AND (d.created_at < {at} OR d.dead_letter_id < {id})"
        ));
    }
    let limit = bind(&mut params, f.limit + 1);
    sql.push_str(&format!(
        " ORDER BY d.created_at DESC, d.dead_letter_id DESC LIMIT {limit}"
    ));
    let rows = query(client, &sql, &params).await?;
    let mut items = rows
        .iter()
        .map(|r| {
            Ok(DeadLetterItem {
                dead_letter_id: r.try_get("dead_letter_id")?,
                original_event_id: r.try_get("original_event_id")?,
                source: r.try_get("source")?,
                op: r.try_get("op")?,
                trigger_id: r.try_get("trigger_id")?,
                script_id: r.try_get("script_id")?,
                attempt_count: r.try_get("attempt_count")?,
                created_at: r.try_get("created_at")?,
                last_attempt_at: r.try_get("last_attempt_at")?,
                error_class: r.try_get("error_class")?,
                last_error: r.try_get("last_error")?,
                resolved_at: r.try_get("resolved_at")?,
                resolution: r.try_get("resolution")?,
                resolved_by: r.try_get("resolved_by")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let more = items.len() as i64 > f.limit;
    items.truncate(f.limit.max(0) as usize);
    let next = match (more, items.last()) {
        (true, Some(last)) => Some(
            Cursor {
                created_at: last.created_at,
                dead_letter_id: last.dead_letter_id,
            }
            .encode(),
        ),
        _ => None,
    };
    Ok(DeadLetterPage { items, next })
}

#[derive(Debug, Serialize)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub what: String,
}

#[derive(Debug, Serialize)]
pub struct DeadLetter {
    pub app_id: Uuid,
    pub dead_letter_id: Uuid,
    pub original_event_id: Uuid,
    pub source: String,
    pub op: String,
    pub trigger_id: Option<Uuid>,
    pub script_id: Option<Uuid>,
    pub script_name: Option<String>,
    pub payload: serde_json::Value,
    pub depth: i32,
    pub attempt_count: i32,
    pub first_attempt_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_error: String,
    pub error_class: String,
    pub reply_to: Option<String>,
    pub created_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    pub resolution: Option<String>,
    /// What happened to the event, oldest first.
    pub history: Vec<HistoryEntry>,
}

pub async fn dead_letter(client: &Client, app: Uuid, id: Uuid) -> Result<DeadLetter> {
    let r = client
        .query_one(
            "SELECT d.*, picloud.picloud_error_class(d.last_error) AS error_class,
                    (SELECT s.name FROM picloud.scripts s
                     WHERE s.app_id = d.app_id AND s.script_id = d.script_id) AS script_name
             FROM picloud.picloud_get_dead_letter($1, $2) d",
            &[&app, &id],
        )
        .await?;
    let mut d = DeadLetter {
        app_id: r.try_get("app_id")?,
        dead_letter_id: r.try_get("dead_letter_id")?,
        original_event_id: r.try_get("original_event_id")?,
        source: r.try_get("source")?,
        op: r.try_get("op")?,
        trigger_id: r.try_get("trigger_id")?,
        script_id: r.try_get("script_id")?,
        script_name: r.try_get("script_name")?,
        payload: r.try_get("payload")?,
        depth: r.try_get("depth")?,
        attempt_count: r.try_get("attempt_count")?,
        first_attempt_at: r.try_get("first_attempt_at")?,
        last_attempt_at: r.try_get("last_attempt_at")?,
        last_error: r.try_get("last_error")?,
        error_class: r.try_get("error_class")?,
        reply_to: r.try_get("reply_to")?,
        created_at: r.try_get("created_at")?,
        resolved_at: r.try_get("resolved_at")?,
        resolved_by: r.try_get("resolved_by")?,
        resolution: r.try_get("resolution")?,
        history: Vec::new(),
    };
    let mut history = Vec::new();
    if let Some(at) = d.first_attempt_at {
        history.push(HistoryEntry {
            at,
            what: format!("first attempt of event {}", d.original_event_id),
        });
    }
    if let Some(at) = d.last_attempt_at {
        history.push(HistoryEntry {
            at,
            what: format!("attempt {} failed: the last one", d.attempt_count),
        });
    }
    history.push(HistoryEntry {
        at: d.created_at,
        what: "dead-lettered".into(),
    });
    if let (Some(at), Some(resolution)) = (d.resolved_at, &d.resolution) {
        history.push(HistoryEntry {
            at,
            what: format!(
                "resolved as {resolution} by {}",
                d.resolved_by.as_deref().unwrap_or("(unknown)")
            ),
        });
    }
    history.sort_by_key(|h| h.at);
    d.history = history;
    Ok(d)
}

pub const RESOLUTIONS: [&str; 4] = ["replayed", "ignored", "handled_by_script", "handler_failed"];

pub async fn resolve(client: &Client, app: Uuid, id: Uuid, resolution: &str) -> Result<()> {
    client
        .execute(
            "SELECT picloud.picloud_resolve_dead_letter($1, $2, $3)",
            &[&app, &id, &resolution],
        )
        .await?;
    Ok(())
}

/// Replays one dead letter; the new event's id.
pub async fn replay(client: &Client, app: Uuid, id: Uuid) -> Result<Uuid> {
    let row = client
        .query_one(
            "SELECT picloud.picloud_replay_dead_letter($1, $2)",
            &[&app, &id],
        )
        .await?;
    Ok(row.try_get(0)?)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BulkRequest {
    pub resolution: String,
    pub source: Option<String>,
    pub script_id: Option<Uuid>,
    pub trigger_id: Option<Uuid>,
    pub error_contains: Option<String>,
    pub created_before: Option<DateTime<Utc>>,
    pub limit: i32,
    pub dry_run: bool,
}

#[derive(Debug, Serialize)]
pub struct BulkRow {
    pub dead_letter_id: Uuid,
    pub source: String,
    pub op: String,
    pub script_id: Option<Uuid>,
    pub trigger_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub last_error: String,
    pub resolution: String,
    pub applied: bool,
    pub replay_event_id: Option<Uuid>,
}

#[derive(Debug, Serialize)]
pub struct BulkResult {
    pub dry_run: bool,
    pub count: usize,
    pub request: BulkRequest,
    pub rows: Vec<BulkRow>,
}

/// picloud_resolve_dead_letters: the dry run lists what would be resolved, changing nothing.
pub async fn resolve_bulk(client: &Client, app: Uuid, b: &BulkRequest) -> Result<BulkResult> {
    let rows = client
        .query(
            "SELECT r.dead_letter_id, r.source, r.op, r.script_id, r.trigger_id, r.created_at,
                    left(r.last_error, 500) AS last_error, r.resolution, r.applied, r.replay_event_id
             FROM picloud.picloud_resolve_dead_letters($1, $2, $3, $4, $5, $6, $7, $8, $9) r",
            &[
                &app,
                &b.resolution,
                &b.source,
                &b.script_id,
                &b.trigger_id,
                &b.error_contains,
                &b.created_before,
                &b.limit,
                &b.dry_run,
            ],
        )
        .await?;
    let rows = rows
        .iter()
        .map(|r| {
            Ok(BulkRow {
                dead_letter_id: r.try_get("dead_letter_id")?,
                source: r.try_get("source")?,
                op: r.try_get("op")?,
                script_id: r.try_get("script_id")?,
                trigger_id: r.try_get("trigger_id")?,
                created_at: r.try_get("created_at")?,
                last_error: r.try_get("last_error")?,
                resolution: r.try_get("resolution")?,
                applied: r.try_get("applied")?,
                replay_event_id: r.try_get("replay_event_id")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(BulkResult {
        dry_run: b.dry_run,
        count: rows.len(),
        request: b.clone(),
        rows,
    })
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ErrorGroup {
    pub error_class: String,
    pub unresolved: i64,
    pub last_at: DateTime<Utc>,
    pub latest_dead_letter_id: Uuid,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TriggerGroup {
    pub trigger_id: Option<Uuid>,
    pub trigger_kind: Option<String>,
    pub pattern: Option<String>,
    pub script_id: Option<Uuid>,
    pub script_name: Option<String>,
    pub unresolved: i64,
    pub last_at: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
pub struct Groups {
    /// How many unresolved dead letters were grouped: all of them, or the newest
    /// GROUPS_SAMPLE when there are more (`sampled` is then true).
    pub grouped: i64,
    pub sampled: bool,
    pub by_error_class: Vec<ErrorGroup>,
    pub by_trigger: Vec<TriggerGroup>,
}

/// Groups read at most this many unresolved dead letters, the newest: reading every one costs
/// a row-level-security check each for a tenant role (the runbook views took 25 s for both
/// groupings at 1,000,000 here).
pub const GROUPS_SAMPLE: i64 = 10_000;

/// The app's unresolved dead letters by error class (as picloud.dead_letter_errors groups
/// them) and by trigger and handler (as picloud.dead_letters_by_trigger), worst first, 50 each.
pub async fn groups(client: &Client, app: Uuid) -> Result<Groups> {
    require(client, app, "manage_dead_letters").await?;
    // One read of the sample (each row passes row-level security once), both groupings built
    // from it in the same statement.
    let row = client
        .query_one(
            "WITH s AS MATERIALIZED (
                 SELECT d.dead_letter_id, d.trigger_id, d.script_id, d.created_at, d.last_error
                 FROM picloud.dead_letters d
                 WHERE d.app_id = $1 AND d.resolved_at IS NULL
                 ORDER BY d.created_at DESC LIMIT $2::bigint + 1
             ), kept AS (
                 SELECT * FROM s ORDER BY s.created_at DESC LIMIT $2::bigint
             )
             SELECT (SELECT count(*) FROM s) AS grouped,
                    (SELECT coalesce(jsonb_agg(e), '[]') FROM (
                         SELECT picloud.picloud_error_class(k.last_error) AS error_class, count(*) AS unresolved,
                                max(k.created_at) AS last_at,
                                (array_agg(k.dead_letter_id ORDER BY k.created_at DESC, k.dead_letter_id))[1]
                                    AS latest_dead_letter_id
                         FROM kept k GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50) e) AS by_error_class,
                    (SELECT coalesce(jsonb_agg(g), '[]') FROM (
                         SELECT k.trigger_id, t.kind AS trigger_kind,
                                coalesce(kv.collection_pattern,
                                         CASE WHEN t.kind = 'dead_letter' THEN 'dead letters' END) AS pattern,
                                k.script_id, sc.name AS script_name, count(*) AS unresolved,
                                max(k.created_at) AS last_at
                         FROM kept k
                         LEFT JOIN picloud.triggers t ON t.app_id = $1 AND t.trigger_id = k.trigger_id
                         LEFT JOIN picloud.kv_trigger_details kv ON kv.app_id = $1 AND kv.trigger_id = k.trigger_id
                         LEFT JOIN picloud.scripts sc ON sc.app_id = $1 AND sc.script_id = k.script_id
                         GROUP BY k.trigger_id, t.kind, kv.collection_pattern, k.script_id, sc.name
                         ORDER BY unresolved DESC, last_at DESC LIMIT 50) g) AS by_trigger",
            &[&app, &GROUPS_SAMPLE],
        )
        .await?;
    let grouped: i64 = row.try_get("grouped")?;
    let decode = |column: &str| -> Result<serde_json::Value> { Ok(row.try_get(column)?) };
    let by_error_class: Vec<ErrorGroup> =
        serde_json::from_value(decode("by_error_class")?).map_err(unexpected)?;
    let by_trigger: Vec<TriggerGroup> =
        serde_json::from_value(decode("by_trigger")?).map_err(unexpected)?;
    Ok(Groups {
        grouped: grouped.min(GROUPS_SAMPLE),
        sampled: grouped > GROUPS_SAMPLE,
        by_error_class,
        by_trigger,
    })
}

fn unexpected(e: serde_json::Error) -> ConsoleError {
    tracing::error!(error = %e, "an answer of the database had an unexpected shape");
    ConsoleError::console(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "unexpected_answer",
        "the database's answer had an unexpected shape",
    )
}

// Outbox --------------------------------------------------------------------------------------

pub const OUTBOX_STATES: [&str; 4] = ["due", "retrying", "scheduled", "claimed"];

/// The SQL condition of an outbox state (each pending event is in exactly one).
fn outbox_condition(state: &str) -> Option<&'static str> {
    Some(match state {
        "due" => "o.claimed_by IS NULL AND o.attempt_count = 0 AND o.due_at <= now()",
        "retrying" => "o.claimed_by IS NULL AND o.attempt_count > 0",
        "scheduled" => "o.claimed_by IS NULL AND o.attempt_count = 0 AND o.due_at > now()",
        "claimed" => "o.claimed_by IS NOT NULL",
        _ => return None,
    })
}

#[derive(Debug, Serialize)]
pub struct OutboxEvent {
    pub event_id: Uuid,
    pub state: String,
    pub source: String,
    pub op: String,
    pub trigger_id: Option<Uuid>,
    pub script_id: Uuid,
    pub attempt_count: i32,
    pub due_at: DateTime<Utc>,
    pub claimed_by: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The first 300 characters of the payload's JSON.
    pub payload_preview: String,
}

#[derive(Debug, Serialize)]
pub struct Outbox {
    pub counts: std::collections::BTreeMap<String, i64>,
    pub state: Option<String>,
    pub events: Vec<OutboxEvent>,
}

/// The app's pending events, soonest due first, optionally of one state only.
pub async fn outbox(client: &Client, app: Uuid, state: Option<&str>, limit: i64) -> Result<Outbox> {
    require(client, app, "manage_dead_letters").await?;
    let condition = match state {
        None => "true",
        Some(s) => outbox_condition(s).ok_or_else(|| {
            ConsoleError::invalid_input(format!(
                "unknown outbox state {s:?}: expected one of {}",
                OUTBOX_STATES.join(", ")
            ))
        })?,
    };
    let sql = format!(
        "SELECT o.event_id, o.source::text AS source, o.op::text AS op, o.trigger_id, o.script_id,
                o.attempt_count::integer AS attempt_count, o.due_at::timestamptz AS due_at,
                o.claimed_by, o.lease_expires_at::timestamptz AS lease_expires_at,
                o.last_attempt_at, o.last_error, o.created_at,
                left(o.payload::text, 300) AS payload_preview,
                CASE WHEN o.claimed_by IS NOT NULL THEN 'claimed'
                     WHEN o.attempt_count > 0 THEN 'retrying'
                     WHEN o.due_at > now() THEN 'scheduled'
                     ELSE 'due' END AS state
         FROM picloud.outbox o
         WHERE o.app_id = $1 AND {condition}
         ORDER BY o.due_at, o.event_id LIMIT $2"
    );
    let rows = client.query(&sql, &[&app, &limit]).await?;
    let events = rows
        .iter()
        .map(|r| {
            Ok(OutboxEvent {
                event_id: r.try_get("event_id")?,
                state: r.try_get("state")?,
                source: r.try_get("source")?,
                op: r.try_get("op")?,
                trigger_id: r.try_get("trigger_id")?,
                script_id: r.try_get("script_id")?,
                attempt_count: r.try_get("attempt_count")?,
                due_at: r.try_get("due_at")?,
                claimed_by: r.try_get("claimed_by")?,
                lease_expires_at: r.try_get("lease_expires_at")?,
                last_attempt_at: r.try_get("last_attempt_at")?,
                last_error: r.try_get("last_error")?,
                created_at: r.try_get("created_at")?,
                payload_preview: r.try_get("payload_preview")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let counts_row = client
        .query_one(
            &format!(
                "SELECT {} FROM picloud.outbox o WHERE o.app_id = $1",
                OUTBOX_STATES
                    .iter()
                    .filter_map(|s| outbox_condition(s)
                        .map(|c| format!("count(*) FILTER (WHERE {c}) AS {s}")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            &[&app],
        )
        .await?;
    let mut counts = std::collections::BTreeMap::new();
    for s in OUTBOX_STATES {
        counts.insert(s.to_string(), counts_row.try_get::<_, i64>(s)?);
    }
    Ok(Outbox {
        counts,
        state: state.map(str::to_string),
        events,
    })
}

// Triggers and handlers -----------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct Trigger {
    pub trigger_id: Uuid,
    pub kind: String,
    pub script_id: Uuid,
    pub script_name: Option<String>,
    pub enabled: bool,
    pub registered_by_principal: String,
    pub collection_pattern: Option<String>,
    pub ops: Option<Vec<String>>,
    pub source_filter: Option<String>,
    pub script_filter: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: Option<DateTime<Utc>>,
}

pub async fn triggers(client: &Client, app: Uuid) -> Result<Vec<Trigger>> {
    let rows = client
        .query(
            "SELECT i.trigger_id, i.kind, i.script_id, s.name AS script_name, i.enabled,
                    i.registered_by_principal::text AS principal, i.collection_pattern, i.ops,
                    i.source_filter, i.script_filter, i.created_at, i.updated_at
             FROM picloud.picloud_list_triggers($1) i
             LEFT JOIN picloud.scripts s ON s.app_id = i.app_id AND s.script_id = i.script_id
             ORDER BY i.created_at, i.trigger_id",
            &[&app],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Trigger {
                trigger_id: r.try_get("trigger_id")?,
                kind: r.try_get("kind")?,
                script_id: r.try_get("script_id")?,
                script_name: r.try_get("script_name")?,
                enabled: r.try_get("enabled")?,
                registered_by_principal: r.try_get("principal")?,
                collection_pattern: r.try_get("collection_pattern")?,
                ops: r.try_get("ops")?,
                source_filter: r.try_get("source_filter")?,
                script_filter: r.try_get("script_filter")?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
            })
        })
        .collect()
}

pub async fn set_trigger_enabled(
    client: &Client,
    app: Uuid,
    trigger: Uuid,
    enabled: bool,
) -> Result<()> {
    client
        .execute(
            "SELECT picloud.picloud_set_trigger_enabled($1, $2, $3)",
            &[&app, &trigger, &enabled],
        )
        .await?;
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct Handler {
    pub script_id: Uuid,
    pub name: String,
    pub kind: String,
    pub target: String,
    pub timeout_ms: i32,
    pub registered_by_principal: String,
    pub created_at: DateTime<Utc>,
}

pub async fn handlers(client: &Client, app: Uuid) -> Result<Vec<Handler>> {
    let rows = client
        .query(
            "SELECT s.script_id, s.name, s.kind, s.target, s.timeout_ms,
                    s.registered_by_principal::text AS principal, s.created_at
             FROM picloud.picloud_list_scripts($1) s",
            &[&app],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Handler {
                script_id: r.try_get("script_id")?,
                name: r.try_get("name")?,
                kind: r.try_get("kind")?,
                target: r.try_get("target")?,
                timeout_ms: r.try_get("timeout_ms")?,
                registered_by_principal: r.try_get("principal")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect()
}

// Stats ---------------------------------------------------------------------------------------

#[derive(Debug, Serialize, Clone)]
pub struct Minute {
    pub minute: DateTime<Utc>,
    pub completed: i64,
    pub failed: i64,
    pub dead_lettered: i64,
}

#[derive(Debug, Serialize)]
pub struct SourceStats {
    pub source: String,
    pub due: i64,
    pub claimed: i64,
    pub delayed: i64,
    pub retrying: i64,
    pub oldest_due_seconds: Option<f64>,
    pub dead_letters_unresolved: i64,
    pub completed: i64,
    pub failed: i64,
    pub dead_lettered: i64,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub minutes: i32,
    /// One entry per minute of the window, oldest first (minutes without outcomes are zeros).
    pub per_minute: Vec<Minute>,
    /// picloud_stats for the window, one row per source.
    pub sources: Vec<SourceStats>,
}

pub async fn stats(client: &Client, app: Uuid, minutes: i32) -> Result<Stats> {
    require(client, app, "manage_dead_letters").await?;
    let rows = client
        .query(
            "SELECT m.minute, coalesce(sum(c.completed), 0)::bigint AS completed,
                    coalesce(sum(c.failed), 0)::bigint AS failed,
                    coalesce(sum(c.dead_lettered), 0)::bigint AS dead_lettered
             FROM generate_series(date_trunc('minute', now()) - ($2::integer - 1) * interval '1 minute',
                                  date_trunc('minute', now()), interval '1 minute') AS m(minute)
             LEFT JOIN picloud.event_counts c ON c.app_id = $1 AND c.minute = m.minute
             GROUP BY m.minute ORDER BY m.minute",
            &[&app, &minutes],
        )
        .await?;
    let per_minute = rows
        .iter()
        .map(|r| {
            Ok(Minute {
                minute: r.try_get("minute")?,
                completed: r.try_get("completed")?,
                failed: r.try_get("failed")?,
                dead_lettered: r.try_get("dead_lettered")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let rows = client
        .query(
            "SELECT s.source, s.due, s.claimed, s.delayed, s.retrying,
                    extract(epoch FROM s.oldest_due_age)::float8 AS oldest_due_seconds,
                    s.dead_letters_unresolved, s.completed, s.failed, s.dead_lettered
             FROM picloud.picloud_stats($2::integer * interval '1 minute') s WHERE s.app_id = $1",
            &[&app, &minutes],
        )
        .await?;
    let sources = rows
        .iter()
        .map(|r| {
            Ok(SourceStats {
                source: r.try_get("source")?,
                due: r.try_get("due")?,
                claimed: r.try_get("claimed")?,
                delayed: r.try_get("delayed")?,
                retrying: r.try_get("retrying")?,
                oldest_due_seconds: r.try_get("oldest_due_seconds")?,
                dead_letters_unresolved: r.try_get("dead_letters_unresolved")?,
                completed: r.try_get("completed")?,
                failed: r.try_get("failed")?,
                dead_lettered: r.try_get("dead_lettered")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Stats {
        minutes,
        per_minute,
        sources,
    })
}

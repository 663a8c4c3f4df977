//! The connections that LISTEN for picloud_wake (the dispatcher's and the first sql lane's).
//! Notifications only arrive through the connection task, so that task forwards them to a
//! `Notify` the claimer waits on.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client};
use uuid::Uuid;

use crate::db::{self, ConnectError, Database};

pub const WAKE_CHANNEL: &str = "picloud_wake";
/// The channel of the start-up check that notifications reach this connection.
const PROBE_CHANNEL: &str = "picloud_listen_probe";
/// How long the start-up check waits for its own notification. A direct or session-pooled
/// connection gets it within milliseconds.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Whom a wake-up is for, from its payload (sent by extension/src/api/wake.rs, whose
/// `WAKE_PAYLOADS` lists the same words): an enqueue names the lane that takes its events, so
/// that only that lane looks for work; the others' looks would compete with it for the cores.
/// Anything else, an empty payload included (and every payload of an older extension), is for
/// every claimer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeFor {
    Any,
    SqlLane,
    HttpLane,
}

impl WakeFor {
    pub fn from_payload(payload: &str) -> WakeFor {
        match payload {
            "sql" => WakeFor::SqlLane,
            "http" => WakeFor::HttpLane,
            named if lone_event(named).is_some() => WakeFor::SqlLane,
            _ => WakeFor::Any,
        }
    }
}

/// The event a sql lane's wake-up names, "sql <app id> <event id>": its transaction's only
/// sql-lane event, which the lane may lock by its key (extension/src/api/wake.rs).
pub fn lone_event(payload: &str) -> Option<(Uuid, Uuid)> {
    let mut ids = payload.strip_prefix("sql ")?.split(' ');
    let app = ids.next()?.parse().ok()?;
    let event = ids.next()?.parse().ok()?;
    ids.next().is_none().then_some((app, event))
}

/// The wake-ups a listening lane has received since it last looked: none, exactly one that
/// names its event, or others (anything a batch must look for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lone {
    None,
    One(Uuid, Uuid),
    Many,
}

impl Lone {
    /// After one more wake-up, naming `event` or not.
    fn and(self, event: Option<(Uuid, Uuid)>) -> Lone {
        match (self, event) {
            (Lone::None, Some((app, event))) => Lone::One(app, event),
            _ => Lone::Many,
        }
    }
}

/// Which wake-ups a connection LISTENs for and acts on.
pub enum Listen {
    /// None: its `wake` is signalled only when the connection ends.
    No,
    /// The wake-ups `wants` accepts (the dispatcher's depends on which lanes serve now).
    For(Box<dyn Fn(WakeFor) -> bool + Send + Sync>),
}

impl Listen {
    /// The listening lane of a kind: wake-ups for that kind, and for any claimer.
    pub fn lane(kind: WakeFor) -> Listen {
        Listen::For(Box::new(move |wake| wake == WakeFor::Any || wake == kind))
    }
}

pub struct WakeConnection {
    pub client: Client,
    /// Signalled on every picloud_wake notification, and once when the
    /// connection ends so the claimer notices at once.
    pub wake: Arc<Notify>,
    /// Signalled when the start-up probe's notification arrives.
    probe: Arc<Notify>,
    /// The wake-ups acted on since `take_lone` last looked (set before `wake` is signalled).
    lone: Arc<Mutex<Lone>>,
}

impl WakeConnection {
    /// The event the wake-ups since the last call named, if they named exactly one and nothing
    /// else woke this connection.
    pub fn take_lone(&self) -> Option<(Uuid, Uuid)> {
        let mut lone = self.lone.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut *lone, Lone::None) {
            Lone::One(app, event) => Some((app, event)),
            Lone::None | Lone::Many => None,
        }
    }
}

/// Connects to a primary (see `Database::admit`) and starts listening as `listen` says. LISTEN
/// is issued before the first claim so no wake-up sent after that claim can be missed.
pub async fn connect(database: &Database, listen: Listen) -> Result<WakeConnection, ConnectError> {
    let (client, mut connection) = database.open().await?;
    let in_hot_standby = db::reported_standby(&connection);
    let wake = Arc::new(Notify::new());
    let probe = Arc::new(Notify::new());
    let lone = Arc::new(Mutex::new(Lone::None));
    let (wake_sender, probe_sender) = (Arc::clone(&wake), Arc::clone(&probe));
    let lone_sender = Arc::clone(&lone);
    let listens = matches!(listen, Listen::For(_));
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(notification))) => {
                    match (notification.channel(), &listen) {
                        (WAKE_CHANNEL, Listen::For(wants))
                            if wants(WakeFor::from_payload(notification.payload())) =>
                        {
                            let named = lone_event(notification.payload());
                            let mut lone =
                                lone_sender.lock().unwrap_or_else(PoisonError::into_inner);
                            *lone = lone.and(named);
                            drop(lone);
                            wake_sender.notify_one()
                        }
                        (PROBE_CHANNEL, _) => probe_sender.notify_one(),
                        _ => {}
                    }
                }
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    tracing::debug!(
                        notice = notice.message(),
                        "database notice on a listening connection"
                    )
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %db::error_text(&e), "listening connection error");
                    break;
                }
                None => break,
            }
        }
        wake_sender.notify_one();
    });
    let client = database.admit(client, in_hot_standby).await?;
    if listens {
        client
            .batch_execute(&format!("LISTEN {WAKE_CHANNEL}"))
            .await
            .map_err(ConnectError::Failed)?;
    }
    Ok(WakeConnection {
        client,
        wake,
        probe,
        lone,
    })
}

/// Why the start-up check could not tell whether notifications arrive.
enum Probe {
    /// The connection goes through a transaction pooler after all (SQLSTATE 26000).
    Pooled,
    Unknown(String),
}
use Probe::{Pooled, Unknown};

/// Says at start-up if notifications do not reach the listening connection, as happens behind
/// a transaction pooler (PgBouncer with pool_mode=transaction): LISTEN lands on whichever
/// server connection ran that statement, which goes back to the pool, so wake-ups are lost
/// (and the supervisor only notices new events at its poll interval, if its prepared
/// statements work at all). The check LISTENs on a probe channel and sends itself a NOTIFY
/// from a second connection: through a direct or session-pooled connection it arrives at once.
pub async fn warn_if_pooled(database: &Database, connection: &WakeConnection) {
    // A prepared statement that vanished between Parse and Execute (SQLSTATE 26000) is the
    // other sign of a transaction pooler: the two messages reached different server sessions.
    let text = |e: tokio_postgres::Error| {
        if e.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) {
            Pooled
        } else {
            Unknown(db::error_text(&e))
        }
    };
    let checked = async {
        connection
            .client
            .batch_execute(&format!("LISTEN {PROBE_CHANNEL}"))
            .await
            .map_err(text)?;
        let other = database.connect().await.map_err(|e| match e {
            ConnectError::Failed(e) => text(e),
            other => Unknown(other.to_string()),
        })?;
        let arrived = connection.probe.notified();
        other
            .batch_execute(&format!("NOTIFY {PROBE_CHANNEL}"))
            .await
            .map_err(text)?;
        let arrived = tokio::time::timeout(PROBE_WAIT, arrived).await.is_ok();
        connection
            .client
            .batch_execute(&format!("UNLISTEN {PROBE_CHANNEL}"))
            .await
            .map_err(text)?;
        Ok::<bool, Probe>(arrived)
    };
    match checked.await {
        Ok(true) => tracing::debug!("notifications reach the listening connection"),
        Ok(false) | Err(Pooled) => tracing::error!(
            waited_ms = PROBE_WAIT.as_millis() as u64,
            "the LISTEN connection does not receive notifications: it probably goes through a \
             transaction pooler (PgBouncer pool_mode=transaction). Connect the supervisor \
             directly to Postgres or through a session-mode pool; producers may keep using \
             transaction pooling"
        ),
        Err(Unknown(error)) => tracing::warn!(
            error,
            "could not check that notifications reach the listening connection"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The extension's list of payloads, which this module must read the same way.
    const EXTENSION_WAKE: &str = include_str!("../../extension/src/api/wake.rs");

    #[test]
    fn payloads_are_the_ones_the_extension_sends() {
        for (target, payload, read) in [
            ("ANY", "", WakeFor::Any),
            ("SQL_LANE", "sql", WakeFor::SqlLane),
            ("HTTP_LANE", "http", WakeFor::HttpLane),
        ] {
            let listed = format!("(WakeFor::{target}, \"{payload}\")");
            assert!(
                EXTENSION_WAKE.contains(&listed),
                "extension/src/api/wake.rs WAKE_PAYLOADS lists {listed}"
            );
            assert_eq!(WakeFor::from_payload(payload), read);
        }
        assert_eq!(WakeFor::from_payload("later"), WakeFor::Any);
    }

    #[test]
    fn a_named_event_is_read_as_the_extension_writes_it() {
        let (app, event) = (Uuid::from_u128(1), Uuid::from_u128(2));
        // The extension's unit test pins the same form.
        let payload = format!("sql {app} {event}");
        assert!(EXTENSION_WAKE.contains("format!(\"{payload} {app} {event}\")"));
        assert_eq!(lone_event(&payload), Some((app, event)));
        assert_eq!(WakeFor::from_payload(&payload), WakeFor::SqlLane);
        for other in [
            "sql",
            "sql x y",
            &format!("sql {app}"),
            &format!("sql {app} {event} 3"),
            &format!("http {app} {event}"),
        ] {
            assert_eq!(lone_event(other), None, "{other}");
        }
        assert_eq!(
            WakeFor::from_payload(&format!("http {app} {event}")),
            WakeFor::Any
        );
        // Only a lone named wake-up since the last look names an event.
        assert_eq!(Lone::None.and(Some((app, event))), Lone::One(app, event));
        assert_eq!(Lone::One(app, event).and(Some((app, event))), Lone::Many);
        assert_eq!(Lone::None.and(None), Lone::Many);
        assert_eq!(Lone::Many.and(Some((app, event))), Lone::Many);
    }

    #[test]
    fn a_lane_acts_on_its_own_kind_and_on_any() {
        let Listen::For(sql) = Listen::lane(WakeFor::SqlLane) else {
            panic!("a lane listens")
        };
        assert!(sql(WakeFor::Any));
        assert!(sql(WakeFor::SqlLane));
        assert!(!sql(WakeFor::HttpLane));
    }
}

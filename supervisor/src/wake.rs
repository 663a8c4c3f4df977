//! The dispatcher's connection: it claims rows and LISTENs on picloud_wake.
//! Notifications only arrive through the connection task, so that task
//! forwards them to a `Notify` the dispatcher waits on.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::db;
use crate::log;

pub const WAKE_CHANNEL: &str = "picloud_wake";

pub struct WakeConnection {
    pub client: Client,
    /// Signalled on every picloud_wake notification, and once when the
    /// connection ends so the dispatcher notices at once.
    pub wake: Arc<Notify>,
}

/// Connects and starts listening. LISTEN is issued before the first claim so
/// no wake-up sent after that claim can be missed.
pub async fn connect(
    config: &tokio_postgres::Config,
) -> Result<WakeConnection, tokio_postgres::Error> {
    connect_listening(config, true).await
}

/// Like `connect`; without `listen` the connection does not LISTEN, and `wake` is signalled
/// only when it ends.
pub async fn connect_listening(
    config: &tokio_postgres::Config,
    listen: bool,
) -> Result<WakeConnection, tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let wake = Arc::new(Notify::new());
    let wake_sender = Arc::clone(&wake);
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(notification))) => {
                    if notification.channel() == WAKE_CHANNEL {
                        wake_sender.notify_one();
                    }
                }
                Some(Ok(AsyncMessage::Notice(notice))) => log::debug(
                    "database notice on dispatcher connection",
                    &[("notice", notice.message().into())],
                ),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    log::warn(
                        "dispatcher connection error",
                        &[("error", db::error_text(&e).into())],
                    );
                    break;
                }
                None => break,
            }
        }
        wake_sender.notify_one();
    });
    if listen {
        client
            .batch_execute(&format!("LISTEN {WAKE_CHANNEL}"))
            .await?;
    }
    Ok(WakeConnection { client, wake })
}

//! Event fan-out: every subscriber gets every event through its own bounded queue.
//!
//! Backed by a `tokio::sync::broadcast` channel: a subscriber that falls more
//! than the queue's capacity behind loses the oldest events and is told how
//! many with [`EventItem::Lagged`]; it never blocks the connection or other
//! subscribers. When the connection ends, every subscriber receives one final
//! [`EventItem::Disconnected`].
//!
//! Subscribe *before* sending the command whose event you will wait for; the
//! subscription sees every event that arrives after it was created.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::message::Event;
use crate::shared::{Notice, Shared};

/// One item from a subscription.
#[derive(Debug, Clone)]
pub enum EventItem {
    /// An event from QEMU.
    Event(Arc<Event>),
    /// This subscriber fell behind; this many events were dropped for it.
    Lagged(u64),
    /// The connection ended (with the reason when there was an error). Last item.
    Disconnected(Option<String>),
}

/// A subscription to QEMU's events. Create it with [`crate::Client::subscribe`].
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<Notice>,
    shared: Arc<Shared>,
    /// The connection had already ended when we subscribed: deliver what is
    /// queued, then the disconnect.
    closed_at_start: bool,
    done: bool,
}

impl Events {
    pub(crate) fn new(shared: Arc<Shared>) -> Events {
        // Subscribe first, then look at the closed flag: if the connection ended
        // in between, the flag is set and we still deliver a disconnect.
        let rx = shared.events.subscribe();
        let closed_at_start = shared.close_reason().is_some();
        Events {
            rx,
            shared,
            closed_at_start,
            done: false,
        }
    }

    /// The next item; `None` after [`EventItem::Disconnected`] was delivered.
    pub async fn next(&mut self) -> Option<EventItem> {
        if self.done {
            return None;
        }
        let received = if self.closed_at_start {
            match self.rx.try_recv() {
                Ok(notice) => Ok(notice),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Err(broadcast::error::RecvError::Lagged(n))
                }
                Err(_) => Err(broadcast::error::RecvError::Closed),
            }
        } else {
            self.rx.recv().await
        };
        Some(match received {
            Ok(Notice::Event(event)) => EventItem::Event(event),
            Ok(Notice::Disconnected(reason)) => {
                self.done = true;
                EventItem::Disconnected(reason.map(|r| r.to_string()))
            }
            Err(broadcast::error::RecvError::Lagged(n)) => EventItem::Lagged(n),
            Err(broadcast::error::RecvError::Closed) => {
                self.done = true;
                EventItem::Disconnected(self.shared.close_reason().flatten())
            }
        })
    }

    /// Waits for the first event that satisfies `matches`, for at most `timeout`.
    ///
    /// Fails with [`Error::Closed`] when the connection ends, [`Error::Lagged`]
    /// when events were dropped for this subscriber (the awaited one may be among
    /// them: re-read state), and [`Error::WaitTimeout`] naming `what`.
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&Event) -> bool,
    ) -> Result<Arc<Event>> {
        let wait = async {
            loop {
                match self.next().await {
                    Some(EventItem::Event(event)) if matches(&event) => return Ok(event),
                    Some(EventItem::Event(_)) => {}
                    Some(EventItem::Lagged(missed)) => return Err(Error::Lagged { missed }),
                    Some(EventItem::Disconnected(reason)) => return Err(Error::Closed { reason }),
                    None => {
                        return Err(Error::Closed {
                            reason: self.shared.close_reason().flatten(),
                        });
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::WaitTimeout {
                what: what.to_owned(),
                after: timeout,
            })?
    }
}

//! Connecting and the QMP handshake.
//!
//! The handshake runs on the framed stream before it is split into a
//! [`Client`] and a [`Connection`]: read the greeting, negotiate capabilities
//! (`oob` when offered), and only then hand the socket to the connection task.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio::io::AsyncRead;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{broadcast, mpsc};
use tokio_util::codec::FramedRead;

use crate::client::Client;
use crate::codec::{DEFAULT_MAX_DEPTH, DEFAULT_MAX_LINE, LineCodec, parse_json, preview};
use crate::connection::{Connection, Reader, Writer};
use crate::error::{Endpoint, Error, Result};
use crate::message::{Greeting, Incoming};
use crate::shared::{Notice, Shared};
use crate::socket;

/// Connection settings. `Config::default()` suits QEMU on the same host.
#[derive(Debug, Clone)]
pub struct Config {
    connect_timeout: Duration,
    greeting_timeout: Duration,
    command_timeout: Option<Duration>,
    max_line: usize,
    max_depth: usize,
    max_in_flight: usize,
    event_capacity: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            connect_timeout: Duration::from_secs(5),
            greeting_timeout: Duration::from_secs(5),
            command_timeout: Some(Duration::from_secs(60)),
            max_line: DEFAULT_MAX_LINE,
            max_depth: DEFAULT_MAX_DEPTH,
            max_in_flight: 8,
            event_capacity: 1024,
        }
    }
}

impl Config {
    /// The defaults.
    pub fn new() -> Config {
        Config::default()
    }

    /// How long `connect()` may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Config {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for the greeting and the capabilities reply (default
    /// 5 s). QEMU sends its greeting at once unless another client holds the
    /// monitor, so this is also how long a busy monitor takes to be reported.
    pub fn greeting_timeout(mut self, timeout: Duration) -> Config {
        self.greeting_timeout = timeout;
        self
    }

    /// Default per-command timeout (default 60 s; `None` waits forever).
    pub fn command_timeout(mut self, timeout: Option<Duration>) -> Config {
        self.command_timeout = timeout;
        self
    }

    /// Longest line accepted from the peer (default 64 MiB).
    pub fn max_line_length(mut self, bytes: usize) -> Config {
        self.max_line = bytes;
        self
    }

    /// Deepest JSON nesting accepted from the peer (default 4096).
    pub fn max_depth(mut self, depth: usize) -> Config {
        self.max_depth = depth;
        self
    }

    /// Commands in flight at once (default 8, QEMU's own queue depth with `oob`).
    pub fn max_in_flight(mut self, n: usize) -> Config {
        self.max_in_flight = n.max(1);
        self
    }

    /// Events queued per subscriber before it is told it lagged (default 1024).
    pub fn event_capacity(mut self, n: usize) -> Config {
        self.event_capacity = n.max(1);
        self
    }

    /// Connects to a QMP Unix socket (`-qmp unix:PATH,server=on,wait=off`).
    pub async fn connect_unix(&self, path: impl AsRef<Path>) -> Result<(Client, Connection)> {
        let endpoint = Endpoint::Unix(path.as_ref().to_owned());
        let stream = self.connect_unix_stream(&endpoint, path.as_ref()).await?;
        let peer = stream.peer_cred().ok().and_then(|c| c.pid());
        let (read, write) = socket::split(stream).map_err(Error::Io)?;
        let (client, connection) = self
            .handshake(endpoint, Box::new(read), Writer::Unix(write))
            .await?;
        if let Some(pid) = peer.and_then(|p| u32::try_from(p).ok()) {
            let _ = client.shared.peer_pid.set(pid);
        }
        Ok((client, connection))
    }

    /// Connects to a QMP TCP socket (`-qmp tcp:HOST:PORT,server=on,wait=off`).
    pub async fn connect_tcp(&self, addr: &str) -> Result<(Client, Connection)> {
        let endpoint = Endpoint::Tcp(addr.to_owned());
        let stream = self
            .with_connect_timeout(&endpoint, TcpStream::connect(addr))
            .await?;
        stream.set_nodelay(true).map_err(Error::Io)?;
        let (read, write) = stream.into_split();
        self.handshake(endpoint, Box::new(read), Writer::Tcp(write))
            .await
    }

    /// `connect()` on a Unix socket. A non-blocking connect fails with
    /// `EAGAIN` while the listener's accept queue is full (where a blocking
    /// one would wait): retried until the connect timeout, because QEMU
    /// drains the queue as soon as its monitor is free. Still full then:
    /// [`Error::QueueFull`].
    async fn connect_unix_stream(&self, endpoint: &Endpoint, path: &Path) -> Result<UnixStream> {
        const RETRY: Duration = Duration::from_millis(50);
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        loop {
            let attempt = tokio::time::timeout_at(deadline, UnixStream::connect(path)).await;
            match attempt {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if tokio::time::Instant::now() + RETRY >= deadline {
                        return Err(Error::QueueFull {
                            endpoint: endpoint.clone(),
                            after: self.connect_timeout,
                        });
                    }
                    tokio::time::sleep(RETRY).await;
                }
                Ok(Err(source)) => {
                    return Err(Error::Connect {
                        endpoint: endpoint.clone(),
                        source,
                    });
                }
                Err(_) => {
                    return Err(Error::ConnectTimeout {
                        endpoint: endpoint.clone(),
                        after: self.connect_timeout,
                    });
                }
            }
        }
    }

    async fn with_connect_timeout<S>(
        &self,
        endpoint: &Endpoint,
        connect: impl Future<Output = std::io::Result<S>>,
    ) -> Result<S> {
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(Error::Connect {
                endpoint: endpoint.clone(),
                source,
            }),
            Err(_) => Err(Error::ConnectTimeout {
                endpoint: endpoint.clone(),
                after: self.connect_timeout,
            }),
        }
    }

    async fn handshake(
        &self,
        endpoint: Endpoint,
        read: Box<dyn AsyncRead + Send + Unpin>,
        mut writer: Writer,
    ) -> Result<(Client, Connection)> {
        let mut reader: Reader = FramedRead::new(read, LineCodec::new(self.max_line));
        let not_qmp = |detail: String| Error::NotQmp {
            endpoint: endpoint.clone(),
            detail,
        };

        let first = match tokio::time::timeout(self.greeting_timeout, reader.next()).await {
            Err(_) => {
                return Err(Error::NoGreeting {
                    endpoint,
                    after: self.greeting_timeout,
                });
            }
            Ok(None) => {
                return Err(not_qmp(
                    "it closed the connection without a greeting".into(),
                ));
            }
            Ok(Some(Err(e @ Error::Io(_)))) => return Err(e),
            Ok(Some(Err(e))) => return Err(not_qmp(e.to_string())),
            Ok(Some(Ok(line))) => line,
        };
        let mut greeting = parse_json(&first, self.max_depth)
            .ok()
            .and_then(|v| Greeting::parse(&v))
            .ok_or_else(|| not_qmp(format!("its first message was {}", preview(&first))))?;

        let (events, _) = broadcast::channel(self.event_capacity);
        let oob = greeting.offers("oob");
        let enable: Vec<&str> = if oob { vec!["oob"] } else { vec![] };
        let mut line = serde_json::to_vec(&json!({
            "execute": "qmp_capabilities",
            "arguments": { "enable": enable },
            "id": 0,
        }))
        .expect("a literal serializes");
        line.push(b'\n');
        writer.write_line(&line, &[]).await?;

        let negotiate = async {
            loop {
                let line = match reader.next().await {
                    None => {
                        return Err(not_qmp(
                            "it closed the connection during the handshake".into(),
                        ));
                    }
                    Some(line) => line?,
                };
                match Incoming::classify(parse_json(&line, self.max_depth)?)? {
                    Incoming::Reply {
                        id: Some(id),
                        result,
                    } if id == 0 => {
                        return result.map_err(|e| Error::Qmp {
                            command: "qmp_capabilities".into(),
                            class: e.class,
                            desc: e.desc,
                        });
                    }
                    // Events may arrive before the reply; there is no subscriber
                    // yet, so they go nowhere, but they must not break the handshake.
                    Incoming::Event(event) => {
                        let _ = events.send(Notice::Event(Arc::new(event)));
                    }
                    other => tracing::debug!(?other, "ignored during the QMP handshake"),
                }
            }
        };
        match tokio::time::timeout(self.greeting_timeout, negotiate).await {
            Ok(result) => result.map(drop)?,
            Err(_) => {
                return Err(Error::WaitTimeout {
                    what: format!("the qmp_capabilities reply from {endpoint}"),
                    after: self.greeting_timeout,
                });
            }
        }
        greeting.oob_enabled = oob;
        tracing::debug!(version = %greeting.version, oob, %endpoint, "QMP connected");

        let shared = Arc::new(Shared::new(
            greeting,
            endpoint,
            events,
            self.max_in_flight,
            self.max_depth,
        ));
        let (requests_tx, requests_rx) = mpsc::channel(self.max_in_flight);
        let client = Client::new(requests_tx, shared.clone(), self.command_timeout);
        let connection = Connection::new(reader, writer, requests_rx, shared);
        Ok((client, connection))
    }
}

/// Connects to a QMP Unix socket with the default [`Config`] and spawns the
/// connection task on the current tokio runtime.
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Client> {
    let (client, connection) = Config::default().connect_unix(path).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "QMP connection ended");
        }
    });
    Ok(client)
}

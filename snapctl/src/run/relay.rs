//! The monitor relay: how a second snapctl reaches QEMU while another one
//! holds its monitor.
//!
//! QEMU serves one client per QMP monitor, and a snapctl that changes a VM
//! keeps its monitor for the whole operation: a commit at `--bandwidth 1M`
//! holds it for minutes. Without a relay, `snapctl jobs`, `job cancel`,
//! `chain` and `check` from another shell would queue behind it, get no
//! greeting and fail, so nobody could watch the job or stop it except with
//! Ctrl-C in the holder's own terminal.
//!
//! So while a [`crate::Session`] is connected to QEMU (from
//! [`crate::Session::open`] until it is dropped), it listens on
//! `<state-dir>/<vm>.relay` ([`crate::Store::relay_path`]) and speaks QMP
//! there to other snapctl processes of the same user:
//!
//! - the greeting is QEMU's own (its version and package), offering no
//!   capabilities; `qmp_capabilities` is answered as QEMU would;
//! - the commands of [`RELAYED`] (queries, and the job verbs a user needs
//!   to watch, slow down, pause or cancel a job) go to QEMU through the
//!   holder's connection; QEMU's reply goes back with the caller's `id`;
//! - anything else is refused with a `GenericError` naming the holder, so
//!   nothing can change QEMU behind the holder's plan (`job-dismiss`,
//!   `job-finalize` and the like stay the holder's);
//! - every event QEMU sends the holder is forwarded to each relay client,
//!   so a client's [`qmp_client::Job`] follows `JOB_STATUS_CHANGE` as on
//!   QEMU's own socket.
//!
//! A job cancelled through the relay is seen by the holder like any other
//! cancelled job: it stops its operation the way its runner documents
//! (for a commit that had begun writing into its base: cut short).
//!
//! Readers find the relay with [`connect_reader`]: when another live
//! process holds the VM's lock and its relay answers, they talk to it
//! instead of QEMU's socket.
//!
//! Safety: the state directory is private (0700); the socket is made 0600,
//! and peers of another uid (root aside) are turned away. A socket file left
//! by a holder that died is stale (the new holder has the lock, so nobody
//! else can be listening) and is removed; the path is never followed
//! through a symlink, and anything at it that is not a socket or a symlink
//! is left alone (the session then runs without a relay). The relay runs as
//! tokio tasks that end, and its socket file is removed, when the session is
//! dropped.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp_client::{Client, EventItem, Greeting};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use crate::error::{Error, Result};
use crate::store::{Holder, Store, VmLock};

/// The commands a relay passes on to QEMU: what `jobs`, `job`, `chain` and
/// `check` send, and the job verbs a user may need while a job runs.
pub const RELAYED: &[&str] = &[
    "query-jobs",
    "query-block-jobs",
    "query-block",
    "query-named-block-nodes",
    "x-debug-query-block-graph",
    "query-status",
    "query-version",
    "query-commands",
    "qom-get",
    "job-cancel",
    "block-job-set-speed",
    "job-pause",
    "job-resume",
];

/// Longest request line accepted from a relay client.
const MAX_LINE: usize = 1 << 20;

/// Relay clients served at once; more are turned away.
const MAX_CLIENTS: usize = 16;

/// Relayed commands in flight at once, over all clients: the holder's own
/// commands share the connection's slots and must always find one.
const MAX_IN_FLIGHT: usize = 4;

/// Messages queued for one client before its commands and events wait.
const OUT_QUEUE: usize = 256;

/// How long a reader waits for a relay's greeting before trying QEMU's
/// socket instead.
const RELAY_GREETING: Duration = Duration::from_secs(3);

/// What the relay says its holder is doing: set when a plan runs.
type Label = Arc<Mutex<Option<String>>>;

/// A running relay; stops, and removes its socket, when dropped.
#[derive(Debug)]
pub struct Relay {
    path: PathBuf,
    /// Device and inode of the socket file bound, so that only that file is
    /// removed at the end.
    file: (u64, u64),
    operation: Label,
    task: JoinHandle<()>,
}

impl Relay {
    /// Starts relaying `client` (the holder's connection to QEMU) on the
    /// relay socket of the VM `lock` is for.
    pub fn start(lock: &VmLock, client: &Client) -> Result<Relay> {
        let path = lock.relay_path();
        remove_stale(&path)?;
        let listener = UnixListener::bind(&path).map_err(|e| Error::io("listen on", &path, e))?;
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io("inspect", &path, e))?;
        let file = (meta.dev(), meta.ino());
        // bind() made the file under the umask; the directory is private
        // anyway, and the mode is set without following a symlink.
        nix::sys::stat::fchmodat(
            None,
            &path,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::FchmodatFlags::NoFollowSymlink,
        )
        .map_err(|e| Error::io("set the mode of", &path, e.into()))?;
        let operation = Label::default();
        let task = tokio::spawn(accept_loop(
            listener,
            client.clone(),
            greeting(client.greeting()),
            operation.clone(),
        ));
        tracing::debug!(path = %path.display(), "relaying QEMU's monitor");
        Ok(Relay {
            path,
            file,
            operation,
            task,
        })
    }

    /// The socket it listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names the operation the holder runs, for the refusals it sends.
    pub fn set_operation(&self, name: &str) {
        if let Ok(mut label) = self.operation.lock() {
            *label = Some(name.to_owned());
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.file);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes what a holder that died left at `path`: the caller holds the
/// VM's lock, so no live process listens there. Only a socket or a symlink
/// (removed, never followed) goes.
fn remove_stale(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("inspect", path, e)),
        Ok(m) if m.file_type().is_socket() || m.file_type().is_symlink() => {
            std::fs::remove_file(path).map_err(|e| Error::io("remove stale relay socket", path, e))
        }
        Ok(_) => Err(Error::Refused(format!(
            "{} is neither a socket nor a symlink: not relaying QEMU's monitor there",
            path.display()
        ))),
    }
}

/// QEMU's greeting, as the holder received it, offering no capabilities
/// (the relay does not do out-of-band execution).
fn greeting(g: &Greeting) -> Value {
    json!({ "QMP": {
        "version": {
            "qemu": { "major": g.version.major, "minor": g.version.minor, "micro": g.version.micro },
            "package": g.package,
        },
        "capabilities": [],
    }})
}

async fn accept_loop(listener: UnixListener, client: Client, greeting: Value, label: Label) {
    let mut clients = JoinSet::new();
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "relay: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Reap finished connections as they end.
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
        };
        if !same_user(&stream) || clients.len() >= MAX_CLIENTS {
            continue;
        }
        if client.is_closed() {
            // QEMU went away: nothing left to relay.
            break;
        }
        clients.spawn(serve(
            stream,
            client.clone(),
            greeting.clone(),
            label.clone(),
            in_flight.clone(),
        ));
    }
}

/// Whether the peer runs as this process's user (or root).
fn same_user(stream: &UnixStream) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    stream
        .peer_cred()
        .is_ok_and(|c| c.uid() == me || c.uid() == 0)
}

/// One relay client: greeting, capabilities negotiation, then commands and
/// events until either side goes away (QEMU included).
async fn serve(
    stream: UnixStream,
    client: Client,
    greeting: Value,
    label: Label,
    in_flight: Arc<Semaphore>,
) {
    let (read, mut write) = stream.into_split();
    let (out, mut queue) = mpsc::channel::<Value>(OUT_QUEUE);
    let writer = async move {
        while let Some(message) = queue.recv().await {
            let mut line = serde_json::to_vec(&message).unwrap_or_default();
            line.push(b'\n');
            if write.write_all(&line).await.is_err() {
                break;
            }
        }
    };
    let (subscribed, subscription) = oneshot::channel::<qmp_client::Events>();
    let events = {
        let out = out.clone();
        async move {
            let Ok(mut events) = subscription.await else {
                return std::future::pending().await;
            };
            while let Some(item) = events.next().await {
                match item {
                    EventItem::Event(e) => {
                        let mut message = json!({ "event": e.name, "data": e.data });
                        if let Some(us) = e.timestamp_us {
                            message["timestamp"] = json!({
                                "seconds": us / 1_000_000,
                                "microseconds": us % 1_000_000,
                            });
                        }
                        if out.send(message).await.is_err() {
                            return;
                        }
                    }
                    EventItem::Lagged(n) => tracing::debug!(missed = n, "relay client lagged"),
                    // QEMU is gone: so is the relay's reason to be.
                    EventItem::Disconnected(_) => return,
                }
            }
        }
    };
    let requests = async move {
        if out.send(greeting).await.is_err() {
            return;
        }
        let mut reader = BufReader::new(read);
        let mut subscribed = Some(subscribed);
        let mut commands = JoinSet::new();
        loop {
            let line = match read_line(&mut reader).await {
                Ok(Some(line)) => line,
                Ok(None) | Err(_) => return,
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let request = parse_request(&line);
            let id = request.id.clone();
            let reply = |result| reply(id.clone(), result);
            let negotiated = subscribed.is_none();
            let answer = match request.command {
                Err(desc) => Some(reply(Err(("GenericError".into(), desc)))),
                Ok((name, _)) if name == "qmp_capabilities" && negotiated => Some(reply(Err((
                    "CommandNotFound".into(),
                    "Capabilities negotiation is already complete, command ignored".into(),
                )))),
                Ok((name, args)) if name == "qmp_capabilities" => {
                    match args.get("enable").and_then(Value::as_array) {
                        Some(caps) if !caps.is_empty() => Some(reply(Err((
                            "GenericError".into(),
                            format!("Capability {} not available", caps[0]),
                        )))),
                        _ => {
                            // Subscribed before the reply goes out: the client
                            // sees every event from then on, none before.
                            let events = client.subscribe();
                            if out.send(reply(Ok(json!({})))).await.is_err() {
                                return;
                            }
                            if let Some(tx) = subscribed.take() {
                                let _ = tx.send(events);
                            }
                            None
                        }
                    }
                }
                Ok(_) if !negotiated => Some(reply(Err((
                    "CommandNotFound".into(),
                    "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
                )))),
                Ok((name, args)) if RELAYED.contains(&name.as_str()) => {
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        return;
                    };
                    let (client, out, id) = (client.clone(), out.clone(), id.clone());
                    commands.spawn(async move {
                        let result = client.execute_raw(&name, args).await;
                        drop(permit);
                        let result = result.map_err(|e| match e {
                            qmp_client::Error::Qmp { class, desc, .. } => (class, desc),
                            other => ("GenericError".to_owned(), other.to_string()),
                        });
                        let _ = out.send(self::reply(id, result)).await;
                    });
                    None
                }
                Ok((name, _)) => Some(reply(Err(("GenericError".into(), refusal(&name, &label))))),
            };
            if let Some(message) = answer
                && out.send(message).await.is_err()
            {
                return;
            }
            while commands.try_join_next().is_some() {}
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = events => {}
        _ = requests => {}
    }
}

/// A reply as QEMU words it, with the request's `id` when it had one.
fn reply(id: Option<Value>, result: std::result::Result<Value, (String, String)>) -> Value {
    let mut message = match result {
        Ok(value) => json!({ "return": value }),
        Err((class, desc)) => json!({ "error": { "class": class, "desc": desc } }),
    };
    if let Some(id) = id {
        message["id"] = id;
    }
    message
}

/// The refusal of a command the relay does not pass on.
fn refusal(command: &str, label: &Label) -> String {
    let operation = label.lock().ok().and_then(|l| l.clone());
    let holder = Holder {
        pid: Some(std::process::id()),
        operation,
    };
    format!(
        "{holder} holds this monitor and relays only {}; {command} must wait until it is done",
        RELAYED.join(", ")
    )
}

/// A relay client's request: the command and its arguments, or why it is
/// not one; and its `id`, echoed in the reply.
struct Request {
    id: Option<Value>,
    command: std::result::Result<(String, Value), String>,
}

fn parse_request(line: &[u8]) -> Request {
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Request {
                id: None,
                command: Err(format!("JSON parse error, {e}")),
            };
        }
    };
    let Value::Object(mut map) = value else {
        return Request {
            id: None,
            command: Err("QMP input must be a JSON object".into()),
        };
    };
    let id = map.remove("id");
    let command = match (map.remove("execute"), map.remove("arguments")) {
        (Some(Value::String(name)), None) => Ok((name, Value::Null)),
        (Some(Value::String(name)), Some(args @ Value::Object(_))) => Ok((name, args)),
        (Some(Value::String(_)), Some(_)) => {
            Err("QMP input member 'arguments' must be an object".into())
        }
        _ if map.contains_key("exec-oob") => Err("out-of-band execution is not relayed".into()),
        _ => Err("QMP input lacks member 'execute'".into()),
    };
    Request { id, command }
}

/// One line, without its newline; `None` at the end of the stream; an error
/// for a line longer than [`MAX_LINE`].
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "request line too long",
        ));
    }
    Ok(Some(line))
}

/// How a command that only reads QEMU, or acts on its jobs, reaches it
/// ([`connect_reader`]).
#[derive(Debug)]
pub struct Reader {
    /// The connection: to QEMU's socket, or to a holder's relay.
    pub client: Client,
    /// The snapctl whose relay this goes through, `None` for QEMU's socket.
    pub relayed_by: Option<Holder>,
}

/// Connects a command that does not take the VM's lock (`jobs`, `job`,
/// `chain`, `check`) to QEMU: through the relay of the snapctl holding the
/// lock when there is one and it answers, else to QEMU's `socket`.
/// `Ok(None)` when QEMU does not run. A monitor held by someone else fails
/// with [`Error::MonitorBusy`], naming the holder when it is a snapctl.
pub async fn connect_reader(
    store: &Store,
    vm: &str,
    socket: &Path,
    command_timeout: Duration,
) -> Result<Option<Reader>> {
    let holder = store.holder(vm)?;
    if let Some(holder) = &holder {
        let relay = store.relay_path(vm)?;
        let connected = qmp_client::Config::new()
            .connect_timeout(RELAY_GREETING)
            .greeting_timeout(RELAY_GREETING)
            .command_timeout(Some(command_timeout))
            .connect_unix(&relay)
            .await;
        match connected {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                tracing::info!(
                    "{holder} holds QEMU's monitor: going through its relay {}",
                    relay.display()
                );
                return Ok(Some(Reader {
                    client,
                    relayed_by: Some(holder.clone()),
                }));
            }
            Err(e) => tracing::debug!(error = %e, "no relay answers; trying QEMU's socket"),
        }
    }
    match super::connect_if_running(socket, command_timeout).await {
        Ok(client) => Ok(client.map(|client| Reader {
            client,
            relayed_by: None,
        })),
        Err(Error::Qmp(e)) if e.is_busy() => Err(Error::MonitorBusy {
            socket: socket.to_owned(),
            holder,
            detail: e.to_string(),
        }),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_like_qemu_reads_them() {
        let r = parse_request(br#"{"execute": "query-jobs", "id": 7}"#);
        assert_eq!(r.id, Some(json!(7)));
        assert_eq!(r.command, Ok(("query-jobs".into(), Value::Null)));
        let r = parse_request(br#"{"execute": "job-cancel", "arguments": {"id": "c"}, "id": "x"}"#);
        assert_eq!(r.command, Ok(("job-cancel".into(), json!({"id": "c"}))));
        assert!(
            parse_request(br#"{"execute": "q", "arguments": 1}"#)
                .command
                .is_err()
        );
        assert!(parse_request(br#"[1]"#).command.is_err());
        assert!(parse_request(b"{not json").command.is_err());
        let r = parse_request(br#"{"exec-oob": "migrate-pause", "id": 1}"#);
        assert_eq!(r.id, Some(json!(1)));
        assert!(r.command.is_err());
    }

    #[test]
    fn refusals_name_the_holder_and_what_is_relayed() {
        let label = Label::default();
        let text = refusal("blockdev-del", &label);
        assert!(
            text.starts_with(&format!("snapctl (pid {})", std::process::id())),
            "{text}"
        );
        *label.lock().unwrap() = Some("commit".into());
        let text = refusal("blockdev-del", &label);
        assert!(
            text.contains(", commit) holds this monitor and relays only query-jobs"),
            "{text}"
        );
        assert!(
            text.contains("job-cancel") && text.contains("blockdev-del"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn long_lines_are_refused() {
        let mut ok = BufReader::new(&b"{\"a\": 1}\nrest"[..]);
        assert_eq!(
            read_line(&mut ok).await.unwrap(),
            Some(b"{\"a\": 1}".to_vec())
        );
        assert_eq!(read_line(&mut ok).await.unwrap(), Some(b"rest".to_vec()));
        assert_eq!(read_line(&mut ok).await.unwrap(), None);
        let long = vec![b'x'; MAX_LINE + 10];
        let mut bad = BufReader::new(&long[..]);
        assert!(read_line(&mut bad).await.is_err());
    }
}

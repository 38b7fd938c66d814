//! Protocol behaviour against a scripted fake QMP server: handshake, pipelining,
//! timeouts, broken peers, events, jobs, fd passing and the guest agent.

mod fake_server;

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_server::{Command, FakeServer, NoLine};
use qmp_client::{
    Client, Config, Endpoint, Error, Event, EventItem, Events, GuestAgent, JobStatus, Version,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A limit for things that should happen at once; generous so a loaded
/// machine does not make the tests flaky.
const SOON: Duration = Duration::from_secs(5);

/// Test defaults: short enough that a broken script fails fast.
fn config() -> Config {
    Config::new()
        .command_timeout(Some(SOON))
        .greeting_timeout(SOON)
}

type ConnectionTask = JoinHandle<qmp_client::Result<()>>;

async fn connect(path: &Path, config: Config) -> (Client, ConnectionTask) {
    let (client, connection) = config.connect_unix(path).await.expect("connect");
    (client, tokio::spawn(connection))
}

/// How the connection task ended.
async fn connection_result(task: ConnectionTask) -> qmp_client::Result<()> {
    tokio::time::timeout(SOON, task)
        .await
        .expect("the connection task did not end")
        .expect("the connection task panicked")
}

async fn next_item(events: &mut Events) -> EventItem {
    tokio::time::timeout(SOON, events.next())
        .await
        .expect("no event item in time")
        .expect("the subscription already ended")
}

async fn next_event(events: &mut Events) -> Arc<Event> {
    match next_item(events).await {
        EventItem::Event(event) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn next_disconnect(events: &mut Events) -> Option<String> {
    match next_item(events).await {
        EventItem::Disconnected(reason) => reason,
        other => panic!("expected a disconnect, got {other:?}"),
    }
}

fn line_json(command: &Command) -> Value {
    serde_json::from_slice(&command.line).expect("the command line is JSON")
}

/// Reads `n` commands.
async fn read_commands(peer: &mut fake_server::Peer, n: usize) -> Vec<Command> {
    let mut commands = Vec::with_capacity(n);
    for _ in 0..n {
        commands.push(peer.read_command().await);
    }
    commands
}

// ---------------------------------------------------------------------------
// 1. Handshake
// ---------------------------------------------------------------------------

#[tokio::test]
async fn handshake_enables_oob_when_offered_and_survives_early_events() {
    let server = FakeServer::start(|mut peer| async move {
        peer.greet(&["oob"]).await;
        let caps = peer.expect("qmp_capabilities").await;
        // QEMU may emit events before it answers qmp_capabilities.
        peer.event("RESUME", json!({})).await;
        peer.event("FUTURE_EARLY_EVENT", json!({"x": [1, 2]})).await;
        peer.reply(&caps.id, json!({})).await;
        let status = peer.expect("query-status").await;
        peer.event("STOP", json!({})).await;
        peer.reply(&status.id, json!({"running": false, "status": "paused"}))
            .await;
        caps
    });
    let (client, _connection) = connect(server.path(), config()).await;

    let greeting = client.greeting();
    assert_eq!(
        greeting.version,
        Version {
            major: 10,
            minor: 0,
            micro: 2
        }
    );
    assert_eq!(greeting.package, "Debian 1:10.0.2+ds-2");
    assert!(greeting.offers("oob"));
    assert!(greeting.oob_enabled);

    let mut events = client.subscribe();
    let status = client.execute(qapi::qmp::query_status {}).await.unwrap();
    assert!(!status.running);
    assert_eq!(status.status, qapi::qmp::RunState::paused);
    // The first event this subscriber sees is the one sent after it subscribed.
    let stop = next_event(&mut events).await;
    assert_eq!(stop.name, "STOP");
    assert_eq!(stop.timestamp_us, Some(1_750_000_000_123_456));

    let caps = server.finish().await;
    assert_eq!(caps.args, json!({"enable": ["oob"]}));
    assert_eq!(
        line_json(&caps),
        json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": caps.id})
    );
}

#[tokio::test]
async fn handshake_without_oob_enables_nothing() {
    let server = FakeServer::start(|mut peer| async move {
        peer.greet(&["future-capability"]).await;
        let caps = peer.expect("qmp_capabilities").await;
        peer.reply(&caps.id, json!({})).await;
        let status = peer.expect("query-status").await;
        peer.reply(&status.id, json!({"running": true, "status": "running"}))
            .await;
        caps
    });
    let (client, _connection) = connect(server.path(), config()).await;
    assert!(!client.greeting().oob_enabled);
    assert!(client.greeting().offers("future-capability"));
    let status = client.execute(qapi::qmp::query_status {}).await.unwrap();
    assert!(status.running);

    let caps = server.finish().await;
    assert!(
        !caps.text().contains("oob"),
        "oob requested though not offered: {}",
        caps.text()
    );
    assert!(
        !caps.text().contains("future-capability"),
        "unknown capability requested: {}",
        caps.text()
    );
    let enable = &caps.args["enable"];
    assert!(
        enable.is_null() || enable == &json!([]),
        "unexpected enable: {enable}"
    );
}

// ---------------------------------------------------------------------------
// 2. Not QMP, no greeting, nothing listening
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hmp_banner_is_not_qmp() {
    let server = FakeServer::start(|mut peer| async move {
        peer.raw(b"QEMU 10.0.2 monitor - type 'help' for more information\r\n(qemu) ")
            .await;
        peer.wait_eof(SOON).await;
    });
    let err = config().connect_unix(server.path()).await.unwrap_err();
    match &err {
        Error::NotQmp { endpoint, detail } => {
            assert_eq!(endpoint, &Endpoint::Unix(server.path().to_owned()));
            assert!(detail.contains("QEMU 10.0.2 monitor"), "{detail}");
        }
        other => panic!("expected NotQmp, got {other:?}"),
    }
    server.finish().await;
}

#[tokio::test]
async fn json_without_qmp_member_is_not_qmp() {
    let server = FakeServer::start(|mut peer| async move {
        peer.send(&json!({"hello": {"version": {"qemu": {"major": 10}}}}))
            .await;
        peer.wait_eof(SOON).await;
    });
    let err = config().connect_unix(server.path()).await.unwrap_err();
    assert!(matches!(err, Error::NotQmp { .. }), "{err:?}");
    assert!(err.to_string().contains("hello"), "{err}");
    server.finish().await;
}

#[tokio::test]
async fn silent_server_is_no_greeting_after_the_greeting_timeout() {
    let server = FakeServer::start(|mut peer| async move {
        // Accept and say nothing, like QEMU with another client on the monitor.
        peer.wait_eof(SOON).await;
    });
    let limit = Duration::from_millis(300);
    let started = Instant::now();
    let err = config()
        .greeting_timeout(limit)
        .connect_unix(server.path())
        .await
        .unwrap_err();
    let took = started.elapsed();
    match &err {
        Error::NoGreeting { endpoint, after } => {
            assert_eq!(endpoint, &Endpoint::Unix(server.path().to_owned()));
            assert_eq!(*after, limit);
        }
        other => panic!("expected NoGreeting, got {other:?}"),
    }
    assert!(err.is_timeout());
    assert!(took >= limit, "gave up after {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // The client hung up when it gave up.
    server.finish().await;
}

#[tokio::test]
async fn missing_socket_is_a_connect_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such.sock");
    let err = config().connect_unix(&path).await.unwrap_err();
    match &err {
        Error::Connect { endpoint, source } => {
            assert_eq!(endpoint, &Endpoint::Unix(path.clone()));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Connect, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn stale_socket_file_is_a_refused_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    // The file stays behind when the listener goes away, as after a QEMU crash.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let err = config().connect_unix(&path).await.unwrap_err();
    match &err {
        Error::Connect { endpoint, source } => {
            assert_eq!(endpoint, &Endpoint::Unix(path.clone()));
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        other => panic!("expected Connect, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// 3. Interleaved events and out-of-order replies
// ---------------------------------------------------------------------------

#[tokio::test]
async fn out_of_order_replies_reach_their_callers_and_events_stay_in_order() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let commands = read_commands(&mut peer, 3).await;
        let mut seq = 0;
        for command in commands.iter().rev() {
            peer.event("TEST_EVENT", json!({ "seq": seq })).await;
            seq += 1;
            peer.reply(
                &command.id,
                json!({"echo": command.name, "args": command.args}),
            )
            .await;
        }
        peer.event("TEST_EVENT", json!({ "seq": seq })).await;
        commands
    });
    let (client, _connection) = connect(server.path(), config()).await;
    let mut events = client.subscribe();

    let (a, b, c) = tokio::join!(
        client.execute_raw("cmd-a", json!({"n": 1})),
        client.execute_raw("cmd-b", json!({"n": 2})),
        client.execute_raw("cmd-c", Value::Null),
    );
    assert_eq!(a.unwrap(), json!({"echo": "cmd-a", "args": {"n": 1}}));
    assert_eq!(b.unwrap(), json!({"echo": "cmd-b", "args": {"n": 2}}));
    assert_eq!(c.unwrap(), json!({"echo": "cmd-c", "args": null}));

    for seq in 0..4 {
        let event = next_event(&mut events).await;
        assert_eq!(event.name, "TEST_EVENT");
        assert_eq!(event.data, json!({ "seq": seq }));
    }

    let commands = server.finish().await;
    let mut ids: Vec<u64> = commands.iter().map(|c| c.id.as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "ids must be unique: {commands:?}");
    // No arguments member at all for a command without arguments.
    let c = commands.iter().find(|c| c.name == "cmd-c").unwrap();
    assert!(line_json(c).get("arguments").is_none(), "{}", c.text());
}

// ---------------------------------------------------------------------------
// 4. At most 8 commands in flight
// ---------------------------------------------------------------------------

#[tokio::test]
async fn no_more_than_eight_commands_in_flight_by_default() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let first = read_commands(&mut peer, 8).await;
        // The 9th must not be written while 8 are unanswered.
        let ninth = peer.try_read_command(Duration::from_millis(400)).await;
        assert!(
            matches!(ninth, Err(NoLine::Timeout)),
            "a 9th command was sent while 8 were in flight: {ninth:?}"
        );
        for command in first.iter().rev() {
            peer.reply(&command.id, json!(command.name)).await;
        }
        let rest = read_commands(&mut peer, 4).await;
        for command in &rest {
            peer.reply(&command.id, json!(command.name)).await;
        }
        (first.len(), rest.len())
    });
    let (client, _connection) = connect(server.path(), Config::new()).await;

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..12 {
        let client = client.clone();
        calls.spawn(async move {
            let name = format!("cmd-{i}");
            let reply = client.execute_raw(&name, Value::Null).await;
            (name, reply)
        });
    }
    let mut done = 0;
    while let Some(joined) = calls.join_next().await {
        let (name, reply) = joined.unwrap();
        assert_eq!(reply.unwrap(), json!(name));
        done += 1;
    }
    assert_eq!(done, 12);
    assert_eq!(server.finish().await, (8, 4));
}

// ---------------------------------------------------------------------------
// 5. Timeouts
// ---------------------------------------------------------------------------

#[tokio::test]
async fn timed_out_command_is_sent_and_its_late_reply_is_discarded() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let slow = peer.expect("slow-command").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The client gave up at 200 ms and sent the next command meanwhile.
        let next = peer.expect("next-command").await;
        peer.reply(&slow.id, json!("late reply for slow-command"))
            .await;
        peer.reply(&next.id, json!("reply for next-command")).await;
        let third = peer.expect("third-command").await;
        peer.reply(&third.id, json!(3)).await;
    });
    let (client, _connection) = connect(
        server.path(),
        config().command_timeout(Some(Duration::from_millis(200))),
    )
    .await;

    let started = Instant::now();
    let err = client
        .execute_raw("slow-command", Value::Null)
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200));
    match &err {
        Error::Timeout {
            command,
            after,
            sent,
        } => {
            assert_eq!(command, "slow-command");
            assert_eq!(*after, Duration::from_millis(200));
            assert!(*sent, "the command reached the socket");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(err.result_unknown());
    assert!(err.is_timeout());

    let patient = client.with_timeout(Some(SOON));
    assert_eq!(
        patient
            .execute_raw("next-command", Value::Null)
            .await
            .unwrap(),
        json!("reply for next-command")
    );
    assert!(!client.is_closed());
    assert_eq!(
        patient
            .execute_raw("third-command", Value::Null)
            .await
            .unwrap(),
        json!(3)
    );
    server.finish().await;
}

#[tokio::test]
async fn command_waiting_for_a_slot_times_out_as_never_sent() {
    let (read_eight, eight_read) = oneshot::channel();
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let held = read_commands(&mut peer, 8).await;
        read_eight.send(()).unwrap();
        // The next line must be the marker sent after the held calls were
        // dropped: the timed-out 9th command never reached the socket.
        let marker = peer.expect("marker").await;
        peer.reply(&marker.id, json!("marker")).await;
        (held, marker)
    });
    let (client, _connection) = connect(server.path(), config()).await;

    let forever = client.with_timeout(None);
    let mut held = Vec::new();
    for i in 0..8 {
        let forever = forever.clone();
        held.push(tokio::spawn(async move {
            forever.execute_raw(&format!("held-{i}"), Value::Null).await
        }));
    }
    tokio::time::timeout(SOON, eight_read)
        .await
        .expect("the server did not read 8 commands")
        .unwrap();

    let err = client
        .with_timeout(Some(Duration::from_millis(200)))
        .execute_raw("ninth-command", Value::Null)
        .await
        .unwrap_err();
    match &err {
        Error::Timeout { command, sent, .. } => {
            assert_eq!(command, "ninth-command");
            assert!(!*sent, "the 9th command cannot have been sent");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(!err.result_unknown());

    for call in &held {
        call.abort();
    }
    for call in held {
        assert!(call.await.unwrap_err().is_cancelled());
    }
    assert_eq!(
        client.execute_raw("marker", Value::Null).await.unwrap(),
        json!("marker")
    );

    let (held, marker) = server.finish().await;
    assert_eq!(marker.name, "marker");
    assert!(held.iter().all(|c| c.name.starts_with("held-")));
}

#[tokio::test]
async fn timeout_during_a_blocked_write_counts_as_sent() {
    let (timed_out, told) = oneshot::channel::<()>();
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        // Read nothing until the client has given up: its write of the big
        // command fills the socket buffer and blocks half-way.
        tokio::time::timeout(SOON, told)
            .await
            .expect("the client did not time out")
            .unwrap();
        let big = peer.read_command().await;
        peer.reply(&big.id, json!("late")).await;
        let next = peer.expect("next-command").await;
        peer.reply(&next.id, json!("next")).await;
        big
    });
    let (client, _connection) = connect(server.path(), config()).await;

    let blob = "x".repeat(4 << 20);
    // The write stays blocked until the server reads, so any limit expires
    // mid-write; a generous one leaves time to serialize and queue the command.
    let err = client
        .with_timeout(Some(Duration::from_secs(1)))
        .execute_raw("big-command", json!({ "blob": blob }))
        .await
        .unwrap_err();
    timed_out.send(()).unwrap();
    // The command did reach QEMU (below), so the caller must not be told
    // it was never sent.
    assert!(matches!(&err, Error::Timeout { sent: true, .. }), "{err:?}");
    assert!(err.result_unknown());
    assert_eq!(
        client
            .execute_raw("next-command", Value::Null)
            .await
            .unwrap(),
        json!("next")
    );
    let big = server.finish().await;
    assert_eq!(big.name, "big-command");
    assert_eq!(big.args["blob"].as_str().map(str::len), Some(4 << 20));
}

// ---------------------------------------------------------------------------
// 6. A dropped call frees its slot
// ---------------------------------------------------------------------------

#[tokio::test]
async fn dropped_calls_free_their_slots() {
    let (read_eight, eight_read) = oneshot::channel();
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let held = read_commands(&mut peer, 8).await;
        read_eight.send(()).unwrap();
        let after = peer.expect("after-drop").await;
        // Late replies to the abandoned calls are discarded...
        for command in &held {
            peer.reply(&command.id, json!("stale")).await;
        }
        // ...and the new call gets its own.
        peer.reply(&after.id, json!("fresh")).await;
    });
    let (client, _connection) = connect(server.path(), config()).await;

    let forever = client.with_timeout(None);
    let mut held = Vec::new();
    for i in 0..8 {
        let forever = forever.clone();
        held.push(tokio::spawn(async move {
            forever.execute_raw(&format!("held-{i}"), Value::Null).await
        }));
    }
    tokio::time::timeout(SOON, eight_read)
        .await
        .expect("the server did not read 8 commands")
        .unwrap();
    for call in &held {
        call.abort();
    }
    for call in held {
        assert!(call.await.unwrap_err().is_cancelled());
    }

    assert_eq!(
        client.execute_raw("after-drop", Value::Null).await.unwrap(),
        json!("fresh")
    );
    server.finish().await;
}

// ---------------------------------------------------------------------------
// 7–10. Broken peers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn malformed_json_ends_the_connection() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        peer.expect("query-status").await;
        peer.raw(b"{\"return\": {\"running\": tru}\n").await;
        peer.wait_eof(SOON).await;
    });
    let (client, connection) = connect(server.path(), config()).await;
    let mut events = client.subscribe();

    let err = client
        .execute_raw("query-status", Value::Null)
        .await
        .unwrap_err();
    match &err {
        Error::Closed {
            reason: Some(reason),
        } => {
            assert!(reason.contains("malformed JSON"), "{reason}");
        }
        other => panic!("expected Closed with a reason, got {other:?}"),
    }
    assert!(err.result_unknown());

    match connection_result(connection).await {
        Err(Error::Protocol(message)) => assert!(message.contains("malformed JSON"), "{message}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    let reason = next_disconnect(&mut events).await.expect("a reason");
    assert!(reason.contains("malformed JSON"), "{reason}");
    assert!(events.next().await.is_none());
    assert!(client.is_closed());
    server.finish().await;
}

#[tokio::test]
async fn oversized_line_ends_the_connection() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        // A line of exactly the limit is fine.
        let fits = peer.expect("fits").await;
        let head = format!("{{\"id\": {}, \"return\": \"", fits.id);
        let mut line = head.clone().into_bytes();
        let payload = 1024 - head.len() - 2;
        line.extend(std::iter::repeat_n(b'y', payload));
        line.extend_from_slice(b"\"}");
        assert_eq!(line.len(), 1024);
        line.push(b'\n');
        peer.raw(&line).await;

        peer.expect("query-block").await;
        let mut line = b"{\"return\": \"".to_vec();
        line.extend(std::iter::repeat_n(b'x', 10 * 1024));
        line.extend_from_slice(b"\"}\n");
        // The client may hang up before it has all of it.
        let _ = peer.try_raw(&line).await;
        peer.wait_eof(SOON).await;
        payload
    });
    let (client, connection) = connect(server.path(), config().max_line_length(1024)).await;
    let mut events = client.subscribe();

    let fits = client.execute_raw("fits", Value::Null).await.unwrap();
    let fits = fits.as_str().expect("a string").to_owned();
    assert!(fits.bytes().all(|b| b == b'y'));

    let err = client
        .execute_raw("query-block", Value::Null)
        .await
        .unwrap_err();
    match &err {
        Error::Closed {
            reason: Some(reason),
        } => assert!(reason.contains("1024"), "{reason}"),
        other => panic!("expected Closed with a reason, got {other:?}"),
    }
    assert!(matches!(
        connection_result(connection).await,
        Err(Error::LineTooLong { limit: 1024 })
    ));
    assert!(next_disconnect(&mut events).await.is_some());
    assert!(client.is_closed());
    assert_eq!(server.finish().await, fits.len());
}

#[tokio::test]
async fn large_reply_under_the_limit_is_fine() {
    const ITEMS: usize = 5000;
    let item = "b".repeat(1000);
    let expected = item.clone();
    let server = FakeServer::start(move |mut peer| async move {
        peer.handshake().await;
        let big = peer.expect("query-named-block-nodes").await;
        let nodes: Vec<&str> = vec![item.as_str(); ITEMS];
        peer.reply(&big.id, json!(nodes)).await;
        let small = peer.expect("query-status").await;
        peer.reply(&small.id, json!({"running": true, "status": "running"}))
            .await;
    });
    let (client, _connection) = connect(server.path(), config()).await;

    let reply = client
        .execute_raw("query-named-block-nodes", Value::Null)
        .await
        .unwrap();
    let nodes = reply.as_array().expect("an array");
    assert_eq!(nodes.len(), ITEMS);
    assert!(nodes.iter().all(|n| n.as_str() == Some(expected.as_str())));
    // The stream is still in step after a 5 MB line.
    let status = client.execute(qapi::qmp::query_status {}).await.unwrap();
    assert!(status.running);
    server.finish().await;
}

#[tokio::test]
async fn deeply_nested_json_is_a_protocol_error() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        // As deep as the default limit allows (the reply object is one more
        // level): accepted, parsed and dropped without exhausting the stack.
        let deep = peer.expect("deep-but-fine").await;
        let depth = qmp_client::DEFAULT_MAX_DEPTH - 1;
        let mut line = format!("{{\"id\": {}, \"return\": ", deep.id).into_bytes();
        line.extend(std::iter::repeat_n(b'[', depth));
        line.extend(std::iter::repeat_n(b']', depth));
        line.extend_from_slice(b"}\n");
        peer.raw(&line).await;
        // Far too deep: the connection ends.
        peer.expect("query-block").await;
        let mut line = b"{\"return\": ".to_vec();
        line.extend(std::iter::repeat_n(b'[', 100_000));
        line.push(b'\n');
        peer.raw(&line).await;
        peer.wait_eof(SOON).await;
    });
    let (client, connection) = connect(server.path(), config()).await;

    let reply = client
        .execute_raw("deep-but-fine", Value::Null)
        .await
        .unwrap();
    let mut levels = 0;
    let mut at = &reply;
    while let Value::Array(inner) = at {
        levels += 1;
        at = inner.first().unwrap_or(&Value::Null);
    }
    assert_eq!(levels, qmp_client::DEFAULT_MAX_DEPTH - 1);
    drop(reply);

    let err = client
        .execute_raw("query-block", Value::Null)
        .await
        .unwrap_err();
    assert!(err.is_closed(), "{err:?}");
    match connection_result(connection).await {
        Err(Error::Protocol(message)) => assert!(message.contains("deep"), "{message}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    server.finish().await;
}

#[tokio::test]
async fn eof_in_the_middle_of_a_reply() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let command = peer.expect("query-status").await;
        let half = format!("{{\"id\": {}, \"return\": {{\"runn", command.id);
        peer.raw(half.as_bytes()).await;
        peer.close().await;
    });
    let (client, connection) = connect(server.path(), config()).await;
    let mut events = client.subscribe();

    let err = client
        .execute_raw("query-status", Value::Null)
        .await
        .unwrap_err();
    assert!(err.is_closed(), "{err:?}");
    assert!(err.result_unknown());
    let reason = next_disconnect(&mut events).await.expect("a reason");
    assert!(reason.contains("middle of a message"), "{reason}");
    assert!(matches!(
        connection_result(connection).await,
        Err(Error::Protocol(_))
    ));
    assert!(client.is_closed());
    server.finish().await;
}

// ---------------------------------------------------------------------------
// 11. quit, then EOF
// ---------------------------------------------------------------------------

#[tokio::test]
async fn quit_then_eof_is_an_orderly_close() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let quit = peer.expect("quit").await;
        peer.reply(&quit.id, json!({})).await;
        peer.event(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        )
        .await;
        peer.close().await;
    });
    // A long default timeout: calls after the close must fail at once anyway.
    let (client, connection) = connect(
        server.path(),
        config().command_timeout(Some(Duration::from_secs(60))),
    )
    .await;
    let mut events = client.subscribe();

    client.execute(qapi::qmp::quit {}).await.unwrap();
    let shutdown = next_event(&mut events).await;
    assert_eq!(shutdown.name, "SHUTDOWN");
    assert_eq!(shutdown.str("reason"), Some("host-qmp-quit"));
    assert_eq!(next_disconnect(&mut events).await, None);
    assert!(events.next().await.is_none());
    assert!(connection_result(connection).await.is_ok());
    assert!(client.is_closed());

    let started = Instant::now();
    let err = client
        .execute_raw("query-status", Value::Null)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Closed { reason: None }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));

    let mut late = client.subscribe();
    let item = tokio::time::timeout(Duration::from_secs(1), late.next())
        .await
        .expect("a late subscriber must see the disconnect at once");
    assert!(
        matches!(item, Some(EventItem::Disconnected(None))),
        "{item:?}"
    );
    assert!(late.next().await.is_none());
    server.finish().await;
}

// ---------------------------------------------------------------------------
// 12. A lagging subscriber
// ---------------------------------------------------------------------------

#[tokio::test]
async fn lagging_subscriber_is_told_and_others_see_everything() {
    const TICKS: u64 = 50;
    let (ack, mut acks) = mpsc::unbounded_channel::<u64>();
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let go = peer.expect("start-ticking").await;
        peer.reply(&go.id, json!({})).await;
        for seq in 0..TICKS {
            peer.event("TICK", json!({ "seq": seq })).await;
            // Pace on the fast subscriber only, so it never falls behind.
            let acked = tokio::time::timeout(SOON, acks.recv())
                .await
                .expect("the fast subscriber did not keep up");
            assert_eq!(acked, Some(seq));
        }
        peer.event("EXTRA", json!({})).await;
        peer.close().await;
    });
    let (client, _connection) = connect(server.path(), config().event_capacity(4)).await;
    let mut slow = client.subscribe();
    let mut fast = client.subscribe();

    let fast_reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            match next_item(&mut fast).await {
                EventItem::Event(event) if event.name == "TICK" => {
                    let seq = event.data["seq"].as_u64().unwrap();
                    seen.push(seq);
                    let _ = ack.send(seq);
                }
                EventItem::Event(event) => assert_eq!(event.name, "EXTRA"),
                EventItem::Lagged(n) => panic!("the fast subscriber lagged by {n}"),
                EventItem::Disconnected(reason) => {
                    assert_eq!(reason, None);
                    return seen;
                }
            }
        }
    });
    client
        .execute_raw("start-ticking", Value::Null)
        .await
        .unwrap();
    let seen = fast_reader.await.unwrap();
    assert_eq!(seen, (0..TICKS).collect::<Vec<_>>());

    // Only now does the slow subscriber read.
    let missed = match next_item(&mut slow).await {
        EventItem::Lagged(n) => n,
        other => panic!("expected Lagged, got {other:?}"),
    };
    assert!(missed > 0);
    let mut ticks = Vec::new();
    let mut extra = false;
    loop {
        match next_item(&mut slow).await {
            EventItem::Event(event) if event.name == "TICK" => {
                assert!(!extra, "TICK after EXTRA");
                ticks.push(event.data["seq"].as_u64().unwrap());
            }
            EventItem::Event(event) => {
                assert_eq!(event.name, "EXTRA");
                extra = true;
            }
            EventItem::Lagged(n) => panic!("lagged twice ({n})"),
            EventItem::Disconnected(reason) => {
                assert_eq!(reason, None);
                break;
            }
        }
    }
    assert!(extra, "the event after the burst was lost");
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{ticks:?}");
    // What was missed plus what was seen is every event.
    assert_eq!(missed + ticks.len() as u64 + 1, TICKS + 1);
    if let Some(first) = ticks.first() {
        assert_eq!(*first, missed);
    }
    assert!(slow.next().await.is_none());
    server.finish().await;
}

// ---------------------------------------------------------------------------
// 13. Unknown events, fields, enum values and error classes
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unknown_events_fields_enums_and_error_classes_are_survivable() {
    let future_status = json!({
        "running": false,
        "status": "hibernating-v12",
        "future-field": {"nested": [1, 2, {"deeper": null}]},
    });
    let reply = future_status.clone();
    let server = FakeServer::start(move |mut peer| async move {
        peer.handshake().await;
        let raw = peer.expect("query-status").await;
        peer.event(
            "FUTURE_EVENT",
            json!({"odd": [1, "two", {"three": 3.5}], "flag": null}),
        )
        .await;
        peer.send(&json!({"hello-from-the-future": true})).await;
        peer.reply(&raw.id, reply.clone()).await;
        let typed = peer.expect("query-status").await;
        peer.reply(&typed.id, reply).await;
        let known = peer.expect("query-status").await;
        peer.reply(
            &known.id,
            json!({"running": true, "status": "running", "singlestep": false, "new": 1}),
        )
        .await;
        let future = peer.expect("future-command").await;
        peer.error(&future.id, "FutureClass", "something new went wrong")
            .await;
        let last = peer.expect("query-name").await;
        peer.reply(&last.id, json!({"name": "vm1"})).await;
    });
    let (client, _connection) = connect(server.path(), config()).await;
    let mut events = client.subscribe();

    let raw = client
        .execute_raw("query-status", Value::Null)
        .await
        .unwrap();
    assert_eq!(raw, future_status);
    let event = next_event(&mut events).await;
    assert_eq!(event.name, "FUTURE_EVENT");
    assert_eq!(event.data["odd"][2]["three"], json!(3.5));

    let err = client
        .execute(qapi::qmp::query_status {})
        .await
        .unwrap_err();
    match &err {
        Error::Decode { command, source } => {
            assert_eq!(command, "query-status");
            assert!(source.to_string().contains("hibernating-v12"), "{source}");
        }
        other => panic!("expected Decode, got {other:?}"),
    }
    assert!(!err.result_unknown());

    let status = client.execute(qapi::qmp::query_status {}).await.unwrap();
    assert_eq!(status.status, qapi::qmp::RunState::running);

    let err = client
        .execute_raw("future-command", json!({}))
        .await
        .unwrap_err();
    match &err {
        Error::Qmp {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "future-command");
            assert_eq!(class, "FutureClass");
            assert_eq!(desc, "something new went wrong");
        }
        other => panic!("expected Qmp, got {other:?}"),
    }
    assert_eq!(err.qmp_class(), Some("FutureClass"));
    assert!(!client.is_closed());

    let name = client.execute(qapi::qmp::query_name {}).await.unwrap();
    assert_eq!(name.name.as_deref(), Some("vm1"));
    server.finish().await;
}

// ---------------------------------------------------------------------------
// 14. Jobs
// ---------------------------------------------------------------------------

fn job_entry(id: &str, status: &str, error: Option<&str>) -> Value {
    let mut entry = json!({
        "id": id,
        "type": "mirror",
        "status": status,
        "current-progress": 1_048_576,
        "total-progress": 1_048_576,
    });
    if let Some(error) = error {
        entry["error"] = json!(error);
    }
    entry
}

/// A job seen to conclude, whose connection then closes before `query-jobs`
/// is answered (a relay whose owner finished with the job): the outcome is
/// the one its events told, not a closed connection.
#[tokio::test]
async fn job_concluded_then_connection_closed_reports_the_events_error() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let start = peer.expect("block-commit").await;
        peer.reply(&start.id, json!({})).await;
        peer.job_status("c1", "running").await;
        let cancel = peer.expect("job-cancel").await;
        peer.reply(&cancel.id, json!({})).await;
        peer.job_status("c1", "aborting").await;
        peer.event(
            "BLOCK_JOB_COMPLETED",
            json!({"device": "c1", "type": "commit", "len": 4, "offset": 1, "speed": 0,
                   "error": "Operation canceled"}),
        )
        .await;
        peer.job_status("c1", "concluded").await;
        // The query for the job's error goes unanswered: the peer goes away.
        peer.expect("query-jobs").await;
    });
    let (client, _connection) = connect(server.path(), config()).await;
    let mut job = client
        .start_job_raw("c1", "block-commit", json!({"job-id": "c1", "device": "d"}))
        .await
        .unwrap();
    job.cancel().await.unwrap();
    let error = job.wait_concluded(SOON).await.unwrap();
    assert_eq!(error.as_deref(), Some("Operation canceled"));
    assert_eq!(job.status(), &JobStatus::Concluded);
}

#[tokio::test]
async fn job_follows_events_and_reports_its_error_after_dismissing() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let start = peer.expect("drive-mirror").await;
        peer.reply(&start.id, json!({})).await;
        peer.job_status("job0", "created").await;
        peer.job_status("job0", "running").await;
        // Another job finishing must not be mistaken for ours.
        peer.job_status("other", "concluded").await;
        peer.event("BLOCK_JOB_READY", json!({"device": "job0"}))
            .await;
        peer.job_status("job0", "ready").await;

        let complete = peer.expect("job-complete").await;
        peer.reply(&complete.id, json!({})).await;
        peer.job_status("other", "null").await;
        peer.job_status("job0", "waiting").await;
        peer.job_status("job0", "pending").await;
        peer.job_status("job0", "concluded").await;

        let query = peer.expect("query-jobs").await;
        peer.reply(
            &query.id,
            json!([
                job_entry("other", "concluded", Some("not ours")),
                job_entry("job0", "concluded", Some("Input/output error")),
            ]),
        )
        .await;
        let dismiss = peer.expect("job-dismiss").await;
        peer.reply(&dismiss.id, json!({})).await;
        peer.job_status("job0", "null").await;
        (complete, dismiss)
    });
    let (client, _connection) = connect(server.path(), config()).await;

    let mut job = client
        .start_job_raw(
            "job0",
            "drive-mirror",
            json!({"job-id": "job0", "device": "disk0", "target": "/tmp/t.qcow2", "sync": "full"}),
        )
        .await
        .unwrap();
    assert_eq!(job.id(), "job0");
    assert_eq!(
        job.wait_for(&[JobStatus::Ready], SOON).await.unwrap(),
        JobStatus::Ready
    );
    assert_eq!(job.status(), &JobStatus::Ready);
    job.complete().await.unwrap();

    let err = job.finish(SOON).await.unwrap_err();
    match &err {
        Error::Job { id, message } => {
            assert_eq!(id, "job0");
            assert!(message.contains("Input/output error"), "{message}");
        }
        other => panic!("expected Job, got {other:?}"),
    }
    assert_eq!(job.status(), &JobStatus::Null);

    let (complete, dismiss) = server.finish().await;
    assert_eq!(
        line_json(&complete),
        json!({"execute": "job-complete", "arguments": {"id": "job0"}, "id": complete.id})
    );
    assert_eq!(dismiss.args, json!({"id": "job0"}));
}

#[tokio::test]
async fn job_rereads_query_jobs_after_a_lag() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let start = peer.expect("block-commit").await;
        // A burst before the reply: the job's subscription (capacity 2)
        // overflows before the job reads anything, and what it keeps is
        // noise, so only query-jobs can tell it that job0 is ready.
        peer.job_status("job0", "created").await;
        peer.job_status("job0", "running").await;
        peer.job_status("job0", "ready").await;
        for i in 0..8 {
            peer.job_status(&format!("noise{i}"), "running").await;
        }
        peer.reply(&start.id, json!({})).await;
        let query = peer.expect("query-jobs").await;
        peer.reply(
            &query.id,
            json!([
                job_entry("noise0", "running", None),
                job_entry("job0", "ready", None)
            ]),
        )
        .await;
        query
    });
    let (client, _connection) = connect(server.path(), config().event_capacity(2)).await;

    let mut job = client
        .start_job_raw(
            "job0",
            "block-commit",
            json!({"job-id": "job0", "device": "top", "auto-dismiss": false}),
        )
        .await
        .unwrap();
    assert_eq!(
        job.wait_for(&[JobStatus::Ready], SOON).await.unwrap(),
        JobStatus::Ready
    );
    let query = server.finish().await;
    assert_eq!(query.name, "query-jobs");
}

// ---------------------------------------------------------------------------
// 15. fd passing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn getfd_and_add_fd_pass_the_descriptor_with_the_command() {
    const SECRET: &[u8] = b"passed through SCM_RIGHTS";
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (line, fds) = peer.read_line_with_fds().await;
            assert_eq!(fds.len(), 1, "one descriptor with {line:?}");
            let fd = fds[0];
            let stat = nix::sys::stat::fstat(fd).unwrap();
            let mut buf = [0u8; 64];
            let n = nix::unistd::read(fd, &mut buf).unwrap();
            nix::unistd::close(fd).unwrap();
            let command: Value = serde_json::from_slice(&line).unwrap();
            let reply = if command["execute"] == "add-fd" {
                json!({"fdset-id": 7, "fd": 42})
            } else {
                json!({})
            };
            peer.reply(&command["id"], reply).await;
            seen.push((command, (stat.st_dev, stat.st_ino), buf[..n].to_vec()));
        }
        seen
    });
    let (client, _connection) = connect(server.path(), config()).await;

    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let ours = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&read_end)).unwrap();
    nix::unistd::write(&write_end, SECRET).unwrap();
    client.getfd("snap-fd", read_end.as_fd()).await.unwrap();
    nix::unistd::write(&write_end, b"again").unwrap();
    let info = client
        .add_fd(&read_end, Some(7), Some("overlay"))
        .await
        .unwrap();
    assert_eq!(info.fdset_id, 7);
    assert_eq!(info.fd, 42);

    let seen = server.finish().await;
    let (getfd, getfd_file, getfd_data) = &seen[0];
    assert_eq!(getfd["execute"], "getfd");
    assert_eq!(getfd["arguments"], json!({"fdname": "snap-fd"}));
    assert_eq!(*getfd_file, (ours.st_dev, ours.st_ino));
    assert_eq!(getfd_data, SECRET);
    let (add_fd, add_fd_file, add_fd_data) = &seen[1];
    assert_eq!(add_fd["execute"], "add-fd");
    assert_eq!(
        add_fd["arguments"],
        json!({"fdset-id": 7, "opaque": "overlay"})
    );
    assert_eq!(*add_fd_file, (ours.st_dev, ours.st_ino));
    assert_eq!(add_fd_data, b"again");
}

// ---------------------------------------------------------------------------
// 16. Guest agent
// ---------------------------------------------------------------------------

#[tokio::test]
async fn guest_agent_skips_stale_output_and_retries_the_first_sync() {
    let server = FakeServer::start(|mut peer| async move {
        // Output left over from an earlier client, including a partial line.
        peer.raw(b"{\"return\": 1234}\n{\"return\": {\"frozen\": tr")
            .await;
        // The agent is not running yet: the first sync goes unanswered.
        let first = peer.agent_read_sync().await;
        let second = peer.agent_read_sync().await;
        assert_ne!(first, second, "each sync carries a fresh id");
        peer.raw(b"garbage that is not JSON\n{\"return\": 99}\n")
            .await;
        peer.agent_delimited(json!(second)).await;

        let freeze = peer.expect("guest-fsfreeze-freeze").await;
        assert_eq!(freeze.delimiters, 0);
        peer.agent_reply(json!(3)).await;
        let ping = peer.expect("guest-ping").await;
        assert_eq!(ping.delimiters, 0);
        peer.agent_reply(json!({})).await;
    });
    let started = Instant::now();
    let mut agent = GuestAgent::connect(server.path(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(agent.path(), server.path());
    agent.set_timeout(SOON);
    assert_eq!(agent.fsfreeze_freeze().await.unwrap(), 3);
    agent.ping().await.unwrap();
    server.finish().await;
}

#[tokio::test]
async fn guest_agent_resyncs_after_a_timed_out_command() {
    let server = FakeServer::start(|mut peer| async move {
        peer.agent_sync().await;
        peer.expect("guest-ping").await;
        // No answer: the client times out. The next thing it sends must be a
        // fresh 0xFF-delimited sync, before any command.
        let id = peer.agent_read_sync().await;
        // The late reply to the ping comes first and must be skipped.
        peer.agent_reply(json!({})).await;
        peer.agent_delimited(json!(id)).await;
        let status = peer.expect("guest-fsfreeze-status").await;
        assert_eq!(status.delimiters, 0);
        peer.agent_reply(json!("frozen")).await;
        let thaw = peer.expect("guest-fsfreeze-thaw").await;
        peer.agent_reply(json!(2)).await;
        thaw
    });
    let mut agent = GuestAgent::connect(server.path(), SOON).await.unwrap();
    agent.set_timeout(Duration::from_millis(200));
    let err = agent.ping().await.unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { command, sent: true, .. } if command == "guest-ping"),
        "{err:?}"
    );
    agent.set_timeout(SOON);
    assert_eq!(
        agent.fsfreeze_status().await.unwrap(),
        qmp_client::FreezeStatus::Frozen
    );
    assert_eq!(agent.fsfreeze_thaw().await.unwrap(), 2);
    let thaw = server.finish().await;
    assert!(thaw.args.is_null(), "{}", thaw.text());
}

#[tokio::test]
async fn guest_agent_accepts_a_late_answer_to_an_earlier_sync() {
    let server = FakeServer::start(|mut peer| async move {
        let first = peer.agent_read_sync().await;
        let second = peer.agent_read_sync().await;
        // The agent started and answers both syncs, the stale one first.
        peer.agent_delimited(json!(first)).await;
        peer.agent_delimited(json!(second)).await;
        let ping = peer.expect("guest-ping").await;
        peer.agent_reply(json!({})).await;
        ping
    });
    let started = Instant::now();
    let mut agent = GuestAgent::connect(server.path(), SOON).await.unwrap();
    // One unanswered 1 s attempt, then success: no second retry.
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    agent.set_timeout(SOON);
    agent.ping().await.unwrap();
    server.finish().await;
}

#[tokio::test]
async fn guest_agent_closing_during_sync_is_reported_at_once() {
    let server = FakeServer::start(|mut peer| async move {
        peer.agent_read_sync().await;
        peer.close().await;
    });
    let started = Instant::now();
    let err = GuestAgent::connect(server.path(), SOON).await.unwrap_err();
    assert!(err.is_closed(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    server.finish().await;
}

/// Ids are the smallest not in use, so requests stay short (QEMU reads its
/// monitor a byte at a time), but the id of a command whose caller gave up is
/// not reused until QEMU has answered it: its late reply can never reach
/// another caller.
#[tokio::test]
async fn ids_are_short_and_never_reused_while_unanswered() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let first = peer.expect("first").await;
        assert_eq!(first.id, json!(1));
        peer.reply(&first.id, json!("one")).await;
        // Reused: nothing is pending.
        let slow = peer.expect("slow").await;
        assert_eq!(slow.id, json!(1));
        // The caller of `slow` gives up; the next command must not get id 1.
        let next = peer.expect("next").await;
        assert_eq!(next.id, json!(2));
        peer.reply(&slow.id, json!("late")).await;
        peer.reply(&next.id, json!("two")).await;
        // Both answered: id 1 is free again.
        let last = peer.expect("last").await;
        assert_eq!(last.id, json!(1));
        peer.reply(&last.id, json!("three")).await;
    });
    let (client, _connection) = connect(server.path(), config()).await;
    assert_eq!(
        client.execute_raw("first", Value::Null).await.unwrap(),
        json!("one")
    );
    let err = client
        .with_timeout(Some(Duration::from_millis(100)))
        .execute_raw("slow", Value::Null)
        .await
        .unwrap_err();
    assert!(err.result_unknown(), "{err}");
    assert_eq!(
        client.execute_raw("next", Value::Null).await.unwrap(),
        json!("two")
    );
    assert_eq!(
        client.execute_raw("last", Value::Null).await.unwrap(),
        json!("three")
    );
    server.finish().await;
}

/// A typed command with no arguments is sent without an `arguments` member:
/// the shortest request QEMU accepts.
#[tokio::test]
async fn empty_arguments_are_left_out() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let cmd = peer.expect("query-status").await;
        assert_eq!(
            String::from_utf8_lossy(&cmd.line).trim_end(),
            r#"{"execute":"query-status","id":1}"#
        );
        peer.reply(
            &cmd.id,
            json!({"status": "paused", "running": false, "singlestep": false}),
        )
        .await;
    });
    let (client, _connection) = connect(server.path(), config()).await;
    let status = client.execute(qapi::qmp::query_status {}).await.unwrap();
    assert!(!status.running);
    server.finish().await;
}

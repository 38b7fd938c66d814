//! A hostile or broken QMP server: garbage bytes, an endless line, replies with
//! ids nobody asked for, an event flood, silence. The client must fail cleanly
//! (an error, never a panic or a hang) with bounded memory, and keep working
//! wherever the protocol still allows it. Inputs the fuzzers found interesting
//! are replayed at the end.

mod fake_server;

use std::path::Path;
use std::time::{Duration, Instant};

use fake_server::{FakeServer, NoLine};
use qmp_client::{Client, Config, Error, EventItem};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// A limit for things that should happen at once; generous for a loaded machine.
const SOON: Duration = Duration::from_secs(10);

const MIB: u64 = 1 << 20;

/// Held by the tests that measure the process's memory, so that under `cargo
/// test` (one process, tests on threads) they do not measure each other.
static MEMORY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type ConnectionTask = JoinHandle<qmp_client::Result<()>>;

fn config() -> Config {
    Config::new()
        .command_timeout(Some(SOON))
        .greeting_timeout(SOON)
}

async fn connect(path: &Path, config: Config) -> (Client, ConnectionTask) {
    let (client, connection) = config.connect_unix(path).await.expect("connect");
    (client, tokio::spawn(connection))
}

async fn connection_result(task: ConnectionTask) -> qmp_client::Result<()> {
    tokio::time::timeout(SOON, task)
        .await
        .expect("the connection task did not end")
        .expect("the connection task panicked")
}

/// A line from `/proc/self/status` in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line:?}"));
    kib * 1024
}

/// Resets the process's peak RSS (`VmHWM`) to the current RSS, so the peak of
/// what follows can be measured. Linux ≥ 4.0; `false` when refused.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------
// Garbage
// ---------------------------------------------------------------------------

/// Invalid UTF-8 and binary junk right after the greeting, in place of the
/// `qmp_capabilities` reply: connecting fails with an error naming the problem.
#[tokio::test]
async fn garbage_after_the_greeting_fails_the_handshake() {
    let server = FakeServer::start(|mut peer| async move {
        peer.greet(&["oob"]).await;
        peer.expect("qmp_capabilities").await;
        peer.raw(b"\xff\xfe\x80\x00garbage \xc3\x28 \xed\xa0\x80\n")
            .await;
        peer.wait_eof(SOON).await;
    });
    let started = Instant::now();
    let err = config()
        .connect_unix(server.path())
        .await
        .map(drop)
        .expect_err("garbage instead of a reply must not connect");
    assert!(started.elapsed() < SOON, "took {:?}", started.elapsed());
    match &err {
        Error::Protocol(message) => assert!(message.contains("malformed JSON"), "{message}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    server.finish().await;
}

/// Junk in place of the greeting itself: "not a QMP monitor", with a readable
/// preview of what came.
#[tokio::test]
async fn garbage_instead_of_a_greeting_is_not_qmp() {
    let server = FakeServer::start(|mut peer| async move {
        peer.raw(b"\x80\x81\xfe\xff\x00\x01binary\n").await;
        peer.wait_eof(SOON).await;
    });
    let err = config()
        .connect_unix(server.path())
        .await
        .map(drop)
        .expect_err("junk is no greeting");
    match &err {
        Error::NotQmp { detail, .. } => assert!(detail.contains("binary"), "{detail}"),
        other => panic!("expected NotQmp, got {other:?}"),
    }
    server.finish().await;
}

/// Invalid UTF-8 once connected: the call in flight fails with `Closed` and the
/// reason, subscribers get a final disconnect, later calls fail at once.
#[tokio::test]
async fn garbage_after_the_handshake_ends_the_connection() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        peer.expect("query-status").await;
        peer.raw(b"\xff\xfe\xfd not json \x80\x80\x80\n").await;
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
        } => assert!(reason.contains("malformed JSON"), "{reason}"),
        other => panic!("expected Closed with a reason, got {other:?}"),
    }
    assert!(matches!(
        connection_result(connection).await,
        Err(Error::Protocol(_))
    ));
    match tokio::time::timeout(SOON, events.next()).await.unwrap() {
        Some(EventItem::Disconnected(Some(reason))) => {
            assert!(reason.contains("malformed JSON"), "{reason}")
        }
        other => panic!("expected a disconnect with a reason, got {other:?}"),
    }
    let started = Instant::now();
    let again = client.execute_raw("query-status", Value::Null).await;
    assert!(matches!(again, Err(Error::Closed { .. })), "{again:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(client);
    server.finish().await;
}

// ---------------------------------------------------------------------------
// A 100 MB line
// ---------------------------------------------------------------------------

/// 100 MB without a newline against the default 64 MiB line limit: the call
/// fails, the connection ends with `LineTooLong`, and the client never holds
/// much more than the limit. The server streams the line from one small
/// buffer so the process's RSS measures the client alone.
#[tokio::test]
async fn hundred_megabyte_line_is_too_long_with_bounded_memory() {
    const LINE: u64 = 100 * 1000 * 1000;
    let _alone = MEMORY.lock().await;
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        peer.expect("query-named-block-nodes").await;
        let chunk = vec![b'x'; MIB as usize];
        let mut sent = 0u64;
        if peer.try_raw(b"{\"return\": \"").await.is_err() {
            return sent;
        }
        while sent < LINE {
            let n = chunk.len().min((LINE - sent) as usize);
            // The client hangs up once it has seen too much.
            if peer.try_raw(&chunk[..n]).await.is_err() {
                break;
            }
            sent += n as u64;
        }
        // Whatever happened, no newline was ever sent.
        let _ = peer.next_line(SOON).await;
        sent
    });
    let (client, connection) = connect(
        server.path(),
        config().command_timeout(Some(Duration::from_secs(60))),
    )
    .await;

    let before = status_bytes("VmRSS");
    let peak_measured = reset_peak_rss();
    let err = client
        .execute_raw("query-named-block-nodes", json!({ "flat": true }))
        .await
        .unwrap_err();
    match &err {
        Error::Closed {
            reason: Some(reason),
        } => assert!(reason.contains("longer than 67108864"), "{reason}"),
        other => panic!("expected Closed with the line limit, got {other:?}"),
    }
    assert!(matches!(
        connection_result(connection).await,
        Err(Error::LineTooLong { limit }) if limit == qmp_client::DEFAULT_MAX_LINE
    ));
    let sent = server.finish().await;
    let after = status_bytes("VmRSS");
    let growth = after.saturating_sub(before);
    eprintln!(
        "RSS before {} MiB, after {} MiB, peak {} MiB; server sent {} MiB",
        before / MIB,
        after / MIB,
        status_bytes("VmHWM") / MIB,
        sent / MIB
    );
    assert!(
        growth < 200 * MIB,
        "RSS grew by {} MiB (from {} to {} MiB)",
        growth / MIB,
        before / MIB,
        after / MIB
    );
    if peak_measured {
        let peak = status_bytes("VmHWM").saturating_sub(before);
        assert!(
            peak < 200 * MIB,
            "peak RSS was {} MiB above the start",
            peak / MIB
        );
    }
    // The client stopped reading soon after the limit, well before 100 MB
    // (the socket buffers hold at most a few MiB more).
    assert!(
        sent >= qmp_client::DEFAULT_MAX_LINE as u64,
        "only {sent} bytes sent"
    );
    assert!(sent < LINE, "the client read all {sent} bytes of the line");
}

// ---------------------------------------------------------------------------
// Replies nobody asked for
// ---------------------------------------------------------------------------

/// Replies whose ids match no call (another number, a string, a float, a
/// negative, null, none at all, a huge one) are ignored: the call times out as
/// sent, result unknown, and the connection keeps working.
#[tokio::test]
async fn replies_with_wrong_ids_are_ignored_and_the_call_times_out() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let asked = peer.expect("query-status").await;
        let id = asked.id.as_u64().expect("a numeric id");
        for wrong in [
            json!(id + 1),
            json!(id.to_string()),
            json!(id as f64),
            json!(-(id as i64)),
            Value::Null,
            json!([id]),
            json!({ "id": id }),
            json!(u64::MAX),
        ] {
            peer.send(&json!({"return": {"status": "wrong"}, "id": wrong}))
                .await;
            peer.send(&json!({"error": {"class": "GenericError", "desc": "wrong"}, "id": wrong}))
                .await;
        }
        peer.send(&json!({"return": {"status": "no id"}})).await;
        // The client gives up; then a proper exchange still works.
        let next = peer.expect("query-version").await;
        assert_ne!(next.id, asked.id, "an unanswered id was reused");
        peer.reply(&next.id, json!({"ok": true})).await;
        // The late reply to the first call is discarded without harm.
        peer.reply(&asked.id, json!({"status": "late"})).await;
        let last = peer.expect("query-name").await;
        peer.reply(&last.id, json!({"name": "vm1"})).await;
    });
    let (client, _connection) = connect(server.path(), config()).await;
    let impatient = client.with_timeout(Some(Duration::from_millis(500)));
    let started = Instant::now();
    let err = impatient
        .execute_raw("query-status", Value::Null)
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(500));
    match &err {
        Error::Timeout { command, sent, .. } => {
            assert_eq!(command, "query-status");
            assert!(*sent, "the command was sent");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(err.result_unknown());
    assert!(!client.is_closed());
    assert_eq!(
        client
            .execute_raw("query-version", Value::Null)
            .await
            .unwrap(),
        json!({"ok": true})
    );
    assert_eq!(
        client.execute_raw("query-name", Value::Null).await.unwrap(),
        json!({"name": "vm1"})
    );
    server.finish().await;
}

// ---------------------------------------------------------------------------
// An event flood
// ---------------------------------------------------------------------------

/// 10^5 events as fast as the socket takes them, while a subscriber reads one
/// event per millisecond: it is told it lagged, memory stays bounded by the
/// queue, and calls made during the flood are answered.
#[tokio::test]
async fn endless_events_lag_a_slow_subscriber_and_calls_still_work() {
    const EVENTS: u64 = 100_000;
    const BATCH: u64 = 1_000;
    let _alone = MEMORY.lock().await;
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        let mut answered = 0;
        let mut seq = 0;
        while seq < EVENTS {
            let mut batch = Vec::with_capacity(BATCH as usize * 128);
            for _ in 0..BATCH {
                let event = json!({
                    "event": "FLOOD",
                    "data": {"seq": seq, "pad": "p".repeat(32)},
                    "timestamp": {"seconds": 1_750_000_000, "microseconds": seq % 1_000_000},
                });
                serde_json::to_writer(&mut batch, &event).unwrap();
                batch.push(b'\n');
                seq += 1;
            }
            peer.raw(&batch).await;
            // Answer whatever the client asked meanwhile, without waiting.
            while let Ok(command) = peer.try_read_command(Duration::from_millis(1)).await {
                peer.reply(&command.id, json!({"during": seq})).await;
                answered += 1;
            }
        }
        peer.event("LAST", json!({})).await;
        loop {
            match peer.try_read_command(SOON).await {
                Ok(command) => {
                    peer.reply(&command.id, json!({"after": seq})).await;
                    answered += 1;
                }
                Err(NoLine::Eof) => return answered,
                Err(NoLine::Timeout) => panic!("the client neither asked nor hung up"),
            }
        }
    });
    let (client, _connection) = connect(server.path(), config()).await;
    let mut slow = client.subscribe();
    let before = status_bytes("VmRSS");

    let caller = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut replies = Vec::new();
            for _ in 0..20 {
                replies.push(client.execute_raw("query-status", Value::Null).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            replies
        })
    };

    let mut lagged = 0u64;
    let mut seen = 0u64;
    let mut last_seq = None;
    let mut got_last = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !got_last {
        assert!(Instant::now() < deadline, "the flood did not end");
        match tokio::time::timeout(SOON, slow.next()).await {
            Ok(Some(EventItem::Event(event))) if event.name == "FLOOD" => {
                let seq = event.data["seq"].as_u64().unwrap();
                assert!(last_seq.is_none_or(|l| seq > l), "out of order: {seq}");
                last_seq = Some(seq);
                seen += 1;
                if lagged == 0 {
                    // Slow until told; then catch up at full speed.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Ok(Some(EventItem::Event(event))) => {
                assert_eq!(event.name, "LAST");
                got_last = true;
            }
            Ok(Some(EventItem::Lagged(n))) => lagged += n,
            Ok(Some(EventItem::Disconnected(reason))) => panic!("disconnected: {reason:?}"),
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!("no event for {SOON:?}"),
        }
    }
    let growth = status_bytes("VmRSS").saturating_sub(before);
    eprintln!(
        "saw {seen} events, missed {lagged}; RSS grew by {} KiB",
        growth / 1024
    );
    assert!(lagged > 0, "a subscriber reading 1 event/ms never lagged");
    assert_eq!(
        seen + lagged,
        EVENTS,
        "every event is either seen or counted as missed"
    );
    assert!(growth < 100 * MIB, "RSS grew by {} MiB", growth / MIB);

    let replies = caller.await.unwrap();
    for reply in &replies {
        assert!(reply.is_ok(), "a call failed during the flood: {reply:?}");
    }
    assert!(
        replies
            .iter()
            .any(|r| r.as_ref().unwrap().get("during").is_some()),
        "no call was answered during the flood: {replies:?}"
    );
    assert!(!client.is_closed());
    drop(slow);
    drop(client);
    assert_eq!(server.finish().await, replies.len());
}

// ---------------------------------------------------------------------------
// Silence
// ---------------------------------------------------------------------------

/// A server that reads the command and never answers: the call times out as
/// sent (result unknown) at its limit, not before and not much after, and the
/// connection stays up.
#[tokio::test]
async fn server_that_never_answers_times_out() {
    let server = FakeServer::start(|mut peer| async move {
        peer.handshake().await;
        peer.expect("query-status").await;
        peer.assert_silent(Duration::from_secs(1)).await;
        peer.wait_eof(SOON).await;
    });
    let (client, connection) = connect(
        server.path(),
        config().command_timeout(Some(Duration::from_millis(300))),
    )
    .await;
    let started = Instant::now();
    let err = client
        .execute_raw("query-status", Value::Null)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        matches!(&err, Error::Timeout { sent: true, .. }),
        "expected a sent timeout, got {err:?}"
    );
    assert!(err.result_unknown());
    assert_eq!(
        err.to_string(),
        "query-status timed out after 300ms: sent, result unknown"
    );
    assert!(!client.is_closed());
    drop(client);
    assert!(connection_result(connection).await.is_ok());
    server.finish().await;
}

/// A server that accepts and says nothing at all: `NoGreeting` at the greeting
/// timeout.
#[tokio::test]
async fn server_that_never_greets_is_reported() {
    let server = FakeServer::start(|mut peer| async move {
        peer.assert_silent(Duration::from_secs(1)).await;
        peer.wait_eof(SOON).await;
    });
    let started = Instant::now();
    let err = config()
        .greeting_timeout(Duration::from_millis(300))
        .connect_unix(server.path())
        .await
        .map(drop)
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(err, Error::NoGreeting { .. }), "{err:?}");
    server.finish().await;
}

// ---------------------------------------------------------------------------
// Fuzzer inputs
// ---------------------------------------------------------------------------

/// The inputs under `fuzz/seeds/TARGET`: the fuzzers' starting points and the
/// interesting inputs they found, kept as regression cases.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// What the `qmp_decode` fuzz target does, on every kept input.
#[test]
fn fuzz_seeds_decode_cleanly() {
    for (name, bytes) in seeds("qmp_decode") {
        let result = std::panic::catch_unwind(|| qmp_client::fuzz_decode(&bytes));
        assert!(result.is_ok(), "seed {name} panicked");
    }
}

const GREETING_LINE: &[u8] = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}
"#;

/// What the `qmp_stream` fuzz target does, on one input: the first byte's low
/// bit says whether the server greets properly before sending the rest.
async fn replay_as_server(name: &str, input: Vec<u8>) {
    const PROMPT: Duration = Duration::from_secs(3);
    let server = FakeServer::start(|mut peer| async move {
        let (mode, body) = input
            .split_first()
            .map_or((0, &input[..]), |(m, r)| (*m, r));
        if mode & 1 == 1 {
            peer.raw(GREETING_LINE).await;
            let caps = peer.expect("qmp_capabilities").await;
            peer.reply(&caps.id, json!({})).await;
        }
        let _ = peer.try_raw(body).await;
        peer.close().await;
    });
    let config = Config::new()
        .greeting_timeout(PROMPT)
        .command_timeout(Some(PROMPT))
        .max_line_length(1 << 16)
        .max_depth(64)
        .event_capacity(4);
    if let Ok((client, connection)) = config.connect_unix(server.path()).await {
        let connection = tokio::spawn(connection);
        let mut events = client.subscribe();
        let (raw, typed) = tokio::join!(
            client.execute_raw("query-status", Value::Null),
            client.execute(qmp_client::qapi::qmp::query_block {}),
        );
        for err in [raw.err(), typed.err()].into_iter().flatten() {
            assert!(!err.is_timeout(), "seed {name}: a call timed out: {err}");
        }
        let drained = tokio::time::timeout(PROMPT, async {
            while let Some(item) = events.next().await {
                if let EventItem::Disconnected(_) = item {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(drained, Ok(true), "seed {name}: no disconnect");
        drop(client);
        let ended = tokio::time::timeout(PROMPT, connection).await;
        assert!(
            matches!(ended, Ok(Ok(_))),
            "seed {name}: the connection did not end"
        );
    }
    server.finish().await;
}

#[tokio::test]
async fn fuzz_seeds_as_a_server_stream_end_cleanly() {
    for (name, input) in seeds("qmp_stream") {
        replay_as_server(&name, input).await;
    }
}

/// Version numbers beyond `u32` in a greeting are cut to 32 bits instead of
/// being refused or saturated: QEMU 4294967297.0.0 is reported as 1.0.0.
#[tokio::test]
async fn greeting_version_beyond_u32_is_not_misread() {
    let server = FakeServer::start(|mut peer| async move {
        peer.send(&json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0,
            "major": 4_294_967_297u64}, "package": ""}, "capabilities": []}}))
            .await;
        if let Ok(caps) = peer.try_read_command(SOON).await {
            peer.reply(&caps.id, json!({})).await;
        }
        peer.wait_eof(SOON).await;
    });
    if let Ok((client, _connection)) = config().connect_unix(server.path()).await {
        assert_ne!(
            client.greeting().version.major,
            1,
            "major version 4294967297 read as 1"
        );
    }
    server.finish().await;
}

//! Arbitrary bytes as what a QMP server sends to a real `Client` over a Unix socket.
//!
//! The first byte picks the script: with its low bit set the server greets and
//! answers `qmp_capabilities` properly first, so the rest of the input reaches the
//! connection task; otherwise the input is the whole conversation, greeting included.
//! The server then closes its side, so every outcome must end promptly: the
//! connection finishes, calls fail or succeed, subscribers see a disconnect.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use qmp_client::{Config, EventItem};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::runtime::Runtime;
use tokio::sync::OnceCell;

const GREETING: &[u8] = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}
"#;

/// Anything that must happen "at once" gets this long before it counts as a hang.
const PROMPT: Duration = Duration::from_secs(3);

static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
});

static DIR: LazyLock<tempfile::TempDir> =
    LazyLock::new(|| tempfile::tempdir().expect("a temporary directory"));

static LISTENER: OnceCell<(UnixListener, PathBuf)> = OnceCell::const_new();

async fn listener() -> &'static (UnixListener, PathBuf) {
    LISTENER
        .get_or_init(|| async {
            let path = DIR.path().join("qmp.sock");
            (UnixListener::bind(&path).expect("bind"), path)
        })
        .await
}

async fn serve(listener: &UnixListener, data: Vec<u8>) {
    let (stream, _) = listener.accept().await.expect("accept");
    let (mut read, mut write) = stream.into_split();
    let (mode, body) = data.split_first().map_or((0, &data[..]), |(m, r)| (*m, r));
    if mode & 1 == 1 {
        let _ = write.write_all(GREETING).await;
        // Wait for the client's qmp_capabilities line, then answer it.
        let mut seen = Vec::new();
        let mut chunk = [0u8; 512];
        while !seen.contains(&b'\n') {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = write.write_all(b"{\"return\": {}, \"id\": 0}\n").await;
    }
    let _ = write.write_all(body).await;
    let _ = write.shutdown().await;
    // Take whatever the client still sends until it hangs up.
    let mut sink = [0u8; 4096];
    while let Ok(n) = read.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

async fn client(path: &PathBuf) {
    let config = Config::new()
        .greeting_timeout(PROMPT)
        .command_timeout(Some(PROMPT))
        .max_line_length(1 << 16)
        .max_depth(64)
        .event_capacity(4);
    let Ok((client, connection)) = config.connect_unix(path).await else {
        return;
    };
    let connection = tokio::spawn(connection);
    let mut events = client.subscribe();
    let (raw, typed) = tokio::join!(
        client.execute_raw("query-status", serde_json::Value::Null),
        client.execute(qmp_client::qapi::qmp::query_block {}),
    );
    for result in [raw.err(), typed.err()].into_iter().flatten() {
        assert!(!result.is_timeout(), "a call timed out after EOF: {result}");
    }
    let drained = tokio::time::timeout(PROMPT, async {
        while let Some(item) = events.next().await {
            if let EventItem::Disconnected(_) = item {
                break;
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "no disconnect after the server closed");
    drop(client);
    let ended = tokio::time::timeout(PROMPT, connection).await;
    assert!(
        matches!(ended, Ok(Ok(_))),
        "the connection task did not end"
    );
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.block_on(async {
        let (listener, path) = listener().await;
        let server = serve(listener, data.to_vec());
        tokio::join!(server, client(path));
    });
});

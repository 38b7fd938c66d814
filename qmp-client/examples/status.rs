//! Starts a paused QEMU with no guest, connects over QMP, prints its version and
//! run state, lists block nodes, and quits it.
//!
//! `cargo run -p qmp-client --example status` (needs `qemu-system-x86_64`; see `scripts/setup`).

use std::process::Stdio;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("qmp.sock");
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "tcg",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64 ({e}); run scripts/setup"))?;
    while !socket.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (client, connection) = qmp_client::Config::new().connect_unix(&socket).await?;
    tokio::spawn(connection);
    println!("QEMU {}", client.greeting().version);

    let status = client
        .execute(qmp_client::qapi::qmp::query_status {})
        .await?;
    println!("run state: {:?}", status.status);

    let nodes = client
        .execute_raw("query-named-block-nodes", serde_json::json!({"flat": true}))
        .await?;
    println!("block nodes: {}", nodes.as_array().map_or(0, Vec::len));

    let mut events = client.subscribe();
    client.execute_raw("quit", serde_json::Value::Null).await?;
    while let Some(item) = events.next().await {
        println!("{item:?}");
    }
    qemu.wait().await?;
    Ok(())
}

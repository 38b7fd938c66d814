//! qmp-client against a real `qemu-system-x86_64` and `qemu-storage-daemon`.
//!
//! Every test starts its own guest-less QEMU in its own [`WorkDir`], drives
//! it over QMP and checks the result where it matters: the block graph QEMU
//! reports and the bytes in the images (`qemu-io` patterns, read after QEMU
//! has exited). The process guards stop QEMU even when a test panics, and
//! print its output then.

use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration::{Process, QemuBuilder, StorageDaemonBuilder, WorkDir, image, wait_until};
use qmp_client::qapi::qmp;
use qmp_client::{Client, Config, Error, JobStatus, Version};
use serde_json::{Value, json};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 64 * MIB;
/// Generous bound for anything QEMU does here (jobs take milliseconds).
const LONG: Duration = Duration::from_secs(10);

/// Connects to a QMP socket and runs the connection in the background.
async fn connect(socket: &Path) -> Client {
    let (client, connection) = Config::new()
        .connect_unix(socket)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    tokio::spawn(connection);
    client
}

/// `quit`, then waits for the process to exit cleanly so its images are
/// closed and flushed before they are checked offline.
async fn quit(client: &Client, process: &mut Process) {
    match client.execute(qmp::quit {}).await {
        Ok(_) => {}
        // The socket may close before the reply is read.
        Err(e) if e.is_closed() => {}
        Err(e) => panic!("quit: {e}"),
    }
    let status = process
        .wait_exit(LONG)
        .unwrap_or_else(|| panic!("{} did not exit after quit", process.command_line()));
    assert!(status.success(), "exit status after quit: {status}");
}

/// The QOM path `query-block` reports as `qdev` for a virtio-blk disk.
fn qdev(disk_id: &str) -> String {
    format!("/machine/peripheral/{disk_id}/virtio-backend")
}

/// The node at the root of the disk's BlockBackend (`query-block`, matched by `qdev`).
async fn root_node(client: &Client, disk_id: &str) -> String {
    let blocks = client
        .execute_raw("query-block", Value::Null)
        .await
        .unwrap();
    let block = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == qdev(disk_id))
        .unwrap_or_else(|| panic!("no disk {disk_id} in query-block: {blocks}"));
    block["inserted"]["node-name"]
        .as_str()
        .unwrap_or_else(|| panic!("disk {disk_id} has no inserted node: {block}"))
        .to_owned()
}

/// `query-named-block-nodes {flat: true}`: every node once, without the
/// nested backing images (and with `backing_file_depth` always 0: only the
/// non-flat form computes it).
async fn named_nodes(client: &Client) -> Vec<Value> {
    let nodes = client
        .execute_raw("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    serde_json::from_value(nodes).unwrap()
}

/// The files of the chain QEMU has open below `node` right now, top first,
/// read from the nested `image`/`backing-image` of the non-flat
/// `query-named-block-nodes`. (`backing_file` and `image.backing-filename`
/// only repeat the header string, whatever is attached.)
async fn live_chain(client: &Client, node: &str) -> Vec<PathBuf> {
    let nodes = client
        .execute_raw("query-named-block-nodes", Value::Null)
        .await
        .unwrap();
    let info = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node} in query-named-block-nodes"));
    let mut chain = Vec::new();
    let mut image = Some(&info["image"]);
    while let Some(layer) = image {
        chain.push(PathBuf::from(layer["filename"].as_str().unwrap()));
        image = layer.get("backing-image");
    }
    assert_eq!(
        info["backing_file_depth"].as_u64(),
        Some(chain.len() as u64 - 1),
        "{info}"
    );
    chain
}

/// Owned copies of `layers`, to compare with [`live_chain`] and
/// [`image::backing_chain`].
fn paths(layers: &[&PathBuf]) -> Vec<PathBuf> {
    layers.iter().map(|p| p.to_path_buf()).collect()
}

/// Writes `pattern` through the disk's device with HMP `qemu-io` (the guest's
/// view) and checks QEMU's stdout, where `qemu-io` reports.
async fn guest_write(
    client: &Client,
    process: &Process,
    disk_id: &str,
    pattern: u8,
    offset: u64,
    len: u64,
) {
    let before = process.stdout_text().len();
    let reply = client
        .hmp(&format!(
            "qemu-io -d {} \"write -P {pattern:#04x} {offset} {len}\"",
            qdev(disk_id)
        ))
        .await
        .unwrap();
    assert_eq!(reply, "", "HMP qemu-io write on {disk_id} failed");
    let wrote = format!("wrote {len}/{len} bytes at offset {offset}");
    assert!(
        wait_until(LONG, || process.stdout_text()[before..].contains(&wrote)),
        "qemu-io did not report `{wrote}`; stdout: {}",
        process.stdout_text()
    );
}

/// Creates `<name>.qcow2` for each name, bottom first: an empty 64 MiB base,
/// then overlays whose headers name the image below by its absolute path.
fn chain_images(dir: &WorkDir, names: &[&str]) -> Vec<PathBuf> {
    let paths: Vec<_> = names
        .iter()
        .map(|n| dir.join(format!("{n}.qcow2")))
        .collect();
    image::create_qcow2(&paths[0], DISK_SIZE);
    for pair in paths.windows(2) {
        image::create_overlay(&pair[1], &pair[0], "qcow2");
    }
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeting_status_busy_monitor_and_hmp_socket() {
    let dir = WorkDir::new();
    let qmp_socket = dir.join("qmp.sock");
    let hmp_socket = dir.join("hmp.sock");
    let mut qemu = QemuBuilder::new()
        .log_dir(dir.path())
        .qmp(&qmp_socket)
        .hmp_monitor(&hmp_socket)
        .spawn()
        .expect("start QEMU");

    let client = connect(&qmp_socket).await;
    let version = client.greeting().version;
    assert!(
        version
            >= Version {
                major: 7,
                minor: 2,
                micro: 0
            },
        "QEMU {version} is too old"
    );
    assert!(client.greeting().oob_enabled, "QEMU offers oob");
    // The kernel names the process at the other end of the socket.
    assert_eq!(client.peer_pid(), Some(qemu.pid()));
    let status = client.execute(qmp::query_status {}).await.unwrap();
    assert!(!status.running);
    assert!(matches!(status.status, qmp::RunState::prelaunch));

    // QEMU parks a second client on a busy monitor: no greeting ever comes.
    let busy = Config::new()
        .greeting_timeout(Duration::from_millis(500))
        .connect_unix(&qmp_socket)
        .await
        .expect_err("a second client on a busy monitor");
    assert!(matches!(busy, Error::NoGreeting { .. }), "{busy:?}");
    assert!(busy.is_timeout() && busy.is_busy());
    // That attempt still waits in QEMU's accept queue (backlog 1, so two
    // places): one more fits, after which connect() itself fails with EAGAIN,
    // which is reported as the same busy monitor, never as a bare OS error.
    let second = Config::new()
        .greeting_timeout(Duration::from_millis(500))
        .connect_unix(&qmp_socket)
        .await
        .expect_err("a third client on a busy monitor");
    assert!(matches!(second, Error::NoGreeting { .. }), "{second:?}");
    let full = Config::new()
        .connect_timeout(Duration::from_millis(300))
        .connect_unix(&qmp_socket)
        .await
        .expect_err("a full accept queue");
    assert!(matches!(full, Error::QueueFull { .. }), "{full:?}");
    assert!(full.is_busy(), "{full:?}");
    assert!(
        full.to_string()
            .contains("another client holds this monitor"),
        "{full}"
    );
    // The first client is unaffected.
    client.execute(qmp::query_status {}).await.unwrap();

    // An HMP monitor greets with a text banner, not a QMP greeting.
    let hmp = Config::new()
        .connect_unix(&hmp_socket)
        .await
        .expect_err("HMP is not QMP");
    match &hmp {
        Error::NotQmp { detail, .. } => assert!(detail.contains("QEMU"), "{detail}"),
        other => panic!("expected NotQmp, got {other:?}"),
    }

    // Dropping every handle closes the socket and frees the monitor.
    drop(client);
    let client = connect(&qmp_socket).await;
    let status = client.execute(qmp::query_status {}).await.unwrap();
    assert!(matches!(status.status, qmp::RunState::prelaunch));
    quit(&client, &mut qemu).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_snapshots_two_disks_all_or_none() {
    let dir = WorkDir::new();
    let frozen_a = dir.join("a.qcow2");
    let frozen_b = dir.join("b.qcow2");
    let overlay_a = dir.join("a-1.qcow2");
    let overlay_b = dir.join("b-1.qcow2");
    for (frozen, overlay, pattern) in [(&frozen_a, &overlay_a, 0xa1), (&frozen_b, &overlay_b, 0xa2)]
    {
        image::create_qcow2(frozen, DISK_SIZE);
        image::write_pattern(frozen, pattern, MIB, 64 * KIB);
        image::create_overlay(overlay, frozen, "qcow2");
    }
    let qmp_socket = dir.join("qmp.sock");
    // vda in the -blockdev layout, vdb in the legacy -drive form.
    let mut qemu = QemuBuilder::new()
        .log_dir(dir.path())
        .blockdev_chain("vda", &[("a0", &frozen_a)])
        .drive("drive1", "vdb", &frozen_b)
        .qmp(&qmp_socket)
        .spawn()
        .expect("start QEMU");
    let client = connect(&qmp_socket).await;
    assert_eq!(root_node(&client, "vda").await, "a0");
    let b0 = root_node(&client, "vdb").await;
    assert!(b0.starts_with('#'), "auto node name expected, got {b0}");

    for (node, file) in [("a1", &overlay_a), ("b1", &overlay_b)] {
        client
            .execute_raw("blockdev-add", integration::qcow2_layer(node, file, None))
            .await
            .unwrap();
    }
    let snapshot = |node: &str, overlay: &str| json!({"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}});

    // All or none: the second action names a missing node, so the first is
    // rolled back too.
    let err = client
        .execute_raw(
            "transaction",
            json!({"actions": [snapshot("a0", "a1"), snapshot("nope", "b1")]}),
        )
        .await
        .expect_err("a transaction with a missing node");
    assert_eq!(
        err.qmp_desc(),
        Some("Cannot find device='nope' nor node-name='nope'")
    );
    assert_eq!(root_node(&client, "vda").await, "a0");
    assert_eq!(root_node(&client, "vdb").await, b0);
    // Still no backing attached. (Opened with `"backing": null` over a header
    // that names one, the node's filename is a `json:{...}` pseudo-filename.)
    for (node, overlay) in [("a1", &overlay_a), ("b1", &overlay_b)] {
        let chain = live_chain(&client, node).await;
        assert_eq!(chain.len(), 1, "{chain:?}");
        let name = chain[0].to_str().unwrap();
        assert!(name.contains(overlay.to_str().unwrap()), "{name}");
    }

    client
        .execute_raw(
            "transaction",
            json!({"actions": [snapshot("a0", "a1"), snapshot(&b0, "b1")]}),
        )
        .await
        .unwrap();
    assert_eq!(root_node(&client, "vda").await, "a1");
    assert_eq!(root_node(&client, "vdb").await, "b1");
    assert_eq!(
        live_chain(&client, "a1").await,
        paths(&[&overlay_a, &frozen_a])
    );
    assert_eq!(
        live_chain(&client, "b1").await,
        paths(&[&overlay_b, &frozen_b])
    );
    let nodes = named_nodes(&client).await;
    for overlay in ["a1", "b1"] {
        let node = nodes.iter().find(|n| n["node-name"] == overlay).unwrap();
        assert_eq!(node["ro"], false, "{node}");
    }
    for frozen in [&frozen_a, &frozen_b] {
        let node = nodes
            .iter()
            .find(|n| n["file"] == frozen.to_str().unwrap())
            .unwrap_or_else(|| panic!("no node for {}", frozen.display()));
        assert_eq!(
            node["ro"], true,
            "the frozen image is read-only now: {node}"
        );
    }

    guest_write(&client, &qemu, "vda", 0xb2, MIB, 64 * KIB).await;
    guest_write(&client, &qemu, "vdb", 0xb3, MIB, 64 * KIB).await;
    quit(&client, &mut qemu).await;

    assert!(image::read_pattern_ok(&frozen_a, 0xa1, MIB, 64 * KIB));
    assert!(image::read_pattern_ok(&frozen_b, 0xa2, MIB, 64 * KIB));
    assert!(image::read_pattern_ok(&overlay_a, 0xb2, MIB, 64 * KIB));
    assert!(image::read_pattern_ok(&overlay_b, 0xb3, MIB, 64 * KIB));
    assert_eq!(
        image::backing_chain(&overlay_a),
        [overlay_a.as_path(), frozen_a.as_path()]
    );
    assert_eq!(
        image::backing_chain(&overlay_b),
        [overlay_b.as_path(), frozen_b.as_path()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_commit_merges_mid_into_base() {
    let dir = WorkDir::new();
    let chain = chain_images(&dir, &["base", "mid", "top"]);
    let [base, mid, top] = [&chain[0], &chain[1], &chain[2]];
    image::write_pattern(base, 0xa0, 0, MIB);
    image::write_pattern(mid, 0xa1, MIB, MIB);
    image::write_pattern(top, 0xa2, MIB, 64 * KIB);
    let qmp_socket = dir.join("qmp.sock");
    let mut qemu = QemuBuilder::new()
        .log_dir(dir.path())
        .blockdev_chain("vda", &[("base", base), ("mid", mid), ("top", top)])
        .qmp(&qmp_socket)
        .spawn()
        .expect("start QEMU");
    let client = connect(&qmp_socket).await;

    let mut job = client
        .start_job_raw(
            "commit-mid",
            "block-commit",
            json!({"job-id": "commit-mid", "device": "top", "top-node": "mid",
                   "base-node": "base", "auto-dismiss": false}),
        )
        .await
        .unwrap();
    assert_eq!(job.wait_concluded(LONG).await.unwrap(), None);
    assert_eq!(job.status(), &JobStatus::Concluded);
    job.dismiss().await.unwrap();
    assert!(job.info().await.unwrap().is_none(), "dismissed");
    assert_eq!(root_node(&client, "vda").await, "top");
    assert_eq!(live_chain(&client, "top").await, paths(&[top, base]));
    quit(&client, &mut qemu).await;

    assert!(image::read_pattern_ok(base, 0xa0, 0, MIB));
    assert!(
        image::read_pattern_ok(base, 0xa1, MIB, MIB),
        "mid's data is in base"
    );
    assert_eq!(image::backing_file(top).as_deref(), base.to_str());
    assert_eq!(image::backing_chain(top), [top.as_path(), base.as_path()]);
    assert!(image::read_pattern_ok(top, 0xa2, MIB, 64 * KIB));
    assert!(image::read_pattern_ok(
        top,
        0xa1,
        MIB + 64 * KIB,
        MIB - 64 * KIB
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_commit_goes_ready_and_pivots_to_base() {
    let dir = WorkDir::new();
    let chain = chain_images(&dir, &["base", "top"]);
    let [base, top] = [&chain[0], &chain[1]];
    image::write_pattern(base, 0xa0, 0, MIB);
    image::write_pattern(top, 0xc0, MIB, 64 * KIB);
    let qmp_socket = dir.join("qmp.sock");
    let mut qemu = QemuBuilder::new()
        .log_dir(dir.path())
        .blockdev_chain("vda", &[("base", base), ("top", top)])
        .qmp(&qmp_socket)
        .spawn()
        .expect("start QEMU");
    let client = connect(&qmp_socket).await;
    guest_write(&client, &qemu, "vda", 0xc1, 2 * MIB, 64 * KIB).await;

    let mut job = client
        .start_job_raw(
            "commit-top",
            "block-commit",
            json!({"job-id": "commit-top", "device": "top", "base-node": "base",
                   "auto-dismiss": false}),
        )
        .await
        .unwrap();
    assert_eq!(
        job.wait_for(&[JobStatus::Ready], LONG).await.unwrap(),
        JobStatus::Ready
    );
    // Until job-complete the device still writes to top.
    assert_eq!(root_node(&client, "vda").await, "top");
    job.complete().await.unwrap();
    job.finish(LONG).await.unwrap();
    assert_eq!(root_node(&client, "vda").await, "base");
    guest_write(&client, &qemu, "vda", 0xc2, 3 * MIB, 64 * KIB).await;
    quit(&client, &mut qemu).await;

    assert!(image::read_pattern_ok(base, 0xa0, 0, MIB));
    assert!(image::read_pattern_ok(base, 0xc0, MIB, 64 * KIB));
    assert!(image::read_pattern_ok(base, 0xc1, 2 * MIB, 64 * KIB));
    assert!(image::read_pattern_ok(base, 0xc2, 3 * MIB, 64 * KIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_pulls_mid_into_top() {
    let dir = WorkDir::new();
    let chain = chain_images(&dir, &["base", "mid", "top"]);
    let [base, mid, top] = [&chain[0], &chain[1], &chain[2]];
    image::write_pattern(base, 0xa0, 0, MIB);
    image::write_pattern(mid, 0xa1, MIB, MIB);
    image::write_pattern(top, 0xa2, 3 * MIB, 64 * KIB);
    let qmp_socket = dir.join("qmp.sock");
    let mut qemu = QemuBuilder::new()
        .log_dir(dir.path())
        .blockdev_chain("vda", &[("base", base), ("mid", mid), ("top", top)])
        .qmp(&qmp_socket)
        .spawn()
        .expect("start QEMU");
    let client = connect(&qmp_socket).await;

    let mut job = client
        .start_job_raw(
            "stream-top",
            "block-stream",
            json!({"job-id": "stream-top", "device": "top", "base-node": "base",
                   "auto-dismiss": false}),
        )
        .await
        .unwrap();
    job.finish(LONG).await.unwrap();
    assert_eq!(live_chain(&client, "top").await, paths(&[top, base]));
    quit(&client, &mut qemu).await;

    assert_eq!(image::backing_file(top).as_deref(), base.to_str());
    assert_eq!(image::backing_chain(top), [top.as_path(), base.as_path()]);
    // mid is out of the chain, so its data must now live in top.
    assert!(image::read_pattern_ok(top, 0xa1, MIB, MIB));
    assert!(image::read_pattern_ok(top, 0xa0, 0, MIB));
    assert!(image::read_pattern_ok(top, 0xa2, 3 * MIB, 64 * KIB));
    // The streamed-from image is untouched and still valid.
    assert!(image::read_pattern_ok(mid, 0xa1, MIB, MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_stream_leaves_the_chain_alone() {
    let dir = WorkDir::new();
    let chain = chain_images(&dir, &["base", "mid", "top"]);
    let [base, mid, top] = [&chain[0], &chain[1], &chain[2]];
    image::write_pattern(mid, 0xa1, 0, 32 * MIB);
    let qmp_socket = dir.join("qmp.sock");
    let mut qemu = QemuBuilder::new()
        .log_dir(dir.path())
        .blockdev_chain("vda", &[("base", base), ("mid", mid), ("top", top)])
        .qmp(&qmp_socket)
        .spawn()
        .expect("start QEMU");
    let client = connect(&qmp_socket).await;

    // 64 KiB/s over 32 MiB: minutes, so the job is surely still running.
    let mut job = client
        .start_job_raw(
            "slow-stream",
            "block-stream",
            json!({"job-id": "slow-stream", "device": "top", "base-node": "base",
                   "speed": 64 * KIB, "auto-dismiss": false}),
        )
        .await
        .unwrap();
    job.wait_for(&[JobStatus::Running], LONG).await.unwrap();
    let (done, total) = job.progress().await.unwrap();
    assert!(done < total, "progress {done}/{total}");
    job.cancel().await.unwrap();
    let error = job.wait_concluded(LONG).await.unwrap();
    assert_eq!(error.as_deref(), Some("Operation canceled"));
    job.dismiss().await.unwrap();
    assert_eq!(root_node(&client, "vda").await, "top");
    assert_eq!(live_chain(&client, "top").await, paths(&[top, mid, base]));
    quit(&client, &mut qemu).await;

    assert_eq!(
        image::backing_chain(top),
        [top.as_path(), mid.as_path(), base.as_path()]
    );
    assert!(image::read_pattern_ok(top, 0xa1, 0, 32 * MIB));
    assert!(image::read_pattern_ok(mid, 0xa1, 0, 32 * MIB));
    assert!(image::read_pattern_ok(base, 0x00, 0, 32 * MIB));
}

/// base <- mid <- top, with 0xa1 in mid at 1 MiB, where every write that
/// reaches base's file fails with EIO (blkdebug event `pwritev`): a commit
/// into base fails at its first write.
struct FailingBase {
    dir: WorkDir,
    chain: Vec<PathBuf>,
    qemu: integration::Qemu,
    client: Client,
}

impl FailingBase {
    async fn start() -> FailingBase {
        let dir = WorkDir::new();
        let chain = chain_images(&dir, &["base", "mid", "top"]);
        let [base, mid, top] = [&chain[0], &chain[1], &chain[2]];
        image::write_pattern(mid, 0xa1, MIB, MIB);
        let qmp_socket = dir.join("qmp.sock");
        let failing_base = json!({
            "driver": "qcow2", "node-name": "base", "backing": null,
            "file": {
                "driver": "blkdebug",
                "inject-error": [{"event": "pwritev", "errno": 5, "once": false}],
                "image": {"driver": "file", "filename": base},
            },
        });
        let qemu = QemuBuilder::new()
            .log_dir(dir.path())
            .blockdev(failing_base)
            .blockdev(integration::qcow2_layer("mid", mid, Some("base")))
            .blockdev(integration::qcow2_layer("top", top, Some("mid")))
            .device("virtio-blk-pci,id=vda,drive=top")
            .qmp(&qmp_socket)
            .spawn()
            .expect("start QEMU");
        let client = connect(&qmp_socket).await;
        FailingBase {
            dir,
            chain,
            qemu,
            client,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_commit_reports_the_io_error() {
    let FailingBase {
        dir: _dir,
        chain,
        mut qemu,
        client,
    } = FailingBase::start().await;
    let [base, mid, top] = [&chain[0], &chain[1], &chain[2]];

    let mut events = client.subscribe();
    let mut job = client
        .start_job_raw(
            "commit-fails",
            "block-commit",
            json!({"job-id": "commit-fails", "device": "top", "top-node": "mid",
                   "base-node": "base", "auto-dismiss": false}),
        )
        .await
        .unwrap();
    match job.finish(LONG).await {
        Err(Error::Job { id, message }) => {
            assert_eq!(id, "commit-fails");
            assert!(message.contains("Input/output error"), "{message}");
        }
        other => panic!("expected a job error, got {other:?}"),
    }
    assert!(
        job.info().await.unwrap().is_none(),
        "finish dismissed the job"
    );
    let completed = events
        .wait_for("BLOCK_JOB_COMPLETED", LONG, |e| {
            e.name == "BLOCK_JOB_COMPLETED" && e.str("device") == Some("commit-fails")
        })
        .await
        .unwrap();
    assert_eq!(completed.str("error"), Some("Input/output error"));
    assert_eq!(live_chain(&client, "top").await.len(), 3, "chain unchanged");
    quit(&client, &mut qemu).await;

    assert_eq!(
        image::backing_chain(top),
        [top.as_path(), mid.as_path(), base.as_path()]
    );
    assert!(image::read_pattern_ok(top, 0xa1, MIB, MIB));
}

/// With QEMU's default `auto-dismiss: true` the job leaves `query-jobs` as it
/// concludes; its error must still be reported (from `BLOCK_JOB_COMPLETED`), and
/// finishing it must not fail on the dismissal QEMU already did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_dismissed_jobs_still_report_their_outcome() {
    let FailingBase {
        dir: _dir,
        chain,
        mut qemu,
        client,
    } = FailingBase::start().await;
    let [base, _, top] = [&chain[0], &chain[1], &chain[2]];

    let mut failing = client
        .start_job_raw(
            "auto-fails",
            "block-commit",
            json!({"job-id": "auto-fails", "device": "top", "top-node": "mid", "base-node": "base"}),
        )
        .await
        .unwrap();
    match failing.finish(LONG).await {
        Err(Error::Job { id, message }) => {
            assert_eq!(id, "auto-fails");
            assert!(message.contains("Input/output error"), "{message}");
        }
        other => panic!("expected a job error, got {other:?}"),
    }

    // A stream that succeeds, auto-dismissed: finish() is Ok.
    let mut streaming = client
        .start_job_raw(
            "auto-ok",
            "block-stream",
            // base is opened through blkdebug, so its name is a json: blob; write
            // the plain path into top's header instead.
            json!({"job-id": "auto-ok", "device": "top", "base-node": "base",
                   "backing-file": base}),
        )
        .await
        .unwrap();
    streaming.finish(LONG).await.unwrap();
    assert!(client.query_jobs().await.unwrap().is_empty());
    quit(&client, &mut qemu).await;
    assert!(image::read_pattern_ok(top, 0xa1, MIB, MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_daemon_runs_an_intermediate_commit() {
    let dir = WorkDir::new();
    let chain = chain_images(&dir, &["base", "mid", "top"]);
    let [base, mid, top] = [&chain[0], &chain[1], &chain[2]];
    image::write_pattern(base, 0xa0, 0, MIB);
    image::write_pattern(mid, 0xa1, MIB, MIB);
    image::write_pattern(top, 0xa2, 2 * MIB, 64 * KIB);
    let qmp_socket = dir.join("qsd.sock");
    let mut daemon = StorageDaemonBuilder::new()
        .log_dir(dir.path())
        .blockdev_chain(&[("base", base), ("mid", mid), ("top", top)])
        .qmp(&qmp_socket)
        .spawn()
        .expect("start qemu-storage-daemon");
    let client = connect(&qmp_socket).await;
    assert!(client.greeting().version.major >= 7);

    let mut job = client
        .start_job_raw(
            "qsd-commit",
            "block-commit",
            json!({"job-id": "qsd-commit", "device": "top", "top-node": "mid",
                   "base-node": "base", "auto-dismiss": false}),
        )
        .await
        .unwrap();
    job.finish(LONG).await.unwrap();
    assert_eq!(live_chain(&client, "top").await, paths(&[top, base]));
    quit(&client, &mut daemon).await;

    assert!(image::read_pattern_ok(base, 0xa0, 0, MIB));
    assert!(image::read_pattern_ok(base, 0xa1, MIB, MIB));
    assert_eq!(image::backing_file(top).as_deref(), base.to_str());
    assert!(image::read_pattern_ok(top, 0xa2, 2 * MIB, 64 * KIB));
    assert!(image::read_pattern_ok(top, 0xa1, MIB, MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fds_are_passed_to_qemu() {
    let dir = WorkDir::new();
    let disk = dir.join("disk.qcow2");
    image::create_qcow2(&disk, DISK_SIZE);
    image::write_pattern(&disk, 0xa5, MIB, 64 * KIB);
    let qmp_socket = dir.join("qmp.sock");
    let mut qemu = QemuBuilder::new()
        .log_dir(dir.path())
        .qmp(&qmp_socket)
        .spawn()
        .expect("start QEMU");
    let client = connect(&qmp_socket).await;

    // add-fd: the image, opened read-only here, becomes /dev/fdset/N in QEMU.
    let file = std::fs::File::open(&disk).unwrap();
    let added = client.add_fd(&file, None, Some("disk")).await.unwrap();
    drop(file);
    let fdsets = client
        .execute_raw("query-fdsets", Value::Null)
        .await
        .unwrap();
    let fdset = fdsets
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["fdset-id"] == added.fdset_id)
        .unwrap_or_else(|| panic!("fdset {} not listed: {fdsets}", added.fdset_id));
    assert_eq!(fdset["fds"], json!([{"fd": added.fd, "opaque": "disk"}]));

    // QEMU can open the image through the fd set and read our data.
    client
        .execute_raw(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "via-fd", "read-only": true,
                   "file": {"driver": "file",
                            "filename": format!("/dev/fdset/{}", added.fdset_id)}}),
        )
        .await
        .unwrap();
    let before = qemu.stdout_text().len();
    let reply = client
        .hmp(&format!(
            "qemu-io via-fd \"read -P 0xa5 {MIB} {}\"",
            64 * KIB
        ))
        .await
        .unwrap();
    assert_eq!(reply, "");
    let read = format!("read {}/{} bytes at offset {MIB}", 64 * KIB, 64 * KIB);
    assert!(wait_until(LONG, || qemu.stdout_text()[before..].contains(&read)));
    assert!(!qemu.stdout_text()[before..].contains("Pattern verification failed"));
    client
        .execute_raw("blockdev-del", json!({"node-name": "via-fd"}))
        .await
        .unwrap();
    client
        .execute_raw("remove-fd", json!({"fdset-id": added.fdset_id}))
        .await
        .unwrap();
    let fdsets = client
        .execute_raw("query-fdsets", Value::Null)
        .await
        .unwrap();
    assert_eq!(fdsets, json!([]), "the fd set is gone once unused");

    // getfd / closefd with the write end of a pipe: once QEMU has closed its
    // copy and we drop ours, the read end sees end-of-file.
    let (mut reader, writer) = std::io::pipe().unwrap();
    client.getfd("sc-pipe", writer.as_fd()).await.unwrap();
    client
        .execute_raw("closefd", json!({"fdname": "sc-pipe"}))
        .await
        .unwrap();
    let again = client
        .execute_raw("closefd", json!({"fdname": "sc-pipe"}))
        .await
        .expect_err("the name is gone after closefd");
    assert_eq!(
        again.qmp_desc(),
        Some("File descriptor named 'sc-pipe' not found")
    );
    drop(writer);
    let eof = tokio::task::spawn_blocking(move || {
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).map(|_| rest)
    });
    let rest = tokio::time::timeout(LONG, eof)
        .await
        .expect("QEMU still holds the pipe after closefd")
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    quit(&client, &mut qemu).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_every_monitor() {
    let dir = WorkDir::new();
    let socket_a = dir.join("a.sock");
    let socket_b = dir.join("b.sock");
    let mut qemu = QemuBuilder::new()
        .log_dir(dir.path())
        .paused(false)
        .qmp(&socket_a)
        .qmp(&socket_b)
        .spawn()
        .expect("start QEMU");
    let a = connect(&socket_a).await;
    let b = connect(&socket_b).await;
    assert!(b.execute(qmp::query_status {}).await.unwrap().running);

    let mut events = b.subscribe();
    a.execute(qmp::stop {}).await.unwrap();
    events
        .wait_for("STOP on monitor B", LONG, |e| e.name == "STOP")
        .await
        .unwrap();
    let status = b.execute(qmp::query_status {}).await.unwrap();
    assert!(matches!(status.status, qmp::RunState::paused));

    a.execute(qmp::cont {}).await.unwrap();
    events
        .wait_for("RESUME on monitor B", LONG, |e| e.name == "RESUME")
        .await
        .unwrap();
    quit(&a, &mut qemu).await;
    // B's subscribers learn that QEMU went away.
    events
        .wait_for("SHUTDOWN on monitor B", LONG, |e| e.name == "SHUTDOWN")
        .await
        .unwrap();
    let closed = events
        .wait_for("disconnect", LONG, |_| false)
        .await
        .unwrap_err();
    assert!(closed.is_closed(), "{closed:?}");
}

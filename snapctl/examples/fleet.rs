//! Eight VMs driven at once from one process through the library, the way a CI
//! harness uses snapctl: no CLI, no subprocess per operation.
//!
//! The example starts eight paused QEMUs (TCG, no guest; one 64 MiB qcow2 disk
//! each), then, concurrently for every VM: snapshot `golden`, write over the
//! disk, revert to `golden`, check the disk reads golden's bytes again, delete
//! `golden`. It prints each VM's timings and the total. Then, the VMs now
//! registered, it times one VM's `create` alone and then one `create` on
//! every VM at once (a session each, as a harness resetting many VMs does),
//! and prints both and their ratio.
//!
//! ```text
//! cargo run --release -p snapctl --example fleet [VMS]
//! ```
//!
//! Needs `qemu-system-x86_64` and `qemu-img` (`scripts/setup` installs them).

use std::time::{Duration, Instant};

use integration::{QemuBuilder, WorkDir, image};
use snapctl::{CreateOptions, RunOptions, Session, SessionOptions, Store};

const DISK: u64 = 64 << 20;

/// One VM's timings, in milliseconds.
#[derive(Debug)]
struct Timings {
    vm: String,
    create: f64,
    revert: f64,
    delete: f64,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// One `create` on a registered VM, from opening its session.
async fn create_one(
    store: &Store,
    vm: String,
    socket: std::path::PathBuf,
    name: &str,
) -> snapctl::Result<()> {
    let mut session = Session::open(store, &vm, &SessionOptions::socket(socket)).await?;
    session
        .create(&CreateOptions::named(name), &RunOptions::default())
        .await?;
    Ok(())
}

/// `create NAME` on every VM of `vms` at once; the milliseconds it took.
async fn create_all(store: &Store, vms: &[(String, std::path::PathBuf)], name: &str) -> f64 {
    let started = Instant::now();
    let runs = vms
        .iter()
        .map(|(vm, socket)| {
            let (store, vm, socket, name) =
                (store.clone(), vm.clone(), socket.clone(), name.to_owned());
            tokio::spawn(async move { create_one(&store, vm, socket, &name).await })
        })
        .collect::<Vec<_>>();
    for run in runs {
        if let Err(e) = run.await.expect("the create task ran") {
            panic!("{e}");
        }
    }
    ms(started)
}

/// Snapshot, write, revert, verify, delete: one harness cycle on one VM.
async fn cycle(store: &Store, vm: String, socket: std::path::PathBuf) -> snapctl::Result<Timings> {
    let options = RunOptions::default();
    let mut session = Session::open(store, &vm, &SessionOptions::socket(socket)).await?;

    let started = Instant::now();
    session
        .create(&CreateOptions::named("golden"), &options)
        .await?;
    let create = ms(started);

    // The test run dirties the disk.
    let client = session.running_client()?.clone();
    let device = "qemu-io -d /machine/peripheral/vda/virtio-backend";
    client
        .hmp(&format!("{device} \"write -P 0xee 0 1M\""))
        .await?;
    client.hmp(&format!("{device} \"flush\"")).await?;
    let dirty = session.record().disks["vda"].active.clone();
    assert!(
        image::read_pattern_ok(&dirty, 0xee, 0, 1 << 20),
        "{vm}: the write did not land"
    );

    let started = Instant::now();
    session.revert("golden", &options).await?;
    let revert = ms(started);

    // The disk reads golden's bytes again: the base's pattern, not the write.
    let active = session.record().disks["vda"].active.clone();
    assert!(
        image::read_pattern_ok(&active, 0xa1, 0, 1 << 20),
        "{vm}: after the revert the disk does not read golden's data"
    );

    let started = Instant::now();
    session.delete("golden", &options).await?;
    let delete = ms(started);
    Ok(Timings {
        vm,
        create,
        revert,
        delete,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("VMS is a number"))
        .unwrap_or(8);
    let dir = WorkDir::new();
    let store = Store::open(&dir.join("state")).expect("state directory");
    let mut qemus = Vec::new();
    let mut vms = Vec::new();
    for i in 0..count {
        let vm = format!("ci{i}");
        let img = dir.join(&vm);
        std::fs::create_dir(&img).expect("image directory");
        let base = img.join("base.qcow2");
        image::create_qcow2(&base, DISK);
        image::write_pattern(&base, 0xa1, 0, 1 << 20);
        let socket = img.join("qmp.sock");
        let qemu = QemuBuilder::new()
            .blockdev_chain("vda", &[("base", &base)])
            .qmp(&socket)
            .spawn()
            .expect("start QEMU");
        qemus.push(qemu);
        vms.push((vm, socket));
    }

    let started = Instant::now();
    let runs = vms
        .iter()
        .cloned()
        .map(|(vm, socket)| {
            let store = store.clone();
            tokio::spawn(async move { cycle(&store, vm, socket).await })
        })
        .collect::<Vec<_>>();
    let mut timings = Vec::new();
    for run in runs {
        match run.await.expect("the cycle task ran") {
            Ok(t) => timings.push(t),
            Err(e) => panic!("{e}"),
        }
    }
    let total = ms(started);
    println!(
        "{:<6} {:>10} {:>10} {:>10}",
        "VM", "create", "revert", "delete"
    );
    for t in &timings {
        println!(
            "{:<6} {:>8.1}ms {:>8.1}ms {:>8.1}ms",
            t.vm, t.create, t.revert, t.delete
        );
    }
    println!("{count} VMs, every cycle at once: {total:.1} ms in total");

    // The median of three: one VM's create alone, then every VM's at once.
    let mut alone = Vec::new();
    let mut together = Vec::new();
    for round in 0..3 {
        alone.push(create_all(&store, &vms[..1], &format!("alone{round}")).await);
        together.push(create_all(&store, &vms, &format!("together{round}")).await);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (alone, together) = (median(&mut alone), median(&mut together));
    println!(
        "one create, 1 VM: {alone:.1} ms; one create on each of {count} VMs at once: {together:.1} ms ({:.1}x)",
        together / alone
    );
    for mut q in qemus {
        q.quit_or_kill(Duration::from_secs(5));
    }
}

//! A CI harness's loop through the library: boot once, checkpoint a golden
//! state (disks, memory and devices), then after every "test" reset the VM to
//! it inside the same QEMU process, and print how long each reset took.
//!
//! The VM here has no guest OS: QEMU runs under its qtest accelerator, so the
//! example writes guest RAM and the disk itself to stand for a test, and checks
//! after each reset that both read the golden state again.
//!
//! ```text
//! cargo run --release -p snapctl --example golden [RESETS]
//! ```
//!
//! Needs `qemu-system-x86_64` and `qemu-img` (`scripts/setup` installs them).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use integration::{QemuBuilder, WorkDir, image};
use snapctl::{CreateOptions, RunOptions, Session, SessionOptions, Store};

const RAM_ADDR: u64 = 0x100_0000;
const GOLDEN: u64 = 0x6060_6060_6060_6060;

/// Guest RAM through QEMU's qtest socket: one line out, one line back.
struct Ram(BufReader<UnixStream>);

impl Ram {
    fn ask(&mut self, line: &str) -> String {
        writeln!(self.0.get_mut(), "{line}").expect("qtest write");
        let mut reply = String::new();
        self.0.read_line(&mut reply).expect("qtest read");
        reply.trim().to_owned()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> snapctl::Result<()> {
    let resets: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("RESETS is a number"))
        .unwrap_or(10);
    let dir = WorkDir::new();
    let base = dir.join("base.qcow2");
    image::create_qcow2(&base, 64 << 20);
    let qmp = dir.join("qmp.sock");
    let qtest = dir.join("qtest.sock");
    let mut qemu = QemuBuilder::new()
        .paused(false)
        .arg("-qtest")
        .arg(format!("unix:{},server=on,wait=off", qtest.display()))
        .blockdev_chain("vda", &[("base", &base)])
        .qmp(&qmp)
        .spawn()
        .expect("start QEMU");
    let mut ram = Ram(BufReader::new(
        UnixStream::connect(&qtest).expect("qtest socket"),
    ));

    let store = Store::open(&dir.join("state"))?;
    let mut vm = Session::open(&store, "ci", &SessionOptions::socket(&qmp)).await?;
    let options = RunOptions::default();

    // The golden state: what every test starts from.
    ram.ask(&format!("writeq {RAM_ADDR:#x} {GOLDEN:#x}"));
    let started = Instant::now();
    let golden = CreateOptions {
        memory: true,
        ..CreateOptions::named("golden")
    };
    vm.create(&golden, &options).await?;
    println!(
        "checkpoint golden: {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );

    let device = "qemu-io -d /machine/peripheral/vda/virtio-backend";
    for test in 1..=resets {
        // The "test" dirties memory and disk.
        ram.ask(&format!("writeq {RAM_ADDR:#x} {test:#x}"));
        let client = vm.running_client()?.clone();
        client
            .hmp(&format!("{device} \"write -P 0xee 0 64k\""))
            .await?;

        let started = Instant::now();
        vm.revert("golden", &options).await?;
        let took = started.elapsed().as_secs_f64() * 1e3;

        let memory = ram.ask(&format!("readq {RAM_ADDR:#x}"));
        assert_eq!(memory, format!("OK {GOLDEN:#018x}"), "reset {test}: RAM");
        client.hmp(&format!("{device} \"flush\"")).await?;
        let active = vm.record().disks["vda"].active.clone();
        assert!(
            image::read_pattern_ok(&active, 0, 0, 64 << 10),
            "reset {test}: the disk does not read the golden state"
        );
        println!("reset {test}: {took:.1} ms (memory and disk back to golden)");
    }
    drop(vm);
    qemu.quit_or_kill(std::time::Duration::from_secs(5));
    Ok(())
}

//! Linux guest tests: each test runs `tests/guest/run.sh NAME`, which boots a small Debian
//! guest in qemu-system-x86_64 with a vhost-user-blk-pci disk served by the `vubd` binary
//! cargo just built, and asserts on the `VUBD-RESULT` lines it prints. The `kernel_*` tests
//! run `tests/guest/kernel/run.sh NAME` instead: vubd inside a guest with a 6.12 kernel,
//! exporting devices to that kernel through VDUSE and ublk.
//!
//! run.sh installs QEMU and builds the guest itself (it needs root and Debian's package
//! servers the first time). When it cannot (exit status 77), the test is reported as
//! SKIPPED on stderr and FAILS, unless `VUBD_ALLOW_GUEST_SKIP=1` is set: a missing guest
//! must never look like a pass.
//!
//! The tests run one at a time (a lock), since each boots a 2-vCPU guest on a 2-core host.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One guest test may take this long (TCG boots, first-time install and guest build
/// included) before it is stopped and failed.
const TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// run.sh's exit status for "the environment cannot run guest tests".
const EXIT_SETUP_MISSING: i32 = 77;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs run.sh with `args` in its own process group; on timeout the group gets SIGTERM
/// (run.sh's trap then stops its QEMU and vubd), then SIGKILL.
fn run_script(script: &str, args: &[&str]) -> Outcome {
    let dir = tempfile::Builder::new()
        .prefix("vubd-guest-test-")
        .tempdir_in("/var/tmp")
        .expect("temp dir in /var/tmp");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let start = Instant::now();
    let mut child = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("VUBD_BIN", env!("CARGO_BIN_EXE_vubd"))
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", script.display()));
    let pgid = child.id() as libc::pid_t;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for run.sh") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            eprintln!("run.sh {args:?} still running after {TIMEOUT:?}: stopping it");
            // SAFETY: kill(2) on the process group we created; no memory is involved.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(30) {
                if child.try_wait().expect("wait for run.sh").is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            // SAFETY: as above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            break child.wait().expect("wait for run.sh");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Outcome {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// The key=value words of one `VUBD-RESULT` line.
fn fields(line: &str) -> Vec<(&str, &str)> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    fields(line)
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn guest_test(name: &str) {
    run_guest_test("tests/guest/run.sh", name)
}

/// A test of the VDUSE/ublk guest (tests/guest/kernel/run.sh: a 6.12 kernel, vubd inside).
fn kernel_test(name: &str) {
    run_guest_test("tests/guest/kernel/run.sh", name)
}

fn run_guest_test(script: &str, name: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = run_script(script, &[name]);
    let code = out.status.code();

    if code == Some(EXIT_SETUP_MISSING) {
        let what: Vec<&str> = out
            .stderr
            .lines()
            .filter_map(|l| l.strip_prefix("VUBD-SETUP-MISSING: "))
            .collect();
        let what = if what.is_empty() {
            "qemu-system-x86_64 or the cached guest (run.sh exited 77)".to_string()
        } else {
            what.join("; ")
        };
        eprintln!("SKIPPED: guest test {name}: {what}");
        if std::env::var("VUBD_ALLOW_GUEST_SKIP").as_deref() == Ok("1") {
            return;
        }
        panic!(
            "guest test {name} could not run ({what}); set VUBD_ALLOW_GUEST_SKIP=1 to allow \
             skipping it\n--- run.sh stderr ---\n{}",
            out.stderr
        );
    }

    let results: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.find("VUBD-RESULT ").map(|i| &l[i..]))
        .collect();
    let summary = out
        .stdout
        .lines()
        .find(|l| l.starts_with("VUBD-TEST "))
        .unwrap_or("(no VUBD-TEST line)");
    // Shown with --nocapture, and on failure.
    println!("guest test {name}: {summary} ({:.0?})", out.elapsed);
    for r in &results {
        println!("  {r}");
    }

    let mut problems = Vec::new();
    if !out.status.success() {
        problems.push(format!("run.sh exited with {}", out.status));
    }
    let own: Vec<&&str> = results
        .iter()
        .filter(|r| field(r, "test") == Some(name))
        .collect();
    if own.is_empty() {
        problems.push(format!("no VUBD-RESULT line for test={name}"));
    }
    for r in &results {
        if field(r, "status") != Some("PASS") {
            problems.push(format!("not a pass: {r}"));
        }
    }
    if !summary.contains(&format!("name={name} status=PASS")) {
        problems.push(format!("summary: {summary}"));
    }
    assert!(
        problems.is_empty(),
        "guest test {name} failed:\n  {}\n--- run.sh stdout ---\n{}\n--- run.sh stderr ---\n{}",
        problems.join("\n  "),
        out.stdout,
        out.stderr
    );
}

/// Disk size, block sizes, queue count, discard/write-zeroes limits, serial, cache mode as
/// the guest's virtio_blk driver sees them (512 B and 4 KiB logical blocks).
#[test]
fn guest_geometry() {
    guest_test("geometry");
}

/// mkfs.ext4, checksummed files, fstrim, e2fsck -fn, remount and verify.
#[test]
fn guest_queues() {
    guest_test("queues");
}

#[test]
fn guest_resize() {
    guest_test("resize");
}

#[test]
fn guest_fs() {
    guest_test("fs");
}

/// fio randwrite + crc32c verify at QD1 and QD32 over both queues.
#[test]
fn guest_fio() {
    guest_test("fio");
}

/// blkdiscard and blkdiscard -z read back as zeroes; the discarded range is a hole in the
/// backing file.
#[test]
fn guest_discard() {
    guest_test("discard");
}

/// vubd SIGKILLed and restarted under a running fio with verify; QEMU reconnects.
#[test]
fn guest_restart() {
    guest_test("restart");
}

/// The restart test on a Ceph RBD image (tests/guest/rbd-restart.sh): write-through, so no
/// completed write may be lost; the restarted vubd breaks its dead predecessor's lock.
#[test]
fn guest_rbd() {
    guest_test("rbd");
}

/// Live migration between two QEMUs on shared storage while fio writes and a reader checks
/// known data; a RAM disk's VM must be refused migration with QEMU naming the feature.
#[test]
fn guest_migrate() {
    guest_test("migrate");
}

/// A DIMM plugged at run time (ADD_MEM_REG), I/O with buffers in it, then unplugged
/// (REM_MEM_REG), I/O again.
#[test]
fn guest_memhotplug() {
    guest_test("memhotplug");
}

/// A disk created over the management socket and hot-plugged into the running guest, used,
/// unplugged and removed.
#[test]
fn guest_diskhotplug() {
    guest_test("diskhotplug");
}

/// reboot -f and system_reset mid-I/O: flushed data intact after each.
#[test]
fn guest_reboot() {
    guest_test("reboot");
}

/// QEMU SIGKILLed mid-I/O: vubd frees the connection's fds and mappings; a new QEMU attaches.
#[test]
fn guest_qemukill() {
    guest_test("qemukill");
}

/// The disk with packed virtqueues (`packed=on`): the guest driver negotiated
/// VIRTIO_F_RING_PACKED (sysfs, and QEMU's guest features), fio randrw with crc32c verify,
/// a system_reset, then fio again while vubd is SIGKILLed and restarted (QEMU reconnects,
/// the packed inflight record brings back what the killed vubd had taken).
#[test]
fn guest_packed() {
    guest_test("packed");
}

/// The 6.12 guest that VDUSE and ublk run in: its modules load, /dev/vduse/control and
/// /dev/ublk-control exist, vdpa lists the vduse management device, vubd runs in it.
#[test]
fn kernel_probe() {
    kernel_test("probe");
}

/// ublk (/dev/ublkbN) in the 6.12 guest: geometry, ext4, fio verify, devices added and
/// removed by RPC and SIGHUP, resize refused on a kernel without UPDATE_SIZE, an
/// unprivileged vubd, 4 KiB IOPS.
#[test]
fn kernel_ublk() {
    kernel_test("ublk");
}

/// ublk user recovery: vubd SIGKILLed twice under a verifying fio and started again with
/// the same --ublk-id; fio completes clean. A device added without an id is taken over by id.
#[test]
fn kernel_ublk_recovery() {
    kernel_test("ublk_recovery");
}

/// VDUSE (/dev/vdX through the kernel's virtio_blk) in the 6.12 guest: vdpa dev add,
/// geometry, ext4, fio verify, resize with a config interrupt, devices added and removed by
/// RPC, vubd SIGKILLed mid-I/O and restarted (it reopens /dev/vduse/NAME and resubmits what
/// the killed one had taken), 4 KiB IOPS.
#[test]
fn kernel_vduse() {
    kernel_test("vduse");
}

/// vhost-user-blk in the same 6.12 guest (vubd on the host, null disk): data path and the
/// same fio as the VDUSE and ublk tests, so the three front ends compare in one kernel.
#[test]
fn kernel_vhostuser() {
    kernel_test("vhostuser");
}

//! RESET_DEVICE as QEMU uses it on guest driver resets: rings and features start over, the
//! memory table and protocol features stay, and the device serves again once the rings are
//! set up anew (without a new SET_MEM_TABLE).

mod common;
mod frontend;

use common::*;
use frontend::*;
use std::time::Duration;

const RESET_DEVICE: u32 = 34;
const PF_RESET_DEVICE: u64 = 1 << 13;

fn flush(mem: &GuestMemory, ring: &mut Ring) -> u8 {
    let hdr = DATA_BASE;
    blk_header(mem, hdr, T_FLUSH, 0);
    mem.write(hdr + 16, &[0xff]);
    let before = ring.used_idx(mem);
    ring.submit(mem, &[(hdr, 16, 0), (hdr + 16, 1, DESC_F_WRITE)]);
    assert!(ring.wait_used(mem, before.wrapping_add(1), Duration::from_secs(5)));
    mem.read(hdr + 16, 1)[0]
}

#[test]
fn reset_device_keeps_the_memory_table() {
    let dir = test_dir();
    let server = Server::start(dir.path(), "vubd", &["--ram", "16M"]);
    let mem = GuestMemory::new(4 * MIB);
    let mut fe = Frontend::connect(&server.socket);
    fe.handshake(PF_RESET_DEVICE);
    assert!(fe.share(&mem));
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    assert_eq!(flush(&mem, &mut ring), 0);

    assert!(fe.ack(RESET_DEVICE, &[], &[]).unwrap());
    // The guest driver starts again: features, then rings, no memory table.
    fe.send(
        SET_FEATURES,
        &u64_payload(F_VERSION_1 | F_PROTOCOL_FEATURES),
        &[],
        false,
    )
    .unwrap();
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).expect("rings after reset");
    assert_eq!(
        flush(&mem, &mut ring),
        0,
        "the device serves after RESET_DEVICE"
    );
    assert_eq!(
        ring.used_idx(&mem),
        1,
        "the ring started over from its new base"
    );
}

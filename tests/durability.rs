//! No data is lost: what a client wrote and flushed is in the file after vubd is SIGKILLed,
//! and with the write cache off (`--writethrough`, or the guest clearing CONFIG_WCE) every
//! completed write is, without a flush.

mod common;
mod frontend;

use common::*;
use frontend::*;
use std::time::Duration;

const WRITEBACK: u32 = 32;

fn kill(server: &mut Server) {
    signal(server.pid(), libc::SIGKILL);
    server.wait_exit(Duration::from_secs(5));
}

#[test]
fn flushed_data_is_in_the_file_after_sigkill() {
    for buffered in [false, true] {
        let dir = test_dir();
        let img = create_file(dir.path(), "disk.img", 32 * MIB);
        let img_arg = img.display().to_string();
        let mut args = vec!["--blk-file", img_arg.as_str()];
        if buffered {
            args.push("--buffered");
        }
        let mut server = Server::start(dir.path(), "vubd", &args);
        let mut client = Client::connect(&server.socket, 1);
        let writes: Vec<(u64, Vec<u8>)> = (0..16u64)
            .map(|i| (i * 1_000_448, pattern(i, i * 1_000_448, 64 * 1024)))
            .collect();
        for (off, data) in &writes {
            ok("write", client.disk().write(*off, data));
        }
        ok("flush", client.disk().flush());
        kill(&mut server);
        drop(client);
        for (off, data) in &writes {
            let what = format!("buffered={buffered}: write at {off} after SIGKILL");
            assert_bytes_eq(&what, &read_file_at(&img, *off, data.len()), data);
        }
    }
}

fn writeback_byte(fe: &mut Frontend) -> u8 {
    let r = fe.get(GET_CONFIG, &config_request(WRITEBACK, 1)).unwrap();
    assert_eq!(r.payload.len(), 13);
    r.payload[12]
}

#[test]
fn writethrough_is_reported_and_the_guest_can_toggle_the_cache() {
    let dir = test_dir();
    let img = create_file(dir.path(), "disk.img", 16 * MIB);
    let img_arg = img.display().to_string();
    let mut server = Server::start(
        dir.path(),
        "vubd",
        &["--blk-file", &img_arg, "--writethrough"],
    );

    let mut fe = Frontend::connect(&server.socket);
    fe.handshake_features(F_CONFIG_WCE, 0);
    assert_eq!(
        writeback_byte(&mut fe),
        0,
        "--writethrough starts with the cache off"
    );
    assert!(fe
        .ack(SET_CONFIG, &config_write(WRITEBACK, &[1]), &[])
        .unwrap());
    assert_eq!(writeback_byte(&mut fe), 1, "guest turned the cache on");
    assert!(fe
        .ack(SET_CONFIG, &config_write(WRITEBACK, &[0]), &[])
        .unwrap());
    assert_eq!(writeback_byte(&mut fe), 0, "and off again");
    // Only the writeback byte is writable.
    assert!(!fe
        .ack(SET_CONFIG, &config_write(0, &[1, 2, 3, 4]), &[])
        .unwrap_or(false));
    drop(fe);

    // Without CONFIG_WCE negotiated the cache cannot be toggled.
    let mut fe = Frontend::connect(&server.socket);
    fe.handshake(0);
    assert!(!fe
        .ack(SET_CONFIG, &config_write(WRITEBACK, &[1]), &[])
        .unwrap_or(false));
    drop(fe);

    // Write-through: completed writes are durable with no flush; they are in the file after
    // a SIGKILL.
    let mut client = Client::connect(&server.socket, 1);
    let data = pattern(9, 12288, 128 * 1024);
    ok("write", client.disk().write(12288, &data));
    kill(&mut server);
    drop(client);
    assert_bytes_eq(
        "write-through data after SIGKILL",
        &read_file_at(&img, 12288, data.len()),
        &data,
    );
}

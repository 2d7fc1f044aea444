//! io_uring restrictions (IORING_REGISTER_RESTRICTIONS): a ring is created disabled, told
//! which operations it may ever carry, then enabled. seccomp cannot see what io_uring does on
//! a thread's behalf, so without this a confined reactor could still open files or sockets
//! through its ring.

use std::io;

use io_uring::{opcode, register::Restriction, IoUring};

/// io_uring_register(2) opcodes (include/uapi/linux/io_uring.h).
const REGISTER_BUFFERS: u8 = 0;
const UNREGISTER_BUFFERS: u8 = 1;
const REGISTER_FILES: u8 = 2;
const UNREGISTER_FILES: u8 = 3;
const REGISTER_PROBE: u8 = 8;

/// What a reactor's ring may carry: block I/O on backend files, sending and receiving on
/// backend sockets, signalling call fds, cancelling, and registering buffers and files for
/// faster I/O.
pub fn restrict_reactor_ring(ring: &IoUring) -> io::Result<()> {
    let ops = [
        opcode::Nop::CODE,
        opcode::Readv::CODE,
        opcode::Writev::CODE,
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::ReadFixed::CODE,
        opcode::WriteFixed::CODE,
        opcode::Fsync::CODE,
        opcode::Fallocate::CODE,
        opcode::MsgRingData::CODE,
        opcode::AsyncCancel::CODE,
        opcode::PollAdd::CODE,
        opcode::PollRemove::CODE,
        opcode::Timeout::CODE,
        // NBD backend: requests and payloads on a connected socket (connecting happens
        // elsewhere, under the control thread's filter).
        opcode::SendMsg::CODE,
        opcode::RecvMsg::CODE,
        opcode::Recv::CODE,
        // ublk front end: FETCH_REQ / COMMIT_AND_FETCH_REQ on /dev/ublkcN (16-byte commands
        // fit a plain SQE; the control commands go through a ring of their own, below).
        opcode::UringCmd16::CODE,
    ];
    let regs = [
        REGISTER_BUFFERS,
        UNREGISTER_BUFFERS,
        REGISTER_FILES,
        UNREGISTER_FILES,
        REGISTER_PROBE,
    ];
    restrict(ring, &ops, &regs)
}

/// What ublk's control ring (128-byte SQEs) may carry: commands to /dev/ublk-control, and
/// cancelling one that waits too long.
pub fn restrict_ublk_control_ring(
    ring: &IoUring<io_uring::squeue::Entry128, io_uring::cqueue::Entry>,
) -> io::Result<()> {
    let mut res = [
        Restriction::sqe_op(opcode::UringCmd80::CODE),
        Restriction::sqe_op(opcode::AsyncCancel::CODE),
    ];
    ring.submitter().register_restrictions(&mut res)?;
    ring.submitter().register_enable_rings()
}

/// What a call fd's signal ring may carry: NOPs (their completions signal the eventfd).
pub fn restrict_signal_ring(ring: &IoUring) -> io::Result<()> {
    restrict(ring, &[opcode::Nop::CODE], &[])
}

fn restrict(ring: &IoUring, ops: &[u8], regs: &[u8]) -> io::Result<()> {
    let mut res: Vec<Restriction> = ops
        .iter()
        .map(|&op| Restriction::sqe_op(op))
        .chain(regs.iter().map(|&r| Restriction::register_op(r)))
        // Links and drains are fine; fixed files are how registered files are used.
        .chain(std::iter::once(Restriction::sqe_flags_allowed(0xff)))
        .collect();
    ring.submitter().register_restrictions(&mut res)?;
    ring.submitter().register_enable_rings()
}

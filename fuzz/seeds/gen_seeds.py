#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/seeds/<target>/*).

The targets decode their input with `arbitrary` 1.x (#[derive(Arbitrary)]), whose format is
simple enough to produce by hand:
  - integers: little-endian bytes;  bool: one byte, low bit;
  - enum: a u32 whose value v selects variant (v * count) >> 32, then the variant's fields;
  - Vec<T>: per element a 0x01 byte then the element, ended by a 0x00 byte (or end of input);
  - Option<T>: a bool byte then T; tuples and arrays: their elements in order.
Check a seed with `cargo fuzz fmt <target> <seed>` (prints the decoded input).

Usage: python3 fuzz/seeds/gen_seeds.py   (from anywhere; writes next to this script)
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def u8(v): return struct.pack('<B', v & 0xff)
def i8(v): return struct.pack('<b', v)
def u16(v): return struct.pack('<H', v & 0xffff)
def u32(v): return struct.pack('<I', v & 0xffffffff)
def u64(v): return struct.pack('<Q', v & 0xffffffffffffffff)
def boolean(b): return b'\x01' if b else b'\x00'


def enum(i, count, *fields):
    v = -((-(i << 32)) // count)  # ceil(i * 2^32 / count)
    assert (v * count) >> 32 == i and v < 2**32
    return u32(v) + b''.join(fields)


def vec(items): return b''.join(b'\x01' + it for it in items) + b'\x00'
def option(x): return b'\x00' if x is None else b'\x01' + x


# ---------------------------------------------------------------- parse_request
def addr_r0(off): return enum(0, 5, u16(off))
def addr_r1(off): return enum(1, 5, u16(off))
def addr_r0end(d): return enum(2, 5, i8(d))
def addr_raw(a): return enum(4, 5, u64(a))


def len_small(n): return enum(0, 3, u8(n))
def len_sectors(n): return enum(1, 3, u8(n))
def len_raw(n): return enum(2, 3, u32(n))


NEXT, WRITE, INDIRECT = 1, 2, 4


def desc(addr, ln, flags, nxt=0): return addr + ln + u8(flags) + u16(nxt)


KINDS = {'in': 0, 'out': 1, 'flush': 2, 'getid': 3, 'discard': 4, 'wz': 5}


def header(at, kind, sector):
    k = enum(KINDS[kind], 7)
    return at + k + u32(0) + enum(0, 2, u16(sector))


def segment(at, sector, num, flags):
    return at + enum(0, 2, u16(sector)) + u32(num) + u32(flags)


def table(at, descs): return at + vec(descs)
def raw_write(at, data): return at + vec([u8(b) for b in data])


def pr_input(descs, avail, headers=(), segments=(), tables=(), writes=(), region1=None,
             queue_log2=4, next_avail=0, event_idx=False, inflight=False, resubmit=(),
             disk=0, used_event=0, long=None, offered=None):
    region1 = region1 if region1 is not None else enum(1, 3, u8(0))  # Gap(0)
    return (u8(0) + region1 + u8(queue_log2)
            + addr_r0(0x0000) + addr_r0(0x1000) + addr_r0(0x2000)
            + u16(next_avail) + u16(len(avail) if offered is None else offered) + u16(0)
            + vec([u16(h) for h in avail]) + u16(used_event) + boolean(event_idx)
            + u8(disk) + boolean(inflight) + vec([u16(h) for h in resubmit])
            + option(long) + vec(list(writes)) + vec(list(headers)) + vec(list(segments))
            + vec(list(tables)) + vec(list(descs)))


def chain_rw(first, hdr_off, data, data_len, write, status_off):
    """header, one data buffer, status: three descriptors at table index `first`."""
    dflags = NEXT | (WRITE if write else 0)
    return [desc(addr_r0(hdr_off), len_small(16), NEXT, first + 1),
            desc(data, data_len, dflags, first + 2),
            desc(addr_r0(status_off), len_small(1), WRITE, 0)]


def parse_request_seeds():
    s = {}
    hdr = lambda i: 0x4000 + 0x100 * i
    st = lambda i: 0x5000 + 0x10 * i
    # read 4 KiB at sector 8 into region 1
    s['read'] = pr_input(chain_rw(0, hdr(0), addr_r1(0), len_sectors(8), True, st(0)), [0],
                         headers=[header(addr_r0(hdr(0)), 'in', 8)])
    s['write'] = pr_input(chain_rw(0, hdr(0), addr_r1(0), len_sectors(1), False, st(0)), [0],
                          headers=[header(addr_r0(hdr(0)), 'out', 16)],
                          writes=[raw_write(addr_r1(0), b'\xab' * 16)])
    s['flush'] = pr_input([desc(addr_r0(hdr(0)), len_small(16), NEXT, 1),
                           desc(addr_r0(st(0)), len_small(1), WRITE, 0)], [0],
                          headers=[header(addr_r0(hdr(0)), 'flush', 0)])
    s['get_id'] = pr_input(chain_rw(0, hdr(0), addr_r1(0), len_small(20), True, st(0)), [0],
                           headers=[header(addr_r0(hdr(0)), 'getid', 0)])
    s['discard'] = pr_input(chain_rw(0, hdr(0), addr_r0(0x6000), len_small(16), False, st(0)),
                            [0], headers=[header(addr_r0(hdr(0)), 'discard', 0)],
                            segments=[segment(addr_r0(0x6000), 8, 8, 0)])
    s['write_zeroes_unmap'] = pr_input(
        chain_rw(0, hdr(0), addr_r0(0x6000), len_small(16), False, st(0)), [0],
        headers=[header(addr_r0(hdr(0)), 'wz', 0)],
        segments=[segment(addr_r0(0x6000), 16, 8, 1)])
    # five requests in one pass, event idx on
    kinds = [('in', True), ('out', False), ('getid', True), ('in', True), ('out', False)]
    descs, heads, hdrs = [], [], []
    for i, (k, w) in enumerate(kinds):
        descs += chain_rw(3 * i, hdr(i), addr_r1(0x1000 * i), len_sectors(2), w, st(i))
        heads.append(3 * i)
        hdrs.append(header(addr_r0(hdr(i)), k, 4 * i))
    s['batch_event_idx'] = pr_input(descs, heads, headers=hdrs, event_idx=True, used_event=2)
    # indirect: one descriptor pointing at a 3-entry table
    s['indirect'] = pr_input(
        [desc(addr_r0(0x6000), len_small(48), INDIRECT, 0)], [0],
        headers=[header(addr_r0(hdr(0)), 'in', 0)],
        tables=[table(addr_r0(0x6000), chain_rw(0, hdr(0), addr_r1(0), len_sectors(1), True,
                                                st(0)))])
    # data buffer straddling two adjacent regions
    s['straddle'] = pr_input(
        chain_rw(0, hdr(0), addr_r0end(-128), len_sectors(1), True, st(0)), [0],
        headers=[header(addr_r0(hdr(0)), 'in', 0)], region1=enum(0, 3))
    # wrapped avail index, inflight tracking and a resubmitted head
    s['wrap_inflight'] = pr_input(
        chain_rw(0, hdr(0), addr_r1(0), len_sectors(1), True, st(0))
        + chain_rw(3, hdr(1), addr_r1(0x1000), len_sectors(1), False, st(1)),
        [3], headers=[header(addr_r0(hdr(0)), 'in', 0), header(addr_r0(hdr(1)), 'out', 0)],
        next_avail=0xffff, inflight=True, resubmit=[0])
    return s


def long_chain_regressions():
    """Not crashes: inputs that show how much walking one request can cost (see README)."""
    s = {}
    # 256 requests per pass, all head 0: an indirect table of 7002 entries (a FLUSH header,
    # 7000 zero-length descriptors, the status byte). Every one is a valid request.
    n = 7000
    long = addr_r0(0x4000) + u16(n) + boolean(True) + addr_r0(0x3000) + addr_r0(0x3100)
    s['long_indirect_flush_x256'] = pr_input(
        [desc(addr_r0(0x4000), len_raw((n + 2) * 16), INDIRECT, 0)], [0] * 256,
        headers=[header(addr_r0(0x3000), 'flush', 0)], region1=enum(0, 3), queue_log2=8,
        long=long)
    return s


# ---------------------------------------------------------------- vhost_message
BODIES = ['GetFeatures', 'SetFeatures', 'SetOwner', 'ResetOwner', 'ResetDevice',
          'GetProtocolFeatures', 'SetProtocolFeatures', 'GetQueueNum', 'GetMaxMemSlots',
          'SetMemTable', 'AddMemReg', 'RemMemReg', 'SetVringNum', 'SetVringAddr',
          'SetVringBase', 'GetVringBase', 'SetVringKick', 'SetVringCall', 'SetVringErr',
          'SetVringEnable', 'GetConfig', 'SetConfig', 'GetInflightFd', 'SetInflightFd',
          'SetLogBase', 'Raw']


def body(name, *fields): return enum(BODIES.index(name), len(BODIES), *fields)


def msg(b, need_reply=False):
    # size: Correct; flags: None
    return b + boolean(need_reply) + enum(0, 2) + option(None)


ALL = 0xffffffffffffffff


def offered(mask=ALL): return enum(0, 2, u64(mask))
def slot(n): return enum(0, 2, u8(n))
def pages(n): return enum(0, 2, u8(n))
def idx(n): return enum(0, 2, u8(n))
def va(s, off): return enum(0, 2, u8(s), u16(off))


MEMFD_EXACT = enum(0, 2, enum(0, 2))  # RegionFd::Memfd(FileSize::Exact)
EVENTFD = enum(0, 3)


def region(s=0, npages=15):  # 64 KiB at gpa slot s, user address slot s, offset 0
    return slot(s) + pages(npages) + slot(s) + pages(0) + MEMFD_EXACT


def negotiate(reply=False):
    return [msg(body('GetFeatures')), msg(body('GetProtocolFeatures')),
            msg(body('SetProtocolFeatures', offered())), msg(body('GetQueueNum')),
            msg(body('GetMaxMemSlots')), msg(body('SetOwner'), reply),
            msg(body('GetConfig', u16(0), u16(60), u32(0))),
            msg(body('SetFeatures', offered()), reply)]


def vring_setup(q, reply=False, enable=True):
    base = 0x4000 * q
    m = [msg(body('SetVringNum', idx(q), u32(16)), reply),
         msg(body('SetVringBase', idx(q), u32(0)), reply),
         msg(body('SetVringAddr', idx(q), u32(0), va(0, base), va(0, base + 0x2000),
                  va(0, base + 0x1000), u64(0)), reply),
         msg(body('SetVringCall', u8(q), EVENTFD), reply),
         msg(body('SetVringKick', u8(q), EVENTFD), reply)]
    if enable:
        m.append(msg(body('SetVringEnable', idx(q), u32(1)), reply))
    return m


def vhost_message_seeds():
    s = {}
    # QEMU-style: SET_MEM_TABLE, two rings started then stopped with GET_VRING_BASE.
    s['qemu_handshake'] = vec(
        negotiate() + [msg(body('SetMemTable', vec([region()]), i8(0)))]
        + vring_setup(0) + vring_setup(1)
        + [msg(body('GetVringBase', idx(0))), msg(body('GetVringBase', idx(1)))])
    # Same with NEED_REPLY on everything that takes it (REPLY_ACK negotiated).
    s['qemu_handshake_reply_ack'] = vec(
        negotiate(True) + [msg(body('SetMemTable', vec([region()]), i8(0)), True)]
        + vring_setup(0, True) + [msg(body('GetVringBase', idx(0)))])
    # libblkio-style: CONFIGURE_MEM_SLOTS, no GET_VRING_BASE, region removed, device reset.
    s['libblkio_mem_slots'] = vec(
        negotiate(True) + [msg(body('AddMemReg', region(0)), True),
                           msg(body('AddMemReg', region(1, 3)), True)]
        + vring_setup(0, True)
        + [msg(body('RemMemReg', region(1, 3), boolean(False)), True),
           msg(body('ResetDevice'), True)])
    # Write cache toggled through the config space (CONFIG_WCE).
    s['set_config_wce'] = vec(
        negotiate(True) + [msg(body('SetConfig', u16(32), u32(0), vec([u8(0)])), True),
                           msg(body('GetConfig', u16(32), u16(1), u32(0)))])
    # Inflight region from a "previous backend" with heads 3 and 1 in flight on queue 0.
    inflight = (pages(1) + pages(0) + u8(2) + idx(4) + enum(0, 2)
                + u16(0) + u16(0) + u16(0) + u16(0)
                + vec([u8(0) + u16(3) + u64(5), u8(0) + u16(1) + u64(7)]))
    s['inflight_resubmit'] = vec(
        negotiate(True)
        + [msg(body('GetInflightFd', u64(0), u16(2), u16(16))),
           msg(body('SetInflightFd', inflight), True),
           msg(body('SetMemTable', vec([region()]), i8(0)), True)]
        + vring_setup(0, True) + [msg(body('GetVringBase', idx(0)))])
    # Kick without an fd (the frontend polls), then a memory table swap while running.
    s['nofd_kick_mem_swap'] = vec(
        negotiate() + [msg(body('SetMemTable', vec([region()]), i8(0)))]
        + vring_setup(0)[:3]
        + [msg(body('SetVringKick', u8(0), enum(1, 3))),
           msg(body('SetVringEnable', idx(0), u32(1))),
           msg(body('SetMemTable', vec([region(), region(1, 7)]), i8(0))),
           msg(body('GetVringBase', idx(0)))])
    return s


def main():
    for target, seeds in (('parse_request', parse_request_seeds()),
                          ('vhost_message', vhost_message_seeds())):
        d = os.path.join(HERE, target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, name), 'wb') as f:
                f.write(data)
        print(f'{target}: {len(seeds)} seeds in {d}')
    d = os.path.join(HERE, '..', 'regressions', 'parse_request')
    os.makedirs(d, exist_ok=True)
    for name, data in long_chain_regressions().items():
        with open(os.path.join(d, name), 'wb') as f:
            f.write(data)
        print(f'parse_request regression input {name} in {d}')


if __name__ == '__main__':
    main()

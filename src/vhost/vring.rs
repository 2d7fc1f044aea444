//! What the frontend told us about one virtqueue, kept by its connection.

use std::fs::File;

use crate::engine::PollerId;

#[derive(Default)]
pub struct Vring {
    pub size: u16,
    /// Frontend virtual addresses of the descriptor table, avail ring and used ring.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub addr_set: bool,
    /// SET_VRING_BASE, or where GET_VRING_BASE left the ring, as vhost-user encodes it (a
    /// split ring's avail index; a packed ring's avail and used positions with their wrap
    /// counters in the low and high halves). None: never set (a ring's start).
    pub base: Option<u32>,
    /// `Some(None)`: SET_VRING_KICK arrived without an fd (the frontend polls instead).
    pub kick: Option<Option<File>>,
    pub call: Option<File>,
    pub enabled: bool,
    /// The poller running this ring on its reactor.
    pub poller: Option<PollerId>,
}

//! A port of the virtual switch (protocol: [`crate::net`]): frames out
//! through the region's tx ring, frames in from its rx ring. Used by the
//! VMM, whose guest's virtio-net it backs, and by native components with
//! a port (`netpeer`).
//!
//! The region is shared with the switch only; the switch's semaphore is a
//! capability the manifest gives (the port ups it after each frame it
//! queues); the switch ups the port's own semaphore when it queued frames
//! for it, which its owner waits on.

use core::sync::atomic::{fence, Ordering};

use moat_user::mmio::Window;
use moat_user::{sys, Sel};

use crate::net::{self, MAX_FRAME};

pub struct Port {
    region: Window,
    switch: Sel,
    tx_head: u32,
    rx_tail: u32,
    /// The switch's `switch_starts` when last looked at.
    switch_starts: u32,
    /// Frames the tx ring had no room for.
    pub full: u64,
}

impl Port {
    /// A port on `region` (at least [`net::REGION`] bytes), upping
    /// `switch` for each frame sent; it resumes the rings where they
    /// stand (a restarted client neither resends nor rereads).
    pub fn new(region: Window, switch: Sel) -> Option<Self> {
        if region.len() < net::REGION as u64 {
            return None;
        }
        Some(Self {
            region,
            switch,
            tx_head: region.read::<u32>(net::TX_HEAD as u64),
            rx_tail: region.read::<u32>(net::RX_TAIL as u64),
            switch_starts: region.read::<u32>(net::SWITCH_STARTS as u64),
            full: 0,
        })
    }

    /// The switch's starts so far, if it (re)started since the last call
    /// (or since [`new`](Self::new)): a restarted switch lost the frames
    /// it held, but the rings go on.
    pub fn switch_started(&mut self) -> Option<u32> {
        let starts = self.region.read::<u32>(net::SWITCH_STARTS as u64);
        if starts == self.switch_starts {
            return None;
        }
        self.switch_starts = starts;
        Some(starts)
    }

    /// Whether the tx ring has room for a frame. If not, the switch is
    /// asked to up this port's semaphore once it has taken one (the
    /// ring's `tx_wanted`), so a sender that waits instead of dropping
    /// learns when to try again.
    pub fn can_queue(&mut self) -> bool {
        let room = |port: &Self| {
            let tail = port.region.read::<u32>(net::TX_TAIL as u64);
            matches!(net::pending(port.tx_head, tail), Some(n) if n < net::RING)
        };
        if room(self) {
            return true;
        }
        self.region.write::<u32>(net::TX_WANTED as u64, 1);
        fence(Ordering::SeqCst);
        // The switch may have taken a slot before it could see the word.
        room(self)
    }

    /// Queues a frame for the switch (without telling it: see
    /// [`notify`](Self::notify)); false if the ring is full or the frame
    /// longer than a slot holds.
    pub fn queue(&mut self, frame: &[u8]) -> bool {
        let tail = self.region.read::<u32>(net::TX_TAIL as u64);
        let room = matches!(net::pending(self.tx_head, tail), Some(n) if n < net::RING);
        if !room || frame.len() > net::SLOT - 4 {
            self.full += 1;
            return false;
        }
        let at = net::slot(net::TX_RING, self.tx_head) as u64;
        self.region.write::<u32>(at, frame.len() as u32);
        self.region.write_bytes(at + 4, frame);
        fence(Ordering::SeqCst);
        self.tx_head = self.tx_head.wrapping_add(1);
        self.region.write::<u32>(net::TX_HEAD as u64, self.tx_head);
        true
    }

    /// Tells the switch there are frames.
    pub fn notify(&self) {
        let _ = sys::sm_up(self.switch);
    }

    /// Queues a frame and tells the switch.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        let queued = self.queue(frame);
        if queued {
            self.notify();
        }
        queued
    }

    /// Whether a frame waits in the rx ring.
    pub fn has_frame(&self) -> bool {
        fence(Ordering::SeqCst);
        self.region.read::<u32>(net::RX_HEAD as u64) != self.rx_tail
    }

    /// The next frame for this port, copied into `buf`: its length, or
    /// `None` if there is none. A slot whose length is more than a frame
    /// may be (the switch never writes one) is skipped as length 0.
    pub fn receive(&mut self, buf: &mut [u8; MAX_FRAME]) -> Option<usize> {
        if !self.has_frame() {
            return None;
        }
        let at = net::slot(net::RX_RING, self.rx_tail) as u64;
        let len = self.region.read::<u32>(at) as usize;
        let len = if len <= MAX_FRAME { len } else { 0 };
        self.region.read_bytes(at + 4, &mut buf[..len]);
        fence(Ordering::SeqCst);
        self.rx_tail = self.rx_tail.wrapping_add(1);
        self.region.write::<u32>(net::RX_TAIL as u64, self.rx_tail);
        fence(Ordering::SeqCst);
        // The switch holds a frame for us until there is room: tell it.
        if self.region.read::<u32>(net::RX_WANTED as u64) != 0 {
            self.region.write::<u32>(net::RX_WANTED as u64, 0);
            self.notify();
        }
        Some(len)
    }

    /// The region, for a hostile client's raw writes.
    pub fn region(&self) -> &Window {
        &self.region
    }
}

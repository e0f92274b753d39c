//! The guest network's back end: a port of the virtual switch (the `net`
//! component) when the arguments name a region shared with it
//! (`net=MAPPING`, the switch's semaphore at selector [`SWITCH_SM`], this
//! port's at [`PORT_SM`]), else the echo peer, a test fixture inside the
//! machine. The guest's MAC address is `mac=` (the one the switch fixes
//! for this port), else `machine::GUEST_MAC`.
//!
//! Frames the guest sends go into the port's transmit ring (the switch is
//! upped once per round of the device's transmit queue); while it is
//! full they wait in the guest's transmit queue (the device takes no more,
//! so the guest's driver stops its queue: flow control, not loss) and the
//! switch is asked to up [`PORT_SM`] when it took one. Frames for the
//! guest come from its receive ring. The VMM's net EC waits on
//! [`PORT_SM`] and runs the device (`Machine::poll_net`: the receive ring
//! into the guest's buffers, as far as its backlog has room, and the
//! transmit queue into the ring); the vCPU loop does the same before each
//! entry. Taking a frame from a receive ring the switch waits on ups the
//! switch (`Port::receive`).

use alloc::boxed::Box;
use alloc::vec::Vec;

use common::args;
use common::net::{self, MAX_FRAME};
use common::net_client::Port;
use moat_user::mmio::window_arg;
use moat_user::{println, Sel};
use vdev::virtio::net::NetBackend;

/// The switch's semaphore (upped per frame sent).
pub const SWITCH_SM: Sel = 32;
/// This port's semaphore (the switch ups it when it queued frames).
pub const PORT_SM: Sel = 33;

/// The switch port the arguments name, with the guest's MAC address.
pub fn port(vmm_args: &str) -> Result<Option<(SwitchPort, [u8; 6])>, &'static str> {
    let Some(mapping) = args::value(vmm_args, "net") else {
        return Ok(None);
    };
    // SAFETY: the root task maps every `shared` region it names in the
    // arguments, for this task's life; it is used only through volatile
    // accesses (`Window`).
    let region = unsafe { window_arg(vmm_args, mapping) }.ok_or("net= names no region")?;
    let port = Port::new(region, SWITCH_SM).ok_or("the net= region is too small")?;
    let mac = match args::value(vmm_args, "mac") {
        Some(text) => net::parse_mac(text).ok_or("mac= is not a MAC address")?,
        None => vmm::machine::GUEST_MAC,
    };
    println!(
        "vmm: network on a switch port, MAC {}",
        net::MacText::new(&mac).as_str()
    );
    Ok(Some((
        SwitchPort {
            port,
            buf: Box::new([0; MAX_FRAME]),
            queued: false,
        },
        mac,
    )))
}

pub struct SwitchPort {
    port: Port,
    buf: Box<[u8; MAX_FRAME]>,
    /// Frames queued since the switch was last told.
    queued: bool,
}

impl NetBackend for SwitchPort {
    fn send(&mut self, frame: &[u8]) {
        if self.port.queue(frame) {
            self.queued = true;
            return;
        }
        if self.port.full.is_power_of_two() {
            println!(
                "vmm: network: the switch port's ring is full: {} frames dropped",
                self.port.full
            );
        }
    }

    fn flush(&mut self) {
        if core::mem::take(&mut self.queued) {
            self.port.notify();
        }
    }

    fn poll(&mut self) -> Option<Vec<u8>> {
        if let Some(starts) = self.port.switch_started() {
            // The first start is the one the VMM may have met already
            // running or not: only later ones are restarts.
            if starts > 1 {
                println!(
                    "vmm: network: the switch restarted (start {starts}); frames it held are lost"
                );
            }
        }
        let len = self.port.receive(&mut self.buf)?;
        Some(self.buf[..len].to_vec())
    }

    fn ready(&self) -> bool {
        self.port.has_frame()
    }

    fn can_send(&mut self) -> bool {
        self.port.can_queue()
    }
}

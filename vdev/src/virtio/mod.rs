//! virtio 1.x devices (modern only) over PCI.
//!
//! A device ([`VirtioDevice`]) sees its queues through [`DeviceIo`]; the
//! transport ([`pci::VirtioPci`]) owns registers, feature negotiation,
//! status, queues and interrupts. Work runs synchronously: a queue
//! notification (an MMIO write to the notify region) processes the device
//! before the write returns, and so does host-side input given through
//! [`pci::VirtioPci::update`].

pub mod block;
pub mod console;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;

#[cfg(any(test, feature = "test-utils"))]
pub mod mock;

use crate::GuestMemory;
use queue::{Chain, Queue, QueueError};

pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const DEVICE_TYPE_NET: u16 = 1;
pub const DEVICE_TYPE_BLOCK: u16 = 2;
pub const DEVICE_TYPE_CONSOLE: u16 = 3;
pub const DEVICE_TYPE_ENTROPY: u16 = 4;

/// A virtio device type's behaviour behind the transport.
pub trait VirtioDevice {
    fn device_type(&self) -> u16;
    fn queue_count(&self) -> u16;
    /// Device-type feature bits offered; the transport adds VERSION_1 and
    /// INDIRECT_DESC.
    fn features(&self) -> u64;
    /// Size of the device configuration structure (0: none).
    fn config_len(&self) -> usize;
    /// Device configuration is read-only for every device here.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver reset the device: forget all guest-visible state. Host
    /// back ends stay as they are.
    fn reset(&mut self);
    /// Do all the work the queues allow now: consume what the driver made
    /// available, fill receive buffers with pending host data.
    fn process(&mut self, io: &mut DeviceIo<'_>) -> Result<(), QueueError>;
}

/// A device's access to its queues while it processes.
pub struct DeviceIo<'a> {
    mem: &'a dyn GuestMemory,
    queues: &'a mut [Queue],
    features: u64,
}

impl<'a> DeviceIo<'a> {
    pub(crate) fn new(mem: &'a dyn GuestMemory, queues: &'a mut [Queue], features: u64) -> Self {
        Self {
            mem,
            queues,
            features,
        }
    }

    pub fn mem(&self) -> &'a dyn GuestMemory {
        self.mem
    }

    /// Whether the driver accepted `feature` (a feature bit mask).
    pub fn negotiated(&self, feature: u64) -> bool {
        self.features & feature == feature
    }

    /// The next chain of queue `index`, `None` if none is available (or the
    /// queue does not exist or is not enabled).
    pub fn pop(&mut self, index: u16) -> Result<Option<Chain>, QueueError> {
        let indirect = self.negotiated(VIRTIO_F_RING_INDIRECT_DESC);
        match self.queues.get_mut(usize::from(index)) {
            Some(queue) => queue.pop(self.mem, indirect),
            None => Ok(None),
        }
    }

    /// Return `chain` to queue `index`, `len` bytes written.
    pub fn push(&mut self, index: u16, chain: &Chain, len: u32) -> Result<(), QueueError> {
        match self.queues.get_mut(usize::from(index)) {
            Some(queue) => queue.push(self.mem, chain, len),
            None => Ok(()),
        }
    }
}

/// Serve a read of a device configuration structure laid out in `image`;
/// bytes past its end read as all ones.
pub(crate) fn read_config_image(image: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| image.get(at))
            .copied()
            .unwrap_or(0xff);
    }
}

#[cfg(test)]
mod fuzz {
    use alloc::boxed::Box;
    use alloc::vec;
    use alloc::vec::Vec;

    use super::block::{Block, MemDisk, BLK_F_FLUSH, SECTOR_SIZE, S_OK, T_IN};
    use super::console::{Console, PortBackend, CONSOLE_F_MULTIPORT};
    use super::mock::{Driver, Machine};
    use super::net::{EchoPeer, Net, ECHO_PEER_IP, ECHO_PEER_MAC, NET_F_MAC};
    use super::pci::{BAR_SIZE, MSIX_TABLE, NOTIFY_CFG};
    use super::rng::{Rng, SplitMix64};
    use super::*;

    struct Sink;
    impl PortBackend for Sink {
        fn output(&mut self, _: &[u8]) {}
    }

    const BASE: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC;
    /// (device type, features, queues)
    const DEVICES: [(u16, u64, u16); 4] = [
        (DEVICE_TYPE_CONSOLE, BASE | CONSOLE_F_MULTIPORT, 6),
        (DEVICE_TYPE_BLOCK, BASE | BLK_F_FLUSH, 1),
        (DEVICE_TYPE_NET, BASE | NET_F_MAC, 2),
        (DEVICE_TYPE_ENTROPY, BASE, 1),
    ];

    /// Probe and bring up again, on the rings of the last bring-up.
    fn bring_up<'m>(
        m: &'m Machine,
        old: Option<&mut Driver<'m>>,
        (device_type, features, queues): (u16, u64, u16),
    ) -> Driver<'m> {
        let mut driver = Driver::probe(m, device_type);
        driver.queues = old
            .map(|d| core::mem::take(&mut d.queues))
            .unwrap_or_default();
        driver.bring_up(features, queues);
        driver
    }

    /// Random register, ring and buffer traffic against all four devices;
    /// afterwards each must still come back to life after a reset.
    #[test]
    fn random_guest_traffic() {
        let m = Machine::new();
        let console = m.plug(Console::new(
            Box::new(Sink),
            vec![("modem", Box::new(Sink))],
        ));
        let block = m.plug(Block::new(
            MemDisk::new(vec![0x5a; 64 * SECTOR_SIZE as usize]),
            b"fuzz",
        ));
        let net = m.plug(Net::new(
            [2, 0, 0, 0, 0, 1],
            EchoPeer::new(ECHO_PEER_MAC, ECHO_PEER_IP),
        ));
        m.plug(Rng::new(Box::new(SplitMix64(5))));
        let mut drivers: Vec<Driver> = DEVICES.iter().map(|&d| bring_up(&m, None, d)).collect();
        let scratch = m.alloc(0x1_0000, 16);
        let mut prng = SplitMix64(0xf022);

        for _ in 0..20_000 {
            let r = prng.next_u64();
            let v = prng.next_u64();
            let which = (r % 4) as usize;
            let width = [1usize, 2, 4, 8][((r >> 2) & 3) as usize];
            let driver = &mut drivers[which];
            if driver.status() & pci::STATUS_NEEDS_RESET != 0 && v.is_multiple_of(16) {
                *driver = bring_up(&m, Some(driver), DEVICES[which]);
                continue;
            }
            match (r >> 4) % 100 {
                0..=1 => m.cfg_write(driver.slot, (v >> 8) as u8, width.min(4), v as u32),
                2..=4 => {
                    let control = driver.msix_cap + 2;
                    m.cfg_write(driver.slot, control, 2, (v as u32) & 0xc000);
                }
                5..=34 => {
                    let offset = match v % 4 {
                        0 => v >> 8 & 0x3f,
                        1 => NOTIFY_CFG + (v >> 8 & 0x1f),
                        2 => MSIX_TABLE + (v >> 8 & 0x7f),
                        _ => (v >> 8) % BAR_SIZE,
                    };
                    m.mmio_write(driver.bar + offset, width, prng.next_u64());
                }
                35..=44 => {
                    m.mmio_read(driver.bar + (v >> 8) % BAR_SIZE, width);
                }
                45..=59 => {
                    // Corrupt a ring.
                    let Some(queue) = driver.queues.get((v % 6) as usize).filter(|q| q.size > 0)
                    else {
                        continue;
                    };
                    let (base, len) = match (v >> 8) % 3 {
                        0 => (queue.desc, 16 * u64::from(queue.size)),
                        1 => (queue.avail, 6 + 2 * u64::from(queue.size)),
                        _ => (queue.used, 6 + 8 * u64::from(queue.size)),
                    };
                    let at = base + (v >> 16) % len;
                    m.mem.put(
                        at,
                        &prng.next_u64().to_le_bytes()[..width.min((base + len - at) as usize)],
                    );
                }
                60..=84 => {
                    // A plausible chain of random buffers, then a kick.
                    let queue = (v % u64::from(DEVICES[which].2)) as u16;
                    let count = 1 + (v >> 8) % 4;
                    let buffers: Vec<(u64, u32, bool)> = (0..count)
                        .map(|_| {
                            let b = prng.next_u64();
                            let addr = if b.is_multiple_of(16) {
                                b >> 8
                            } else {
                                scratch + (b >> 8) % 0xf000
                            };
                            (addr, (b >> 40) as u32 % 0x1000, b & 0x10 != 0)
                        })
                        .collect();
                    if let Some(q) = driver
                        .queues
                        .get_mut(usize::from(queue))
                        .filter(|q| q.size > 0)
                    {
                        q.add(&m.mem, &buffers);
                    }
                    driver.kick(queue);
                }
                85..=92 => match v % 4 {
                    0 => {
                        console
                            .borrow_mut()
                            .update(|c| c.port_input((v >> 8) as u32 % 3, &v.to_le_bytes()));
                    }
                    1 => {
                        console
                            .borrow_mut()
                            .update(|c| c.set_host_open((v >> 8) as u32 % 3, v & 0x100 != 0));
                    }
                    _ => {
                        net.borrow_mut()
                            .update(|n| n.receive(&vec![v as u8; (v >> 8) as usize % 1600]));
                    }
                },
                93..=98 => {
                    m.mem
                        .put(scratch + (v >> 8) % 0xfff0, &prng.next_u64().to_le_bytes());
                }
                _ => *driver = bring_up(&m, Some(driver), DEVICES[which]),
            }
        }

        // Every device recovers through a reset and a fresh bring-up.
        for (which, &device) in DEVICES.iter().enumerate() {
            assert_eq!(m.cfg_read(drivers[which].slot, 0, 2), 0x1af4);
            drivers[which] = bring_up(&m, Some(&mut drivers[which]), device);
        }
        let d = &mut drivers[1];
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&T_IN.to_le_bytes());
        let (h, data, status) = (m.alloc_data(&header), m.alloc(512, 16), m.alloc(1, 1));
        d.add(0, &[(h, 16, false), (data, 512, true), (status, 1, true)]);
        d.kick(0);
        assert_eq!(d.used(0).map(|(_, len)| len), Some(513));
        assert_eq!(m.mem.bytes(status, 1), [S_OK]);
        let d = &mut drivers[3];
        let buf = m.alloc(32, 8);
        d.add(0, &[(buf, 32, true)]);
        d.kick(0);
        assert_eq!(d.used(0).map(|(_, len)| len), Some(32));
        assert!(block.borrow().status() & pci::STATUS_NEEDS_RESET == 0);
    }
}

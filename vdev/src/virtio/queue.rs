//! The split virtqueue, device side, over [`GuestMemory`].
//!
//! Everything in the rings is guest-written and hostile: every index is
//! range-checked, every walk is bounded (a direct chain by the queue size,
//! an indirect one by its table), every address goes through the
//! bounds-checked `GuestMemory`. A malformed ring yields a [`QueueError`];
//! the transport then marks the device NEEDS_RESET and stops using it.

use alloc::vec::Vec;

use crate::{BadGuestAddress, GuestMemory};

/// Largest queue the device offers (and the longest chain or indirect
/// table it walks).
pub const QUEUE_SIZE_MAX: u16 = 256;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

const DESC_SIZE: u64 = 16;
const RING_HEADER: u64 = 4;
const AVAIL_ELEM: u64 = 2;
const USED_ELEM: u64 = 8;
const AVAIL_IDX: u64 = 2;
const USED_IDX: u64 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// Enabled with a size that is not a power of two up to the maximum,
    /// or with misaligned or wrapping ring addresses.
    BadConfig,
    /// The available index ran more than a queue's worth ahead.
    AvailIndex {
        next: u16,
        avail: u16,
    },
    /// A descriptor index outside its table.
    DescIndex(u16),
    /// More links than the table has entries: a loop.
    ChainTooLong,
    /// An indirect descriptor not negotiated, chained on, of bad length, or
    /// inside another indirect table.
    BadIndirect,
    Memory(BadGuestAddress),
}

impl From<BadGuestAddress> for QueueError {
    fn from(error: BadGuestAddress) -> Self {
        Self::Memory(error)
    }
}

/// One buffer of a chain, already validated not to wrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A descriptor chain taken from the available ring; give it back with
/// [`Queue::push`].
#[derive(Debug)]
pub struct Chain {
    head: u16,
    descriptors: Vec<Descriptor>,
}

impl Chain {
    pub fn head(&self) -> u16 {
        self.head
    }

    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descriptors
    }

    pub fn readable_len(&self) -> u64 {
        self.total(false)
    }

    pub fn writable_len(&self) -> u64 {
        self.total(true)
    }

    fn total(&self, writable: bool) -> u64 {
        self.descriptors
            .iter()
            .filter(|d| d.writable == writable)
            .map(|d| u64::from(d.len))
            .sum()
    }

    /// Reads the device-readable buffers in order, as one byte stream.
    pub fn reader(&self) -> ChainCursor<'_> {
        ChainCursor::new(&self.descriptors, false, u64::MAX)
    }

    /// Writes the device-writable buffers in order, at most `limit` bytes.
    pub fn writer(&self, limit: u64) -> ChainCursor<'_> {
        ChainCursor::new(&self.descriptors, true, limit)
    }
}

/// A position in one direction of a chain's buffers.
pub struct ChainCursor<'c> {
    descriptors: &'c [Descriptor],
    writable: bool,
    index: usize,
    offset: u32,
    left: u64,
    done: u64,
}

impl<'c> ChainCursor<'c> {
    fn new(descriptors: &'c [Descriptor], writable: bool, limit: u64) -> Self {
        let total: u64 = descriptors
            .iter()
            .filter(|d| d.writable == writable)
            .map(|d| u64::from(d.len))
            .sum();
        Self {
            descriptors,
            writable,
            index: 0,
            offset: 0,
            left: total.min(limit),
            done: 0,
        }
    }

    /// Bytes still to go.
    pub fn remaining(&self) -> u64 {
        self.left
    }

    /// Bytes moved so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// The guest address and length of the next piece, at most `max` bytes.
    fn next_piece(&mut self, max: usize) -> Option<(u64, usize)> {
        if self.left == 0 || max == 0 {
            return None;
        }
        loop {
            let d = self.descriptors.get(self.index)?;
            if d.writable == self.writable && self.offset < d.len {
                let len = u64::from(d.len - self.offset)
                    .min(self.left)
                    .min(max as u64);
                let addr = d.addr + u64::from(self.offset);
                self.offset += len as u32;
                self.left -= len;
                self.done += len;
                return Some((addr, len as usize));
            }
            self.index += 1;
            self.offset = 0;
        }
    }

    /// Copy from the readable buffers into `buf`; returns the bytes copied
    /// (fewer than `buf.len()` at the chain's end).
    pub fn read(
        &mut self,
        mem: &dyn GuestMemory,
        buf: &mut [u8],
    ) -> Result<usize, BadGuestAddress> {
        let mut filled = 0;
        while let Some((addr, len)) = self.next_piece(buf.len() - filled) {
            mem.read(addr, &mut buf[filled..filled + len])?;
            filled += len;
        }
        Ok(filled)
    }

    /// Copy `data` into the writable buffers; returns the bytes copied.
    pub fn write(&mut self, mem: &dyn GuestMemory, data: &[u8]) -> Result<usize, BadGuestAddress> {
        let mut copied = 0;
        while let Some((addr, len)) = self.next_piece(data.len() - copied) {
            mem.write(addr, &data[copied..copied + len])?;
            copied += len;
        }
        Ok(copied)
    }

    /// Skip `count` bytes without touching them.
    pub fn skip(&mut self, count: u64) {
        let mut left = count;
        while left > 0 {
            let Some((_, len)) = self.next_piece(usize::try_from(left).unwrap_or(usize::MAX))
            else {
                break;
            };
            left -= len as u64;
        }
    }
}

/// One queue's transport registers and the device's ring positions.
#[derive(Clone, Debug)]
pub struct Queue {
    pub(crate) max_size: u16,
    pub(crate) size: u16,
    pub(crate) ready: bool,
    pub(crate) desc_table: u64,
    pub(crate) avail_ring: u64,
    pub(crate) used_ring: u64,
    pub(crate) msix_vector: u16,
    next_avail: u16,
    next_used: u16,
    /// The driver wants an interrupt for what was pushed since the last
    /// [`take_signal`](Self::take_signal).
    signal: bool,
    /// Chains taken in this round of processing, at most a queue's worth:
    /// bounds the work per notification even while another vCPU keeps
    /// refilling the ring.
    popped: u16,
}

pub const NO_VECTOR: u16 = 0xffff;

/// A queue as a person debugging a stall wants to see it: the driver's
/// indices in guest memory beside the device's own positions. `avail`
/// ahead of `next_avail` is work the device has not taken; `used` behind
/// `next_used` would be a used index the guest cannot see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueView {
    pub ready: bool,
    pub size: u16,
    /// The avail ring's index as the guest last wrote it (`None`: the ring
    /// is outside guest memory).
    pub avail: Option<u16>,
    /// The used ring's index in guest memory.
    pub used: Option<u16>,
    /// The next avail entry the device takes.
    pub next_avail: u16,
    /// The next used entry the device fills.
    pub next_used: u16,
    /// The device owes the driver an interrupt.
    pub signal: bool,
}

impl core::fmt::Display for QueueView {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if !self.ready {
            return write!(f, "off");
        }
        let index = |i: Option<u16>| i.map_or("?".into(), |i| alloc::format!("{i}"));
        write!(
            f,
            "size {} avail {} used {}, device next_avail {} next_used {}",
            self.size,
            index(self.avail),
            index(self.used),
            self.next_avail,
            self.next_used
        )?;
        if self.signal {
            write!(f, ", interrupt owed")?;
        }
        Ok(())
    }
}

impl Queue {
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            msix_vector: NO_VECTOR,
            next_avail: 0,
            next_used: 0,
            signal: false,
            popped: 0,
        }
    }

    pub fn ready(&self) -> bool {
        self.ready
    }

    /// The queue's indices, read from guest memory, beside the device's.
    pub fn view(&self, mem: &dyn GuestMemory) -> QueueView {
        let read = |gpa: u64| (self.ready).then(|| read_u16(mem, gpa).ok()).flatten();
        QueueView {
            ready: self.ready,
            size: self.size,
            avail: read(self.avail_ring + AVAIL_IDX),
            used: read(self.used_ring + USED_IDX),
            next_avail: self.next_avail,
            next_used: self.next_used,
            signal: self.signal,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Back to the state after device reset.
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// The driver set queue_enable: check what it programmed, start at
    /// index 0 of fresh rings.
    pub fn enable(&mut self) -> Result<(), QueueError> {
        let size = u64::from(self.size);
        let fits = |base: u64, bytes: u64, align: u64| {
            base.is_multiple_of(align) && base.checked_add(bytes).is_some()
        };
        // Each ring ends in a 16-bit event field.
        let valid = self.size.is_power_of_two()
            && self.size <= self.max_size
            && fits(self.desc_table, DESC_SIZE * size, 16)
            && fits(self.avail_ring, RING_HEADER + AVAIL_ELEM * size + 2, 2)
            && fits(self.used_ring, RING_HEADER + USED_ELEM * size + 2, 4);
        if !valid {
            return Err(QueueError::BadConfig);
        }
        self.ready = true;
        self.next_avail = 0;
        self.next_used = 0;
        Ok(())
    }

    pub(crate) fn start_round(&mut self) {
        self.popped = 0;
    }

    /// The next available chain, `None` if there is none (or the queue is
    /// not enabled, or a queue's worth was taken this round).
    pub fn pop(
        &mut self,
        mem: &dyn GuestMemory,
        indirect: bool,
    ) -> Result<Option<Chain>, QueueError> {
        if !self.ready || self.popped >= self.size {
            return Ok(None);
        }
        let avail = read_u16(mem, self.avail_ring + AVAIL_IDX)?;
        let pending = avail.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailIndex {
                next: self.next_avail,
                avail,
            });
        }
        let slot = u64::from(self.next_avail % self.size);
        let head = read_u16(mem, self.avail_ring + RING_HEADER + AVAIL_ELEM * slot)?;
        let descriptors = self.walk(mem, head, indirect)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        self.popped += 1;
        Ok(Some(Chain { head, descriptors }))
    }

    fn walk(
        &self,
        mem: &dyn GuestMemory,
        head: u16,
        indirect: bool,
    ) -> Result<Vec<Descriptor>, QueueError> {
        let mut descriptors = Vec::new();
        let mut table = self.desc_table;
        let mut table_len = self.size;
        let mut in_indirect = false;
        let mut index = head;
        // Links followed in the current table: a chain without a loop
        // cannot visit more entries than the table has.
        let mut links = 0u16;
        loop {
            if index >= table_len {
                return Err(QueueError::DescIndex(index));
            }
            if links == table_len {
                return Err(QueueError::ChainTooLong);
            }
            links += 1;
            let mut raw = [0u8; DESC_SIZE as usize];
            mem.read(table + DESC_SIZE * u64::from(index), &mut raw)?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if addr.checked_add(u64::from(len)).is_none() {
                return Err(QueueError::Memory(BadGuestAddress(addr)));
            }
            if flags & DESC_F_INDIRECT != 0 {
                let entries = u64::from(len) / DESC_SIZE;
                let bad = !indirect
                    || in_indirect
                    || flags & DESC_F_NEXT != 0
                    || u64::from(len) % DESC_SIZE != 0
                    || entries == 0
                    || entries > u64::from(QUEUE_SIZE_MAX);
                if bad {
                    return Err(QueueError::BadIndirect);
                }
                table = addr;
                table_len = entries as u16;
                in_indirect = true;
                index = 0;
                links = 0;
                continue;
            }
            descriptors.push(Descriptor {
                addr,
                len,
                writable: flags & DESC_F_WRITE != 0,
            });
            if flags & DESC_F_NEXT == 0 {
                return Ok(descriptors);
            }
            index = next;
        }
    }

    /// Return `chain` to the driver with `len` bytes written into it.
    pub fn push(
        &mut self,
        mem: &dyn GuestMemory,
        chain: &Chain,
        len: u32,
    ) -> Result<(), QueueError> {
        if !self.ready {
            return Ok(());
        }
        let slot = u64::from(self.next_used % self.size);
        let mut elem = [0u8; USED_ELEM as usize];
        elem[0..4].copy_from_slice(&u32::from(chain.head).to_le_bytes());
        elem[4..8].copy_from_slice(&len.to_le_bytes());
        mem.write(self.used_ring + RING_HEADER + USED_ELEM * slot, &elem)?;
        // The element is written before the index that publishes it.
        self.next_used = self.next_used.wrapping_add(1);
        mem.write(self.used_ring + USED_IDX, &self.next_used.to_le_bytes())?;
        // Read after publishing, so a driver re-enabling interrupts just
        // before is not missed.
        let flags = read_u16(mem, self.avail_ring)?;
        self.signal |= flags & AVAIL_F_NO_INTERRUPT == 0;
        Ok(())
    }

    /// Whether an interrupt is due, clearing the request.
    pub fn take_signal(&mut self) -> bool {
        core::mem::take(&mut self.signal)
    }
}

fn read_u16(mem: &dyn GuestMemory, gpa: u64) -> Result<u16, BadGuestAddress> {
    let mut raw = [0; 2];
    mem.read(gpa, &mut raw)?;
    Ok(u16::from_le_bytes(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mock::{write_desc, Driver, Machine, MockQueue, MEM_SIZE};
    use crate::virtio::pci::{common, VirtioPci, STATUS_DRIVER_OK, STATUS_NEEDS_RESET};
    use crate::virtio::rng::{Rng, SplitMix64};
    use crate::virtio::{DEVICE_TYPE_ENTROPY, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1};
    use crate::Shared;
    use alloc::boxed::Box;

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC;

    fn setup() -> (Machine, Shared<VirtioPci<Rng>>) {
        let m = Machine::new();
        let device = m.plug(Rng::new(Box::new(SplitMix64(9))));
        (m, device)
    }

    fn driver(m: &Machine, features: u64, size: Option<u16>) -> Driver<'_> {
        let mut driver = Driver::probe(m, DEVICE_TYPE_ENTROPY);
        assert!(driver.negotiate(features));
        driver.enable_msix();
        driver.write(common::MSIX_CONFIG, 2, 0);
        driver.setup_queue(0, size, 1);
        driver.set_status(driver.status() | STATUS_DRIVER_OK);
        driver
    }

    /// Let the driver write raw descriptors and publish `head`, kick, and
    /// check the device gave up with `error` without returning anything.
    fn expect_error(
        size: u16,
        features: u64,
        build: impl FnOnce(&Machine, &mut MockQueue) -> u16,
        error: QueueError,
    ) {
        let (m, device) = setup();
        let mut driver = driver(&m, features, Some(size));
        let head = build(&m, &mut driver.queues[0]);
        driver.queues[0].publish(&m.mem, head);
        driver.kick(0);
        assert_eq!(device.borrow().last_error(), Some(error));
        assert_ne!(driver.status() & STATUS_NEEDS_RESET, 0);
        assert_eq!(driver.used(0), None);
        assert_eq!(m.msi.count(0), 1, "config vector tells the driver");
        // Stopped for good until reset: a valid request is not served.
        let buf = m.alloc(8, 8);
        driver.add(0, &[(buf, 8, true)]);
        driver.kick(0);
        assert_eq!(driver.used(0), None);
    }

    fn buffer(m: &Machine) -> u64 {
        m.alloc(64, 16)
    }

    /// The dump's view: the guest's indices beside the device's, before
    /// and after the device served a request.
    #[test]
    fn view_shows_both_sides_of_the_ring() {
        let (m, device) = setup();
        assert_eq!(device.borrow().queue_views()[0].to_string(), "off");
        let mut driver = driver(&m, FEATURES, Some(8));
        let buf = m.alloc(8, 8);
        driver.add(0, &[(buf, 8, true)]);
        let view = device.borrow().queue_views()[0];
        assert_eq!(
            (view.avail, view.used, view.next_avail, view.next_used),
            (Some(1), Some(0), 0, 0)
        );
        assert_eq!(
            view.to_string(),
            "size 8 avail 1 used 0, device next_avail 0 next_used 0"
        );
        driver.kick(0);
        let view = device.borrow().queue_views()[0];
        assert_eq!(
            (view.avail, view.used, view.next_avail, view.next_used),
            (Some(1), Some(1), 1, 1)
        );
    }

    #[test]
    fn looping_chain() {
        expect_error(
            8,
            FEATURES,
            |m, q| {
                let b = buffer(m);
                write_desc(&m.mem, q.desc, 0, (b, 8, DESC_F_WRITE | DESC_F_NEXT, 1));
                write_desc(&m.mem, q.desc, 1, (b, 8, DESC_F_WRITE | DESC_F_NEXT, 0));
                0
            },
            QueueError::ChainTooLong,
        );
        // A self-loop on the last entry of a full-size table.
        expect_error(
            QUEUE_SIZE_MAX,
            FEATURES,
            |m, q| {
                let b = buffer(m);
                write_desc(&m.mem, q.desc, 255, (b, 8, DESC_F_WRITE | DESC_F_NEXT, 255));
                255
            },
            QueueError::ChainTooLong,
        );
    }

    #[test]
    fn descriptor_index_out_of_range() {
        expect_error(8, FEATURES, |_, _| 8, QueueError::DescIndex(8));
        expect_error(
            8,
            FEATURES,
            |m, q| {
                write_desc(&m.mem, q.desc, 0, (buffer(m), 8, DESC_F_NEXT, 0xffff));
                0
            },
            QueueError::DescIndex(0xffff),
        );
    }

    #[test]
    fn bad_indirect_tables() {
        let indirect = |len: u32, flags: u16| {
            move |m: &Machine, q: &mut MockQueue| {
                let table = m.alloc(4096 * 2, 16);
                write_desc(&m.mem, table, 0, (buffer(m), 8, DESC_F_WRITE, 0));
                write_desc(&m.mem, q.desc, 0, (table, len, DESC_F_INDIRECT | flags, 1));
                0
            }
        };
        expect_error(
            8,
            VIRTIO_F_VERSION_1,
            indirect(16, 0),
            QueueError::BadIndirect,
        );
        expect_error(8, FEATURES, indirect(0, 0), QueueError::BadIndirect);
        expect_error(8, FEATURES, indirect(24, 0), QueueError::BadIndirect);
        expect_error(8, FEATURES, indirect(16 * 257, 0), QueueError::BadIndirect);
        expect_error(
            8,
            FEATURES,
            indirect(16, DESC_F_NEXT),
            QueueError::BadIndirect,
        );
        expect_error(
            8,
            FEATURES,
            |m, q| {
                let (outer, inner) = (m.alloc(32, 16), m.alloc(16, 16));
                write_desc(&m.mem, inner, 0, (buffer(m), 8, DESC_F_WRITE, 0));
                write_desc(
                    &m.mem,
                    outer,
                    0,
                    (buffer(m), 8, DESC_F_WRITE | DESC_F_NEXT, 1),
                );
                write_desc(&m.mem, outer, 1, (inner, 16, DESC_F_INDIRECT, 0));
                write_desc(&m.mem, q.desc, 0, (outer, 32, DESC_F_INDIRECT, 0));
                0
            },
            QueueError::BadIndirect,
        );
        // Loops and stray indices inside a table.
        expect_error(
            8,
            FEATURES,
            |m, q| {
                let table = m.alloc(48, 16);
                for i in 0..3 {
                    write_desc(
                        &m.mem,
                        table,
                        i,
                        (buffer(m), 8, DESC_F_WRITE | DESC_F_NEXT, (i + 1) % 3),
                    );
                }
                write_desc(&m.mem, q.desc, 0, (table, 48, DESC_F_INDIRECT, 0));
                0
            },
            QueueError::ChainTooLong,
        );
        expect_error(
            8,
            FEATURES,
            |m, q| {
                let table = m.alloc(32, 16);
                write_desc(
                    &m.mem,
                    table,
                    0,
                    (buffer(m), 8, DESC_F_WRITE | DESC_F_NEXT, 2),
                );
                write_desc(&m.mem, q.desc, 0, (table, 32, DESC_F_INDIRECT, 0));
                0
            },
            QueueError::DescIndex(2),
        );
    }

    #[test]
    fn addresses_outside_guest_memory() {
        let outside = MEM_SIZE as u64;
        expect_error(
            8,
            FEATURES,
            |m, q| {
                write_desc(&m.mem, q.desc, 0, (outside - 4, 8, DESC_F_WRITE, 0));
                0
            },
            QueueError::Memory(crate::BadGuestAddress(outside - 4)),
        );
        expect_error(
            8,
            FEATURES,
            |m, q| {
                write_desc(&m.mem, q.desc, 0, (u64::MAX - 2, 8, DESC_F_WRITE, 0));
                0
            },
            QueueError::Memory(crate::BadGuestAddress(u64::MAX - 2)),
        );
        expect_error(
            8,
            FEATURES,
            |m, q| {
                write_desc(&m.mem, q.desc, 0, (outside, 32, DESC_F_INDIRECT, 0));
                0
            },
            QueueError::Memory(crate::BadGuestAddress(outside)),
        );
        // The rings themselves outside memory.
        let (m, device) = setup();
        let mut driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        assert!(driver.negotiate(FEATURES));
        driver.setup_queue(0, Some(8), 0xffff);
        driver.set_status(driver.status() | STATUS_DRIVER_OK);
        let used = driver.queues[0].used;
        driver.add(0, &[(buffer(&m), 8, true)]);
        driver.set_status(0);
        assert!(driver.negotiate(FEATURES));
        driver.write(common::QUEUE_SELECT, 2, 0);
        driver.write(common::QUEUE_SIZE, 2, 8);
        driver.write(common::QUEUE_DESC, 8, driver.queues[0].desc);
        driver.write(common::QUEUE_DRIVER, 8, driver.queues[0].avail);
        driver.write(common::QUEUE_DEVICE, 8, outside);
        driver.write(common::QUEUE_ENABLE, 2, 1);
        driver.set_status(driver.status() | STATUS_DRIVER_OK);
        driver.kick(0);
        assert_eq!(
            device.borrow().last_error(),
            Some(QueueError::Memory(crate::BadGuestAddress(outside + 4)))
        );
        assert_eq!(m.mem.u16(used + 2), 0);
    }

    #[test]
    fn avail_index_jumping_ahead() {
        let (m, device) = setup();
        let mut driver = driver(&m, FEATURES, Some(8));
        driver.queues[0].set_avail_idx(&m.mem, 9);
        driver.kick(0);
        assert_eq!(
            device.borrow().last_error(),
            Some(QueueError::AvailIndex { next: 0, avail: 9 })
        );
        assert_eq!(driver.used(0), None);
    }

    #[test]
    fn a_full_queue_of_maximum_size_in_one_notification() {
        let (m, _) = setup();
        let mut driver = driver(&m, FEATURES, None);
        assert_eq!(driver.queues[0].size, QUEUE_SIZE_MAX);
        let buffers: Vec<u64> = (0..QUEUE_SIZE_MAX).map(|_| m.alloc(8, 8)).collect();
        for &b in &buffers {
            driver.add(0, &[(b, 8, true)]);
        }
        driver.kick(0);
        for i in 0..u32::from(QUEUE_SIZE_MAX) {
            assert_eq!(driver.used(0), Some((i, 8)));
        }
        assert_eq!(driver.used(0), None);
        assert_eq!(m.msi.count(1), 1, "one interrupt for the batch");
        assert!(buffers.iter().all(|&b| m.mem.bytes(b, 8) != [0; 8]));
    }

    #[test]
    fn the_longest_chains_direct_and_indirect() {
        let (m, device) = setup();
        let mut driver = driver(&m, FEATURES, None);
        let chain: Vec<_> = (0..QUEUE_SIZE_MAX)
            .map(|_| (m.alloc(4, 4), 4, true))
            .collect();
        driver.add(0, &chain);
        driver.kick(0);
        assert_eq!(driver.used(0), Some((0, 4 * u32::from(QUEUE_SIZE_MAX))));
        let table = m.alloc(16 * u64::from(QUEUE_SIZE_MAX), 16);
        let head = driver.queues[0].add_indirect(&m.mem, table, &chain);
        driver.kick(0);
        assert_eq!(
            driver.used(0),
            Some((u32::from(head), 4 * u32::from(QUEUE_SIZE_MAX)))
        );
        assert_eq!(device.borrow().last_error(), None);
    }

    #[test]
    fn indices_wrap_around_sixteen_bits() {
        let (m, device) = setup();
        let mut driver = driver(&m, FEATURES, Some(4));
        let b = m.alloc(8, 8);
        for round in 0..(0x1_0000 / 4 + 3) {
            for _ in 0..4 {
                driver.add(0, &[(b, 8, true)]);
            }
            driver.kick(0);
            for _ in 0..4 {
                assert!(driver.used(0).is_some(), "round {round}");
            }
        }
        assert_eq!(device.borrow().last_error(), None);
        assert_eq!(m.mem.u16(driver.queues[0].used + 2), 12);
    }

    #[test]
    fn cursors_split_readable_and_writable_parts() {
        let m = Machine::new();
        let (a, b, c) = (m.alloc_data(b"head"), m.alloc_data(b"er!"), m.alloc(10, 1));
        let chain = Chain {
            head: 0,
            descriptors: vec![
                Descriptor {
                    addr: a,
                    len: 4,
                    writable: false,
                },
                Descriptor {
                    addr: c,
                    len: 6,
                    writable: true,
                },
                Descriptor {
                    addr: b,
                    len: 3,
                    writable: false,
                },
                Descriptor {
                    addr: c + 6,
                    len: 4,
                    writable: true,
                },
            ],
        };
        assert_eq!((chain.readable_len(), chain.writable_len()), (7, 10));
        let mut reader = chain.reader();
        let mut out = [0u8; 16];
        assert_eq!(reader.read(&*m.mem, &mut out[..5]).unwrap(), 5);
        assert_eq!(reader.read(&*m.mem, &mut out[5..]).unwrap(), 2);
        assert_eq!(&out[..7], b"header!");
        assert_eq!(reader.remaining(), 0);
        let mut writer = chain.writer(9);
        writer.skip(2);
        assert_eq!(writer.write(&*m.mem, b"0123456789").unwrap(), 7);
        assert_eq!(m.mem.bytes(c, 10), b"\0\x000123456\0");
        assert_eq!(writer.done(), 9);
    }
}

//! The guest side, for tests and (feature `test-utils`) the fuzz targets:
//! RAM, interrupt recorders, a PCI bus, and a driver that finds and
//! programs a virtio-pci device the way Linux's virtio_pci_modern and
//! virtio_ring do — through CF8/CFC and BAR accesses only, never through
//! the model's Rust API.

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use super::pci::{
    common, VirtioPci, VirtioPciWiring, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};
use super::queue::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use super::VirtioDevice;
use crate::pci::config::{BAR0, CAPABILITIES_POINTER, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crate::pci::{PciConfigIo, PciMmio, PciRoot};
use crate::{BadGuestAddress, BusDevice, GuestMemory, IrqLine, MsiSink, Shared};

pub const MEM_SIZE: usize = 8 << 20;
pub const MMIO_BASE: u64 = 0xe000_0000;
pub const MMIO_LEN: u64 = 0x1000_0000;
pub const MSI_ADDRESS: u64 = 0xfee0_0000;
/// MSI data of vector `v` as the mock driver programs it.
pub const MSI_DATA_BASE: u32 = 0x40;

pub struct TestMemory {
    bytes: RefCell<Vec<u8>>,
}

impl TestMemory {
    fn range(&self, gpa: u64, len: usize) -> Result<core::ops::Range<usize>, BadGuestAddress> {
        let start = usize::try_from(gpa).map_err(|_| BadGuestAddress(gpa))?;
        let end = start.checked_add(len).ok_or(BadGuestAddress(gpa))?;
        if end > self.bytes.borrow().len() {
            return Err(BadGuestAddress(gpa));
        }
        Ok(start..end)
    }

    pub fn bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.read(gpa, &mut out).unwrap();
        out
    }

    pub fn put(&self, gpa: u64, data: &[u8]) {
        self.write(gpa, data).unwrap();
    }

    pub fn u16(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.bytes(gpa, 2).try_into().unwrap())
    }

    pub fn u32(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.bytes(gpa, 4).try_into().unwrap())
    }
}

impl GuestMemory for TestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), BadGuestAddress> {
        let range = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.bytes.borrow()[range]);
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), BadGuestAddress> {
        let range = self.range(gpa, data.len())?;
        self.bytes.borrow_mut()[range].copy_from_slice(data);
        Ok(())
    }
}

#[derive(Default)]
pub struct MsiLog(pub RefCell<Vec<(u64, u32)>>);

impl MsiLog {
    pub fn count(&self, vector: u16) -> usize {
        let data = MSI_DATA_BASE + u32::from(vector);
        self.0
            .borrow()
            .iter()
            .filter(|&&(a, d)| a == MSI_ADDRESS && d == data)
            .count()
    }

    pub fn total(&self) -> usize {
        self.0.borrow().len()
    }
}

impl MsiSink for MsiLog {
    fn send(&self, address: u64, data: u32) {
        self.0.borrow_mut().push((address, data));
    }
}

#[derive(Default)]
pub struct IrqLog {
    pub level: Cell<bool>,
    pub raised: Cell<u32>,
}

impl IrqLine for IrqLog {
    fn set_level(&self, high: bool) {
        if high && !self.level.get() {
            self.raised.set(self.raised.get() + 1);
        }
        self.level.set(high);
    }
}

/// A guest: RAM, a PCI bus with its config ports and MMIO hole, and bump
/// allocators for RAM and BAR space.
pub struct Machine {
    pub mem: Rc<TestMemory>,
    pub msi: Rc<MsiLog>,
    pub irq: Rc<IrqLog>,
    pub root: Shared<PciRoot>,
    pub config_io: RefCell<PciConfigIo>,
    pub mmio: RefCell<PciMmio>,
    heap: Cell<u64>,
    next_bar: Cell<u64>,
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Machine {
    pub fn new() -> Self {
        let root = Rc::new(RefCell::new(PciRoot::new(MMIO_BASE, MMIO_LEN)));
        Self {
            mem: Rc::new(TestMemory {
                bytes: RefCell::new(vec![0; MEM_SIZE]),
            }),
            msi: Rc::default(),
            irq: Rc::default(),
            config_io: RefCell::new(PciConfigIo::new(root.clone())),
            mmio: RefCell::new(PciMmio::new(root.clone())),
            root,
            heap: Cell::new(0x1_0000),
            next_bar: Cell::new(MMIO_BASE),
        }
    }

    pub fn plug<D: VirtioDevice + 'static>(&self, device: D) -> Shared<VirtioPci<D>> {
        let wiring = VirtioPciWiring {
            mem: self.mem.clone(),
            msi: self.msi.clone(),
            intx: self.irq.clone(),
            intx_irq: 11,
        };
        let device = Rc::new(RefCell::new(VirtioPci::new(device, wiring).unwrap()));
        self.root.borrow_mut().add(device.clone()).unwrap();
        device
    }

    /// Guest RAM for rings and buffers.
    pub fn alloc(&self, len: u64, align: u64) -> u64 {
        let at = self.heap.get().next_multiple_of(align);
        self.heap.set(at + len);
        assert!(at + len <= MEM_SIZE as u64, "test memory exhausted");
        at
    }

    pub fn alloc_data(&self, data: &[u8]) -> u64 {
        let at = self.alloc(data.len() as u64, 16);
        self.mem.put(at, data);
        at
    }

    fn alloc_bar(&self, size: u64) -> u64 {
        let at = self.next_bar.get().next_multiple_of(size);
        self.next_bar.set(at + size);
        at
    }

    fn select(&self, device: u8, register: u8) {
        let address = 0x8000_0000u32 | u32::from(device) << 11 | u32::from(register & 0xfc);
        self.config_io.borrow_mut().write(0, &address.to_le_bytes());
    }

    /// Configuration read through CF8/CFC, `width` bytes at `register`.
    pub fn cfg_read(&self, device: u8, register: u8, width: usize) -> u32 {
        self.select(device, register);
        let mut raw = [0u8; 4];
        self.config_io
            .borrow_mut()
            .read(4 + u64::from(register & 3), &mut raw[..width]);
        u32::from_le_bytes(raw)
    }

    pub fn cfg_write(&self, device: u8, register: u8, width: usize, value: u32) {
        self.select(device, register);
        self.config_io
            .borrow_mut()
            .write(4 + u64::from(register & 3), &value.to_le_bytes()[..width]);
    }

    pub fn mmio_read(&self, addr: u64, width: usize) -> u64 {
        let mut raw = [0u8; 8];
        self.mmio
            .borrow_mut()
            .read(addr - MMIO_BASE, &mut raw[..width]);
        u64::from_le_bytes(raw)
    }

    pub fn mmio_write(&self, addr: u64, width: usize, value: u64) {
        self.mmio
            .borrow_mut()
            .write(addr - MMIO_BASE, &value.to_le_bytes()[..width]);
    }
}

/// Write descriptor `index` of the table at `table`: (address, length,
/// flags, next).
pub fn write_desc(
    mem: &TestMemory,
    table: u64,
    index: u16,
    (addr, len, flags, next): (u64, u32, u16, u16),
) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    mem.put(table + 16 * u64::from(index), &raw);
}

/// The driver's view of one split virtqueue.
pub struct MockQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl MockQueue {
    fn new(size: u16, desc: u64, avail: u64, used: u64) -> Self {
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Chain `buffers` (address, length, device-writable) through free
    /// descriptors and make the chain available; returns its head.
    pub fn add(&mut self, mem: &TestMemory, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = self.next_desc;
            let next = (index + 1) % self.size;
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= DESC_F_NEXT;
            }
            write_desc(mem, self.desc, index, (addr, len, flags, next));
            self.next_desc = next;
        }
        self.publish(mem, head);
        head
    }

    /// One descriptor pointing at an indirect table holding `buffers`.
    pub fn add_indirect(
        &mut self,
        mem: &TestMemory,
        table: u64,
        buffers: &[(u64, u32, bool)],
    ) -> u16 {
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= DESC_F_NEXT;
            }
            write_desc(mem, table, i as u16, (addr, len, flags, i as u16 + 1));
        }
        let head = self.next_desc;
        let len = 16 * buffers.len() as u32;
        write_desc(mem, self.desc, head, (table, len, DESC_F_INDIRECT, 0));
        self.next_desc = (head + 1) % self.size;
        self.publish(mem, head);
        head
    }

    /// Put `head` in the available ring and bump the index.
    pub fn publish(&mut self, mem: &TestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.put(self.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.put(self.avail + 2, &self.avail_idx.to_le_bytes());
    }

    pub fn set_avail_idx(&mut self, mem: &TestMemory, idx: u16) {
        self.avail_idx = idx;
        mem.put(self.avail + 2, &idx.to_le_bytes());
    }

    /// The next used element (id, len), if the device returned one.
    pub fn used(&mut self, mem: &TestMemory) -> Option<(u32, u32)> {
        if mem.u16(self.used + 2) == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let id = mem.u32(self.used + 4 + 8 * slot);
        let len = mem.u32(self.used + 8 + 8 * slot);
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }
}

/// Where the capabilities said the regions are.
pub struct Driver<'m> {
    pub m: &'m Machine,
    pub slot: u8,
    pub bar: u64,
    pub bar_size: u64,
    pub common: u64,
    pub notify: u64,
    pub notify_multiplier: u32,
    pub isr: u64,
    pub device_cfg: Option<u64>,
    pub msix_cap: u8,
    pub msix_vectors: u16,
    pub msix_table: u64,
    pub queues: Vec<MockQueue>,
}

const VENDOR_CAP: u32 = 0x09;
const MSIX_CAP: u32 = 0x11;

impl<'m> Driver<'m> {
    /// Enumerate bus 0 for virtio device `device_type`, size and place its
    /// BAR, enable it and parse its capabilities.
    pub fn probe(m: &'m Machine, device_type: u16) -> Self {
        let wanted = 0x1af4 | (0x1040 + u32::from(device_type)) << 16;
        let slot = (0..32)
            .find(|&d| m.cfg_read(d, 0, 4) == wanted)
            .expect("device not found");

        m.cfg_write(slot, BAR0 as u8, 4, u32::MAX);
        m.cfg_write(slot, BAR0 as u8 + 4, 4, u32::MAX);
        let low = m.cfg_read(slot, BAR0 as u8, 4);
        assert_eq!(low & 0b110, 0b100, "64-bit memory BAR");
        let mask = u64::from(m.cfg_read(slot, BAR0 as u8 + 4, 4)) << 32 | u64::from(low & !0xf);
        let bar_size = !mask + 1;
        let bar = m.alloc_bar(bar_size);
        m.cfg_write(slot, BAR0 as u8, 4, bar as u32);
        m.cfg_write(slot, BAR0 as u8 + 4, 4, (bar >> 32) as u32);
        m.cfg_write(
            slot,
            COMMAND as u8,
            2,
            u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER),
        );

        let mut driver = Self {
            m,
            slot,
            bar,
            bar_size,
            common: 0,
            notify: 0,
            notify_multiplier: 0,
            isr: 0,
            device_cfg: None,
            msix_cap: 0,
            msix_vectors: 0,
            msix_table: 0,
            queues: Vec::new(),
        };
        let mut cap = m.cfg_read(slot, CAPABILITIES_POINTER as u8, 1) as u8;
        let mut seen = 0;
        while cap != 0 {
            seen += 1;
            assert!(seen < 48, "capability list loops");
            let id = m.cfg_read(slot, cap, 1);
            let next = m.cfg_read(slot, cap + 1, 1) as u8;
            if id == VENDOR_CAP {
                let cfg_type = m.cfg_read(slot, cap + 3, 1);
                assert_eq!(m.cfg_read(slot, cap + 4, 1), 0, "regions in BAR 0");
                let offset = u64::from(m.cfg_read(slot, cap + 8, 4));
                let length = u64::from(m.cfg_read(slot, cap + 12, 4));
                assert!(offset + length <= bar_size);
                match cfg_type {
                    1 => driver.common = bar + offset,
                    2 => {
                        driver.notify = bar + offset;
                        driver.notify_multiplier = m.cfg_read(slot, cap + 16, 4);
                    }
                    3 => driver.isr = bar + offset,
                    4 => driver.device_cfg = Some(bar + offset),
                    _ => {}
                }
            } else if id == MSIX_CAP {
                driver.msix_cap = cap;
                driver.msix_vectors = m.cfg_read(slot, cap + 2, 2) as u16 & 0x7ff;
                driver.msix_vectors += 1;
                let table = m.cfg_read(slot, cap + 4, 4);
                assert_eq!(table & 7, 0, "table in BAR 0");
                driver.msix_table = bar + u64::from(table);
            }
            cap = next;
        }
        assert!(driver.common != 0 && driver.notify != 0 && driver.isr != 0);
        driver
    }

    pub fn read(&self, offset: u64, width: usize) -> u64 {
        self.m.mmio_read(self.common + offset, width)
    }

    pub fn write(&self, offset: u64, width: usize, value: u64) {
        self.m.mmio_write(self.common + offset, width, value);
    }

    pub fn status(&self) -> u8 {
        self.read(common::DEVICE_STATUS, 1) as u8
    }

    pub fn set_status(&self, status: u8) {
        self.write(common::DEVICE_STATUS, 1, u64::from(status));
    }

    pub fn device_features(&self) -> u64 {
        self.write(common::DEVICE_FEATURE_SELECT, 4, 0);
        let low = self.read(common::DEVICE_FEATURE, 4);
        self.write(common::DEVICE_FEATURE_SELECT, 4, 1);
        low | self.read(common::DEVICE_FEATURE, 4) << 32
    }

    /// Reset, acknowledge, offer `features` as the driver's: returns whether
    /// FEATURES_OK stuck.
    pub fn negotiate(&self, features: u64) -> bool {
        self.set_status(0);
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for select in 0..2u64 {
            self.write(common::DRIVER_FEATURE_SELECT, 4, select);
            self.write(
                common::DRIVER_FEATURE,
                4,
                (features >> (32 * select)) & 0xffff_ffff,
            );
        }
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        self.status() & STATUS_FEATURES_OK != 0
    }

    /// Program every MSI-X vector (data = MSI_DATA_BASE + vector), unmask
    /// them and enable MSI-X, as `pci_alloc_irq_vectors` + `request_irq` do.
    pub fn enable_msix(&self) {
        let control = self.msix_cap + 2;
        self.m.cfg_write(self.slot, control, 2, 0xc000);
        for vector in 0..u64::from(self.msix_vectors) {
            let entry = self.msix_table + 16 * vector;
            self.m.mmio_write(entry, 4, MSI_ADDRESS);
            self.m.mmio_write(entry + 4, 4, 0);
            self.m
                .mmio_write(entry + 8, 4, u64::from(MSI_DATA_BASE) + vector);
            self.m.mmio_write(entry + 12, 4, 0);
        }
        self.m.cfg_write(self.slot, control, 2, 0x8000);
    }

    /// Set up queue `index` at the size the device offers (or `size`), with
    /// MSI-X `vector`; returns the vector the device accepted.
    pub fn setup_queue(&mut self, index: u16, size: Option<u16>, vector: u16) -> u16 {
        self.write(common::QUEUE_SELECT, 2, u64::from(index));
        let offered = self.read(common::QUEUE_SIZE, 2) as u16;
        assert!(offered.is_power_of_two());
        assert_eq!(self.read(common::QUEUE_ENABLE, 2), 0);
        let size = size.unwrap_or(offered);
        self.write(common::QUEUE_SIZE, 2, u64::from(size));
        let slot = usize::from(index);
        let n = u64::from(size);
        // Rings of an earlier bring-up of the same size are reused, zeroed.
        let queue = match self.queues.get(slot).filter(|q| q.size == size) {
            Some(old) => {
                self.m.mem.put(old.desc, &vec![0; 16 * usize::from(size)]);
                self.m
                    .mem
                    .put(old.avail, &vec![0; 6 + 2 * usize::from(size)]);
                self.m
                    .mem
                    .put(old.used, &vec![0; 6 + 8 * usize::from(size)]);
                MockQueue::new(size, old.desc, old.avail, old.used)
            }
            None => MockQueue::new(
                size,
                self.m.alloc(16 * n, 16),
                self.m.alloc(6 + 2 * n, 2),
                self.m.alloc(6 + 8 * n, 4),
            ),
        };
        // vp_iowrite64_twopart: low half, then high half.
        for (field, addr) in [
            (common::QUEUE_DESC, queue.desc),
            (common::QUEUE_DRIVER, queue.avail),
            (common::QUEUE_DEVICE, queue.used),
        ] {
            self.write(field, 4, addr & 0xffff_ffff);
            self.write(field + 4, 4, addr >> 32);
        }
        self.write(common::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        let accepted = self.read(common::QUEUE_MSIX_VECTOR, 2) as u16;
        assert_eq!(self.read(common::QUEUE_NOTIFY_OFF, 2), u64::from(index));
        self.write(common::QUEUE_ENABLE, 2, 1);
        if self.queues.len() <= slot {
            self.queues
                .resize_with(slot + 1, || MockQueue::new(0, 0, 0, 0));
        }
        self.queues[slot] = queue;
        accepted
    }

    /// The whole Linux bring-up: negotiate, MSI-X with vector 0 for config
    /// and `q + 1` for queue `q`, all `queues` set up, DRIVER_OK.
    pub fn bring_up(&mut self, features: u64, queues: u16) {
        assert!(self.negotiate(features), "features refused");
        self.enable_msix();
        self.write(common::MSIX_CONFIG, 2, 0);
        assert_eq!(self.read(common::MSIX_CONFIG, 2), 0);
        for q in 0..queues {
            assert_eq!(self.setup_queue(q, None, q + 1), q + 1);
        }
        self.set_status(self.status() | STATUS_DRIVER_OK);
    }

    pub fn kick(&self, queue: u16) {
        let addr = self.notify + u64::from(queue) * u64::from(self.notify_multiplier);
        self.m.mmio_write(addr, 2, u64::from(queue));
    }

    pub fn add(&mut self, queue: u16, buffers: &[(u64, u32, bool)]) -> u16 {
        self.queues[usize::from(queue)].add(&self.m.mem, buffers)
    }

    pub fn used(&mut self, queue: u16) -> Option<(u32, u32)> {
        self.queues[usize::from(queue)].used(&self.m.mem)
    }

    pub fn config_read(&self, offset: u64, width: usize) -> u64 {
        self.m
            .mmio_read(self.device_cfg.expect("device config") + offset, width)
    }
}

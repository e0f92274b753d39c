//! virtio over PCI, modern interface only: vendor 0x1af4, device 0x1040 +
//! type, revision 1. One 64-bit memory BAR holds every region the
//! vendor-specific capabilities point at, plus the MSI-X table and PBA:
//!
//! | BAR offset | region                                  |
//! |------------|-----------------------------------------|
//! | 0x0000     | common configuration                    |
//! | 0x1000     | ISR status (read clears)                |
//! | 0x2000     | device configuration                    |
//! | 0x3000     | notifications, queue `n` at `4 * n`     |
//! | 0x4000     | MSI-X table (`queues + 1` vectors)      |
//! | 0x5000     | MSI-X pending bits                      |
//!
//! Without MSI-X the device raises INTx (pin A) through an [`IrqLine`],
//! level-triggered while ISR status is non-zero.

use alloc::rc::Rc;
use alloc::vec::Vec;

use super::queue::{Queue, QueueError, NO_VECTOR, QUEUE_SIZE_MAX};
use super::{
    read_config_image, DeviceIo, VirtioDevice, DEVICE_TYPE_BLOCK, DEVICE_TYPE_CONSOLE,
    DEVICE_TYPE_NET, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::pci::config::{COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, INTERRUPT_LINE};
use crate::pci::{BarWidth, ConfigSpace, Msix, PciDevice, PciError, PciIds};
use crate::{GuestMemory, IrqLine, MsiSink};

pub const VENDOR_ID: u16 = 0x1af4;
pub const DEVICE_ID_BASE: u16 = 0x1040;
const REVISION: u8 = 1;

const CAP_ID_VENDOR: u8 = 0x09;
const CFG_TYPE_COMMON: u8 = 1;
const CFG_TYPE_NOTIFY: u8 = 2;
const CFG_TYPE_ISR: u8 = 3;
const CFG_TYPE_DEVICE: u8 = 4;
const VIRTIO_CAP_LEN: u8 = 16;
const NOTIFY_CAP_LEN: u8 = 20;

pub const BAR_INDEX: usize = 0;
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_CFG: u64 = 0x0000;
pub const ISR_CFG: u64 = 0x1000;
pub const DEVICE_CFG: u64 = 0x2000;
pub const NOTIFY_CFG: u64 = 0x3000;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x5000;
const REGION_LEN: u64 = 0x1000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// One MSI-X vector per queue plus one for configuration changes, all in
/// one 4 KiB table.
const MAX_QUEUES: u16 = (REGION_LEN / 16) as u16 - 1;

/// Offsets in the common configuration structure.
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    pub const LEN: usize = 0x38;
}

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;
const INTERRUPT_PIN_A: u8 = 1;

/// Where a virtio device's interrupts and DMA go.
pub struct VirtioPciWiring {
    pub mem: Rc<dyn GuestMemory>,
    pub msi: Rc<dyn MsiSink>,
    pub intx: Rc<dyn IrqLine>,
    /// What firmware would have written to Interrupt Line: the legacy IRQ
    /// `intx` is wired to.
    pub intx_irq: u8,
}

pub struct VirtioPci<D> {
    device: D,
    config: ConfigSpace,
    msix: Msix,
    wiring: VirtioPciWiring,
    intx_asserted: bool,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<Queue>,
    msix_config: u16,
    isr: u8,
    last_error: Option<QueueError>,
}

fn pci_class(device_type: u16) -> (u8, u8) {
    match device_type {
        DEVICE_TYPE_NET => (0x02, 0x00),
        DEVICE_TYPE_BLOCK => (0x01, 0x00),
        DEVICE_TYPE_CONSOLE => (0x07, 0x80),
        _ => (0xff, 0x00),
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64) -> [u8; VIRTIO_CAP_LEN as usize - 2] {
    let mut body = [0u8; VIRTIO_CAP_LEN as usize - 2];
    body[0] = VIRTIO_CAP_LEN;
    body[1] = cfg_type;
    body[2] = BAR_INDEX as u8;
    body[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
    body[10..14].copy_from_slice(&(length as u32).to_le_bytes());
    body
}

impl<D: VirtioDevice> VirtioPci<D> {
    pub fn new(device: D, wiring: VirtioPciWiring) -> Result<Self, PciError> {
        let device_type = device.device_type();
        let queue_count = device.queue_count();
        if queue_count > MAX_QUEUES || device.config_len() as u64 > REGION_LEN {
            return Err(PciError::Layout);
        }
        let (class, subclass) = pci_class(device_type);
        let mut config = ConfigSpace::new(&PciIds {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID_BASE + device_type,
            revision: REVISION,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VENDOR_ID,
            subsystem_id: device_type,
        });
        config.add_mem_bar(BAR_INDEX, BAR_SIZE, BarWidth::Bits64)?;
        config.set_interrupt_pin(INTERRUPT_PIN_A);
        config.write(INTERRUPT_LINE, &[wiring.intx_irq]);

        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(CFG_TYPE_COMMON, COMMON_CFG, common::LEN as u64),
        )?;
        let notify_len = u64::from(queue_count) * u64::from(NOTIFY_OFF_MULTIPLIER);
        let mut notify = [0u8; NOTIFY_CAP_LEN as usize - 2];
        notify[..14].copy_from_slice(&virtio_cap(CFG_TYPE_NOTIFY, NOTIFY_CFG, notify_len));
        notify[0] = NOTIFY_CAP_LEN;
        notify[14..18].copy_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        config.add_capability(CAP_ID_VENDOR, &notify)?;
        config.add_capability(CAP_ID_VENDOR, &virtio_cap(CFG_TYPE_ISR, ISR_CFG, 1))?;
        if device.config_len() > 0 {
            config.add_capability(
                CAP_ID_VENDOR,
                &virtio_cap(CFG_TYPE_DEVICE, DEVICE_CFG, device.config_len() as u64),
            )?;
        }
        let msix = Msix::new(
            &mut config,
            queue_count + 1,
            BAR_INDEX as u8,
            MSIX_TABLE as u32,
            MSIX_PBA as u32,
        )?;

        Ok(Self {
            device,
            config,
            msix,
            wiring,
            intx_asserted: false,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues: (0..queue_count)
                .map(|_| Queue::new(QUEUE_SIZE_MAX))
                .collect(),
            msix_config: NO_VECTOR,
            isr: 0,
            last_error: None,
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// Change the device from the host side (queue input, open a port...),
    /// then let it use its queues right away.
    pub fn update<R>(&mut self, change: impl FnOnce(&mut D) -> R) -> R {
        let result = change(&mut self.device);
        self.run();
        result
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    /// Each queue's indices, for the VMM's state dump.
    pub fn queue_views(&self) -> Vec<super::queue::QueueView> {
        self.queues
            .iter()
            .map(|q| q.view(self.wiring.mem.as_ref()))
            .collect()
    }

    /// Why the device last set NEEDS_RESET, for the VMM's log.
    pub fn last_error(&self) -> Option<QueueError> {
        self.last_error
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC
    }

    fn live(&self) -> bool {
        let needed = STATUS_DRIVER_OK | STATUS_FEATURES_OK;
        self.status & needed == needed
            && self.status & (STATUS_NEEDS_RESET | STATUS_FAILED) == 0
            && self.config.command() & COMMAND_BUS_MASTER != 0
    }

    /// Let the device work, then raise the interrupts it asked for.
    fn run(&mut self) {
        if !self.live() {
            return;
        }
        self.queues.iter_mut().for_each(Queue::start_round);
        let mut io = DeviceIo::new(&*self.wiring.mem, &mut self.queues, self.driver_features);
        let result = self.device.process(&mut io);
        for index in 0..self.queues.len() {
            if self.queues[index].take_signal() {
                self.interrupt(self.queues[index].msix_vector, ISR_QUEUE);
            }
        }
        if let Err(error) = result {
            self.fail(error);
        }
    }

    /// The guest broke the device: stop using it until reset, and tell the
    /// driver through a configuration interrupt.
    fn fail(&mut self, error: QueueError) {
        self.status |= STATUS_NEEDS_RESET;
        self.last_error = Some(error);
        self.interrupt(self.msix_config, ISR_CONFIG);
    }

    fn interrupt(&mut self, vector: u16, isr: u8) {
        if self.msix.enabled(&self.config) {
            self.msix.notify(&self.config, vector, &*self.wiring.msi);
        } else {
            self.isr |= isr;
            self.update_intx();
        }
    }

    fn update_intx(&mut self) {
        let pending = self.isr != 0 && !self.msix.enabled(&self.config);
        self.config.set_interrupt_status(pending);
        let level = pending && self.config.command() & COMMAND_INTX_DISABLE == 0;
        if level != self.intx_asserted {
            self.intx_asserted = level;
            self.wiring.intx.set_level(level);
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.msix_config = NO_VECTOR;
        self.isr = 0;
        self.queues.iter_mut().for_each(Queue::reset);
        self.device.reset();
        self.update_intx();
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let was_live = self.live();
        let mut status = value & !STATUS_NEEDS_RESET;
        // FEATURES_OK sticks only if the device accepts the driver's subset.
        let acceptable = self.driver_features & !self.offered_features() == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0;
        if self.status & STATUS_FEATURES_OK == 0 && !acceptable {
            status &= !STATUS_FEATURES_OK;
        }
        self.status = status | (self.status & STATUS_NEEDS_RESET);
        if !was_live {
            self.run();
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// A vector the table has, or NO_VECTOR: what the driver reads back
    /// tells it whether the assignment took.
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn common_image(&self) -> [u8; common::LEN] {
        let mut image = [0u8; common::LEN];
        let mut put = |offset: u64, bytes: &[u8]| {
            let at = offset as usize;
            image[at..at + bytes.len()].copy_from_slice(bytes);
        };
        let device_features = match self.device_feature_select {
            0 => self.offered_features() as u32,
            1 => (self.offered_features() >> 32) as u32,
            _ => 0,
        };
        let driver_features = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(
            common::DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(common::DEVICE_FEATURE, &device_features.to_le_bytes());
        put(
            common::DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        put(common::DRIVER_FEATURE, &driver_features.to_le_bytes());
        put(common::MSIX_CONFIG, &self.msix_config.to_le_bytes());
        put(
            common::NUM_QUEUES,
            &(self.queues.len() as u16).to_le_bytes(),
        );
        put(common::DEVICE_STATUS, &[self.status]);
        // Device configurations never change: config_generation stays 0.
        put(common::QUEUE_SELECT, &self.queue_select.to_le_bytes());
        if let Some(queue) = self.selected_queue() {
            put(common::QUEUE_SIZE, &queue.size.to_le_bytes());
            put(common::QUEUE_MSIX_VECTOR, &queue.msix_vector.to_le_bytes());
            put(common::QUEUE_ENABLE, &u16::from(queue.ready).to_le_bytes());
            put(common::QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(common::QUEUE_DESC, &queue.desc_table.to_le_bytes());
            put(common::QUEUE_DRIVER, &queue.avail_ring.to_le_bytes());
            put(common::QUEUE_DEVICE, &queue.used_ring.to_le_bytes());
        }
        image
    }

    /// Writes must hit a field with its natural width (64-bit fields also
    /// as two 32-bit halves); anything else is ignored.
    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let Some(dst) = raw.get_mut(..data.len()) else {
            return;
        };
        dst.copy_from_slice(data);
        let value = u64::from_le_bytes(raw);
        let features_locked = self.status & STATUS_FEATURES_OK != 0;
        match (offset, data.len()) {
            (common::DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (common::DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (common::DRIVER_FEATURE, 4) if !features_locked => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | value << 32,
                _ => {}
            },
            (common::MSIX_CONFIG, 2) => self.msix_config = self.checked_vector(value as u16),
            (common::DEVICE_STATUS, 1) => self.set_status(value as u8),
            (common::QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (common::QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.checked_vector(value as u16);
                if let Some(queue) = self.queues.get_mut(usize::from(self.queue_select)) {
                    queue.msix_vector = vector;
                }
            }
            _ => self.write_queue_setup(offset, data.len(), value),
        }
    }

    /// Size, ring addresses and enable of the selected queue, frozen once
    /// it is enabled.
    fn write_queue_setup(&mut self, offset: u64, len: usize, value: u64) {
        let Some(queue) = self.queues.get_mut(usize::from(self.queue_select)) else {
            return;
        };
        if queue.ready {
            return;
        }
        let field = match offset {
            common::QUEUE_DESC..=0x27 => &mut queue.desc_table,
            common::QUEUE_DRIVER..=0x2f => &mut queue.avail_ring,
            common::QUEUE_DEVICE..=0x37 => &mut queue.used_ring,
            common::QUEUE_SIZE if len == 2 => {
                queue.size = value as u16;
                return;
            }
            common::QUEUE_ENABLE if len == 2 && value == 1 => {
                if let Err(error) = queue.enable() {
                    self.fail(error);
                }
                return;
            }
            _ => return,
        };
        match (offset % 8, len) {
            (0, 8) => *field = value,
            (0, 4) => *field = (*field & !0xffff_ffff) | value,
            (4, 4) => *field = (*field & 0xffff_ffff) | value << 32,
            _ => {}
        }
    }

    fn read_isr(&mut self, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = core::mem::take(&mut self.isr);
        }
        self.update_intx();
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPci<D> {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_written(&mut self, _offset: usize, _len: usize) {
        self.msix.config_written(&self.config, &*self.wiring.msi);
        self.update_intx();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let region = offset & !(REGION_LEN - 1);
        let inner = offset - region;
        match region {
            _ if bar != BAR_INDEX => data.fill(0xff),
            COMMON_CFG => read_config_image(&self.common_image(), inner, data),
            ISR_CFG if inner == 0 => self.read_isr(data),
            DEVICE_CFG => self.device.read_config(inner, data),
            MSIX_TABLE => self.msix.read_table(inner, data),
            MSIX_PBA => self.msix.read_pba(inner, data),
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let region = offset & !(REGION_LEN - 1);
        let inner = offset - region;
        match region {
            _ if bar != BAR_INDEX => {}
            COMMON_CFG => self.write_common(inner, data),
            NOTIFY_CFG => {
                let queue = inner / u64::from(NOTIFY_OFF_MULTIPLIER);
                if inner.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER))
                    && queue < self.queues.len() as u64
                {
                    self.run();
                }
            }
            MSIX_TABLE => self
                .msix
                .write_table(&self.config, inner, data, &*self.wiring.msi),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{COMMAND, STATUS, STATUS_INTERRUPT};
    use crate::virtio::mock::{Driver, Machine, MSI_ADDRESS, MSI_DATA_BASE};
    use crate::virtio::queue::AVAIL_F_NO_INTERRUPT;
    use crate::virtio::rng::{Rng, SplitMix64};
    use crate::virtio::DEVICE_TYPE_ENTROPY;
    use alloc::boxed::Box;

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC;

    fn rng_machine() -> (Machine, Rc<core::cell::RefCell<VirtioPci<Rng>>>) {
        let m = Machine::new();
        let device = m.plug(Rng::new(Box::new(SplitMix64(3))));
        (m, device)
    }

    /// One 16-byte entropy request on queue 0; returns its used element.
    fn request(driver: &mut Driver) -> Option<(u32, u32)> {
        let buf = driver.m.alloc(16, 8);
        driver.add(0, &[(buf, 16, true)]);
        driver.kick(0);
        driver.used(0)
    }

    #[test]
    fn identifies_as_a_modern_virtio_device() {
        let (m, _) = rng_machine();
        let driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        let slot = driver.slot;
        assert_eq!(m.cfg_read(slot, 0x08, 1), u32::from(REVISION));
        assert_eq!(m.cfg_read(slot, 0x2c, 2), u32::from(VENDOR_ID));
        assert_eq!(m.cfg_read(slot, 0x2e, 2), u32::from(DEVICE_TYPE_ENTROPY));
        assert_eq!(m.cfg_read(slot, 0x3d, 1), 1, "INTx pin A");
        assert_eq!(m.cfg_read(slot, 0x3c, 1), 11, "interrupt line as wired");
        assert_eq!(driver.bar_size, BAR_SIZE);
        assert_eq!(driver.common, driver.bar + COMMON_CFG);
        assert_eq!(driver.isr, driver.bar + ISR_CFG);
        assert_eq!(driver.notify, driver.bar + NOTIFY_CFG);
        assert_eq!(driver.notify_multiplier, NOTIFY_OFF_MULTIPLIER);
        assert_eq!(driver.msix_vectors, 2, "one per queue plus config");
        assert_eq!(driver.msix_table, driver.bar + MSIX_TABLE);
        assert_eq!(driver.read(common::NUM_QUEUES, 2), 1);
    }

    #[test]
    fn features_ok_only_for_an_acceptable_subset() {
        let (m, _) = rng_machine();
        let driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        assert_eq!(driver.device_features(), FEATURES);
        assert!(
            !driver.negotiate(FEATURES | 1 << 40),
            "feature never offered"
        );
        assert!(
            !driver.negotiate(VIRTIO_F_RING_INDIRECT_DESC),
            "legacy driver"
        );
        assert!(
            driver.negotiate(VIRTIO_F_VERSION_1),
            "driver may refuse features"
        );
        // Once FEATURES_OK is set, the driver's features are frozen.
        driver.write(common::DRIVER_FEATURE_SELECT, 4, 0);
        driver.write(common::DRIVER_FEATURE, 4, 0xffff_ffff);
        assert_eq!(driver.read(common::DRIVER_FEATURE, 4), 0);
        driver.write(common::DRIVER_FEATURE_SELECT, 4, 1);
        assert_eq!(driver.read(common::DRIVER_FEATURE, 4), 1);
    }

    #[test]
    fn queue_registers_follow_the_selector() {
        let (m, _) = rng_machine();
        let driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        assert!(driver.negotiate(FEATURES));
        driver.write(common::QUEUE_SELECT, 2, 0);
        assert_eq!(
            driver.read(common::QUEUE_SIZE, 2),
            u64::from(QUEUE_SIZE_MAX)
        );
        assert_eq!(
            driver.read(common::QUEUE_MSIX_VECTOR, 2),
            u64::from(NO_VECTOR)
        );
        driver.write(common::QUEUE_SIZE, 2, 64);
        assert_eq!(driver.read(common::QUEUE_SIZE, 2), 64);
        driver.write(common::QUEUE_MSIX_VECTOR, 2, 2);
        assert_eq!(
            driver.read(common::QUEUE_MSIX_VECTOR, 2),
            u64::from(NO_VECTOR),
            "table has vectors 0 and 1"
        );
        driver.write(common::QUEUE_MSIX_VECTOR, 2, 1);
        assert_eq!(driver.read(common::QUEUE_MSIX_VECTOR, 2), 1);
        driver.write(common::QUEUE_DESC, 8, 0x1_2345_6780);
        assert_eq!(driver.read(common::QUEUE_DESC, 8), 0x1_2345_6780);
        driver.write(common::QUEUE_DESC + 4, 4, 0);
        assert_eq!(driver.read(common::QUEUE_DESC, 4), 0x2345_6780);
        assert_eq!(driver.read(common::QUEUE_DESC + 4, 4), 0);

        driver.write(common::QUEUE_SELECT, 2, 1);
        driver.write(common::QUEUE_SIZE, 2, 16);
        assert_eq!(driver.read(common::QUEUE_SIZE, 2), 0, "no queue 1");
        assert_eq!(driver.read(common::QUEUE_SELECT, 2), 1);
        driver.write(common::QUEUE_ENABLE, 2, 1);
        assert_eq!(driver.read(common::QUEUE_ENABLE, 2), 0);
        driver.write(common::MSIX_CONFIG, 2, 7);
        assert_eq!(driver.read(common::MSIX_CONFIG, 2), u64::from(NO_VECTOR));
    }

    #[test]
    fn enabled_queues_are_frozen_and_checked() {
        let (m, device) = rng_machine();
        let mut driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        assert!(driver.negotiate(FEATURES));
        driver.setup_queue(0, Some(32), 1);
        let desc = driver.read(common::QUEUE_DESC, 8);
        driver.write(common::QUEUE_DESC, 8, 0x9990);
        driver.write(common::QUEUE_SIZE, 2, 4);
        assert_eq!(driver.read(common::QUEUE_DESC, 8), desc);
        assert_eq!(driver.read(common::QUEUE_SIZE, 2), 32);

        for bad in [
            (common::QUEUE_SIZE, 2, 100),
            (common::QUEUE_SIZE, 2, 512),
            (common::QUEUE_DESC, 8, 0x1008),
        ] {
            assert!(driver.negotiate(FEATURES));
            driver.write(common::QUEUE_SELECT, 2, 0);
            driver.write(bad.0, bad.1, bad.2);
            driver.write(common::QUEUE_ENABLE, 2, 1);
            assert_eq!(driver.read(common::QUEUE_ENABLE, 2), 0, "{bad:?}");
            assert_ne!(driver.status() & STATUS_NEEDS_RESET, 0, "{bad:?}");
            assert_eq!(device.borrow().last_error(), Some(QueueError::BadConfig));
        }
    }

    #[test]
    fn nothing_moves_before_driver_ok_or_without_bus_mastering() {
        let (m, _) = rng_machine();
        let mut driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        assert!(driver.negotiate(FEATURES));
        driver.enable_msix();
        driver.setup_queue(0, None, 1);
        assert_eq!(request(&mut driver), None);
        // DRIVER_OK without bus mastering: still nothing.
        m.cfg_write(driver.slot, COMMAND as u8, 2, 0x2);
        driver.set_status(driver.status() | STATUS_DRIVER_OK);
        driver.kick(0);
        assert_eq!(driver.used(0), None);
        m.cfg_write(driver.slot, COMMAND as u8, 2, 0x6);
        driver.kick(0);
        assert_eq!(driver.used(0), Some((0, 16)));
    }

    #[test]
    fn driver_ok_without_features_ok_does_nothing() {
        let (m, _) = rng_machine();
        let mut driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        assert!(!driver.negotiate(1 << 40));
        driver.setup_queue(0, None, NO_VECTOR);
        driver.set_status(driver.status() | STATUS_DRIVER_OK);
        assert_eq!(request(&mut driver), None);
    }

    #[test]
    fn intx_follows_isr_without_msix() {
        let (m, _) = rng_machine();
        let mut driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        assert!(driver.negotiate(FEATURES));
        driver.setup_queue(0, None, NO_VECTOR);
        driver.set_status(driver.status() | STATUS_DRIVER_OK);
        assert!(request(&mut driver).is_some());
        assert!(m.irq.level.get());
        assert_ne!(
            m.cfg_read(driver.slot, STATUS as u8, 2) & u32::from(STATUS_INTERRUPT),
            0
        );
        assert_eq!(m.mmio_read(driver.isr + 1, 1), 0xff, "ISR is one byte");
        assert_eq!(m.mmio_read(driver.isr, 1), u64::from(ISR_QUEUE));
        assert!(!m.irq.level.get(), "reading ISR deasserts");
        assert_eq!(m.mmio_read(driver.isr, 1), 0);
        assert_eq!(
            m.cfg_read(driver.slot, STATUS as u8, 2) & u32::from(STATUS_INTERRUPT),
            0
        );

        // INTx disabled: ISR still records, the line stays low until enabled.
        m.cfg_write(
            driver.slot,
            COMMAND as u8,
            2,
            u32::from(0x6 | COMMAND_INTX_DISABLE),
        );
        assert!(request(&mut driver).is_some());
        assert!(!m.irq.level.get());
        m.cfg_write(driver.slot, COMMAND as u8, 2, 0x6);
        assert!(m.irq.level.get());
        // Enabling MSI-X takes the line down too.
        driver.enable_msix();
        assert!(!m.irq.level.get());
        assert_eq!(m.irq.raised.get(), 2);
        assert_eq!(m.msi.total(), 0, "queue has no vector");
    }

    #[test]
    fn masked_vectors_are_delivered_on_unmask() {
        let (m, _) = rng_machine();
        let mut driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        driver.bring_up(FEATURES, 1);
        let control = driver.msix_cap + 2;
        m.cfg_write(driver.slot, control, 2, 0xc000);
        assert!(request(&mut driver).is_some());
        assert_eq!(m.msi.total(), 0);
        m.mmio_write(driver.msix_table + 16 + 12, 4, 1);
        m.cfg_write(driver.slot, control, 2, 0x8000);
        assert_eq!(m.msi.total(), 0, "entry still masked");
        assert_eq!(m.mmio_read(driver.bar + MSIX_PBA, 8), 0b10);
        m.mmio_write(driver.msix_table + 16 + 12, 4, 0);
        assert_eq!(*m.msi.0.borrow(), vec![(MSI_ADDRESS, MSI_DATA_BASE + 1)]);
        assert_eq!(m.mmio_read(driver.bar + MSIX_PBA, 8), 0);
    }

    #[test]
    fn no_interrupt_flag_suppresses_the_signal() {
        let (m, _) = rng_machine();
        let mut driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        driver.bring_up(FEATURES, 1);
        m.mem
            .put(driver.queues[0].avail, &AVAIL_F_NO_INTERRUPT.to_le_bytes());
        assert!(request(&mut driver).is_some());
        assert_eq!(m.msi.total(), 0);
        m.mem.put(driver.queues[0].avail, &0u16.to_le_bytes());
        assert!(request(&mut driver).is_some());
        assert_eq!(m.msi.count(1), 1);
    }

    #[test]
    fn reset_in_the_middle_forgets_everything() {
        let (m, _) = rng_machine();
        let mut driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        driver.bring_up(FEATURES, 1);
        assert_eq!(request(&mut driver), Some((0, 16)));
        // A request made available but not yet processed, then reset.
        let buf = m.alloc(16, 8);
        driver.add(0, &[(buf, 16, true)]);
        driver.set_status(0);
        driver.kick(0);
        assert_eq!(driver.used(0), None, "a reset device does no work");
        assert_eq!(driver.status(), 0);
        driver.write(common::QUEUE_SELECT, 2, 0);
        assert_eq!(driver.read(common::QUEUE_ENABLE, 2), 0);
        assert_eq!(
            driver.read(common::QUEUE_SIZE, 2),
            u64::from(QUEUE_SIZE_MAX)
        );
        assert_eq!(
            driver.read(common::QUEUE_MSIX_VECTOR, 2),
            u64::from(NO_VECTOR)
        );
        assert_eq!(driver.read(common::QUEUE_DESC, 8), 0);
        assert_eq!(driver.read(common::MSIX_CONFIG, 2), u64::from(NO_VECTOR));
        driver.write(common::DRIVER_FEATURE_SELECT, 4, 1);
        assert_eq!(driver.read(common::DRIVER_FEATURE, 4), 0);

        // A fresh bring-up on new rings starts again at index 0.
        driver.bring_up(FEATURES, 1);
        assert_eq!(request(&mut driver), Some((0, 16)));
        assert_eq!(m.mem.u16(driver.queues[0].used + 2), 1);
    }

    #[test]
    fn malformed_register_accesses_are_harmless() {
        let (m, _) = rng_machine();
        let driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        assert!(driver.negotiate(FEATURES));
        // Reads of any width at any offset see the same bytes.
        let whole: Vec<u8> = (0..common::LEN as u64)
            .map(|o| driver.read(o, 1) as u8)
            .collect();
        assert_eq!(
            u16::from_le_bytes([whole[0x12], whole[0x13]]),
            1,
            "num_queues"
        );
        assert_eq!(
            driver.read(0x11, 4),
            u64::from(u32::from_le_bytes(whole[0x11..0x15].try_into().unwrap()))
        );
        assert_eq!(
            driver.read(common::LEN as u64, 4),
            0xffff_ffff,
            "past the structure"
        );
        // Writes of the wrong width or misaligned are ignored.
        driver.write(common::QUEUE_SELECT, 1, 5);
        driver.write(common::QUEUE_SELECT + 1, 1, 5);
        driver.write(common::QUEUE_SELECT, 4, 0x0005_0005);
        assert_eq!(driver.read(common::QUEUE_SELECT, 2), 0);
        driver.write(common::DEVICE_STATUS, 2, 0);
        driver.write(common::DEVICE_STATUS - 1, 2, 0);
        assert_ne!(driver.status() & STATUS_FEATURES_OK, 0);
        driver.write(common::QUEUE_DESC + 2, 4, 0xdead);
        driver.write(common::QUEUE_DESC + 1, 8, 0xdead);
        assert_eq!(driver.read(common::QUEUE_DESC, 8), 0);
        // Stray accesses elsewhere in the BAR.
        for offset in [
            NOTIFY_CFG + 1,
            NOTIFY_CFG + 4,
            ISR_CFG + 2,
            0x6000,
            BAR_SIZE - 1,
            MSIX_PBA,
        ] {
            m.mmio_write(driver.bar + offset, 1, 0xff);
        }
        assert_eq!(m.mmio_read(driver.bar + 0x6000, 4), 0xffff_ffff);
        assert_eq!(
            m.mmio_read(driver.bar + BAR_SIZE - 2, 4),
            0xffff_ffff,
            "straddles the BAR's end"
        );
        assert_eq!(m.mmio_read(driver.bar + MSIX_PBA, 8), 0, "PBA is read-only");
        assert_eq!(driver.status() & STATUS_NEEDS_RESET, 0);
    }
}

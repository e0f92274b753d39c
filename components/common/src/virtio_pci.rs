//! The virtio 1.x PCI transport as a driver sees it (modern interface,
//! virtio 1.2 section 4.1): the vendor capabilities that place the common
//! configuration, notify and device structures in the BARs, MSI-X entry
//! 0, the initialization sequence and a split queue's registers. Shared
//! by the `blk` and `net` drivers; the device's own protocol is theirs.
//!
//! Everything is reached through [`Window`]s the root task mapped (the
//! function's configuration page and its BARs, uncached): a structure
//! that lies outside the BARs given to the driver is an error, never an
//! access elsewhere.

use moat_user::mmio::Window;

// PCI configuration space.
const PCI_COMMAND: u64 = 0x04;
const PCI_CAPABILITIES: u64 = 0x34;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Capabilities followed before the list is taken as a loop.
const MAX_CAPABILITIES: u32 = 48;

// Capability types and the common configuration's registers.
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_DEVICE: u8 = 4;
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const NO_VECTOR: u16 = 0xffff;
/// VIRTIO_F_VERSION_1: bit 32, i.e. bit 0 of feature word 1.
const FEATURE_VERSION_1: u32 = 1 << 0;

/// The MSI-X vector every queue completes on (entry 0 of the table).
pub const QUEUE_VECTOR: u16 = 0;

/// A split queue's descriptor flags.
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;

/// A device's virtio structures.
pub struct Transport {
    common: Window,
    notify: Window,
    multiplier: u64,
    /// The device-specific configuration.
    pub device: Window,
    /// The MSI-X capability's offset in the configuration page.
    msix: u64,
}

impl Transport {
    /// Finds the structures through the capability list of the function
    /// whose configuration page is `config`; `bar(n)` is BAR n's window,
    /// if the driver was given it.
    pub fn find(config: &Window, bar: &dyn Fn(u8) -> Option<Window>) -> Result<Self, &'static str> {
        let (mut common, mut notify, mut device) = (None, None, None);
        let mut multiplier = 0;
        let mut msix = None;
        let mut cap = u64::from(config.read::<u8>(PCI_CAPABILITIES)) & !3;
        let mut hops = 0;
        while cap != 0 && hops < MAX_CAPABILITIES {
            hops += 1;
            let id = config.read::<u8>(cap);
            let next = u64::from(config.read::<u8>(cap + 1)) & !3;
            if id == CAP_VENDOR {
                let kind = config.read::<u8>(cap + 3);
                let bar_index = config.read::<u8>(cap + 4);
                let offset = u64::from(config.read::<u32>(cap + 8));
                let length = u64::from(config.read::<u32>(cap + 12));
                let window = bar(bar_index).and_then(|b| b.sub(offset, length));
                match kind {
                    CFG_COMMON => common = common.or(window),
                    CFG_NOTIFY if notify.is_none() => {
                        notify = window;
                        multiplier = u64::from(config.read::<u32>(cap + 16));
                    }
                    CFG_DEVICE => device = device.or(window),
                    _ => {}
                }
            } else if id == CAP_MSIX {
                msix = Some(cap);
            }
            cap = next;
        }
        Ok(Self {
            common: common.ok_or("no virtio common configuration in a BAR given to us")?,
            notify: notify.ok_or("no virtio notify structure")?,
            multiplier,
            device: device.ok_or("no virtio device configuration")?,
            msix: msix.ok_or("no MSI-X capability")?,
        })
    }

    /// Points MSI-X entry 0 at the message `address`/`data` (what
    /// `irq_assign` of an MSI gave), enables MSI-X, memory decoding and
    /// bus mastering.
    pub fn enable_msix(
        &self,
        config: &Window,
        bar: &dyn Fn(u8) -> Option<Window>,
        address: u64,
        data: u64,
    ) -> Result<(), &'static str> {
        let table = config.read::<u32>(self.msix + 4);
        let table = bar((table & 7) as u8)
            .and_then(|b| b.sub(u64::from(table & !7), 16))
            .ok_or("the MSI-X table is in no BAR given to us")?;
        table.write::<u32>(0, address as u32);
        table.write::<u32>(4, (address >> 32) as u32);
        table.write::<u32>(8, data as u32);
        table.write::<u32>(12, 0);
        let control = config.read::<u16>(self.msix + 2);
        config.write::<u16>(self.msix + 2, (control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
        let command = config.read::<u16>(PCI_COMMAND);
        config.write::<u16>(PCI_COMMAND, command | COMMAND_MEMORY | COMMAND_BUS_MASTER);
        Ok(())
    }

    /// Resets the device and negotiates VERSION_1 and whichever of the
    /// feature bits 0-31 in `wanted` it offers; the device's offered bits
    /// 0-31. Configuration changes raise no interrupt.
    pub fn negotiate(&self, wanted: u32) -> Result<u32, &'static str> {
        let common = &self.common;
        common.write::<u8>(DEVICE_STATUS, 0);
        while common.read::<u8>(DEVICE_STATUS) != 0 {}
        common.write::<u8>(DEVICE_STATUS, STATUS_ACKNOWLEDGE);
        common.write::<u8>(DEVICE_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        common.write::<u32>(DEVICE_FEATURE_SELECT, 0);
        let low = common.read::<u32>(DEVICE_FEATURE);
        common.write::<u32>(DEVICE_FEATURE_SELECT, 1);
        let high = common.read::<u32>(DEVICE_FEATURE);
        if high & FEATURE_VERSION_1 == 0 {
            return Err("the device does not offer VIRTIO_F_VERSION_1");
        }
        common.write::<u32>(DRIVER_FEATURE_SELECT, 0);
        common.write::<u32>(DRIVER_FEATURE, low & wanted);
        common.write::<u32>(DRIVER_FEATURE_SELECT, 1);
        common.write::<u32>(DRIVER_FEATURE, FEATURE_VERSION_1);
        common.write::<u8>(DEVICE_STATUS, Self::FEATURES_OK);
        if common.read::<u8>(DEVICE_STATUS) & STATUS_FEATURES_OK == 0 {
            return Err("the device refused our features");
        }
        common.write::<u16>(MSIX_CONFIG, NO_VECTOR);
        Ok(low)
    }

    const FEATURES_OK: u8 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

    /// Sets up queue `index` with at most `max` entries whose descriptor
    /// table, driver (available) and device (used) rings lie at these
    /// physical addresses, completing on [`QUEUE_VECTOR`], and enables it:
    /// its size and its notify register.
    pub fn queue(
        &self,
        index: u16,
        max: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<(u16, Window), &'static str> {
        let common = &self.common;
        common.write::<u16>(QUEUE_SELECT, index);
        let size = common.read::<u16>(QUEUE_SIZE).min(max);
        if size == 0 {
            return Err("the device lacks a queue");
        }
        common.write::<u16>(QUEUE_SIZE, size);
        common.write::<u16>(QUEUE_MSIX_VECTOR, QUEUE_VECTOR);
        if common.read::<u16>(QUEUE_MSIX_VECTOR) != QUEUE_VECTOR {
            return Err("the device did not take MSI-X vector 0 for a queue");
        }
        common.write::<u64>(QUEUE_DESC, desc);
        common.write::<u64>(QUEUE_DRIVER, driver);
        common.write::<u64>(QUEUE_DEVICE, device);
        let notify_off = u64::from(common.read::<u16>(QUEUE_NOTIFY_OFF));
        let notify = self
            .notify
            .sub(notify_off * self.multiplier, 2)
            .ok_or("a queue's notify address is outside its structure")?;
        common.write::<u16>(QUEUE_ENABLE, 1);
        Ok((size, notify))
    }

    /// The driver is ready: the device may use its queues.
    pub fn driver_ok(&self) {
        self.common
            .write::<u8>(DEVICE_STATUS, Self::FEATURES_OK | STATUS_DRIVER_OK);
    }
}

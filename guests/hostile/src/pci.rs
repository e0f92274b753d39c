//! Finding the virtio devices on PCI bus 0 the way a driver does: vendor
//! and device id, the memory BAR, and the vendor-specific capabilities
//! that place the common configuration, notification, ISR and device
//! regions inside it (virtio 1.x, 4.1.4).

/// Reads configuration space of bus 0 (CF8/CFC or ECAM).
pub trait ConfigSpace {
    fn read32(&mut self, slot: u8, offset: u8) -> u32;
}

pub const SLOTS: u8 = 32;
const VIRTIO_VENDOR: u16 = 0x1af4;
const STATUS_CAPS: u32 = 1 << 20;
const CAP_POINTER: u8 = 0x34;
const CAP_VENDOR: u8 = 0x09;
const BAR0: u8 = 0x10;
const BAR_IO: u32 = 1;
const BAR_64: u32 = 0b100;
/// Enough for any honest capability list; a looping one ends here.
const MAX_CAPS: usize = 48;

/// Offsets and sizes of the virtio regions, as guest-physical addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    pub base: u64,
    pub len: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioDevice {
    pub slot: u8,
    pub device_id: u16,
    /// BAR index -> base, for the BARs the capabilities name.
    pub common: Region,
    pub notify: Region,
    pub notify_multiplier: u32,
    pub isr: Region,
    pub device: Region,
}

impl VirtioDevice {
    /// The whole span of its regions (for aiming random MMIO at it).
    pub fn span(&self) -> Region {
        let regions = [self.common, self.notify, self.isr, self.device];
        let lo = regions.iter().map(|r| r.base).min().unwrap_or(0);
        let hi = regions
            .iter()
            .map(|r| r.base.saturating_add(r.len))
            .max()
            .unwrap_or(0);
        Region {
            base: lo,
            len: hi - lo,
        }
    }
}

/// The memory BAR `index` of `slot`, if it is one (64-bit ones take two).
fn bar(cfg: &mut impl ConfigSpace, slot: u8, index: u8) -> Option<u64> {
    if index > 5 {
        return None;
    }
    let low = cfg.read32(slot, BAR0 + 4 * index);
    if low & BAR_IO != 0 {
        return None;
    }
    let high = if low & 0b110 == BAR_64 && index < 5 {
        u64::from(cfg.read32(slot, BAR0 + 4 * index + 4)) << 32
    } else {
        0
    };
    Some(high | u64::from(low & !0xf))
}

/// Every virtio device on bus 0 with its regions, at most `N`.
pub fn find_virtio<const N: usize>(cfg: &mut impl ConfigSpace) -> ([VirtioDevice; N], usize) {
    let mut found = [VirtioDevice::default(); N];
    let mut count = 0;
    for slot in 0..SLOTS {
        if count == N {
            break;
        }
        let ids = cfg.read32(slot, 0);
        if ids as u16 != VIRTIO_VENDOR {
            continue;
        }
        if cfg.read32(slot, 4) & STATUS_CAPS == 0 {
            continue;
        }
        let mut dev = VirtioDevice {
            slot,
            device_id: (ids >> 16) as u16,
            ..VirtioDevice::default()
        };
        let mut at = (cfg.read32(slot, CAP_POINTER) & 0xfc) as u8;
        for _ in 0..MAX_CAPS {
            if at < 0x40 {
                break;
            }
            let head = cfg.read32(slot, at);
            let next = ((head >> 8) & 0xfc) as u8;
            if head as u8 == CAP_VENDOR {
                let kind = (head >> 24) as u8;
                let bar_index = cfg.read32(slot, at + 4) as u8;
                let offset = u64::from(cfg.read32(slot, at + 8));
                let len = u64::from(cfg.read32(slot, at + 12));
                if let Some(base) = bar(cfg, slot, bar_index) {
                    let region = Region {
                        base: base.wrapping_add(offset),
                        len,
                    };
                    match kind {
                        1 => dev.common = region,
                        2 => {
                            dev.notify = region;
                            dev.notify_multiplier = cfg.read32(slot, at + 16);
                        }
                        3 => dev.isr = region,
                        4 => dev.device = region,
                        _ => {}
                    }
                }
            }
            at = next;
        }
        if dev.common.len != 0 && dev.notify.len != 0 {
            found[count] = dev;
            count += 1;
        }
    }
    (found, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One virtio device in slot 3 with the VMM's layout (BAR0 64-bit at
    /// 0xc000_0000), a looping capability list in slot 5.
    struct Fake;

    /// (position, type, next, offset in BAR0)
    const CAPS: [(u8, u32, u32, u32); 4] = [
        (0x40, 1, 0x54, 0),
        (0x54, 2, 0x68, 0x3000),
        (0x68, 3, 0x78, 0x1000),
        (0x78, 4, 0, 0x2000),
    ];

    impl ConfigSpace for Fake {
        fn read32(&mut self, slot: u8, offset: u8) -> u32 {
            match (slot, offset) {
                (3 | 5, 0x00) => return 0x1044_1af4,
                (3 | 5, 0x04) => return STATUS_CAPS,
                (3, 0x10) => return 0xc000_0004,
                (3, 0x14) => return 0,
                (3 | 5, 0x34) => return 0x40,
                // Slot 5: a capability pointing at itself.
                (5, 0x40) => return 0x0100_4009,
                (5, _) => return 0,
                _ => {}
            }
            for (at, kind, next, bar_offset) in CAPS {
                let len = if kind == 2 { 20 } else { 16 };
                if slot == 3 && (at..at + len).contains(&offset) {
                    return match offset - at {
                        0 => (kind << 24) | (next << 8) | 9,
                        4 => 0,
                        8 => bar_offset,
                        12 => 0x1000,
                        _ => 4,
                    };
                }
            }
            0xffff_ffff
        }
    }

    #[test]
    fn finds_the_regions_and_survives_a_loop() {
        let (devs, n) = find_virtio::<4>(&mut Fake);
        assert_eq!(n, 1);
        let d = devs[0];
        assert_eq!((d.slot, d.device_id), (3, 0x1044));
        assert_eq!(d.common.base, 0xc000_0000);
        assert_eq!(d.notify.base, 0xc000_3000);
        assert_eq!(d.notify_multiplier, 4);
        assert_eq!(d.span().base, 0xc000_0000);
    }
}

//! Virtio rings built to mislead a device: descriptor chains that loop,
//! point outside RAM or into the ring itself, carry huge lengths and
//! bogus flags, and an available index far ahead of the used one; then
//! the register writes that hand the queue to the device and kick it.

use crate::pci::VirtioDevice;
use crate::{Layout, Xorshift};

/// Bytes of one ring image (descriptor table, available and used rings
/// wherever they fall in it).
pub const IMAGE_LEN: usize = 8192;
/// Register accesses of one ring action, at most.
pub const MAX_STEPS: usize = 24;

/// Common configuration offsets (virtio 1.x, 4.1.4.3).
pub mod common {
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// End of the queue address fields.
    pub const QUEUE_ADDRESSES_END: u64 = 0x38;
}

const STATUS_ACKNOWLEDGE: u64 = 1;
const STATUS_DRIVER: u64 = 2;
const STATUS_DRIVER_OK: u64 = 4;
const STATUS_FEATURES_OK: u64 = 8;
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const DESC_INDIRECT: u16 = 4;
const DESC_SIZE: usize = 16;

/// One register access of a ring action.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Step {
    #[default]
    None,
    Write {
        addr: u64,
        size: u8,
        value: u64,
    },
    /// Read `queue_notify_off` of the selected queue and write the queue
    /// number to the notification address it gives.
    Notify {
        queue: u16,
    },
    Read {
        addr: u64,
        size: u8,
    },
}

/// A ring action: write `image` to guest-physical `base` (always inside
/// the scratch area), then perform `steps` in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    pub base: u64,
    pub image: [u8; IMAGE_LEN],
    pub steps: [Step; MAX_STEPS],
    pub queue: u16,
    pub size: u16,
}

struct Steps<'a> {
    steps: &'a mut [Step; MAX_STEPS],
    len: usize,
}

impl Steps<'_> {
    fn push(&mut self, step: Step) {
        if let Some(slot) = self.steps.get_mut(self.len) {
            *slot = step;
            self.len += 1;
        }
    }

    fn write(&mut self, addr: u64, size: u8, value: u64) {
        self.push(Step::Write { addr, size, value });
    }
}

/// A queue size: mostly a power of two up to 256, sometimes 0, odd, or
/// the largest the field holds.
fn queue_size(rng: &mut Xorshift) -> u16 {
    match rng.below(8) {
        0 => 0,
        1 => rng.next_u64() as u16,
        2 => 0xffff,
        3 => 1 + rng.below(300) as u16,
        _ => 1 << rng.below(9),
    }
}

fn put16(image: &mut [u8], at: usize, value: u16) {
    if let Some(b) = image.get_mut(at..at + 2) {
        b.copy_from_slice(&value.to_le_bytes());
    }
}

/// Fills `ring` for one device of `devices`: the image and the steps.
pub fn build(rng: &mut Xorshift, layout: &Layout, device: &VirtioDevice, ring: &mut Ring) {
    // A page-aligned image in scratch that fits below the end of RAM.
    let pages = (layout.ram_end - layout.scratch - IMAGE_LEN as u64) / 4096;
    ring.base = layout.scratch + rng.below(pages.max(1)) * 4096;
    ring.image.fill(0);
    let size = queue_size(rng);
    ring.size = size;
    let entries = usize::from(size).clamp(1, 128);
    let base = ring.base;
    // Where the three parts go: packed as a driver would, overlapping, or
    // anywhere a device may be pointed at.
    let offset = |rng: &mut Xorshift| rng.below(IMAGE_LEN as u64 / 2) & !1;
    let desc = match rng.below(4) {
        0 => layout.dma_target(rng, base),
        _ => base,
    };
    let avail = match rng.below(5) {
        0 => desc,
        1 => layout.dma_target(rng, base),
        2 => base + offset(rng),
        _ => base + (entries * DESC_SIZE) as u64,
    };
    // The used ring (which the device writes) never on the descriptor
    // table: a used index written over a descriptor's address would aim
    // the device at RAM the guest keeps (its canary was hit so).
    let rings = base + IMAGE_LEN as u64 / 2;
    let used = match rng.below(5) {
        0 if avail != desc => avail,
        0 => rings,
        1 => rings + offset(rng) / 2,
        2 => layout.dma_target(rng, rings),
        _ => (base + (entries * DESC_SIZE + 6 + 2 * entries) as u64 + 3) & !3,
    };

    // Descriptors, wherever the table lies inside the image.
    let in_image = |addr: u64| {
        addr.checked_sub(base)
            .filter(|&o| o < IMAGE_LEN as u64)
            .map(|o| o as usize)
    };
    if let Some(at) = in_image(avail) {
        put16(&mut ring.image, at, rng.below(2) as u16);
        let idx = match rng.below(4) {
            0 => rng.next_u64() as u16,
            1 => 0x8000 + rng.below(0x8000) as u16,
            _ => 1 + rng.below(entries as u64) as u16,
        };
        put16(&mut ring.image, at + 2, idx);
        for i in 0..entries {
            let head = match rng.below(4) {
                0 => rng.next_u64() as u16,
                _ => rng.below(entries as u64) as u16,
            };
            put16(&mut ring.image, at + 4 + 2 * i, head);
        }
    }
    if let Some(at) = in_image(used) {
        if rng.one_in(2) {
            put16(&mut ring.image, at + 2, rng.next_u64() as u16);
        }
    }

    // Descriptors last: where the rings overlap the table, the table wins
    // (a descriptor's address must stay one a device may be given).
    if let Some(table) = in_image(desc) {
        for i in 0..entries {
            let at = table + i * DESC_SIZE;
            let Some(d) = ring.image.get_mut(at..at + DESC_SIZE) else {
                break;
            };
            // "Into the ring itself": the rings' half of the image, never
            // the table (a device writing there would rewrite addresses).
            let addr = layout.dma_target(rng, rings);
            let len: u32 = match rng.below(6) {
                0 => 0,
                1 => u32::MAX,
                2 => 1 + rng.below(16) as u32,
                3 => 4096,
                4 => rng.next_u64() as u32,
                _ => 1 << rng.below(31),
            };
            let mut flags = rng.next_u64() as u16 & (DESC_NEXT | DESC_WRITE | DESC_INDIRECT);
            if rng.one_in(8) {
                flags = rng.next_u64() as u16;
            }
            let next = match rng.below(4) {
                // A loop back to itself or to the start.
                0 => i as u16,
                1 => 0,
                2 => rng.next_u64() as u16,
                _ => (i as u16).wrapping_add(1),
            };
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
        }
    }
    let c = device.common.base;
    let mut s = Steps {
        steps: &mut ring.steps,
        len: 0,
    };
    s.steps.fill(Step::None);
    // Reset, then a driver's bring-up, each step skipped now and then.
    s.write(c + common::DEVICE_STATUS, 1, 0);
    s.write(
        c + common::DEVICE_STATUS,
        1,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER,
    );
    for select in 0..2 {
        s.write(c + common::DRIVER_FEATURE_SELECT, 4, select);
        let features = match (select, rng.below(3)) {
            // VERSION_1, and INDIRECT_DESC now and then.
            (1, 0 | 1) => 1,
            (0, 0) => 1 << 28,
            _ => rng.next_u64() & 0xffff_ffff,
        };
        s.write(c + common::DRIVER_FEATURE, 4, features);
    }
    if !rng.one_in(8) {
        s.write(
            c + common::DEVICE_STATUS,
            1,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }
    let queue = match rng.below(8) {
        0 => rng.next_u64() as u16,
        _ => rng.below(6) as u16,
    };
    ring.queue = queue;
    s.write(c + common::QUEUE_SELECT, 2, u64::from(queue));
    s.write(c + common::QUEUE_SIZE, 2, u64::from(size));
    let vector = match rng.below(3) {
        0 => 0xffff,
        _ => rng.below(8),
    };
    s.write(c + common::QUEUE_MSIX_VECTOR, 2, vector);
    for (field, addr) in [
        (common::QUEUE_DESC, desc),
        (common::QUEUE_DRIVER, avail),
        (common::QUEUE_DEVICE, used),
    ] {
        s.write(c + field, 4, addr & 0xffff_ffff);
        s.write(c + field + 4, 4, addr >> 32);
    }
    if !rng.one_in(8) {
        s.write(c + common::QUEUE_ENABLE, 2, 1);
    }
    if !rng.one_in(8) {
        s.write(
            c + common::DEVICE_STATUS,
            1,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }
    for _ in 0..1 + rng.below(3) {
        s.push(Step::Notify { queue });
    }
    s.push(Step::Read {
        addr: device.isr.base,
        size: 1,
    });
    s.push(Step::Read {
        addr: c + common::DEVICE_STATUS,
        size: 1,
    });
}

/// Whether a write of `size` bytes at `offset` of a common configuration
/// region touches the queue address fields (which must only ever hold
/// addresses from [`Layout::dma_target`]).
pub fn touches_queue_addresses(offset: u64, size: u8) -> bool {
    offset < common::QUEUE_ADDRESSES_END && offset + u64::from(size) > common::QUEUE_DESC
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::Region;
    use crate::MIB;

    fn device() -> VirtioDevice {
        VirtioDevice {
            slot: 1,
            device_id: 0x1044,
            common: Region {
                base: 0xc000_0000,
                len: 0x38,
            },
            notify: Region {
                base: 0xc000_3000,
                len: 0x1000,
            },
            notify_multiplier: 4,
            isr: Region {
                base: 0xc000_1000,
                len: 1,
            },
            device: Region::default(),
        }
    }

    #[test]
    fn rings_stay_in_scratch_and_hand_devices_only_allowed_addresses() {
        let layout = Layout::new(32 * MIB, 8 * MIB).unwrap();
        let mut rng = Xorshift::new(9);
        let mut ring = Ring {
            base: 0,
            image: [0; IMAGE_LEN],
            steps: [Step::None; MAX_STEPS],
            queue: 0,
            size: 0,
        };
        let mut loops = 0;
        for _ in 0..2000 {
            build(&mut rng, &layout, &device(), &mut ring);
            assert!(ring.base >= layout.scratch);
            assert!(ring.base + IMAGE_LEN as u64 <= layout.ram_end);
            // Queue addresses as the device sees them, low and high halves.
            let mut addr = [0u64; 3];
            for step in ring.steps {
                if let Step::Write { addr: a, value, .. } = step {
                    let off = a - 0xc000_0000;
                    if (common::QUEUE_DESC..common::QUEUE_ADDRESSES_END).contains(&off) {
                        let field = ((off - common::QUEUE_DESC) / 8) as usize;
                        let shift = if off % 8 == 4 { 32 } else { 0 };
                        addr[field] |= value << shift;
                    }
                }
            }
            for a in addr {
                assert!(layout.dma_allowed(a), "{a:#x}");
            }
            assert_ne!(addr[2], addr[0], "used ring on the descriptor table");
            // Descriptor buffers in the image.
            let table = addr[0]
                .checked_sub(ring.base)
                .filter(|&o| o < IMAGE_LEN as u64)
                .map_or(IMAGE_LEN, |o| o as usize);
            let entries = usize::from(ring.size).clamp(1, 128);
            let end = (table + entries * DESC_SIZE).min(IMAGE_LEN);
            for d in ring.image[table.min(end)..end].chunks_exact(DESC_SIZE) {
                let a = u64::from_le_bytes(d[0..8].try_into().unwrap());
                assert!(a == 0 || layout.dma_allowed(a), "{a:#x}");
            }
            let next = u16::from_le_bytes([ring.image[14], ring.image[15]]);
            loops += usize::from(next == 0 && ring.image[12] & 1 != 0);
            assert!(ring.steps.iter().any(|s| matches!(s, Step::Notify { .. })));
        }
        assert!(loops > 10, "no self loops: {loops}");
    }

    #[test]
    fn queue_address_writes_are_recognised() {
        assert!(touches_queue_addresses(0x20, 1));
        assert!(touches_queue_addresses(0x1e, 4));
        assert!(touches_queue_addresses(0x37, 1));
        assert!(!touches_queue_addresses(0x1c, 4));
        assert!(!touches_queue_addresses(0x38, 8));
    }
}

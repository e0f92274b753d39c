//! PCI configuration space as the root task reads it before handing a
//! device to its driver: finding a function by its ids and its memory
//! BARs, sized the standard way (write all ones, read the mask back,
//! restore) with decoding off meanwhile. Generic over how the bytes are
//! reached, so the host tests run it on a fake device.

use alloc::vec::Vec;

pub const VENDOR_ID: u16 = 0x00;
pub const COMMAND: u16 = 0x04;
pub const HEADER_TYPE: u16 = 0x0e;
pub const BAR0: u16 = 0x10;
/// Command register: memory and I/O decoding, bus mastering (DMA).
pub const COMMAND_IO: u32 = 1 << 0;
pub const COMMAND_MEMORY: u32 = 1 << 1;
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
const BAR_IO: u32 = 1 << 0;
const BAR_TYPE_64: u32 = 0b10 << 1;
const BAR_TYPE_MASK: u32 = 0b11 << 1;
const BAR_ADDRESS_MASK: u32 = !0xf;

/// One function's configuration space (4 KiB with ECAM).
pub trait Config {
    fn read32(&self, offset: u16) -> u32;
    fn write32(&mut self, offset: u16, value: u32);
}

/// A memory BAR: its number, physical address and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: u8,
    pub address: u64,
    pub size: u64,
}

/// Whether a function is there (vendor id not all ones), and its ids.
pub fn ids(config: &impl Config) -> Option<(u16, u16)> {
    let word = config.read32(VENDOR_ID);
    let vendor = word as u16;
    (vendor != 0xffff && vendor != 0).then_some((vendor, (word >> 16) as u16))
}

/// Whether function 0 says the device has more functions.
pub fn multifunction(config: &impl Config) -> bool {
    (config.read32(HEADER_TYPE & !3) >> 16) & 0x80 != 0
}

/// The memory BARs of a type-0 header, sized; I/O BARs and empty ones are
/// left out. Decoding is off while the BARs are probed and restored after.
pub fn memory_bars(config: &mut impl Config) -> Vec<Bar> {
    let mut bars = Vec::new();
    if (config.read32(HEADER_TYPE & !3) >> 16) & 0x7f != 0 {
        return bars;
    }
    let command = config.read32(COMMAND);
    config.write32(COMMAND, command & !(COMMAND_IO | COMMAND_MEMORY));
    let mut index = 0u16;
    while index < 6 {
        let offset = BAR0 + index * 4;
        let low = config.read32(offset);
        if low & BAR_IO != 0 {
            index += 1;
            continue;
        }
        let wide = low & BAR_TYPE_MASK == BAR_TYPE_64 && index < 5;
        config.write32(offset, u32::MAX);
        let low_mask = config.read32(offset) & BAR_ADDRESS_MASK;
        config.write32(offset, low);
        let (high, high_mask) = if wide {
            let high = config.read32(offset + 4);
            config.write32(offset + 4, u32::MAX);
            let mask = config.read32(offset + 4);
            config.write32(offset + 4, high);
            (high, mask)
        } else {
            (0, u32::MAX)
        };
        let mask = u64::from(high_mask) << 32 | u64::from(low_mask);
        let size = (!mask).wrapping_add(1);
        if low_mask != 0 && size != 0 {
            bars.push(Bar {
                index: index as u8,
                address: u64::from(high) << 32 | u64::from(low & BAR_ADDRESS_MASK),
                size,
            });
        }
        index += if wide { 2 } else { 1 };
    }
    config.write32(COMMAND, command);
    bars
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function with BARs of the given sizes (0: none; `io`: an I/O BAR)
    /// that answers the sizing protocol as hardware does.
    struct Fake {
        regs: [u32; 1024],
        sizes: [u64; 6],
        wide: [bool; 6],
    }

    impl Config for Fake {
        fn read32(&self, offset: u16) -> u32 {
            self.regs[usize::from(offset / 4)]
        }
        fn write32(&mut self, offset: u16, value: u32) {
            let reg = usize::from(offset / 4);
            let bar = reg.wrapping_sub(4);
            if bar < 6 && !(bar > 0 && self.wide[bar - 1]) {
                let mask = !(self.sizes[bar].wrapping_sub(1));
                let kind = self.regs[reg] & 0xf;
                self.regs[reg] = (value & mask as u32 & !0xf) | kind;
            } else if bar < 6 {
                let mask = !(self.sizes[bar - 1].wrapping_sub(1));
                self.regs[reg] = value & (mask >> 32) as u32;
            } else {
                self.regs[reg] = value;
            }
        }
    }

    #[test]
    fn sizes_32_and_64_bit_bars_and_skips_io() {
        let mut f = Fake {
            regs: [0; 1024],
            sizes: [0x20, 0x1000, 0, 0, 0x4000, 0],
            wide: [false, false, false, false, true, false],
        };
        f.regs[0] = 0x1042_1af4;
        f.regs[1] = 0x0007;
        f.regs[4] = 0xc001; // I/O BAR 0
        f.regs[5] = 0xfeb0_0000; // 32-bit BAR 1
        f.regs[8] = 0xfe00_000c; // 64-bit prefetchable BAR 4
        f.regs[9] = 0x1;
        assert_eq!(ids(&f), Some((0x1af4, 0x1042)));
        let bars = memory_bars(&mut f);
        assert_eq!(
            bars,
            [
                Bar {
                    index: 1,
                    address: 0xfeb0_0000,
                    size: 0x1000
                },
                Bar {
                    index: 4,
                    address: 0x1_fe00_0000,
                    size: 0x4000
                }
            ]
        );
        // Everything restored, decoding back on.
        assert_eq!(f.regs[1], 0x0007);
        assert_eq!(f.regs[5], 0xfeb0_0000);
        assert_eq!(f.regs[9], 0x1);
    }

    #[test]
    fn absent_function() {
        let mut f = Fake {
            regs: [0xffff_ffff; 1024],
            sizes: [0; 6],
            wide: [false; 6],
        };
        assert_eq!(ids(&f), None);
        f.regs[0] = 0;
        assert_eq!(ids(&f), None);
    }
}

//! A type-0 configuration space: the standard header, memory BARs and a
//! capability list, all as bytes with a per-byte write mask, so any access
//! width at any offset behaves like hardware (read-only bits stay put).

use super::PciError;

/// Conventional (non-express) configuration space; ECAM's extended range
/// above it reads as zero.
pub const CONFIG_SPACE_SIZE: usize = 256;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const PROG_IF: usize = 0x09;
pub const SUBCLASS: usize = 0x0a;
pub const CLASS: usize = 0x0b;
pub const CACHE_LINE_SIZE: usize = 0x0c;
pub const LATENCY_TIMER: usize = 0x0d;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_INTERRUPT: u16 = 1 << 3;
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

pub const BAR_COUNT: usize = 6;
const BAR_MEM_64: u32 = 0b10 << 1;
/// Low BAR bits that describe the BAR instead of holding address bits.
const BAR_MEM_FLAGS: u32 = 0xf;
const MIN_MEM_BAR_SIZE: u64 = 16;

const FIRST_CAPABILITY: usize = 0x40;

/// What the guest sees in the header's identification fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarWidth {
    Bits32,
    Bits64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Bar {
    #[default]
    Unused,
    Mem32 {
        size: u64,
    },
    Mem64 {
        size: u64,
    },
    /// The upper half of the 64-bit BAR just below.
    Mem64High,
}

/// A memory BAR as the device decodes it right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarWindow {
    pub base: u64,
    pub size: u64,
}

impl BarWindow {
    /// Offset of `[addr, addr + len)` inside the window, if all of it is.
    pub fn offset_of(&self, addr: u64, len: usize) -> Option<u64> {
        let offset = addr.checked_sub(self.base)?;
        (offset < self.size && len as u64 <= self.size - offset).then_some(offset)
    }
}

pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: [Bar; BAR_COUNT],
    /// Offset of the last capability (0: none yet), whose next pointer the
    /// following one is linked into.
    last_capability: usize,
    next_free: usize,
}

impl ConfigSpace {
    pub fn new(ids: &PciIds) -> Self {
        let mut config = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: [Bar::Unused; BAR_COUNT],
            last_capability: 0,
            next_free: FIRST_CAPABILITY,
        };
        config.set_u16(VENDOR_ID, ids.vendor_id);
        config.set_u16(DEVICE_ID, ids.device_id);
        config.bytes[REVISION_ID] = ids.revision;
        config.bytes[PROG_IF] = ids.prog_if;
        config.bytes[SUBCLASS] = ids.subclass;
        config.bytes[CLASS] = ids.class;
        config.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id);
        config.set_u16(SUBSYSTEM_ID, ids.subsystem_id);
        let command = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        config.writable[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        config.writable[CACHE_LINE_SIZE] = 0xff;
        config.writable[LATENCY_TIMER] = 0xff;
        config.writable[INTERRUPT_LINE] = 0xff;
        config
    }

    /// Guest read: any width at any offset; beyond the 256 bytes, zeros.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i)
                .and_then(|at| self.bytes.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Guest write: only the writable bits of each byte change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i).filter(|&at| at < CONFIG_SPACE_SIZE) else {
                break;
            };
            let mask = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (value & mask);
        }
    }

    pub fn u8_at(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        let mut raw = [0; 2];
        self.read(offset, &mut raw);
        u16::from_le_bytes(raw)
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut raw = [0; 4];
        self.read(offset, &mut raw);
        u32::from_le_bytes(raw)
    }

    /// Device-side store, ignoring the write mask (e.g. the status register).
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        let end = offset.saturating_add(data.len());
        if let Some(dst) = self.bytes.get_mut(offset..end) {
            dst.copy_from_slice(data);
        }
    }

    /// Which bits of `[offset, offset + mask.len())` the guest may change.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        let end = offset.saturating_add(mask.len());
        if let Some(dst) = self.writable.get_mut(offset..end) {
            dst.copy_from_slice(mask);
        }
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
    }

    /// The INTx status bit (read-only for the guest) follows the device's
    /// interrupt condition.
    pub fn set_interrupt_status(&mut self, pending: bool) {
        let status = self.u16_at(STATUS);
        let status = if pending {
            status | STATUS_INTERRUPT
        } else {
            status & !STATUS_INTERRUPT
        };
        self.set_u16(STATUS, status);
    }

    /// Declare memory BAR `index` of `size` bytes (a power of two); a 64-bit
    /// BAR also takes `index + 1`. The guest sizes it by writing all ones and
    /// reading back the mask.
    pub fn add_mem_bar(
        &mut self,
        index: usize,
        size: u64,
        width: BarWidth,
    ) -> Result<(), PciError> {
        let indices = match width {
            BarWidth::Bits32 => index..index + 1,
            BarWidth::Bits64 => index..index + 2,
        };
        if indices.end > BAR_COUNT {
            return Err(PciError::BarIndex);
        }
        if self.bars[indices.clone()]
            .iter()
            .any(|bar| *bar != Bar::Unused)
        {
            return Err(PciError::BarInUse);
        }
        let max = match width {
            BarWidth::Bits32 => 1 << 31,
            BarWidth::Bits64 => 1 << 63,
        };
        if !size.is_power_of_two() || !(MIN_MEM_BAR_SIZE..=max).contains(&size) {
            return Err(PciError::BarSize);
        }
        let address_mask = !(size - 1);
        let offset = BAR0 + 4 * index;
        match width {
            BarWidth::Bits32 => {
                self.bars[index] = Bar::Mem32 { size };
                self.set_u32(offset, 0);
            }
            BarWidth::Bits64 => {
                self.bars[index] = Bar::Mem64 { size };
                self.bars[index + 1] = Bar::Mem64High;
                self.set_u32(offset, BAR_MEM_64);
                self.set_writable(offset + 4, &((address_mask >> 32) as u32).to_le_bytes());
            }
        }
        let low_mask = address_mask as u32 & !BAR_MEM_FLAGS;
        self.set_writable(offset, &low_mask.to_le_bytes());
        Ok(())
    }

    /// Size and width of BAR `index`, if it is the first register of a
    /// memory BAR.
    pub fn bar_size(&self, index: usize) -> Option<(u64, BarWidth)> {
        match self.bars.get(index)? {
            Bar::Mem32 { size } => Some((*size, BarWidth::Bits32)),
            Bar::Mem64 { size } => Some((*size, BarWidth::Bits64)),
            _ => None,
        }
    }

    /// The address programmed into BAR `index`, decoding or not.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let offset = BAR0 + 4 * index;
        let low = u64::from(self.u32_at(offset) & !BAR_MEM_FLAGS);
        match self.bars.get(index)? {
            Bar::Mem32 { .. } => Some(low),
            Bar::Mem64 { .. } => Some(low | u64::from(self.u32_at(offset + 4)) << 32),
            _ => None,
        }
    }

    /// Where BAR `index` decodes now: memory decoding on, an address that is
    /// not zero (unassigned) and does not wrap.
    pub fn mem_bar(&self, index: usize) -> Option<BarWindow> {
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let (size, _) = self.bar_size(index)?;
        let base = self.bar_address(index).filter(|&base| base != 0)?;
        base.checked_add(size)?;
        Some(BarWindow { base, size })
    }

    /// Append a capability: `body` follows the ID and next-pointer bytes.
    /// Returns its offset; the guest may write none of it until
    /// [`set_writable`](Self::set_writable) says otherwise.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, PciError> {
        let offset = self.next_free;
        let end = offset + 2 + body.len();
        if end > CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpace);
        }
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..end].copy_from_slice(body);
        let link = match self.last_capability {
            0 => CAPABILITIES_POINTER,
            last => last + 1,
        };
        self.bytes[link] = offset as u8;
        self.last_capability = offset;
        self.next_free = end.next_multiple_of(4);
        self.set_u16(STATUS, self.u16_at(STATUS) | STATUS_CAPABILITIES);
        Ok(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor_id: 0x1234,
            device_id: 0x5678,
            revision: 1,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0x1234,
            subsystem_id: 1,
        }
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut config = ConfigSpace::new(&ids());
        config.add_mem_bar(0, 0x8000, BarWidth::Bits64).unwrap();
        config.add_mem_bar(2, 0x1000, BarWidth::Bits32).unwrap();
        for offset in (BAR0..BAR0 + 12).step_by(4) {
            config.write(offset, &u32::MAX.to_le_bytes());
        }
        assert_eq!(config.u32_at(BAR0), 0xffff_8000 | BAR_MEM_64);
        assert_eq!(config.u32_at(BAR0 + 4), 0xffff_ffff);
        assert_eq!(config.u32_at(BAR0 + 8), 0xffff_f000);
        assert_eq!(
            config.u32_at(BAR0 + 12),
            0,
            "unused BAR is hardwired to zero"
        );

        config.write(BAR0, &0x1234_5678u32.to_le_bytes());
        config.write(BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(config.bar_address(0), Some(0x1_1234_0000));
        assert_eq!(config.mem_bar(0), None, "memory decoding is off");
        config.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(
            config.mem_bar(0),
            Some(BarWindow {
                base: 0x1_1234_0000,
                size: 0x8000
            })
        );
        assert_eq!(
            config.mem_bar(1),
            None,
            "upper half is not a BAR of its own"
        );
        // A BAR ending at the top of the address space: its end does not fit
        // in 64 bits, so it never decodes.
        config.write(BAR0 + 4, &u32::MAX.to_le_bytes());
        config.write(BAR0, &u32::MAX.to_le_bytes());
        assert_eq!(config.bar_address(0), Some(0xffff_ffff_ffff_8000));
        assert_eq!(config.mem_bar(0), None);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut config = ConfigSpace::new(&ids());
        assert_eq!(
            config.add_mem_bar(5, 0x1000, BarWidth::Bits64),
            Err(PciError::BarIndex)
        );
        assert_eq!(
            config.add_mem_bar(6, 0x1000, BarWidth::Bits32),
            Err(PciError::BarIndex)
        );
        assert_eq!(
            config.add_mem_bar(0, 0x1800, BarWidth::Bits32),
            Err(PciError::BarSize)
        );
        assert_eq!(
            config.add_mem_bar(0, 8, BarWidth::Bits32),
            Err(PciError::BarSize)
        );
        assert_eq!(
            config.add_mem_bar(0, 1 << 32, BarWidth::Bits32),
            Err(PciError::BarSize)
        );
        config.add_mem_bar(0, 0x1000, BarWidth::Bits64).unwrap();
        assert_eq!(
            config.add_mem_bar(1, 0x1000, BarWidth::Bits32),
            Err(PciError::BarInUse)
        );
    }

    #[test]
    fn read_only_fields_survive_writes_of_any_width() {
        let mut config = ConfigSpace::new(&ids());
        config.write(VENDOR_ID, &[0xff; 8]);
        config.write(0x3b, &[0xaa, 0x0b, 0xcc]);
        assert_eq!(config.u16_at(VENDOR_ID), 0x1234);
        assert_eq!(config.u16_at(DEVICE_ID), 0x5678);
        assert_eq!(config.u8_at(INTERRUPT_LINE), 0x0b);
        assert_eq!(config.u8_at(INTERRUPT_PIN), 0);
        config.write(COMMAND, &[0xff, 0xff]);
        assert_eq!(
            config.command(),
            COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
        );
        // Past the end: ignored, reads as zero.
        config.write(0xfe, &[1, 2, 3, 4]);
        let mut tail = [0xee; 4];
        config.read(0xfe, &mut tail);
        assert_eq!(tail, [0; 4]);
        config.read(usize::MAX, &mut tail);
        assert_eq!(tail, [0; 4]);
    }

    #[test]
    fn capabilities_chain_from_the_pointer() {
        let mut config = ConfigSpace::new(&ids());
        let first = config.add_capability(0x09, &[5, 1, 2]).unwrap();
        let second = config.add_capability(0x11, &[0; 10]).unwrap();
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x48);
        assert_eq!(usize::from(config.u8_at(CAPABILITIES_POINTER)), first);
        assert_eq!(usize::from(config.u8_at(first + 1)), second);
        assert_eq!(config.u8_at(second + 1), 0);
        assert_ne!(config.u16_at(STATUS) & STATUS_CAPABILITIES, 0);
        assert_eq!(
            config.add_capability(0x09, &[0; 200]),
            Err(PciError::CapabilitySpace)
        );
    }
}

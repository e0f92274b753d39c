//! The PCI host bridge: bus 0, function 0 only, device numbers 0-31 with
//! the bridge itself at 00:00.0.
//!
//! Three bus windows share one [`PciRoot`]:
//! - [`PciConfigIo`]: configuration mechanism #1, 8 ports at 0xCF8;
//! - [`PciEcam`]: the same configuration space, memory-mapped (ECAM);
//! - [`PciMmio`]: the whole PCI MMIO hole, one window given at construction.
//!   Every access is routed by the BARs as the guest has programmed them at
//!   that moment, so moving a BAR or toggling memory decoding needs nothing
//!   from the VMM. A BAR outside the hole simply does not decode.
//!
//! Absent devices, functions and buses read as all ones.

pub mod config;
pub mod msix;

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

pub use config::{BarWidth, BarWindow, ConfigSpace, PciIds};
pub use msix::Msix;

use crate::{BusDevice, Shared};
use config::{BAR0, BAR_COUNT, COMMAND, COMMAND_MEMORY};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciError {
    BarIndex,
    BarSize,
    BarInUse,
    CapabilitySpace,
    Msix,
    /// All 31 device numbers are taken.
    BusFull,
    /// The BARs do not fit in the MMIO window.
    WindowFull,
    /// A device too big for its transport's BAR layout.
    Layout,
}

/// A function on bus 0 as the host bridge sees it: a configuration space
/// and the registers behind its memory BARs. Both are called with offsets,
/// never with guest addresses.
pub trait PciDevice {
    fn config(&self) -> &ConfigSpace;
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// After a guest write to `[offset, offset + len)` of configuration
    /// space (e.g. MSI-X enabled, INTx disabled).
    fn config_written(&mut self, _offset: usize, _len: usize) {}
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// Red Hat's "QEMU PCIe host bridge" IDs: no Linux quirk or driver binds
/// to them, and the class passes Linux's type-1 sanity check.
pub const HOST_BRIDGE_IDS: PciIds = PciIds {
    vendor_id: 0x1b36,
    device_id: 0x0008,
    revision: 0,
    class: 0x06,
    subclass: 0x00,
    prog_if: 0,
    subsystem_vendor_id: 0x1b36,
    subsystem_id: 0x0008,
};

pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::new(&HOST_BRIDGE_IDS),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

pub const DEVICES_PER_BUS: usize = 32;
const FUNCTION_CONFIG_SIZE: u64 = 4096;

/// Bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

type DeviceRef = Rc<RefCell<dyn PciDevice>>;

pub struct PciRoot {
    devices: Vec<Option<DeviceRef>>,
    mmio_base: u64,
    mmio_len: u64,
}

impl PciRoot {
    /// A bus with only the host bridge; BARs decode inside
    /// `[mmio_base, mmio_base + mmio_len)`.
    pub fn new(mmio_base: u64, mmio_len: u64) -> Self {
        let mut devices: Vec<Option<DeviceRef>> = Vec::new();
        devices.resize_with(DEVICES_PER_BUS, || None);
        devices[0] = Some(Rc::new(RefCell::new(HostBridge::new())));
        Self {
            devices,
            mmio_base,
            mmio_len,
        }
    }

    pub fn mmio_window(&self) -> (u64, u64) {
        (self.mmio_base, self.mmio_len)
    }

    /// Plug `device` into the lowest free device number (1, 2, ... in the
    /// order of calls, so its INTx routing is known beforehand); returns it.
    pub fn add(&mut self, device: DeviceRef) -> Result<u8, PciError> {
        let (number, slot) = self
            .devices
            .iter_mut()
            .enumerate()
            .find(|(_, slot)| slot.is_none())
            .ok_or(PciError::BusFull)?;
        *slot = Some(device);
        Ok(number as u8)
    }

    fn function(&self, bdf: Bdf) -> Option<&DeviceRef> {
        if bdf.bus != 0 || bdf.function != 0 {
            return None;
        }
        self.devices.get(usize::from(bdf.device))?.as_ref()
    }

    /// The configuration-space path both access mechanisms share. A device
    /// busy elsewhere (a re-entrant access) reads as absent.
    pub fn config_read(&self, bdf: Bdf, offset: usize, data: &mut [u8]) {
        match self.function(bdf).and_then(|d| d.try_borrow().ok()) {
            Some(device) => device.config().read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&self, bdf: Bdf, offset: usize, data: &[u8]) {
        if let Some(mut device) = self.function(bdf).and_then(|d| d.try_borrow_mut().ok()) {
            device.config_mut().write(offset, data);
            device.config_written(offset, data.len());
        }
    }

    /// The device and BAR decoding all of `[addr, addr + len)`, and the
    /// offset inside that BAR.
    fn decode(&self, addr: u64, len: usize) -> Option<(&DeviceRef, usize, u64)> {
        let in_window = addr
            .checked_sub(self.mmio_base)
            .is_some_and(|offset| offset < self.mmio_len && len as u64 <= self.mmio_len - offset);
        if !in_window {
            return None;
        }
        for device in self.devices.iter().flatten() {
            let Ok(borrowed) = device.try_borrow() else {
                continue;
            };
            let config = borrowed.config();
            for bar in 0..BAR_COUNT {
                if let Some(offset) = config.mem_bar(bar).and_then(|w| w.offset_of(addr, len)) {
                    return Some((device, bar, offset));
                }
            }
        }
        None
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.decode(addr, data.len()) {
            Some((device, bar, offset)) => match device.try_borrow_mut() {
                Ok(mut device) => device.bar_read(bar, offset, data),
                Err(_) => data.fill(0xff),
            },
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((device, bar, offset)) = self.decode(addr, data.len()) {
            if let Ok(mut device) = device.try_borrow_mut() {
                device.bar_write(bar, offset, data);
            }
        }
    }

    /// Do what firmware would: give every memory BAR a naturally aligned
    /// place in the MMIO window (in device and BAR order) and turn on memory
    /// decoding. For a guest that does not assign BARs itself.
    pub fn assign_bars(&mut self) -> Result<(), PciError> {
        let window_end = self
            .mmio_base
            .checked_add(self.mmio_len)
            .ok_or(PciError::WindowFull)?;
        let mut next = self.mmio_base;
        for number in 1..DEVICES_PER_BUS {
            let bdf = Bdf {
                bus: 0,
                device: number as u8,
                function: 0,
            };
            let Some(device) = self.function(bdf) else {
                continue;
            };
            let bars: Vec<_> = {
                let device = device.borrow();
                (0..BAR_COUNT)
                    .filter_map(|bar| {
                        device
                            .config()
                            .bar_size(bar)
                            .map(|(size, width)| (bar, size, width))
                    })
                    .collect()
            };
            for (bar, size, width) in bars {
                let base = next
                    .checked_next_multiple_of(size)
                    .ok_or(PciError::WindowFull)?;
                let end = base
                    .checked_add(size)
                    .filter(|&end| end <= window_end)
                    .ok_or(PciError::WindowFull)?;
                if width == BarWidth::Bits32 && end > 1 << 32 {
                    return Err(PciError::WindowFull);
                }
                let offset = BAR0 + 4 * bar;
                self.config_write(bdf, offset, &(base as u32).to_le_bytes());
                if width == BarWidth::Bits64 {
                    self.config_write(bdf, offset + 4, &((base >> 32) as u32).to_le_bytes());
                }
                next = end;
            }
            let command = device.borrow().config().command() | COMMAND_MEMORY;
            self.config_write(bdf, COMMAND, &command.to_le_bytes());
        }
        Ok(())
    }
}

/// Configuration mechanism #1: the address register at 0xCF8 (dword
/// accesses only), the data window at 0xCFC-0xCFF (any width inside it).
pub struct PciConfigIo {
    root: Shared<PciRoot>,
    address: u32,
}

pub const CONFIG_IO_PORT: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;
const CONFIG_DATA: u64 = 4;
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
const CONFIG_ADDRESS_REGISTER: u32 = 0xfc;

impl PciConfigIo {
    pub fn new(root: Shared<PciRoot>) -> Self {
        Self { root, address: 0 }
    }

    /// Target and register offset of an access at `offset` of the data
    /// window, if enabled and inside the dword.
    fn target(&self, offset: u64, len: usize) -> Option<(Bdf, usize)> {
        let byte = offset.checked_sub(CONFIG_DATA)?;
        if self.address & CONFIG_ADDRESS_ENABLE == 0 || byte.saturating_add(len as u64) > 4 {
            return None;
        }
        let bdf = Bdf {
            bus: (self.address >> 16) as u8,
            device: ((self.address >> 11) & 0x1f) as u8,
            function: ((self.address >> 8) & 0x7) as u8,
        };
        Some((
            bdf,
            (self.address & CONFIG_ADDRESS_REGISTER) as usize + byte as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
        } else if let Some((bdf, register)) = self.target(offset, data.len()) {
            self.root.borrow().config_read(bdf, register, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & !0b11;
        } else if let Some((bdf, register)) = self.target(offset, data.len()) {
            self.root.borrow().config_write(bdf, register, data);
        }
    }
}

/// Enhanced configuration access: 4 KiB per function, bus 0 at offset 0.
pub struct PciEcam {
    root: Shared<PciRoot>,
}

/// ECAM window for bus 0 only.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

impl PciEcam {
    pub fn new(root: Shared<PciRoot>) -> Self {
        Self { root }
    }

    fn target(offset: u64, len: usize) -> Option<(Bdf, usize)> {
        let register = offset % FUNCTION_CONFIG_SIZE;
        if register + len as u64 > FUNCTION_CONFIG_SIZE {
            return None;
        }
        let bdf = Bdf {
            bus: u8::try_from(offset >> 20).ok()?,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
        };
        Some((bdf, register as usize))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::target(offset, data.len()) {
            Some((bdf, register)) => self.root.borrow().config_read(bdf, register, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bdf, register)) = Self::target(offset, data.len()) {
            self.root.borrow().config_write(bdf, register, data);
        }
    }
}

/// The PCI MMIO hole; insert it on the MMIO bus at the root's window.
pub struct PciMmio {
    root: Shared<PciRoot>,
}

impl PciMmio {
    pub fn new(root: Shared<PciRoot>) -> Self {
        Self { root }
    }

    fn address(&self, offset: u64) -> Option<u64> {
        self.root.borrow().mmio_base.checked_add(offset)
    }
}

impl BusDevice for PciMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.address(offset) {
            Some(addr) => self.root.borrow().mmio_read(addr, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(addr) = self.address(offset) {
            self.root.borrow().mmio_write(addr, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::config::{CLASS, HEADER_TYPE, STATUS};
    use super::*;
    use crate::virtio::rng::SplitMix64;

    const WINDOW: (u64, u64) = (0xc000_0000, 0x1000_0000);

    /// Two BARs whose registers read back their offset's low byte.
    struct Probe {
        config: ConfigSpace,
        writes: Vec<(usize, u64, Vec<u8>)>,
    }

    impl Probe {
        fn new() -> Self {
            let mut config = ConfigSpace::new(&PciIds {
                vendor_id: 0x1234,
                device_id: 0x1111,
                revision: 0,
                class: 0xff,
                subclass: 0,
                prog_if: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            });
            config.add_mem_bar(0, 0x1000, BarWidth::Bits32).unwrap();
            config.add_mem_bar(2, 0x10000, BarWidth::Bits64).unwrap();
            Self {
                config,
                writes: Vec::new(),
            }
        }
    }

    impl PciDevice for Probe {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 * 0x10 + offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.writes.push((bar, offset, data.to_vec()));
        }
    }

    struct Platform {
        root: Shared<PciRoot>,
        io: PciConfigIo,
        ecam: PciEcam,
        mmio: PciMmio,
        probe: Shared<Probe>,
    }

    fn platform() -> Platform {
        let root = Rc::new(RefCell::new(PciRoot::new(WINDOW.0, WINDOW.1)));
        let probe = Rc::new(RefCell::new(Probe::new()));
        assert_eq!(root.borrow_mut().add(probe.clone()), Ok(1));
        Platform {
            io: PciConfigIo::new(root.clone()),
            ecam: PciEcam::new(root.clone()),
            mmio: PciMmio::new(root.clone()),
            root,
            probe,
        }
    }

    fn address(bus: u32, device: u32, function: u32, register: u32) -> u32 {
        CONFIG_ADDRESS_ENABLE | bus << 16 | device << 11 | function << 8 | register
    }

    impl Platform {
        fn cf8(
            &mut self,
            bus: u32,
            device: u32,
            function: u32,
            register: u32,
            width: usize,
        ) -> u32 {
            self.io.write(
                0,
                &address(bus, device, function, register & 0xfc).to_le_bytes(),
            );
            let mut raw = [0u8; 4];
            self.io
                .read(CONFIG_DATA + u64::from(register & 3), &mut raw[..width]);
            u32::from_le_bytes(raw)
        }

        fn cf8_write(&mut self, device: u32, register: u32, width: usize, value: u32) {
            self.io
                .write(0, &address(0, device, 0, register & 0xfc).to_le_bytes());
            self.io.write(
                CONFIG_DATA + u64::from(register & 3),
                &value.to_le_bytes()[..width],
            );
        }

        fn ecam(&mut self, bus: u64, device: u64, register: u64, width: usize) -> u32 {
            let mut raw = [0u8; 4];
            self.ecam
                .read(bus << 20 | device << 15 | register, &mut raw[..width]);
            u32::from_le_bytes(raw)
        }

        fn mmio(&mut self, addr: u64) -> Option<u8> {
            let mut byte = [0u8];
            self.mmio.read(addr - WINDOW.0, &mut byte);
            (byte[0] != 0xff).then_some(byte[0])
        }
    }

    #[test]
    fn enumeration_through_cf8_and_ecam() {
        let mut p = platform();
        assert_eq!(p.cf8(0, 0, 0, 0, 4), 0x0008_1b36, "host bridge");
        assert_eq!(p.cf8(0, 0, 0, 0x0a, 2), 0x0600, "class host bridge");
        assert_eq!(
            p.cf8(0, 0, 0, u32::from(HEADER_TYPE as u8), 1),
            0,
            "single function"
        );
        assert_eq!(p.cf8(0, 1, 0, 0, 4), 0x1111_1234);
        assert_eq!(p.cf8(0, 1, 0, 2, 2), 0x1111, "word at a byte offset");
        assert_eq!(p.cf8(0, 1, 0, 3, 1), 0x11);
        for (bus, device, function) in [(0, 2, 0), (0, 31, 0), (0, 1, 1), (1, 1, 0), (255, 0, 0)] {
            assert_eq!(
                p.cf8(bus, device, function, 0, 4),
                u32::MAX,
                "{bus}:{device}.{function}"
            );
        }
        for bdf in [(0, 0), (0, 1), (0, 2), (1, 0)] {
            for register in [0u64, 0x08, 0x2c, 0x3c] {
                let via_cf8 = p.cf8(bdf.0 as u32, bdf.1 as u32, 0, register as u32, 4);
                assert_eq!(p.ecam(bdf.0, bdf.1, register, 4), via_cf8);
            }
        }
        assert_eq!(p.ecam(0, 1, 0x100, 4), 0, "no extended capabilities");
        assert_eq!(
            p.ecam(0, 1, 0xffe, 4),
            u32::MAX,
            "crosses the function's space"
        );
        assert_eq!(p.ecam(0, 1, 1 << 12, 4), u32::MAX, "function 1");
    }

    #[test]
    fn config_address_register_quirks() {
        let mut p = platform();
        // Linux's type-1 probe: a byte write to 0xCFB, then a dword
        // round-trip through 0xCF8.
        p.io.write(3, &[1]);
        p.io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut raw = [0u8; 4];
        p.io.read(0, &mut raw);
        assert_eq!(u32::from_le_bytes(raw), 0x8000_0000);
        let mut byte = [0u8; 1];
        p.io.read(0, &mut byte);
        assert_eq!(
            byte,
            [0xff],
            "only dword accesses reach the address register"
        );
        // Disabled address: data reads all ones, writes go nowhere.
        p.io.write(
            0,
            &(address(0, 1, 0, 0x3c) & !CONFIG_ADDRESS_ENABLE).to_le_bytes(),
        );
        p.io.read(CONFIG_DATA, &mut raw);
        assert_eq!(raw, [0xff; 4]);
        p.io.write(CONFIG_DATA, &[9]);
        assert_eq!(p.cf8(0, 1, 0, 0x3c, 1), 0);
        // An access crossing the data window's end is dropped.
        p.io.write(0, &address(0, 1, 0, 0).to_le_bytes());
        let mut word = [0u8; 2];
        p.io.read(CONFIG_DATA + 3, &mut word);
        assert_eq!(word, [0xff; 2]);
        p.cf8_write(1, 0x3c, 1, 5);
        assert_eq!(p.cf8(0, 1, 0, 0x3c, 1), 5);
    }

    #[test]
    fn bars_size_move_and_decode_inside_the_window_only() {
        let mut p = platform();
        p.cf8_write(1, 0x10, 4, u32::MAX);
        assert_eq!(p.cf8(0, 1, 0, 0x10, 4), 0xffff_f000);
        p.cf8_write(1, 0x18, 4, u32::MAX);
        p.cf8_write(1, 0x1c, 4, u32::MAX);
        assert_eq!(p.cf8(0, 1, 0, 0x18, 4), 0xffff_0004);
        assert_eq!(p.cf8(0, 1, 0, 0x1c, 4), u32::MAX);

        let bar0 = WINDOW.0 + 0x1000;
        let bar2 = WINDOW.0 + 0x10_0000;
        p.cf8_write(1, 0x10, 4, bar0 as u32);
        p.cf8_write(1, 0x18, 4, bar2 as u32);
        p.cf8_write(1, 0x1c, 4, 0);
        assert_eq!(p.mmio(bar0 + 4), None, "memory decoding still off");
        p.cf8_write(1, 0x04, 2, u32::from(COMMAND_MEMORY));
        assert_eq!(p.mmio(bar0 + 4), Some(0x04));
        assert_eq!(p.mmio(bar2 + 0x22), Some(0x22 + 0x20));
        p.mmio.write(bar2 + 8 - WINDOW.0, &[1, 2]);
        assert_eq!(p.probe.borrow().writes, vec![(2, 8, vec![1, 2])]);

        // The guest moves BAR0: the old place goes dead, the new one works.
        p.cf8_write(1, 0x10, 4, (bar0 + 0x4000) as u32);
        assert_eq!(p.mmio(bar0 + 4), None);
        assert_eq!(p.mmio(bar0 + 0x4004), Some(0x04));
        // Straddling the BAR's end, or outside the window: no decode.
        let mut word = [0u8; 4];
        p.mmio.read(bar0 + 0x4ffe - WINDOW.0, &mut word);
        assert_eq!(word, [0xff; 4]);
        p.cf8_write(1, 0x1c, 4, 1);
        assert_eq!(p.mmio(bar2), None, "BAR2 now at 4 GiB + bar2, outside");
        p.cf8_write(1, 0x04, 2, 0);
        assert_eq!(p.mmio(bar0 + 0x4004), None);
    }

    #[test]
    fn firmware_style_assignment() {
        let p = platform();
        p.root.borrow_mut().assign_bars().unwrap();
        let probe = p.probe.borrow();
        assert_eq!(
            probe.config().mem_bar(0),
            Some(BarWindow {
                base: WINDOW.0,
                size: 0x1000
            })
        );
        assert_eq!(
            probe.config().mem_bar(2),
            Some(BarWindow {
                base: WINDOW.0 + 0x10000,
                size: 0x10000
            })
        );
        let mut tight = PciRoot::new(0x1000, 0x8000);
        tight.add(Rc::new(RefCell::new(Probe::new()))).unwrap();
        assert_eq!(tight.assign_bars(), Err(PciError::WindowFull));
    }

    #[test]
    fn the_bus_fills_up() {
        let mut root = PciRoot::new(WINDOW.0, WINDOW.1);
        for expected in 1..DEVICES_PER_BUS as u8 {
            assert_eq!(
                root.add(Rc::new(RefCell::new(HostBridge::new()))),
                Ok(expected)
            );
        }
        assert_eq!(
            root.add(Rc::new(RefCell::new(HostBridge::new()))),
            Err(PciError::BusFull)
        );
    }

    #[test]
    fn fuzzed_accesses_keep_the_bus_sane() {
        let mut p = platform();
        let mut prng = SplitMix64(0x9c1);
        for _ in 0..20_000 {
            let r = prng.next_u64();
            let width = [1usize, 2, 4, 8][(r & 3) as usize];
            let value = prng.next_u64().to_le_bytes();
            let mut out = [0u8; 8];
            match (r >> 2) % 6 {
                0 => p.io.write((r >> 8) % 8, &value[..width]),
                1 => p.io.read((r >> 8) % 8, &mut out[..width]),
                2 => p
                    .ecam
                    .write((r >> 8) % (2 * ECAM_BUS_SIZE), &value[..width]),
                3 => p
                    .ecam
                    .read((r >> 8) % (2 * ECAM_BUS_SIZE), &mut out[..width]),
                4 => p.mmio.write((r >> 8) % WINDOW.1, &value[..width]),
                _ => p.mmio.read((r >> 8) % WINDOW.1, &mut out[..width]),
            }
            // Identification never changes; absent devices stay absent.
            assert_eq!(p.ecam(0, 0, 0, 4), 0x0008_1b36);
            assert_eq!(p.ecam(0, 1, 0, 4), 0x1111_1234);
            assert_eq!(p.ecam(0, 1, CLASS as u64, 1), 0xff);
            assert_eq!(p.ecam(0, 5, 0, 4), u32::MAX);
            let status = p.ecam(0, 1, STATUS as u64, 2);
            assert_eq!(status & !0x18, 0, "only read-only status bits");
        }
    }
}

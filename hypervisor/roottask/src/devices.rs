//! The PCI devices the manifest's `pci` lines ask for: found once at
//! start through ECAM (bus 0), their configuration page and memory BARs
//! mapped uncached into the root (`map_device`), to be delegated to the
//! driver each time it is loaded. Without MCFG (QEMU's `pc` machine) there
//! is no ECAM and a `pci` line fails; docs/architecture.md says why ports
//! 0xcf8/0xcfc are not handed out instead.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use moat_abi::{BootInfo, Status, PAGE_SIZE};
use moat_roottask::manifest::{Manifest, PciRequest};
use moat_roottask::pci::{self, Bar, Config};
use moat_user::{println, sys};

/// Where the root maps bus 0's configuration space (256 functions).
const ROOT_ECAM: u64 = 0x0000_3000_0000_0000;
/// Where the root maps the devices' BARs: device d, BAR n at
/// `ROOT_BARS + (d * 6 + n) * MAX_BAR`.
const ROOT_BARS: u64 = 0x0000_3100_0000_0000;
/// Largest BAR handed out (one `map_device`).
pub const MAX_BAR: u64 = 2 << 20;
const FUNCTIONS: u64 = 32 * 8;

/// A device found for a `pci` line.
pub struct Device {
    /// The root's page number of its configuration page.
    pub config_page: u64,
    /// Its memory BARs and the root's page number of each.
    pub bars: Vec<(Bar, u64)>,
    /// Its bus:device.function, for messages.
    pub location: String,
}

/// One function's ECAM page as mapped in the root.
struct Ecam {
    address: u64,
}

impl Config for Ecam {
    fn read32(&self, offset: u16) -> u32 {
        // SAFETY: `address` is a function's ECAM page, mapped uncached in
        // the root by `map_device` for its whole life; the offset is
        // aligned and inside the page; config reads have no side effects
        // the root does not want.
        unsafe {
            core::ptr::read_volatile((self.address + u64::from(offset & 0xffc)) as *const u32)
        }
    }

    fn write32(&mut self, offset: u16, value: u32) {
        // SAFETY: as in `read32`; the root writes only BAR sizing and the
        // command register of a device no driver holds yet.
        unsafe {
            core::ptr::write_volatile(
                (self.address + u64::from(offset & 0xffc)) as *mut u32,
                value,
            )
        }
    }
}

/// Finds and maps every device the manifest asks for; `None` for one not
/// there (its driver then fails to load, saying so).
pub fn discover(info: &BootInfo, manifest: &Manifest) -> Vec<Option<Device>> {
    if manifest.devices.is_empty() {
        return Vec::new();
    }
    if info.ecam_base == 0 {
        println!(
            "roottask: the machine has no PCI Express configuration space (MCFG): no pci devices"
        );
        return manifest.devices.iter().map(|_| None).collect();
    }
    if let Err(status) =
        sys::map_device(info.ecam_base / PAGE_SIZE, ROOT_ECAM / PAGE_SIZE, FUNCTIONS)
    {
        println!("roottask: cannot map PCI configuration space: {status}");
        return manifest.devices.iter().map(|_| None).collect();
    }
    manifest
        .devices
        .iter()
        .enumerate()
        .map(|(d, request)| {
            let found = find(request)?;
            match take(d as u64, found) {
                Ok(device) => Some(device),
                Err(status) => {
                    println!(
                        "roottask: cannot map the BARs of pci {:04x}:{:04x}: {status}",
                        request.vendor, request.device
                    );
                    None
                }
            }
        })
        .collect()
}

/// The function number (device * 8 + function) of the request's device.
fn find(request: &PciRequest) -> Option<u64> {
    let mut seen = 0;
    for function in 0..FUNCTIONS {
        if function % 8 != 0 && !pci::multifunction(&ecam(function - function % 8)) {
            continue;
        }
        if pci::ids(&ecam(function)) == Some((request.vendor, request.device)) {
            if seen == request.nth {
                return Some(function);
            }
            seen += 1;
        }
    }
    println!(
        "roottask: no pci device {:04x}:{:04x} (number {}) on bus 0",
        request.vendor, request.device, request.nth
    );
    None
}

fn ecam(function: u64) -> Ecam {
    Ecam {
        address: ROOT_ECAM + function * PAGE_SIZE,
    }
}

fn take(d: u64, function: u64) -> Result<Device, Status> {
    let mut config = ecam(function);
    // No DMA until its driver turns it on.
    let command = config.read32(pci::COMMAND);
    config.write32(pci::COMMAND, command & !pci::COMMAND_BUS_MASTER);
    let mut bars = Vec::new();
    for bar in pci::memory_bars(&mut config) {
        // A BAR smaller than a page may share it with another device's.
        if bar.size < PAGE_SIZE || bar.size > MAX_BAR || bar.address % PAGE_SIZE != 0 {
            println!(
                "roottask: pci BAR {} ({:#x} bytes at {:#x}) not handed out",
                bar.index, bar.size, bar.address
            );
            continue;
        }
        let page = (ROOT_BARS + (d * 6 + u64::from(bar.index)) * MAX_BAR) / PAGE_SIZE;
        sys::map_device(bar.address / PAGE_SIZE, page, bar.size / PAGE_SIZE)?;
        bars.push((bar, page));
    }
    Ok(Device {
        config_page: config.address / PAGE_SIZE,
        bars,
        location: format!("00:{:02x}.{}", function / 8, function % 8),
    })
}

/// Stops a device's DMA (its driver is gone: the memory it was given goes
/// back to the pool).
pub fn stop_dma(device: &Device) {
    let mut config = Ecam {
        address: device.config_page * PAGE_SIZE,
    };
    let command = config.read32(pci::COMMAND);
    config.write32(pci::COMMAND, command & !pci::COMMAND_BUS_MASTER);
}

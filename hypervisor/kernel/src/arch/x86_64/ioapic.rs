//! The IOAPIC: routes a device's global system interrupt (GSI) to a vector
//! on this CPU. The kernel masks a GSI when it fires; the driver that owns
//! it unmasks it once it has served the device.

use super::layout::phys_to_virt;
use core::sync::atomic::{AtomicU64, Ordering};

const REGISTER_SELECT: u64 = 0x00;
const REGISTER_WINDOW: u64 = 0x10;
const REG_VERSION: u32 = 0x01;
const REG_REDIRECTION: u32 = 0x10;
const ACTIVE_LOW: u32 = 1 << 13;
const LEVEL_TRIGGERED: u32 = 1 << 15;
const MASKED: u32 = 1 << 16;

/// Interrupt vectors for GSIs start here.
pub const VECTOR_BASE: u8 = 0x30;
/// GSIs the kernel routes (those of the first IOAPIC).
pub const MAX_GSIS: u32 = 24;

static BASE: AtomicU64 = AtomicU64::new(0);
static GSI_COUNT: AtomicU64 = AtomicU64::new(0);

fn read(register: u32) -> u32 {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: BASE is the direct-map address of the IOAPIC's registers (set
    // by `init` from the MADT); select then window is the access protocol.
    unsafe {
        core::ptr::write_volatile((base + REGISTER_SELECT) as *mut u32, register);
        core::ptr::read_volatile((base + REGISTER_WINDOW) as *const u32)
    }
}

fn write(register: u32, value: u32) {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: as in `read`.
    unsafe {
        core::ptr::write_volatile((base + REGISTER_SELECT) as *mut u32, register);
        core::ptr::write_volatile((base + REGISTER_WINDOW) as *mut u32, value);
    }
}

/// Masks every pin of the IOAPIC at `address` (physical, from the MADT).
pub fn init(address: u64) {
    BASE.store(phys_to_virt(address), Ordering::Relaxed);
    let pins = ((read(REG_VERSION) >> 16) & 0xff) + 1;
    let count = pins.min(MAX_GSIS);
    GSI_COUNT.store(count.into(), Ordering::Relaxed);
    for gsi in 0..count {
        write(REG_REDIRECTION + 2 * gsi, MASKED);
        write(REG_REDIRECTION + 2 * gsi + 1, 0);
    }
}

pub fn present(gsi: u64) -> bool {
    BASE.load(Ordering::Relaxed) != 0 && gsi < GSI_COUNT.load(Ordering::Relaxed)
}

/// Routes `gsi` to its vector on the CPU with APIC id `apic_id`, unmasked.
pub fn route(gsi: u32, level: bool, active_low: bool, apic_id: u32) {
    let mut low = u32::from(VECTOR_BASE) + gsi;
    if level {
        low |= LEVEL_TRIGGERED;
    }
    if active_low {
        low |= ACTIVE_LOW;
    }
    write(REG_REDIRECTION + 2 * gsi + 1, apic_id << 24);
    write(REG_REDIRECTION + 2 * gsi, low);
}

pub fn set_masked(gsi: u32, masked: bool) {
    let register = REG_REDIRECTION + 2 * gsi;
    let low = read(register);
    write(register, if masked { low | MASKED } else { low & !MASKED });
}

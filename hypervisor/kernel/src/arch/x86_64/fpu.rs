//! FPU/SSE state. The kernel and user tasks are built without floating
//! point, so the host runs with CR0.TS set: an FPU or SSE instruction in a
//! user task raises #NM (and the task is reported like any fault) instead
//! of seeing or changing a guest's registers. Guests get their state
//! restored right before each entry and saved right after each exit.

use super::cpu;

const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// FXSAVE layout: FPU control word at 0, MXCSR at 24.
const FCW_OFFSET: usize = 0;
const MXCSR_OFFSET: usize = 24;
const FCW_DEFAULT: u16 = 0x037f;
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Enables FXSAVE/SSE for guests and traps FPU use everywhere else.
pub fn init() {
    // SAFETY: OSFXSR/OSXMMEXCPT only enable FXSAVE and SSE exceptions; TS
    // and MP make FPU instructions trap, which the kernel never executes.
    unsafe {
        cpu::write_cr4(cpu::read_cr4() | CR4_OSFXSR | CR4_OSXMMEXCPT);
        cpu::write_cr0(cpu::read_cr0() | CR0_TS | CR0_MP);
    }
}

/// The state of a freshly reset FPU, as FXSAVE would store it.
pub fn reset_area(area: &mut [u8; 4096]) {
    area[..512].fill(0);
    area[FCW_OFFSET..FCW_OFFSET + 2].copy_from_slice(&FCW_DEFAULT.to_le_bytes());
    area[MXCSR_OFFSET..MXCSR_OFFSET + 4].copy_from_slice(&MXCSR_DEFAULT.to_le_bytes());
}

/// Loads a guest's FPU state (from a 16-byte-aligned FXSAVE area).
pub fn load_guest(area: &[u8; 4096]) {
    // SAFETY: CLTS allows FPU instructions; the area is a whole page (so
    // aligned and large enough) holding a valid FXSAVE image (reset_area or
    // a previous save).
    unsafe {
        core::arch::asm!("clts", "fxrstor64 [{}]", in(reg) area.as_ptr(), options(nostack, readonly));
    }
}

/// Saves a guest's FPU state and traps FPU use again.
pub fn save_guest(area: &mut [u8; 4096]) {
    // SAFETY: as in `load_guest`; TS is set again before returning.
    unsafe {
        core::arch::asm!("clts", "fxsave64 [{}]", in(reg) area.as_mut_ptr(), options(nostack));
        cpu::write_cr0(cpu::read_cr0() | CR0_TS);
    }
}

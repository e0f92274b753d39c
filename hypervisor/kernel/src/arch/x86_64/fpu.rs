//! FPU, SSE and extended (XSAVE) state. The kernel and user tasks are built
//! without floating point, so the host runs with CR0.TS set: an FPU or SSE
//! instruction in a user task raises #NM (and the task is reported like
//! any fault) instead of seeing or changing a guest's registers. Guests get
//! their state — with XSAVE, every component their XCR0 enables (AVX,
//! AVX-512, ...) — restored right before each entry and saved right after
//! each exit.

use super::cpu;
use core::sync::atomic::{AtomicU64, Ordering};

const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
/// FXSAVE layout: FPU control word at 0, MXCSR at 24.
const FCW_OFFSET: usize = 0;
const MXCSR_OFFSET: usize = 24;
/// XSTATE_BV in the XSAVE header, after the 512-byte legacy area.
const XSTATE_BV_OFFSET: usize = 512;
const FCW_DEFAULT: u16 = 0x037f;
const MXCSR_DEFAULT: u32 = 0x1f80;
const AREA_SIZE: u64 = 4096;
/// XCR0 bits: x87, SSE, AVX.
const XCR0_X87: u64 = 1 << 0;
const XCR0_SSE: u64 = 1 << 1;
const XCR0_AVX: u64 = 1 << 2;
/// The host's XCR0 (it uses no extended state).
const HOST_XCR0: u64 = XCR0_X87 | XCR0_SSE;

/// XCR0 bits the CPU supports and the kernel saves per vCPU; 0 without
/// XSAVE (then FXSAVE keeps x87 and SSE only).
static SUPPORTED_XCR0: AtomicU64 = AtomicU64::new(0);

/// Finds what the CPU can save for guests (XSAVE components, or FXSAVE
/// only), reports it, and sets up the boot CPU (`init_this_cpu`).
pub fn init() {
    let features = core::arch::x86_64::__cpuid(1);
    let has_xsave = features.ecx & (1 << 26) != 0;
    if has_xsave {
        // SAFETY: CPUID says XSAVE exists; leaf 0xd is then defined.
        let leaf = core::arch::x86_64::__cpuid_count(0xd, 0);
        let supported = u64::from(leaf.eax) | (u64::from(leaf.edx) << 32);
        if u64::from(leaf.ecx) <= AREA_SIZE {
            SUPPORTED_XCR0.store(supported, Ordering::Relaxed);
        }
        log::info!(
            "fpu: xsave, components {supported:#x}, {} bytes per guest",
            leaf.ecx
        );
    }
    init_this_cpu();
}

/// Enables FXSAVE/SSE (and XSAVE where `init` found it usable) for guests
/// on this CPU, and traps FPU use everywhere else.
pub fn init_this_cpu() {
    let xsave = SUPPORTED_XCR0.load(Ordering::Relaxed) != 0;
    let mut cr4 = cpu::read_cr4() | CR4_OSFXSR | CR4_OSXMMEXCPT;
    if xsave {
        cr4 |= CR4_OSXSAVE;
    }
    // SAFETY: OSFXSR/OSXMMEXCPT/OSXSAVE only enable FXSAVE, SSE exceptions
    // and XSAVE; TS and MP make FPU instructions trap, which the kernel
    // never executes.
    unsafe {
        cpu::write_cr4(cr4);
        cpu::write_cr0(cpu::read_cr0() | CR0_TS | CR0_MP);
    }
    if xsave {
        xsetbv(HOST_XCR0);
    }
}

/// Whether `xcr0` is a value XSETBV accepts and the kernel keeps.
pub fn valid_xcr0(xcr0: u64) -> bool {
    let supported = SUPPORTED_XCR0.load(Ordering::Relaxed);
    xcr0 & XCR0_X87 != 0
        && xcr0 & !supported == 0
        && (xcr0 & XCR0_AVX == 0 || xcr0 & XCR0_SSE != 0)
        && (supported != 0 || xcr0 == XCR0_X87)
}

fn xsetbv(value: u64) {
    // SAFETY: only called with CR4.OSXSAVE set and a value `valid_xcr0`
    // accepted (or the host's, which has x87 and SSE only).
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") 0, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nomem, nostack));
    }
}

/// The state of a freshly reset FPU: an FXSAVE image (an XSAVE header of
/// zeros means every extended component in its initial state).
pub fn reset_area(area: &mut [u8; 4096]) {
    area.fill(0);
    area[FCW_OFFSET..FCW_OFFSET + 2].copy_from_slice(&FCW_DEFAULT.to_le_bytes());
    area[MXCSR_OFFSET..MXCSR_OFFSET + 4].copy_from_slice(&MXCSR_DEFAULT.to_le_bytes());
}

/// Loads a guest's state: its XCR0 and the components it enables.
pub fn load_guest(area: &mut [u8; 4096], xcr0: u64) {
    // XRSTOR faults on a component in XSTATE_BV that XCR0 lacks: the VMM
    // may have shrunk XCR0 since the image was saved (a guest reset). Such
    // components go back to their initial state, as the CPU would do.
    let header = &mut area[XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8];
    let mut bv = [0u8; 8];
    bv.copy_from_slice(header);
    header.copy_from_slice(&(u64::from_le_bytes(bv) & xcr0).to_le_bytes());
    // SAFETY: CLTS allows FPU instructions; the area is a whole page (so
    // 64-byte aligned and large enough, checked at init) holding a valid
    // image (`reset_area` or a previous save in the standard format, its
    // XSTATE_BV now within XCR0).
    unsafe {
        core::arch::asm!("clts", options(nomem, nostack));
        if SUPPORTED_XCR0.load(Ordering::Relaxed) != 0 {
            xsetbv(xcr0);
            core::arch::asm!("xrstor64 [{}]", in(reg) area.as_ptr(), in("eax") u32::MAX, in("edx") u32::MAX,
                options(nostack, readonly));
        } else {
            core::arch::asm!("fxrstor64 [{}]", in(reg) area.as_ptr(), options(nostack, readonly));
        }
    }
}

/// Saves a guest's state, restores the host's XCR0 and traps FPU use
/// again. Returns the XCR0 the guest ran with at the end: a CPU that does
/// not intercept XSETBV (QEMU's SVM) lets the guest change it directly, and
/// the saved image then needs that value to be restored.
pub fn save_guest(area: &mut [u8; 4096], xcr0: u64) -> u64 {
    let mut current = xcr0;
    // SAFETY: as in `load_guest`; XCR0 still holds the guest's value, so
    // XSAVE stores every component the guest may have used.
    unsafe {
        core::arch::asm!("clts", options(nomem, nostack));
        if SUPPORTED_XCR0.load(Ordering::Relaxed) != 0 {
            let (low, high): (u32, u32);
            core::arch::asm!("xgetbv", in("ecx") 0, out("eax") low, out("edx") high, options(nomem, nostack));
            current = u64::from(low) | (u64::from(high) << 32);
            core::arch::asm!("xsave64 [{}]", in(reg) area.as_mut_ptr(), in("eax") u32::MAX, in("edx") u32::MAX,
                options(nostack));
            xsetbv(HOST_XCR0);
        } else {
            core::arch::asm!("fxsave64 [{}]", in(reg) area.as_mut_ptr(), options(nostack));
        }
        cpu::write_cr0(cpu::read_cr0() | CR0_TS);
    }
    current
}

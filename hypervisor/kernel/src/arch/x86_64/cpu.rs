//! Small CPU helpers: MSRs, control registers, the TSC, port I/O.

use core::arch::asm;
use x86::msr;

pub fn read_msr(register: u32) -> u64 {
    // SAFETY: callers only name MSRs that exist on this CPU (architectural
    // ones, or ones whose CPUID feature they checked).
    unsafe { msr::rdmsr(register) }
}

pub fn write_msr(register: u32, value: u64) {
    // SAFETY: as for `read_msr`; the values written are the kernel's own
    // configuration, checked against the CPU's capabilities by the callers.
    unsafe { msr::wrmsr(register, value) }
}

pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Switches to the page tables at `root`.
///
/// # Safety
/// `root` must be a PML4 that maps the kernel (code, stacks, statics, direct
/// map) exactly as the current one does.
pub unsafe fn write_cr3(root: u64) {
    // SAFETY: the caller guarantees the kernel stays mapped.
    unsafe { asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) };
}

pub fn read_cr0() -> u64 {
    let value: u64;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

pub fn read_cr4() -> u64 {
    let value: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// # Safety
/// The new CR0 must keep paging, protection and write protection as the
/// kernel relies on them.
pub unsafe fn write_cr0(value: u64) {
    // SAFETY: the caller keeps the modes the kernel runs in.
    unsafe { asm!("mov cr0, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// # Safety
/// The new CR4 must keep PAE and any feature the kernel already uses.
pub unsafe fn write_cr4(value: u64) {
    // SAFETY: the caller keeps the modes the kernel runs in.
    unsafe { asm!("mov cr4, {}", in(reg) value, options(nostack, preserves_flags)) };
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: with interrupts off, HLT parks the CPU; nothing is lost.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: callers name ports the kernel owns (PIC, PIT, debug exit).
    unsafe { x86::io::outb(port, value) }
}

pub fn inb(port: u16) -> u8 {
    // SAFETY: as for `outb`.
    unsafe { x86::io::inb(port) }
}

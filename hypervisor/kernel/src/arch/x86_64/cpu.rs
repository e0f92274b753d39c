//! Per-CPU data (reached through GS in the kernel) and small CPU helpers.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};
use x86::msr;

/// Reached through GS while in the kernel; the syscall entry relies on the
/// offsets of `kernel_rsp` and `user_rsp`.
#[repr(C)]
pub struct PerCpu {
    self_pointer: u64,
    /// Where SYSCALL saves the user registers: the end of the running EC's
    /// register area.
    pub kernel_rsp: u64,
    pub user_rsp: u64,
    pub id: u64,
    /// The top of this CPU's kernel stack, where Rust code runs.
    pub stack_top: u64,
}

pub const PERCPU_KERNEL_RSP: usize = 8;
pub const PERCPU_USER_RSP: usize = 16;
pub const PERCPU_STACK_TOP: usize = 32;
const _: () = assert!(core::mem::offset_of!(PerCpu, stack_top) == PERCPU_STACK_TOP);
const _: () = assert!(core::mem::offset_of!(PerCpu, kernel_rsp) == PERCPU_KERNEL_RSP);
const _: () = assert!(core::mem::offset_of!(PerCpu, user_rsp) == PERCPU_USER_RSP);

static mut BOOT_CPU: PerCpu = PerCpu {
    self_pointer: 0,
    kernel_rsp: 0,
    user_rsp: 0,
    id: 0,
    stack_top: 0,
};
static PERCPU_READY: AtomicBool = AtomicBool::new(false);

/// Sets up the boot CPU's per-CPU block and points GS at it.
pub fn init_boot_cpu(kernel_stack_top: u64) {
    let percpu = core::ptr::addr_of_mut!(BOOT_CPU);
    // SAFETY: runs once on the boot CPU before anything reads BOOT_CPU, with
    // interrupts off; nothing else holds a reference to it.
    unsafe {
        (*percpu).self_pointer = percpu as u64;
        (*percpu).kernel_rsp = kernel_stack_top;
        (*percpu).stack_top = kernel_stack_top;
        (*percpu).id = 0;
    }
    write_msr(msr::IA32_GS_BASE, percpu as u64);
    write_msr(msr::IA32_KERNEL_GSBASE, 0);
    PERCPU_READY.store(true, Ordering::Release);
}

/// Where the next SYSCALL saves the user registers.
pub fn set_kernel_rsp(top: u64) {
    // SAFETY: GS points at this CPU's PerCpu in the kernel; one CPU with
    // interrupts off, so no concurrent access.
    unsafe {
        asm!("mov gs:[{}], {}", const PERCPU_KERNEL_RSP, in(reg) top, options(nostack, preserves_flags));
    }
}

/// This CPU's number (0 before per-CPU data exists).
pub fn current_id() -> u64 {
    if !PERCPU_READY.load(Ordering::Acquire) {
        return 0;
    }
    let id: u64;
    // SAFETY: GS points at this CPU's PerCpu while in the kernel (entries from
    // user mode swap it in before any Rust code runs).
    unsafe {
        asm!("mov {}, gs:[{}]", out(reg) id, const core::mem::offset_of!(PerCpu, id),
             options(nostack, readonly, preserves_flags));
    }
    id
}

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

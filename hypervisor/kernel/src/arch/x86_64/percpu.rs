//! Per-CPU data: one [`PerCpu`] block per CPU, in a static table indexed by
//! the kernel's CPU number (0 = the boot CPU, then the MADT order), reached
//! on the CPU itself through GS while in the kernel.
//!
//! Each field is written only by the CPU it belongs to, except where its
//! comment says otherwise (the boot CPU fills a block in before it starts
//! that CPU, and reads `state` while it waits). Every field is atomic, so
//! the table is plain shared data; the orderings say where one CPU
//! publishes to another.
//!
//! What is per-CPU now: the entry-path words (the kernel stack, where
//! SYSCALL saves the user registers), the GDT and TSS with their IST
//! stacks, the LAPIC timer's state, the VMXON region or host save area,
//! and what the IPIs between CPUs need (`ipi`). Each CPU's run queue,
//! current EC and VPID/ASID space are in the kernel's state, under the
//! kernel lock (`Kernel::cpus`).

use super::cpu::write_msr;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use moat_kernel::smp::MAX_CPUS;
use x86::msr;

/// The boot CPU's number.
pub const BOOT_CPU: usize = 0;

/// Reached through GS while in the kernel; the entry code relies on the
/// offsets of `kernel_rsp`, `user_rsp` and `stack_top`.
#[repr(C)]
pub struct PerCpu {
    /// The block's own address, so `current` needs one GS-relative load.
    self_pointer: AtomicU64,
    /// Where SYSCALL saves the user registers: the end of the running EC's
    /// register area.
    pub kernel_rsp: AtomicU64,
    /// Scratch for the SYSCALL entry.
    pub user_rsp: AtomicU64,
    pub id: AtomicU64,
    /// The top of this CPU's kernel stack, where Rust code runs.
    pub stack_top: AtomicU64,
    /// This CPU's local APIC id.
    pub apic_id: AtomicU32,
    /// Where bring-up stands ([`CpuState`]); the boot CPU reads it.
    state: AtomicU8,
    /// Set by the CPU during bring-up: its virtualization is on, its timer
    /// interrupts arrive.
    pub virt_on: AtomicBool,
    pub timer_ticking: AtomicBool,
    /// This CPU's GDT and TSS (`gdt::CpuTables`), by address.
    pub tables: AtomicU64,
    /// The top of this CPU's IST stacks (NMI, #DF, #MC), one after another.
    pub ist_base: AtomicU64,
    /// The frame given to VMXON (Intel) or VM_HSAVE_PA (AMD); 0: none.
    pub virt_area: AtomicU64,
    /// The LAPIC timer: TSC of the next scheduling tick, of the armed
    /// expiry, and the ticks counted.
    pub next_tick: AtomicU64,
    pub armed: AtomicU64,
    pub ticks: AtomicU64,
    /// The CPU schedules ECs (`ipi::join`): wake-ups and shootdowns reach
    /// it. Written by the CPU itself, read by every CPU.
    pub scheduling: AtomicBool,
    /// The latest shootdown generation this CPU carried out (`ipi`); read
    /// by the initiator.
    pub ipi_ack: AtomicU64,
    /// A shootdown may have revoked ports: the TSS's I/O bitmap must be
    /// reloaded before the next return to user mode.
    pub io_stale: AtomicBool,
    /// The CPU is in guest mode (`vcpu::GuestRun::go`); for the NMI
    /// handler's report.
    pub in_guest: AtomicBool,
    /// Wake-ups to send when this CPU drops the kernel lock, one bit per
    /// CPU (`ipi::kick`).
    pub kicks: AtomicU64,
    /// A timer expiry to arm when this CPU drops the kernel lock
    /// (`lapic::arm_if_earlier`); `u64::MAX`: none.
    pub arm_at: AtomicU64,
    /// The CPU waits for the kernel lock (`kernel::lock_wanted`).
    pub wants_lock: AtomicBool,
    /// Since when (TSC) the CPU waits for the kernel lock; 0: it does not.
    pub spin_since: AtomicU64,
}

pub const PERCPU_KERNEL_RSP: usize = 8;
pub const PERCPU_USER_RSP: usize = 16;
pub const PERCPU_STACK_TOP: usize = 32;
const _: () = assert!(core::mem::offset_of!(PerCpu, stack_top) == PERCPU_STACK_TOP);
const _: () = assert!(core::mem::offset_of!(PerCpu, kernel_rsp) == PERCPU_KERNEL_RSP);
const _: () = assert!(core::mem::offset_of!(PerCpu, user_rsp) == PERCPU_USER_RSP);

/// Where a CPU's bring-up stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CpuState {
    /// Not started (or not present).
    Offline = 0,
    /// The boot CPU filled the block in and sent the start-up IPIs.
    Starting = 1,
    /// The CPU runs its own code and idles; it may be given work.
    Online = 2,
    /// It did not answer in time; it was sent INIT to stop it.
    Failed = 3,
}

impl PerCpu {
    const fn new() -> Self {
        Self {
            self_pointer: AtomicU64::new(0),
            kernel_rsp: AtomicU64::new(0),
            user_rsp: AtomicU64::new(0),
            id: AtomicU64::new(0),
            stack_top: AtomicU64::new(0),
            apic_id: AtomicU32::new(0),
            state: AtomicU8::new(CpuState::Offline as u8),
            virt_on: AtomicBool::new(false),
            timer_ticking: AtomicBool::new(false),
            tables: AtomicU64::new(0),
            ist_base: AtomicU64::new(0),
            virt_area: AtomicU64::new(0),
            next_tick: AtomicU64::new(0),
            armed: AtomicU64::new(u64::MAX),
            ticks: AtomicU64::new(0),
            scheduling: AtomicBool::new(false),
            ipi_ack: AtomicU64::new(0),
            io_stale: AtomicBool::new(false),
            in_guest: AtomicBool::new(false),
            kicks: AtomicU64::new(0),
            arm_at: AtomicU64::new(u64::MAX),
            wants_lock: AtomicBool::new(false),
            spin_since: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> CpuState {
        match self.state.load(Ordering::Acquire) {
            1 => CpuState::Starting,
            2 => CpuState::Online,
            3 => CpuState::Failed,
            _ => CpuState::Offline,
        }
    }

    /// Publishes a new state: what the CPU wrote before is visible to
    /// whoever reads this state.
    pub fn set_state(&self, state: CpuState) {
        self.state.store(state as u8, Ordering::Release);
    }
}

static CPUS: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];

/// CPU `index`'s block. Panics for an index past [`MAX_CPUS`].
pub fn get(index: usize) -> &'static PerCpu {
    &CPUS[index]
}

/// Every CPU's block, CPUs not present included.
pub fn all() -> &'static [PerCpu] {
    &CPUS
}

/// Points GS at CPU `index`'s block, on that CPU, before anything on it
/// uses per-CPU data (logging does): the first thing each CPU does in
/// Rust. `stack_top` is its kernel stack.
pub fn enter(index: usize, stack_top: u64) {
    let percpu = get(index);
    percpu
        .self_pointer
        .store(percpu as *const PerCpu as u64, Ordering::Relaxed);
    percpu.id.store(index as u64, Ordering::Relaxed);
    percpu.kernel_rsp.store(stack_top, Ordering::Relaxed);
    percpu.stack_top.store(stack_top, Ordering::Relaxed);
    write_msr(msr::IA32_GS_BASE, percpu as *const PerCpu as u64);
    write_msr(msr::IA32_KERNEL_GSBASE, 0);
}

/// This CPU's block.
#[inline]
pub fn current() -> &'static PerCpu {
    let pointer: u64;
    // SAFETY: GS points at this CPU's block in CPUS whenever kernel code
    // runs: every CPU runs `enter` before anything else in Rust, and
    // entries from user mode swap it in before any Rust code runs. The
    // block's first word is its own address.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) pointer,
                         options(nostack, readonly, preserves_flags));
    }
    // SAFETY: `pointer` is the address of a block in the static CPUS table.
    unsafe { &*(pointer as *const PerCpu) }
}

/// This CPU's number.
pub fn current_id() -> usize {
    current().id.load(Ordering::Relaxed) as usize
}

/// Where the next SYSCALL on this CPU saves the user registers.
#[inline]
pub fn set_kernel_rsp(top: u64) {
    // SAFETY: GS points at this CPU's block in the kernel (see `current`);
    // the word at PERCPU_KERNEL_RSP is its `kernel_rsp`, an AtomicU64 only
    // this CPU writes, and an aligned 8-byte store is atomic.
    unsafe {
        core::arch::asm!("mov gs:[{}], {}", const PERCPU_KERNEL_RSP, in(reg) top,
                         options(nostack, preserves_flags));
    }
}

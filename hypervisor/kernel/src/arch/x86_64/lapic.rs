//! The local APIC: x2APIC (MSRs) when the CPU has it, xAPIC (MMIO) otherwise.
//! Its timer is calibrated against the PIT at boot, on the boot CPU; every
//! CPU's timer then runs one-shot from that calibration, with its state
//! (next tick, armed expiry, ticks) in the CPU's per-CPU block. The boot
//! CPU starts the others with INIT and STARTUP IPIs.

use super::cpu::{rdtsc, read_msr, write_msr};
use super::layout::phys_to_virt;
use super::percpu;
use super::pit;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ADDRESS: u64 = 0x000f_ffff_ffff_f000;
const X2APIC_MSR_BASE: u32 = 0x800;

const REG_ID: u32 = 0x20;
const REG_EOI: u32 = 0xb0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_SPURIOUS: u32 = 0xf0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_LINT1: u32 = 0x360;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;

const SPURIOUS_ENABLE: u32 = 1 << 8;
const ICR_DELIVERY_INIT: u32 = 0b101 << 8;
const ICR_DELIVERY_STARTUP: u32 = 0b110 << 8;
const ICR_DELIVERY_NMI: u32 = 0b100 << 8;
/// xAPIC only: the previous IPI has not been sent yet.
const ICR_SEND_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const LVT_MASKED: u32 = 1 << 16;
const LVT_DELIVERY_NMI: u32 = 0b100 << 8;
const DIVIDE_BY_16: u32 = 0b0011;

/// The calibration window: 10 ms of PIT ticks.
const CALIBRATION_PIT_TICKS: u16 = (pit::FREQUENCY_HZ / 100) as u16;
const CALIBRATION_PER_SECOND: u64 = 100;
pub const TICK_HZ: u64 = 100;
/// Microseconds per timer tick.
pub const TICK_US: u64 = 1_000_000 / TICK_HZ;

/// The same on every CPU: the mode the boot CPU chose, the xAPIC page's
/// physical address (every CPU's own APIC answers there), the timer and
/// TSC frequencies it measured.
static X2APIC: AtomicBool = AtomicBool::new(false);
static MMIO_BASE: AtomicU64 = AtomicU64::new(0);
static TIMER_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TIMER_VECTOR: AtomicU64 = AtomicU64::new(0);
static SPURIOUS_VECTOR: AtomicU64 = AtomicU64::new(0);

/// This CPU's APIC id.
pub fn id() -> u32 {
    percpu::current().apic_id.load(Ordering::Relaxed)
}

fn read(register: u32) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        read_msr(X2APIC_MSR_BASE + (register >> 4)) as u32
    } else {
        let address = MMIO_BASE.load(Ordering::Relaxed) + u64::from(register);
        // SAFETY: MMIO_BASE is the direct-map address of this CPU's xAPIC page
        // (set in `init` before any access), and `register` is an aligned
        // register offset inside it.
        unsafe { core::ptr::read_volatile(address as *const u32) }
    }
}

fn write(register: u32, value: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        write_msr(X2APIC_MSR_BASE + (register >> 4), value.into());
    } else {
        let address = MMIO_BASE.load(Ordering::Relaxed) + u64::from(register);
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile(address as *mut u32, value) }
    }
}

pub struct Calibration {
    pub x2apic: bool,
    pub id: u32,
    pub timer_hz: u64,
    pub tsc_hz: u64,
}

/// Enables the LAPIC, calibrates its timer and the TSC, and starts the
/// periodic tick on `timer_vector`. EN in IA32_APIC_BASE is never cleared
/// (Bochs ignores later writes once it was).
pub fn init(use_x2apic: bool, timer_vector: u8, spurious_vector: u8) -> Calibration {
    let base = read_msr(IA32_APIC_BASE);
    X2APIC.store(use_x2apic, Ordering::Relaxed);
    MMIO_BASE.store(phys_to_virt(base & APIC_BASE_ADDRESS), Ordering::Relaxed);
    TIMER_VECTOR.store(timer_vector.into(), Ordering::Relaxed);
    SPURIOUS_VECTOR.store(spurious_vector.into(), Ordering::Relaxed);
    let id = enable();

    write(REG_LVT_TIMER, LVT_MASKED | u32::from(timer_vector));
    let mut tsc_start = 0;
    let mut tsc_end = 0;
    let mut remaining = 0;
    pit::measure(
        CALIBRATION_PIT_TICKS,
        || {
            write(REG_TIMER_INITIAL, u32::MAX);
            tsc_start = rdtsc();
        },
        || {
            remaining = read(REG_TIMER_CURRENT);
            tsc_end = rdtsc();
        },
    );
    write(REG_TIMER_INITIAL, 0);
    let timer_hz = u64::from(u32::MAX - remaining) * CALIBRATION_PER_SECOND;
    let tsc_hz = tsc_end.wrapping_sub(tsc_start) * CALIBRATION_PER_SECOND;
    TIMER_HZ.store(timer_hz, Ordering::Relaxed);
    TSC_HZ.store(tsc_hz, Ordering::Relaxed);

    start_timer();
    Calibration {
        x2apic: use_x2apic,
        id,
        timer_hz,
        tsc_hz,
    }
}

/// Enables this CPU's APIC in the boot CPU's mode, with the spurious
/// vector and the timer's divider; returns (and records) its id.
fn enable() -> u32 {
    let base = read_msr(IA32_APIC_BASE);
    if X2APIC.load(Ordering::Relaxed) {
        // xAPIC first: x2APIC may only be entered from it.
        if base & APIC_BASE_X2APIC == 0 {
            write_msr(IA32_APIC_BASE, base | APIC_BASE_ENABLE);
            write_msr(IA32_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
        }
    } else {
        write_msr(IA32_APIC_BASE, base | APIC_BASE_ENABLE);
    }
    write(
        REG_SPURIOUS,
        SPURIOUS_ENABLE | SPURIOUS_VECTOR.load(Ordering::Relaxed) as u32,
    );
    let id = if X2APIC.load(Ordering::Relaxed) {
        read(REG_ID)
    } else {
        read(REG_ID) >> 24
    };
    percpu::current().apic_id.store(id, Ordering::Relaxed);
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    // LINT1 is the PC's NMI line (firmware sets it up on the boot CPU
    // only; others come out of reset masked): every CPU takes it, so an
    // NMI from outside (QEMU's monitor `nmi`) reaches all of them and
    // each reports for the state dump (`dump.rs`).
    write(REG_LVT_LINT1, LVT_DELIVERY_NMI);
    id
}

/// One-shot mode: every expiry is armed for the next event; the first is
/// a tick period from now.
fn start_timer() {
    write(REG_LVT_TIMER, TIMER_VECTOR.load(Ordering::Relaxed) as u32);
    let first = rdtsc() + tick_period();
    percpu::current().next_tick.store(first, Ordering::Relaxed);
    arm(first);
}

/// Brings up the APIC of a CPU other than the boot CPU, with the boot
/// CPU's mode and calibration, and starts its timer; returns its id.
pub fn init_this_cpu() -> u32 {
    let id = enable();
    start_timer();
    id
}

/// Sends INIT to the CPU with APIC id `apic_id`: it stops whatever it does
/// and waits for a STARTUP IPI.
pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, ICR_DELIVERY_INIT | ICR_LEVEL_ASSERT);
}

/// Sends a STARTUP IPI: the CPU, waiting after INIT, starts in real mode at
/// `vector` * 4 KiB.
pub fn send_startup(apic_id: u32, vector: u8) {
    send_ipi(
        apic_id,
        ICR_DELIVERY_STARTUP | ICR_LEVEL_ASSERT | u32::from(vector),
    );
}

/// Sends a fixed interrupt with `vector` to the CPU with APIC id `apic_id`.
pub fn send_fixed(apic_id: u32, vector: u8) {
    send_ipi(apic_id, ICR_LEVEL_ASSERT | u32::from(vector));
}

/// Sends an NMI to the CPU with APIC id `apic_id` (it arrives even while
/// that CPU runs with interrupts off).
pub fn send_nmi(apic_id: u32) {
    send_ipi(apic_id, ICR_DELIVERY_NMI | ICR_LEVEL_ASSERT);
}

fn send_ipi(apic_id: u32, command: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // One 64-bit write; x2APIC has no send-pending bit to wait for.
        write_msr(
            X2APIC_MSR_BASE + (REG_ICR_LOW >> 4),
            (u64::from(apic_id) << 32) | u64::from(command),
        );
    } else {
        wait_until_sent();
        write(REG_ICR_HIGH, apic_id << 24);
        write(REG_ICR_LOW, command);
        wait_until_sent();
    }
}

/// Waits (at most 10 ms) until the xAPIC has sent the last IPI.
fn wait_until_sent() {
    let limit = TSC_HZ.load(Ordering::Relaxed) / 100;
    let start = rdtsc();
    while read(REG_ICR_LOW) & ICR_SEND_PENDING != 0 && rdtsc().wrapping_sub(start) < limit {
        core::hint::spin_loop();
    }
}

/// Spins for `us` microseconds by the TSC.
pub fn delay_us(us: u64) {
    let cycles = TSC_HZ.load(Ordering::Relaxed) / 1_000_000 * us;
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}

/// Whether the APICs run in x2APIC mode.
pub fn x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// The TSC frequency the boot CPU measured.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Waits with interrupts on for `count` timer ticks, at most one second by
/// the TSC; returns the TSC cycles they took, or None if they did not come.
pub fn wait_for_ticks(count: u64, tsc_hz: u64) -> Option<u64> {
    let first = ticks();
    let start = rdtsc();
    let mut elapsed = 0;
    // SAFETY: the IDT and the timer vector's handler are set up; the kernel
    // holds no lock here that the handler takes.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    while ticks() < first + count && elapsed < tsc_hz {
        core::hint::spin_loop();
        elapsed = rdtsc().wrapping_sub(start);
    }
    // SAFETY: back to the kernel's rule: interrupts off in kernel mode.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    (ticks() >= first + count).then_some(elapsed)
}

pub fn end_of_interrupt() {
    write(REG_EOI, 0);
}

fn tick_period() -> u64 {
    (TSC_HZ.load(Ordering::Relaxed) / TICK_HZ).max(1)
}

/// Arms the one-shot timer to fire at TSC value `deadline` (at once if it
/// has passed).
pub fn arm(deadline: u64) {
    let delta = deadline.saturating_sub(rdtsc()).max(1);
    let timer_hz = u128::from(TIMER_HZ.load(Ordering::Relaxed));
    let tsc_hz = u128::from(TSC_HZ.load(Ordering::Relaxed).max(1));
    let count = (u128::from(delta) * timer_hz / tsc_hz).clamp(1, u128::from(u32::MAX)) as u32;
    percpu::current().armed.store(deadline, Ordering::Relaxed);
    write(REG_TIMER_INITIAL, count);
}

/// The one-shot timer has fired: it is armed for nothing now.
pub fn fired() {
    percpu::current().armed.store(u64::MAX, Ordering::Relaxed);
}

/// The TSC deadline this CPU's one-shot timer is armed for.
pub fn armed() -> u64 {
    percpu::current().armed.load(Ordering::Relaxed)
}

/// Brings the next expiry forward to `deadline` if that is sooner: when
/// this CPU next drops the kernel lock (`arm_deferred`). Writing the timer
/// is an exit on a hypervisor and a turn to another CPU on an emulator
/// that runs CPUs in turn (QEMU with `-icount`), which then can only wait
/// for the lock.
pub fn arm_if_earlier(deadline: u64) {
    if deadline < armed() {
        percpu::current()
            .arm_at
            .fetch_min(deadline, Ordering::Relaxed);
    }
}

/// Carries out what `arm_if_earlier` asked for; called after the kernel
/// lock was dropped.
#[inline]
pub fn arm_deferred() {
    if percpu::current().arm_at.load(Ordering::Relaxed) != u64::MAX {
        arm_deferred_now();
    }
}

#[cold]
#[inline(never)]
fn arm_deferred_now() {
    let deadline = percpu::current().arm_at.swap(u64::MAX, Ordering::Relaxed);
    if deadline < armed() {
        arm(deadline);
    }
}

/// On a timer interrupt at TSC `now`: whether a scheduling tick (budget
/// accounting) is due; if so the next one is scheduled a period later.
pub fn tick_due(now: u64) -> bool {
    let percpu = percpu::current();
    let next = percpu.next_tick.load(Ordering::Relaxed);
    if now < next {
        return false;
    }
    let period = tick_period();
    let following = if next + period > now {
        next + period
    } else {
        now + period
    };
    percpu.next_tick.store(following, Ordering::Relaxed);
    percpu.ticks.fetch_add(1, Ordering::Relaxed);
    true
}

/// The TSC value of this CPU's next scheduling tick.
pub fn next_tick() -> u64 {
    percpu::current().next_tick.load(Ordering::Relaxed)
}

/// Ticks this CPU's timer counted since it started.
pub fn ticks() -> u64 {
    percpu::current().ticks.load(Ordering::Relaxed)
}

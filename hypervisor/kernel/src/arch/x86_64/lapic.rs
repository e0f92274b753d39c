//! The local APIC: x2APIC (MSRs) when the CPU has it, xAPIC (MMIO) otherwise.
//! Its timer is calibrated against the PIT at boot and then ticks
//! periodically.

use super::cpu::{rdtsc, read_msr, write_msr};
use super::layout::phys_to_virt;
use super::pit;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ADDRESS: u64 = 0x000f_ffff_ffff_f000;
const X2APIC_MSR_BASE: u32 = 0x800;

const REG_ID: u32 = 0x20;
const REG_EOI: u32 = 0xb0;
const REG_SPURIOUS: u32 = 0xf0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;

const SPURIOUS_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const DIVIDE_BY_16: u32 = 0b0011;

/// The calibration window: 10 ms of PIT ticks.
const CALIBRATION_PIT_TICKS: u16 = (pit::FREQUENCY_HZ / 100) as u16;
const CALIBRATION_PER_SECOND: u64 = 100;
pub const TICK_HZ: u64 = 100;
/// Microseconds per timer tick.
pub const TICK_US: u64 = 1_000_000 / TICK_HZ;

static X2APIC: AtomicBool = AtomicBool::new(false);
static MMIO_BASE: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);
static TIMER_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// TSC value of the next scheduling tick, and of the armed expiry.
static NEXT_TICK: AtomicU64 = AtomicU64::new(0);
static ARMED: AtomicU64 = AtomicU64::new(u64::MAX);
static ID: AtomicU64 = AtomicU64::new(0);

/// This CPU's APIC id.
pub fn id() -> u32 {
    ID.load(Ordering::Relaxed) as u32
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
    if use_x2apic {
        write_msr(IA32_APIC_BASE, base | APIC_BASE_ENABLE);
        write_msr(IA32_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
        X2APIC.store(true, Ordering::Relaxed);
    } else {
        write_msr(IA32_APIC_BASE, base | APIC_BASE_ENABLE);
        MMIO_BASE.store(phys_to_virt(base & APIC_BASE_ADDRESS), Ordering::Relaxed);
    }
    write(REG_SPURIOUS, SPURIOUS_ENABLE | u32::from(spurious_vector));
    let id = if use_x2apic {
        read(REG_ID)
    } else {
        read(REG_ID) >> 24
    };
    ID.store(id.into(), Ordering::Relaxed);

    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
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

    // One-shot mode: every expiry is armed for the next event.
    write(REG_LVT_TIMER, u32::from(timer_vector));
    NEXT_TICK.store(rdtsc() + tick_period(), Ordering::Relaxed);
    arm(NEXT_TICK.load(Ordering::Relaxed));
    Calibration {
        x2apic: use_x2apic,
        id,
        timer_hz,
        tsc_hz,
    }
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
    ARMED.store(deadline, Ordering::Relaxed);
    write(REG_TIMER_INITIAL, count);
}

/// The TSC deadline the one-shot timer is armed for.
pub fn armed() -> u64 {
    ARMED.load(Ordering::Relaxed)
}

/// Brings the next expiry forward to `deadline` if that is sooner.
pub fn arm_if_earlier(deadline: u64) {
    if deadline < ARMED.load(Ordering::Relaxed) {
        arm(deadline);
    }
}

/// On a timer interrupt at TSC `now`: whether a scheduling tick (budget
/// accounting) is due; if so the next one is scheduled a period later.
pub fn tick_due(now: u64) -> bool {
    let next = NEXT_TICK.load(Ordering::Relaxed);
    if now < next {
        return false;
    }
    let period = tick_period();
    let following = if next + period > now {
        next + period
    } else {
        now + period
    };
    NEXT_TICK.store(following, Ordering::Relaxed);
    TICKS.fetch_add(1, Ordering::Relaxed);
    true
}

/// The TSC value of the next scheduling tick.
pub fn next_tick() -> u64 {
    NEXT_TICK.load(Ordering::Relaxed)
}

/// Timer interrupts seen since the tick started.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

//! Inter-processor interrupts between the CPUs that schedule: a wake-up
//! (the target looks at its run queue again) and the TLB shootdown.
//!
//! A shootdown is started only by the CPU holding the kernel lock, so one
//! request is in flight at a time and a single request slot serves: the
//! initiator publishes the request (a new generation, and the root table of
//! an address space that is going away, if any), sends the IPI to every
//! other scheduling CPU and waits until each has acknowledged the
//! generation. A target acknowledges from its IPI handler, or — when it is
//! itself waiting for the kernel lock with interrupts off — from the lock's
//! spin loop (`kernel::lock`), so the initiator never waits for a CPU that
//! waits for it.

use super::percpu::{self, CpuState};
use super::{cpu, lapic};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The IPI's vector (above the IOAPIC's GSIs, below the spurious vector).
pub const VECTOR_IPI: u64 = 0xf0;

/// How long an initiator waits for a CPU's acknowledgement before it
/// reports the CPU and goes on without it.
const ACK_TIMEOUT_MS: u64 = 1000;

/// For the system test that shows the shootdown matters
/// (`smp-test-no-shootdown`): remote CPUs are not asked to flush.
static NO_REMOTE_SHOOTDOWN: AtomicBool = AtomicBool::new(false);

/// Switches remote shootdowns off, for that test only.
pub fn disable_remote_shootdowns() {
    log::warn!("ipi: remote TLB shootdowns are off (smp-test-no-shootdown)");
    NO_REMOTE_SHOOTDOWN.store(true, Ordering::Relaxed);
}

/// The generation of the latest shootdown request.
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// The request's retiring root table (0: none): a CPU that has it loaded
/// switches to the kernel's own tables.
static RETIRING: AtomicU64 = AtomicU64::new(0);

/// This CPU takes part in scheduling, wake-ups and shootdowns from now on.
pub fn join() {
    let me = percpu::current();
    me.ipi_ack
        .store(GENERATION.load(Ordering::Acquire), Ordering::Release);
    me.scheduling.store(true, Ordering::Release);
}

/// The CPUs that schedule, by number.
pub fn scheduling_cpus() -> impl Iterator<Item = usize> {
    percpu::all()
        .iter()
        .enumerate()
        .filter(|(_, block)| {
            block.state() == CpuState::Online && block.scheduling.load(Ordering::Acquire)
        })
        .map(|(index, _)| index)
}

/// Whether CPU `index` schedules (a component may be bound to it).
pub fn schedules(index: usize) -> bool {
    index < moat_kernel::smp::MAX_CPUS
        && percpu::get(index).state() == CpuState::Online
        && percpu::get(index).scheduling.load(Ordering::Acquire)
}

fn send(index: usize) {
    let apic_id = percpu::get(index).apic_id.load(Ordering::Relaxed);
    lapic::send_fixed(apic_id, VECTOR_IPI as u8);
}

/// Makes CPU `index` look at its run queue soon (a no-op for this CPU).
/// The IPI goes out when this CPU next drops the kernel lock
/// (`send_kicks`), so the woken CPU finds the lock free: on an emulator
/// that runs CPUs in turn (QEMU with `-icount`) an IPI sent under the lock
/// hands the turn to a CPU that can only wait for it.
pub fn kick(index: usize) {
    if index != percpu::current_id() && schedules(index) {
        percpu::current()
            .kicks
            .fetch_or(1 << (index % moat_kernel::smp::MAX_CPUS), Ordering::Relaxed);
    }
}

/// Sends the wake-ups `kick` recorded on this CPU; called after the
/// kernel lock was dropped.
#[inline]
pub fn send_kicks() {
    if percpu::current().kicks.load(Ordering::Relaxed) != 0 {
        send_kicks_now();
    }
}

/// Asks this CPU, once it drops the kernel lock, to wait until a CPU that
/// wants the lock has taken it (`send_kicks`), before it may take it
/// again: a long call that stopped for that CPU (`interrupt_due`) would
/// otherwise take the lock back at once, as its EC executes the call
/// again, and on an emulator that runs CPUs in turn the waiter may never
/// see it free (it waited over 400 µs a time on Bochs while the root task
/// delegated a guest's memory). The request is this CPU's own bit in its
/// `kicks`, which `kick` never sets, so the common path tests nothing more.
pub fn hand_over() {
    let me = percpu::current_id() % moat_kernel::smp::MAX_CPUS;
    percpu::current().kicks.fetch_or(1 << me, Ordering::Relaxed);
}

/// The longest a CPU waits in `send_kicks` for another to take the lock
/// it handed over.
const HAND_OVER_US: u64 = 100;

#[cold]
#[inline(never)]
fn send_kicks_now() {
    let me = percpu::current_id() % moat_kernel::smp::MAX_CPUS;
    let mut pending = percpu::current().kicks.swap(0, Ordering::Relaxed);
    if pending & (1 << me) != 0 {
        pending &= !(1 << me);
        wait_for_taker();
    }
    while pending != 0 {
        let index = pending.trailing_zeros() as usize;
        pending &= pending - 1;
        send(index);
    }
}

/// Flushes the non-global TLB entries of every other scheduling CPU and,
/// with `retiring`, moves every CPU (this one too) off that root table;
/// returns when all have done so. The caller holds the kernel lock.
///
/// This CPU needs no flush: the unmapping already invalidated the page
/// where its address space is loaded here, and without PCIDs an address
/// space that is not loaded has no entries in this CPU's TLB.
pub fn shootdown(retiring: Option<u64>) {
    if let Some(root) = retiring {
        if cpu::read_cr3() == root {
            // SAFETY: the kernel's own tables map everything the kernel
            // uses, as every PD's do.
            unsafe { cpu::write_cr3(crate::memory::kernel_root()) };
        }
    }
    let me = percpu::current_id();
    if NO_REMOTE_SHOOTDOWN.load(Ordering::Relaxed) && retiring.is_none()
        || !scheduling_cpus().any(|index| index != me)
    {
        return;
    }
    RETIRING.store(retiring.unwrap_or(0), Ordering::Relaxed);
    let generation = GENERATION.fetch_add(1, Ordering::AcqRel) + 1;
    percpu::current()
        .ipi_ack
        .store(generation, Ordering::Release);
    let mut targets = [false; moat_kernel::smp::MAX_CPUS];
    for index in scheduling_cpus().filter(|&index| index != me) {
        targets[index] = true;
        send(index);
    }
    let limit = lapic::tsc_hz() / 1000 * ACK_TIMEOUT_MS;
    let start = cpu::rdtsc();
    for (index, _) in targets.iter().enumerate().filter(|(_, &t)| t) {
        let block = percpu::get(index);
        while block.ipi_ack.load(Ordering::Acquire) < generation {
            if cpu::rdtsc().wrapping_sub(start) > limit {
                log::error!("tlb: cpu {index} did not acknowledge shootdown {generation}");
                break;
            }
            core::hint::spin_loop();
        }
    }
}

/// Does what the latest shootdown asks of this CPU, if it has not yet.
/// Cheap when nothing is pending; called with interrupts off.
pub fn service() {
    let me = percpu::current();
    let generation = GENERATION.load(Ordering::Acquire);
    if me.ipi_ack.load(Ordering::Relaxed) >= generation {
        return;
    }
    let retiring = RETIRING.load(Ordering::Relaxed);
    let loaded = cpu::read_cr3();
    let root = if retiring != 0 && loaded == retiring {
        crate::memory::kernel_root()
    } else {
        loaded
    };
    // SAFETY: either the tables already loaded or the kernel's own, which
    // map the kernel exactly as every PD's tables do; writing CR3 flushes
    // the non-global TLB entries (user mappings are never global).
    unsafe { cpu::write_cr3(root) };
    // The TSS's I/O bitmap may be a revoked copy: reload it at the next
    // switch to user mode.
    me.io_stale.store(true, Ordering::Relaxed);
    me.ipi_ack.store(generation, Ordering::Release);
}

/// After `hand_over`: waits (at most `HAND_OVER_US`) while another CPU
/// wants the kernel lock and has not yet taken it.
fn wait_for_taker() {
    let limit = lapic::tsc_hz() / 1_000_000 * HAND_OVER_US;
    let start = cpu::rdtsc();
    while crate::kernel::lock_wanted()
        && !crate::kernel::KERNEL.is_locked()
        && cpu::rdtsc().wrapping_sub(start) < limit
    {
        core::hint::spin_loop();
    }
}

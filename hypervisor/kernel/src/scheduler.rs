//! Leaving the kernel: to the EC that runs next on this CPU (into its
//! guest, if it is running a vCPU), or to the idle loop. Every CPU runs
//! this with its own run queue (`Kernel::cpus`).

use crate::arch::x86_64::entry::{self, TrapFrame};
use crate::arch::x86_64::virt::RunOutcome;
use crate::arch::x86_64::{cpu, ipi, lapic};
use crate::kernel::{self, KernelGuard};
use crate::vcpu::{GuestRun, Step};

type Guard<'a> = KernelGuard;

/// Picks the EC to run and returns where its registers are; idles (never
/// returning) when nothing can run; stops the system when the root task
/// has ended.
pub fn leave() -> *const TrapFrame {
    leave_with(kernel::lock())
}

/// `leave` for a caller that already holds the kernel lock.
pub fn leave_with(guard: Guard<'_>) -> *const TrapFrame {
    match next(guard) {
        Some(frame) => frame,
        None => idle(),
    }
}

/// The user context to enter next, running vCPU steps on the way; None if
/// nothing can run. A guest runs with the kernel lock dropped: other CPUs
/// go on meanwhile, and what they do to the vCPU (poke, destroy, revoke of
/// guest memory) reaches it by IPI, which ends the run.
fn next(mut guard: Guard<'_>) -> Option<*const TrapFrame> {
    loop {
        let Some(kernel) = guard.as_mut() else {
            crate::stop(crate::StopReason::Fatal)
        };
        if kernel.root_ended() {
            drop(guard);
            crate::root::finish();
        }
        // What this CPU did may have revoked what others still cache; and
        // this CPU is off the register areas of ECs destroyed meanwhile.
        kernel.before_leaving();
        let Some((ec, vcpu)) = kernel.pick() else {
            kernel.cpus[kernel.me % moat_kernel::smp::MAX_CPUS].entered = None;
            return None;
        };
        if vcpu {
            match kernel.vcpu_step(ec) {
                Step::ToUser => {}
                Step::Enter(run) => {
                    guard = run_guest(guard, ec, run);
                    continue;
                }
            }
        }
        let frame = kernel.prepare_switch(ec);
        if !frame.is_null() {
            return Some(frame);
        }
    }
}

/// Runs the guest without the kernel lock, then takes the lock again and
/// hands the exit to `vcpu_finish`. (Out of line: the IPC path does not
/// carry it.)
#[inline(never)]
fn run_guest(guard: Guard<'_>, ec: crate::kernel::EcId, mut run: GuestRun) -> Guard<'static> {
    drop(guard);
    let outcome = run.go();
    if outcome == RunOutcome::Host {
        take_pending_interrupt();
    }
    let mut guard = kernel::lock();
    if let Some(kernel) = guard.as_mut() {
        kernel.vcpu_finish(ec, run, outcome);
    }
    guard
}

/// Lets the interrupt that ended a guest run be delivered, in kernel mode.
fn take_pending_interrupt() {
    // SAFETY: the kernel lock is not held, so the interrupt handlers can
    // take it; the one-instruction window after STI lets a pending
    // interrupt in, and interrupts are off again before anything else.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// Waits with interrupts on until an EC can run on this CPU, then enters
/// it.
fn idle() -> ! {
    loop {
        let mut guard = kernel::lock();
        let now = cpu::rdtsc();
        if let Some(kernel) = guard.as_mut() {
            kernel.expire_timeouts(now);
            // A teardown a preempted `revoke` left half done (its caller
            // may be gone) goes on while nothing else runs.
            kernel.destroy_doomed_until(&crate::syscall::interrupt_due);
        }
        if guard.is_some() {
            if let Some(frame) = next(guard) {
                // SAFETY: `frame` is the saved user context of an EC that
                // the scheduler just prepared (its address space and entry
                // stack).
                unsafe { entry::enter_user(frame) };
            }
        } else {
            // The root task is not started yet (another CPU than the
            // boot CPU, early).
            drop(guard);
        }
        // SAFETY: STI's one-instruction shadow makes STI;HLT atomic, so no
        // wake-up is lost; interrupts are off again before the kernel lock
        // is taken.
        unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
    }
}

/// Where a CPU other than the boot CPU goes once it is online: it
/// schedules the ECs bound to it.
pub fn run_ap() -> ! {
    ipi::join();
    idle()
}

/// Where the boot CPU joins the others before it starts the root task.
pub fn join_boot_cpu() {
    ipi::join();
}

/// After the root task's teardown: waits (at most 100 ms) until every CPU
/// has freed the ECs it may still have been running (`CpuSched::zombies`),
/// so that the memory check at the end counts them as free.
pub fn await_zombies() {
    for cpu in ipi::scheduling_cpus() {
        ipi::kick(cpu);
    }
    let limit = lapic::tsc_hz() / 10;
    let start = cpu::rdtsc();
    loop {
        {
            let mut guard = kernel::lock();
            let Some(kernel) = guard.as_mut() else { return };
            kernel.free_left_here();
            if kernel.cpus.iter().all(|c| {
                c.zombies.is_empty() && c.dead_vcpus.is_empty() && c.dead_frames.is_empty()
            }) {
                return;
            }
        }
        if cpu::rdtsc().wrapping_sub(start) > limit {
            log::warn!("smp: a CPU did not leave the ECs of the ended root task");
            return;
        }
        core::hint::spin_loop();
    }
}

/// A timer interrupt on this CPU: wakes ECs whose deadline passed, charges
/// the current SC at a scheduling tick, preempts, and arms the one-shot
/// timer for the next event (tick, deadline or console output, whichever
/// is first).
pub fn tick() {
    let now = cpu::rdtsc();
    // The one-shot timer fired: nothing is armed until the end.
    lapic::fired();
    let due = lapic::tick_due(now);
    let mut next = lapic::next_tick().min(crate::console::feed());
    {
        let mut guard = kernel::lock();
        if let Some(kernel) = guard.as_mut() {
            kernel.expire_timeouts(now);
            crate::dump::at_safe_point(kernel);
            if due {
                kernel.rotate_current();
            }
            kernel.preempt_if_needed();
            if let Some(deadline) = kernel.timeouts.iter().map(|&(deadline, _)| deadline).min() {
                next = next.min(deadline);
            }
        }
    }
    // Without the lock (see `lapic::arm_if_earlier`), unless dropping it
    // armed an earlier expiry.
    if next < lapic::armed() {
        lapic::arm(next);
    }
}

/// The wake-up IPI: another CPU made an EC of this CPU ready; it may
/// preempt the current one.
pub fn wake() {
    ipi::service();
    let mut guard = kernel::lock();
    if let Some(kernel) = guard.as_mut() {
        kernel.preempt_if_needed();
    }
}

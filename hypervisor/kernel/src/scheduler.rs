//! Leaving the kernel: to the EC that runs next (into its guest, if it is
//! running a vCPU), or to the idle loop.

use crate::arch::x86_64::entry::{self, TrapFrame};
use crate::arch::x86_64::{cpu, lapic};
use crate::kernel::{Kernel, KERNEL};
use crate::vcpu::Step;
use spin::MutexGuard;

type Guard<'a> = MutexGuard<'a, Option<Kernel>>;

/// Picks the EC to run and returns where its registers are; idles (never
/// returning) when nothing can run; stops the system when the root task
/// has ended.
pub fn leave() -> *const TrapFrame {
    leave_with(KERNEL.lock())
}

/// `leave` for a caller that already holds the kernel lock.
pub fn leave_with(guard: Guard<'_>) -> *const TrapFrame {
    match next(guard) {
        Some(frame) => frame,
        None => idle(),
    }
}

/// The user context to enter next, running vCPU steps on the way; None if
/// nothing can run.
fn next(mut guard: Guard<'_>) -> Option<*const TrapFrame> {
    loop {
        let Some(kernel) = guard.as_mut() else {
            crate::stop(crate::StopReason::Fatal)
        };
        if kernel.root_ended() {
            drop(guard);
            crate::root::finish();
        }
        let ec = kernel.pick()?;
        if kernel.ecs.get(ec).is_some_and(|e| e.vcpu.is_some()) {
            match kernel.vcpu_step(ec) {
                Step::ToUser => {}
                Step::Reschedule => continue,
                Step::HostInterrupt => {
                    drop(guard);
                    take_pending_interrupt();
                    guard = KERNEL.lock();
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

/// Lets the interrupt that ended a guest run be delivered, in kernel mode.
fn take_pending_interrupt() {
    // SAFETY: the kernel lock is not held, so the interrupt handlers can
    // take it; the one-instruction window after STI lets a pending
    // interrupt in, and interrupts are off again before anything else.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// Waits with interrupts on until an EC can run, then enters it.
fn idle() -> ! {
    loop {
        let mut guard = KERNEL.lock();
        let now = cpu::rdtsc();
        if let Some(kernel) = guard.as_mut() {
            kernel.expire_timeouts(now);
            // A teardown a preempted `revoke` left half done (its caller
            // may be gone) goes on while nothing else runs.
            kernel.destroy_doomed_until(&crate::syscall::interrupt_due);
        }
        if let Some(frame) = next(guard) {
            // SAFETY: `frame` is the saved user context of an EC that the
            // scheduler just prepared (its address space and entry stack).
            unsafe { entry::enter_user(frame) };
        }
        // SAFETY: STI's one-instruction shadow makes STI;HLT atomic, so no
        // wake-up is lost; interrupts are off again before the kernel lock
        // is taken.
        unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
    }
}

/// A timer interrupt: wakes ECs whose deadline passed, charges the current
/// SC at a scheduling tick, preempts, and arms the one-shot timer for the
/// next event (tick, deadline or console output, whichever is first).
pub fn tick() {
    let now = cpu::rdtsc();
    let due = lapic::tick_due(now);
    let mut next = lapic::next_tick().min(crate::console::feed());
    let mut guard = KERNEL.lock();
    if let Some(kernel) = guard.as_mut() {
        kernel.expire_timeouts(now);
        if due {
            kernel.rotate_current();
        }
        kernel.preempt_if_needed();
        if let Some(deadline) = kernel.timeouts.iter().map(|&(deadline, _)| deadline).min() {
            next = next.min(deadline);
        }
    }
    lapic::arm(next);
}

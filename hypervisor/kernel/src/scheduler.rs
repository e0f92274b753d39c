//! Leaving the kernel: to the EC that runs next, or to the idle loop.

use crate::arch::x86_64::entry::{self, TrapFrame};
use crate::arch::x86_64::{cpu, lapic};
use crate::kernel::KERNEL;

/// Picks the EC to run and returns where its registers are; idles (never
/// returning) when nothing can run; stops the system when the root task
/// has ended.
pub fn leave() -> *const TrapFrame {
    let guard = KERNEL.lock();
    leave_with(guard)
}

/// `leave` for a caller that already holds the kernel lock.
pub fn leave_with(
    mut guard: spin::MutexGuard<'_, Option<crate::kernel::Kernel>>,
) -> *const TrapFrame {
    let frame = {
        let Some(kernel) = guard.as_mut() else {
            crate::stop(crate::StopReason::Fatal)
        };
        if kernel.root_ended() {
            drop(guard);
            crate::root::finish();
        }
        kernel.pick().map(|ec| kernel.prepare_switch(ec))
    };
    drop(guard);
    match frame {
        Some(frame) if !frame.is_null() => frame,
        _ => idle(),
    }
}

/// Waits with interrupts on until an EC can run, then enters it.
fn idle() -> ! {
    loop {
        let frame = leave_if_runnable();
        if let Some(frame) = frame {
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

fn leave_if_runnable() -> Option<*const TrapFrame> {
    let mut guard = KERNEL.lock();
    let kernel = guard.as_mut()?;
    if kernel.root_ended() {
        drop(guard);
        crate::root::finish();
    }
    kernel.expire_timeouts(cpu::rdtsc());
    let ec = kernel.pick()?;
    let frame = kernel.prepare_switch(ec);
    (!frame.is_null()).then_some(frame)
}

/// The timer tick: deadlines, budgets, preemption.
/// A timer interrupt: wakes ECs whose deadline passed, charges the current
/// SC at a scheduling tick, preempts, and arms the one-shot timer for the
/// next event (tick or deadline, whichever is first).
pub fn tick() {
    let now = cpu::rdtsc();
    let due = lapic::tick_due(now);
    let mut next = lapic::next_tick();
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

//! The kernel's state dump, for a system that stalled: an NMI (QEMU's
//! monitor command `nmi`, which reaches every CPU even when one spins with
//! interrupts off) makes each CPU print where it was, then the kernel's
//! state is printed once — per CPU the current EC, the EC it entered last
//! and its run queue; the ECs by state; semaphores with waiters and the
//! timeouts — and the debug event's semaphores are upped
//! (`moat_abi::DEBUG_GSI`), so that each VMM prints its own state. The
//! kernel prints only kernel state. docs/architecture.md, "A stalled run
//! explains itself".
//!
//! The NMI may interrupt this CPU inside the kernel lock or the console
//! lock, so the handler never waits for either:
//! it prints its line with a bounded wait for the console, and prints the
//! state only if it can take the kernel lock at once. Otherwise the CPU
//! that holds the lock prints it at its next pass through the scheduler
//! or its next timer tick ([`at_safe_point`]), where the state is
//! consistent. A CPU that spins in the kernel with the lock held for ever
//! leaves only the per-CPU lines, which then show where it spins.

use crate::arch::x86_64::{cpu, lapic, percpu};
use crate::console;
use crate::ec::EcState;
use crate::kernel::{self, Cap, EcId, Kernel, Object, PdId};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use moat_abi::Space;
use moat_kernel::cap::SlotRef;

/// Every line starts with this (the harness collects them).
pub const PREFIX: &str = "dump: ";

/// The kernel state is still to be printed.
static STATE_PENDING: AtomicBool = AtomicBool::new(false);
/// The debug event's semaphores are still to be upped.
static EVENT_PENDING: AtomicBool = AtomicBool::new(false);

/// When the last NMI asked for a dump (TSC; 0: never).
static LAST_REQUEST: AtomicU64 = AtomicU64::new(0);
/// NMIs closer than this to the one that asked for a dump are the same
/// request (it reaches every CPU).
const DUMP_GAP_MS: u64 = 500;

/// Root selectors looked at to name a PD (the root task's component PDs
/// are far below).
const ROOT_SELECTORS_SCANNED: u64 = 4096;

/// An NMI was sent only to learn where the lock's holder is
/// ([`sample_holder`]).
static SAMPLE: AtomicBool = AtomicBool::new(false);

/// Asks CPU `index` (holding the kernel lock too long, `debug-lock-waits`)
/// by NMI to print where it is, and nothing more.
pub fn sample_holder(index: usize) {
    let Some(cpu) = percpu::all().get(index) else {
        return;
    };
    if !SAMPLE.swap(true, Ordering::AcqRel) {
        lapic::send_nmi(cpu.apic_id.load(Ordering::Relaxed));
    }
}

/// The NMI handler's part, on each CPU: its line, then the kernel state if
/// the kernel lock is free.
pub fn nmi(rip: u64, cs: u64) {
    let here = kernel::here();
    if SAMPLE.swap(false, Ordering::AcqRel) {
        console::write_bounded(format_args!(
            "lock: cpu{here} holds the kernel lock at rip {rip:#x}\n"
        ));
        return;
    }
    let mode = if kernel::in_guest(here) {
        "in a guest"
    } else if cs & 3 == 3 {
        "in user mode"
    } else {
        "in the kernel"
    };
    console::write_bounded(format_args!(
        "{PREFIX}cpu{here} nmi at rip {rip:#x} ({mode}), {} timer ticks\n",
        percpu::current().ticks.load(Ordering::Relaxed)
    ));
    // One NMI reaches every CPU: the first asks for the dump, the others
    // (within DUMP_GAP_MS) only report.
    let now = cpu::rdtsc();
    let last = LAST_REQUEST.load(Ordering::Acquire);
    let gap = lapic::tsc_hz() / 1000 * DUMP_GAP_MS;
    if (last == 0 || now.wrapping_sub(last) >= gap)
        && LAST_REQUEST
            .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        STATE_PENDING.store(true, Ordering::Release);
        EVENT_PENDING.store(true, Ordering::Release);
    }
    // Never wait: this CPU may hold the lock itself (then it prints at its
    // next safe point).
    if let Some(guard) = kernel::KERNEL.try_lock() {
        if let Some(k) = guard.as_ref() {
            print_if_pending(k);
        }
    }
}

/// Where a CPU holds the kernel lock with the state consistent: prints the
/// state if an NMI asked for it, and raises the debug event (which may
/// allocate and wake ECs, so it is never done in the NMI handler).
/// Whether an NMI asked for the state or the debug event.
#[inline]
pub fn pending() -> bool {
    STATE_PENDING.load(Ordering::Relaxed) || EVENT_PENDING.load(Ordering::Relaxed)
}

#[inline]
pub fn at_safe_point(k: &mut Kernel) {
    if STATE_PENDING.load(Ordering::Relaxed) || EVENT_PENDING.load(Ordering::Relaxed) {
        at_safe_point_slow(k);
    }
}

fn at_safe_point_slow(k: &mut Kernel) {
    print_if_pending(k);
    if EVENT_PENDING.swap(false, Ordering::AcqRel) {
        k.debug_event();
    }
}

fn print_if_pending(k: &Kernel) {
    if STATE_PENDING.swap(false, Ordering::AcqRel) {
        let mut out = Lines;
        // Lines only fails if formatting does, which it does not.
        let _ = write_state(&mut out, k);
    }
}

/// Writes each line to the console at once (the system may be stuck).
struct Lines;

impl Write for Lines {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        console::write_bounded(format_args!("{s}"));
        Ok(())
    }
}

fn write_state(out: &mut impl Write, k: &Kernel) -> fmt::Result {
    let now = cpu::rdtsc();
    writeln!(
        out,
        "{PREFIX}kernel state (cpu{}): {} cpus online, {} pds, {} ecs, {} scs, {} sms, {} vcpus",
        kernel::here(),
        (0..k.cpus.len())
            .filter(|&n| percpu::get(n).state() == percpu::CpuState::Online)
            .count(),
        k.pds.len(),
        k.ecs.len(),
        k.scs.len(),
        k.sms.len(),
        k.vcpus.len()
    )?;
    let online = |n: usize| percpu::get(n).state() == percpu::CpuState::Online;
    for (n, c) in k.cpus.iter().enumerate().filter(|&(n, _)| online(n)) {
        write!(out, "{PREFIX}cpu{n} current ")?;
        write_ec_opt(out, k, c.current)?;
        write!(out, "; entered ")?;
        match c.entered {
            Some(ec) => write!(out, "ec {}", ec.index())?,
            None => write!(out, "none")?,
        }
        write!(out, "; ready")?;
        if c.run.is_empty() {
            write!(out, " none")?;
        }
        for (priority, sc) in c.run.iter() {
            write!(out, " p{priority} ")?;
            let holder = k.scs.get(sc).and_then(|s| s.holder);
            write_ec_opt(out, k, holder)?;
        }
        writeln!(out)?;
    }
    let mut by_state = [0usize; 6];
    for id in k.ecs.ids() {
        if let Some(e) = k.ecs.get(id) {
            by_state[state_index(e.state)] += 1;
        }
    }
    writeln!(
        out,
        "{PREFIX}ecs: running {}, idle handlers {}, call queued {}, waiting for a reply {}, \
         on a semaphore {}, dead {}",
        by_state[0], by_state[1], by_state[2], by_state[3], by_state[4], by_state[5]
    )?;
    let mut waited = 0;
    for id in k.sms.ids() {
        let Some(sm) = k.sms.get(id) else { continue };
        if sm.waiters.is_empty() {
            continue;
        }
        waited += 1;
        write!(out, "{PREFIX}sm {} of ", id.index())?;
        write_pd(out, k, sm.owner)?;
        write!(out, ": count {}, waiting", sm.count)?;
        for &waiter in &sm.waiters {
            write!(out, " ")?;
            write_ec(out, k, waiter)?;
        }
        writeln!(out)?;
    }
    let hz = lapic::tsc_hz().max(1);
    write!(
        out,
        "{PREFIX}semaphores with waiters {waited}; timeouts {}",
        k.timeouts.len()
    )?;
    if let Some(&(deadline, ec)) = k.timeouts.iter().min_by_key(|&&(d, _)| d) {
        let us = |t: u64| u128::from(t) * 1_000_000 / u128::from(hz);
        if deadline >= now {
            write!(out, ", next in {} us (", us(deadline - now))?;
        } else {
            write!(out, ", next {} us ago (", us(now - deadline))?;
        }
        write_ec(out, k, ec)?;
        write!(out, ")")?;
    }
    writeln!(out, "; debug event semaphores {}", k.debug_sms.len())?;
    writeln!(out, "{PREFIX}end of kernel state")
}

fn state_index(state: EcState) -> usize {
    match state {
        EcState::Running => 0,
        EcState::Idle => 1,
        EcState::CallQueued(_) => 2,
        EcState::WaitReply(_) => 3,
        EcState::SmWait(_) => 4,
        EcState::Dead => 5,
    }
}

fn write_ec_opt(out: &mut impl Write, k: &Kernel, ec: Option<EcId>) -> fmt::Result {
    match ec {
        Some(ec) => write_ec(out, k, ec),
        None => write!(out, "none"),
    }
}

/// `ec 7 (pd 3 = root sel 32, sm-wait 4, vcpu)`.
fn write_ec(out: &mut impl Write, k: &Kernel, id: EcId) -> fmt::Result {
    write!(out, "ec {}", id.index())?;
    let Some(e) = k.ecs.get(id) else {
        return write!(out, " (gone)");
    };
    write!(out, " (")?;
    write_pd(out, k, e.pd)?;
    match e.state {
        EcState::Running => write!(out, ", running")?,
        EcState::Idle => write!(out, ", idle")?,
        EcState::CallQueued(h) => write!(out, ", call queued at ec {}", h.index())?,
        EcState::WaitReply(h) => write!(out, ", waits for ec {}", h.index())?,
        EcState::SmWait(sm) => write!(out, ", waits on sm {}", sm.index())?,
        EcState::Dead => write!(out, ", dead")?,
    }
    if e.vcpu.is_some() {
        write!(out, ", runs a vcpu")?;
    }
    write!(out, ")")
}

/// `pd 3 = root sel 32`: the selector names the component in the root
/// task's `started 'NAME' (pd sel 32, …)` line.
fn write_pd(out: &mut impl Write, k: &Kernel, pd: PdId) -> fmt::Result {
    write!(out, "pd {}", pd.index())?;
    if k.root_pd == Some(pd) {
        return write!(out, " = root");
    }
    match root_selector_of(k, pd) {
        Some(sel) => write!(out, " = root sel {sel}"),
        None => Ok(()),
    }
}

/// The root task's selector for `pd`, if it holds one.
fn root_selector_of(k: &Kernel, pd: PdId) -> Option<u64> {
    let space = k.space_of(k.root_pd?, Space::Object).ok()?;
    (0..ROOT_SELECTORS_SCANNED).find(|&sel| {
        k.caps
            .lookup(SlotRef::new(space, sel))
            .is_ok_and(|c| c.object == Cap::Object(Object::Pd(pd)))
    })
}

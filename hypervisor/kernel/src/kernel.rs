//! The kernel's state: every object, every capability space, each CPU's
//! run queue and running EC, behind one lock, the kernel lock: a CPU takes
//! it on every entry (system call, interrupt, exception) and drops it when
//! it leaves, with interrupts off throughout, so the kernel is one
//! critical section (the design of seL4's SMP kernel). See
//! docs/architecture.md, "Many CPUs", for what runs without it.
//!
//! The object files (`pd.rs`, `ec.rs`, `sc.rs`, `pt.rs`, `sm.rs`) add the
//! calls on each object as `impl Kernel` blocks; this file holds what they
//! share: capability glue with reference-counted object lifetime, quotas,
//! and scheduling.

use crate::arch::x86_64::entry::TrapFrame;
use crate::arch::x86_64::{cpu, gdt, ipi, percpu};
use crate::ec::{Ec, EcState};
use crate::pd::Pd;
use crate::pt::Pt;
use crate::sc::Sc;
use crate::sm::Sm;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use moat_abi::{Space, Status};
use moat_kernel::arena::{Arena, Id};
use moat_kernel::cap::{CapError, CapSystem, Capability, Rights, SlotRef, SpaceId};
use moat_kernel::sched::RunQueues;
use moat_kernel::smp::MAX_CPUS;
use spin::mutex::{SpinMutex, SpinMutexGuard};
use spin::RelaxStrategy;

pub type PdId = Id<Pd>;
pub type EcId = Id<Box<Ec>>;
pub type ScId = Id<Sc>;
pub type PtId = Id<Pt>;
pub type SmId = Id<Sm>;

/// What an object capability names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    Pd(PdId),
    Ec(EcId),
    Sc(ScId),
    Pt(PtId),
    Sm(SmId),
    Vcpu(crate::vcpu::VcpuId),
}

/// The payload of a capability in any of a PD's spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    Object(Object),
    /// A page of memory; `owned`: the kernel allocated the frame for this
    /// (original) capability and frees it when the capability goes.
    Frame {
        phys: u64,
        owned: bool,
    },
    Port,
    Gsi,
}

/// Kernel memory charged per capability slot.
pub const CAP_SLOT_COST: u64 = 96;

/// The kernel lock: a spinlock whose wait (`KernelRelax`) carries out
/// shootdowns and makes a guest running under the lock exit. Not a ticket
/// lock: on an emulator or under nested virtualization the CPUs are
/// threads the host may preempt, and a fair lock then waits for whichever
/// preempted CPU's turn it is (smp_ipc timed out so on a loaded host).
pub static KERNEL: SpinMutex<Option<Kernel>, KernelRelax> = SpinMutex::new(None);

/// The kernel lock held. Dropping it unlocks, then sends the wake-ups
/// and arms the timer as asked meanwhile (`ipi::kick`,
/// `lapic::arm_if_earlier`): fields drop in declaration order.
pub struct KernelGuard {
    inner: SpinMutexGuard<'static, Option<Kernel>, KernelRelax>,
    _then: AfterUnlock,
}

struct AfterUnlock;

impl Drop for AfterUnlock {
    #[inline(always)]
    fn drop(&mut self) {
        ipi::send_kicks();
        crate::arch::x86_64::lapic::arm_deferred();
    }
}

impl core::ops::Deref for KernelGuard {
    type Target = Option<Kernel>;
    fn deref(&self) -> &Option<Kernel> {
        &self.inner
    }
}

impl core::ops::DerefMut for KernelGuard {
    fn deref_mut(&mut self) -> &mut Option<Kernel> {
        &mut self.inner
    }
}

/// Takes the kernel lock.
#[track_caller]
#[inline(always)]
pub fn lock() -> KernelGuard {
    let mut guard = KERNEL.lock();
    let me = percpu::current();
    if let Some(kernel) = guard.as_mut() {
        kernel.me = me.id.load(Ordering::Relaxed) as usize % MAX_CPUS;
    }
    // Set only by a wait (`KernelRelax`) or `debug-lock-waits`: the common,
    // uncontended case does nothing more.
    if me.wants_lock.load(Ordering::Relaxed) || REPORT_LOCK_WAITS.load(Ordering::Relaxed) {
        after_wait(me, core::panic::Location::caller());
    }
    KernelGuard {
        inner: guard,
        _then: AfterUnlock,
    }
}

/// `lock`'s uncommon part: the wait is over; with `debug-lock-waits`, where
/// the lock was taken.
#[cold]
#[inline(never)]
fn after_wait(me: &percpu::PerCpu, site: &'static core::panic::Location<'static>) {
    me.wants_lock.store(false, Ordering::Relaxed);
    me.spin_since.store(0, Ordering::Relaxed);
    if REPORT_LOCK_WAITS.load(Ordering::Relaxed) {
        HOLDER_SITE.store(site as *const _ as usize, Ordering::Relaxed);
        HOLDER_SINCE.store(cpu::rdtsc(), Ordering::Relaxed);
        HOLDER_CPU.store(here() as u64, Ordering::Relaxed);
    }
}

/// Where (`lock`'s caller), since when (TSC) and on which CPU the kernel
/// lock was last taken: for the report of a long wait.
static HOLDER_SITE: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
static HOLDER_SINCE: AtomicU64 = AtomicU64::new(0);
static HOLDER_CPU: AtomicU64 = AtomicU64::new(0);

/// Reporting of long waits for the kernel lock (kernel argument
/// `debug-lock-waits`).
static REPORT_LOCK_WAITS: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

/// The wait, in µs, that `debug-lock-waits` reports.
static REPORT_LOCK_WAITS_US: AtomicU64 = AtomicU64::new(20_000);

/// Reports every wait for the kernel lock longer than `us` µs
/// (`debug-lock-waits` 20 ms, `debug-lock-waits=US` any other).
pub fn report_lock_waits(us: u64) {
    REPORT_LOCK_WAITS_US.store(us, Ordering::Relaxed);
    REPORT_LOCK_WAITS.store(true, Ordering::Relaxed);
}

/// With `debug-lock-waits`, a wait for the lock longer than the limit is
/// reported (once per wait) with where the holder took it: the tool that
/// showed guests holding the lock for a tick (docs/architecture.md).
fn report_long_wait(me: &percpu::PerCpu) {
    if !REPORT_LOCK_WAITS.load(Ordering::Relaxed) {
        return;
    }
    let now = cpu::rdtsc();
    let since = me.spin_since.load(Ordering::Relaxed);
    if since == 0 {
        me.spin_since.store(now, Ordering::Relaxed);
        return;
    }
    let hz = crate::arch::x86_64::lapic::tsc_hz().max(1);
    let limit = hz.saturating_mul(REPORT_LOCK_WAITS_US.load(Ordering::Relaxed)) / 1_000_000;
    if since != u64::MAX && now.saturating_sub(since) > limit {
        me.spin_since.store(u64::MAX, Ordering::Relaxed);
        let site = HOLDER_SITE.load(Ordering::Relaxed) as *const core::panic::Location<'static>;
        // SAFETY: `site` is 0 or a `&'static Location` stored by `lock`.
        let site = unsafe { site.as_ref() };
        // Where the holder is, before this line's own output takes time.
        crate::dump::sample_holder(HOLDER_CPU.load(Ordering::Relaxed) as usize);
        let held = now.saturating_sub(HOLDER_SINCE.load(Ordering::Relaxed)) * 1_000_000 / hz;
        crate::console::write_emergency(format_args!(
            "lock: cpu {} waits > {} us; cpu {} holds it for {} us, taken at {:?}\n",
            here(),
            REPORT_LOCK_WAITS_US.load(Ordering::Relaxed),
            HOLDER_CPU.load(Ordering::Relaxed),
            held,
            site,
        ));
    }
}

/// Whether another CPU waits for the kernel lock: a long kernel operation
/// (a preemptible `delegate`, `revoke` or teardown) then stops at its next
/// step and lets it in, as it does for a due interrupt on its own CPU.
pub fn lock_wanted() -> bool {
    let me = here();
    percpu::all()
        .iter()
        .enumerate()
        .any(|(index, cpu)| index != me && cpu.wants_lock.load(Ordering::Relaxed))
}

/// What a CPU does while it waits for the kernel lock: carries out the TLB
/// shootdown the holder may be waiting for (`ipi`), so a CPU that waits
/// for the lock with interrupts off never holds up the one that holds it,
/// and says that it waits (`lock_wanted`). (No CPU holds the lock inside a
/// guest: a guest runs without it, `vcpu::GuestRun`.)
pub struct KernelRelax;

impl RelaxStrategy for KernelRelax {
    fn relax() {
        percpu::current().wants_lock.store(true, Ordering::Relaxed);
        report_long_wait(percpu::current());
        ipi::service();
        core::hint::spin_loop();
    }
}

/// Whether CPU `index` is in guest mode now (read without the lock, by
/// the NMI handler).
pub fn in_guest(index: usize) -> bool {
    percpu::get(index).in_guest.load(Ordering::Relaxed)
}

/// One CPU's scheduling state.
pub struct CpuSched {
    /// The SCs of this CPU that are ready, by priority.
    pub run: RunQueues<ScId>,
    /// The EC on the CPU (holding the current SC), if any.
    pub current: Option<EcId>,
    /// The EC whose register area this CPU entered last (its entries save
    /// registers there until it enters another or idles).
    pub entered: Option<EcId>,
    /// ECs destroyed while this CPU may still have been running them: freed
    /// when it next passes through the scheduler. (Boxed: the register
    /// area must stay where that CPU saves into it.)
    #[allow(clippy::vec_box)]
    pub zombies: Vec<Box<Ec>>,
    /// Control structures of vCPUs of this CPU destroyed by another CPU:
    /// freed here (a VMCS must be cleared on the CPU where it is current).
    pub dead_vcpus: Vec<crate::vcpu::Backend>,
    /// Pages of a vCPU destroyed while this CPU ran it in guest mode
    /// (`Kernel::destroy_vcpu`): freed after the run.
    pub dead_frames: Vec<u64>,
    /// `zombies`, `dead_vcpus` or `dead_frames` got something
    /// (`before_leaving` looks).
    pub left_work: bool,
    /// The vCPU this CPU runs in guest mode, without the kernel lock
    /// (`vcpu::GuestRun`), from `vcpu_step` to `vcpu_finish`.
    pub guest: Option<crate::vcpu::VcpuId>,
    /// The TLB tags (VPIDs / ASIDs) of this CPU's vCPUs.
    pub tags: moat_kernel::virt::tags::TagSpace,
    /// Whose I/O bitmap this CPU's TSS holds: `Some(None)` means it must be
    /// reloaded, `None` that it denies everything.
    pub io_loaded: Option<Option<PdId>>,
}

impl CpuSched {
    fn new() -> Self {
        Self {
            run: RunQueues::new(),
            current: None,
            entered: None,
            zombies: Vec::new(),
            dead_vcpus: Vec::new(),
            dead_frames: Vec::new(),
            left_work: false,
            guest: None,
            tags: moat_kernel::virt::tags::TagSpace::new(
                crate::arch::x86_64::virt::highest_tlb_tag(),
            ),
            io_loaded: None,
        }
    }
}

/// This CPU's number.
pub fn here() -> usize {
    percpu::current_id()
}

/// Capabilities a long `delegate` or `revoke` handles between two looks
/// for a due interrupt or a CPU waiting for the lock: on Bochs, 8 page
/// delegations took ~0.3 ms, and a modem on another CPU waiting for them
/// was late by up to 0.9 ms; with 2, by up to 0.45 ms (`demo_smp`).
pub const PREEMPT_EVERY: u64 = 2;

/// `count` capabilities from key `from` of the source to key `to` of the
/// destination.
#[derive(Clone, Copy, Debug)]
pub struct Range {
    pub from: u64,
    pub to: u64,
    pub count: u64,
}

/// Why a preemptible long call stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    Failed(Status),
    /// An interrupt is due; `done` capabilities of the range are handled.
    Preempted {
        done: u64,
    },
}

impl From<Status> for Stopped {
    fn from(status: Status) -> Self {
        Stopped::Failed(status)
    }
}

pub struct Kernel {
    pub caps: CapSystem<Cap>,
    /// Which PD and which of its spaces a capability space is.
    pub space_owner: Vec<Option<(PdId, Space)>>,
    pub pds: Arena<Pd>,
    pub ecs: Arena<Box<Ec>>,
    pub scs: Arena<Sc>,
    pub pts: Arena<Pt>,
    pub sms: Arena<Sm>,
    pub vcpus: Arena<Box<crate::vcpu::Vcpu>>,
    /// Per CPU, by the kernel's CPU number.
    pub cpus: Box<[CpuSched; MAX_CPUS]>,
    /// The CPU holding the kernel lock (set by `lock`): the kernel's code
    /// runs for this CPU.
    pub me: usize,
    /// ECs waiting with a deadline (absolute TSC).
    pub timeouts: Vec<(u64, EcId)>,
    /// The root task's first EC: when it ends, the system stops.
    pub root_ec: Option<EcId>,
    /// The root task's first EC has ended: the system stops.
    pub root_dead: bool,
    pub root_pd: Option<PdId>,
    /// Objects whose last capability went, to destroy after the revoke.
    doomed: Vec<Object>,
    /// Memory or ports were revoked since the last shootdown: other CPUs
    /// may still hold them in their TLBs (TSS I/O bitmaps).
    pub tlb_dirty: bool,
    /// Frames that were mapped until the pending shootdown: freed after it.
    pub free_after_shootdown: Vec<u64>,
    /// The semaphore each GSI is assigned to.
    pub irq_sms: [Option<SmId>; crate::arch::x86_64::msi::IRQ_SLOTS],
    /// The semaphores of the debug event (`moat_abi::DEBUG_GSI`): upped
    /// after each state dump (`dump.rs`).
    pub debug_sms: Vec<SmId>,
}

/// A PD's capabilities to itself do not keep it alive: it lives as long as
/// others hold it.
fn counts(holder: PdId, object: Object) -> bool {
    object != Object::Pd(holder)
}

pub fn status_of(error: CapError) -> Status {
    match error {
        CapError::NoSpace(_) | CapError::Empty(_) => Status::BadCapability,
        CapError::Occupied(_) => Status::Occupied,
        CapError::SpaceFull(_) | CapError::OutOfMemory | CapError::TooManySpaces => {
            Status::QuotaExceeded
        }
        CapError::InsufficientRights { .. } => Status::InsufficientRights,
        CapError::NoRights => Status::BadParameter,
    }
}

impl Kernel {
    pub fn new() -> Self {
        Self {
            caps: CapSystem::new(),
            space_owner: Vec::new(),
            pds: Arena::new(),
            ecs: Arena::new(),
            scs: Arena::new(),
            pts: Arena::new(),
            sms: Arena::new(),
            vcpus: Arena::new(),
            // Built on the heap: the array is too large for the stack.
            cpus: (0..MAX_CPUS)
                .map(|_| CpuSched::new())
                .collect::<Vec<_>>()
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| unreachable!("MAX_CPUS entries were made")),
            me: here(),
            timeouts: Vec::new(),
            root_ec: None,
            root_dead: false,
            root_pd: None,
            doomed: Vec::new(),
            tlb_dirty: false,
            free_after_shootdown: Vec::new(),
            irq_sms: [None; crate::arch::x86_64::msi::IRQ_SLOTS],
            debug_sms: Vec::new(),
        }
    }

    // ---- quotas ----

    pub fn charge(&mut self, pd: PdId, bytes: u64) -> Result<(), Status> {
        let pd = self.pds.get_mut(pd).ok_or(Status::BadCapability)?;
        pd.quota.charge(bytes).map_err(|_| Status::QuotaExceeded)
    }

    pub fn refund(&mut self, pd: PdId, bytes: u64) {
        if let Some(pd) = self.pds.get_mut(pd) {
            pd.quota.refund(bytes);
        }
    }

    // ---- capability spaces ----

    pub fn space_of(&self, pd: PdId, space: Space) -> Result<SpaceId, Status> {
        let pd = self.pds.get(pd).ok_or(Status::BadCapability)?;
        Ok(pd.spaces[space as usize])
    }

    fn pd_of_space(&self, space: SpaceId) -> Option<(PdId, Space)> {
        self.space_owner.get(space as usize).copied().flatten()
    }

    pub fn register_space(&mut self, space: SpaceId, pd: PdId, kind: Space) -> Result<(), Status> {
        let index = space as usize;
        if self.space_owner.len() <= index {
            self.space_owner
                .try_reserve(index + 1 - self.space_owner.len())
                .map_err(|_| Status::QuotaExceeded)?;
            self.space_owner.resize(index + 1, None);
        }
        self.space_owner[index] = Some((pd, kind));
        Ok(())
    }

    /// The capability at `selector` in `pd`'s object space, with `needed`
    /// rights.
    pub fn lookup_object(&self, pd: PdId, selector: u64, needed: u8) -> Result<Object, Status> {
        let space = self.space_of(pd, Space::Object)?;
        let cap = self
            .caps
            .lookup_with(
                SlotRef::new(space, selector),
                Rights::from_bits_retain(needed),
            )
            .map_err(status_of)?;
        match cap.object {
            Cap::Object(object) => Ok(object),
            _ => Err(Status::BadCapability),
        }
    }

    pub fn lookup_pd(&self, pd: PdId, selector: u64, needed: u8) -> Result<PdId, Status> {
        match self.lookup_object(pd, selector, needed)? {
            Object::Pd(id) if self.pds.contains(id) => Ok(id),
            _ => Err(Status::BadCapability),
        }
    }

    pub fn lookup_ec(&self, pd: PdId, selector: u64, needed: u8) -> Result<EcId, Status> {
        match self.lookup_object(pd, selector, needed)? {
            Object::Ec(id) if self.ecs.contains(id) => Ok(id),
            _ => Err(Status::BadCapability),
        }
    }

    pub fn lookup_pt(&self, pd: PdId, selector: u64, needed: u8) -> Result<PtId, Status> {
        match self.lookup_object(pd, selector, needed)? {
            Object::Pt(id) if self.pts.contains(id) => Ok(id),
            _ => Err(Status::BadCapability),
        }
    }

    pub fn lookup_sm(&self, pd: PdId, selector: u64, needed: u8) -> Result<SmId, Status> {
        match self.lookup_object(pd, selector, needed)? {
            Object::Sm(id) if self.sms.contains(id) => Ok(id),
            _ => Err(Status::BadCapability),
        }
    }

    /// Puts an original capability for a new object at `selector` of
    /// `holder`'s object space, charging the slot to `holder`.
    pub fn install_object(
        &mut self,
        holder: PdId,
        selector: u64,
        object: Object,
    ) -> Result<(), Status> {
        let space = self.space_of(holder, Space::Object)?;
        self.charge(holder, CAP_SLOT_COST)?;
        if let Err(error) = self.caps.insert_root(
            SlotRef::new(space, selector),
            Cap::Object(object),
            Rights::ALL,
        ) {
            self.refund(holder, CAP_SLOT_COST);
            return Err(status_of(error));
        }
        if counts(holder, object) {
            self.object_ref(object, 1);
        }
        Ok(())
    }

    /// Checks that `selector` is free in `holder`'s object space.
    pub fn object_slot_free(&self, holder: PdId, selector: u64) -> Result<(), Status> {
        let space = self.space_of(holder, Space::Object)?;
        match self.caps.lookup(SlotRef::new(space, selector)) {
            Ok(_) => Err(Status::Occupied),
            Err(CapError::Empty(_)) => {
                if self.caps.len(space) >= self.caps.limit(space).unwrap_or(0) {
                    Err(Status::QuotaExceeded)
                } else {
                    Ok(())
                }
            }
            Err(error) => Err(status_of(error)),
        }
    }

    fn object_ref(&mut self, object: Object, delta: i32) -> u32 {
        let count = match object {
            Object::Pd(id) => self.pds.get_mut(id).map(|o| &mut o.caps),
            Object::Ec(id) => self.ecs.get_mut(id).map(|o| &mut o.caps),
            Object::Sc(id) => self.scs.get_mut(id).map(|o| &mut o.caps),
            Object::Pt(id) => self.pts.get_mut(id).map(|o| &mut o.caps),
            Object::Sm(id) => self.sms.get_mut(id).map(|o| &mut o.caps),
            Object::Vcpu(id) => self.vcpus.get_mut(id).map(|o| &mut o.caps),
        };
        match count {
            Some(count) => {
                *count = count.saturating_add_signed(delta);
                *count
            }
            None => 0,
        }
    }

    /// Derives `count` capabilities from `from` (space of the caller) to
    /// `to` in `dst`, masked to `rights`; all or nothing.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    pub fn delegate(
        &mut self,
        src: PdId,
        dst: PdId,
        kind: Space,
        from: u64,
        to: u64,
        count: u64,
        rights: u8,
    ) -> Result<(), Status> {
        let range = Range { from, to, count };
        match self.delegate_range(src, dst, kind, range, rights, 0, || false) {
            Ok(()) | Err(Stopped::Preempted { .. }) => Ok(()),
            Err(Stopped::Failed(status)) => Err(status),
        }
    }

    /// Delegates `range` from its `start`th capability on; every
    /// [`PREEMPT_EVERY`] capabilities it asks `preempt` whether to stop
    /// (an interrupt is due), and then says how far it got, so the call
    /// can go on later: a long delegation never holds off a component of
    /// higher priority for longer than that many steps. A failure undoes
    /// the whole range, the part done before a stop included.
    #[allow(clippy::too_many_arguments)]
    pub fn delegate_range(
        &mut self,
        src: PdId,
        dst: PdId,
        kind: Space,
        range: Range,
        rights: u8,
        start: u64,
        preempt: impl Fn() -> bool,
    ) -> Result<(), Stopped> {
        let Range { from, to, count } = range;
        let src_space = self.space_of(src, kind)?;
        let dst_space = self.space_of(dst, kind)?;
        if kind == Space::Memory && rights & moat_abi::rights::MEM_READ == 0 {
            return Err(Status::BadParameter.into());
        }
        // A port or GSI capability is keyed by what it grants: it cannot
        // move to another key.
        if matches!(kind, Space::Io | Space::Irq) && from != to {
            return Err(Status::BadParameter.into());
        }
        let mask = Rights::from_bits_retain(rights);
        for i in start..count {
            if i > start && (i - start).is_multiple_of(PREEMPT_EVERY) && preempt() {
                return Err(Stopped::Preempted { done: i });
            }
            let (Some(source), Some(target)) = (from.checked_add(i), to.checked_add(i)) else {
                return Err(Status::BadParameter.into());
            };
            if let Err(status) =
                self.delegate_one(src_space, dst, dst_space, kind, source, target, mask)
            {
                // Undo what this call did.
                for j in 0..i {
                    let _ = self.revoke_slot(SlotRef::new(dst_space, to + j), true);
                }
                return Err(status.into());
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn delegate_one(
        &mut self,
        src_space: SpaceId,
        dst: PdId,
        dst_space: SpaceId,
        kind: Space,
        source: u64,
        target: u64,
        mask: Rights,
    ) -> Result<(), Status> {
        let from = SlotRef::new(src_space, source);
        let to = SlotRef::new(dst_space, target);
        let cap = self.caps.lookup(from).map_err(status_of)?.clone();
        let rights = cap.rights & mask;
        if rights.is_empty() {
            return Err(Status::InsufficientRights);
        }
        self.charge(dst, CAP_SLOT_COST)?;
        let payload = match cap.object {
            Cap::Frame { phys, .. } => Cap::Frame { phys, owned: false },
            other => other,
        };
        if let Err(error) = self.caps.delegate_with(from, to, mask, payload) {
            self.refund(dst, CAP_SLOT_COST);
            return Err(status_of(error));
        }
        match payload {
            Cap::Object(object) if counts(dst, object) => {
                self.object_ref(object, 1);
            }
            Cap::Frame { phys, .. } if kind == Space::Memory => {
                if let Err(status) = self.map_page(dst, target, phys, rights.bits()) {
                    let _ = self.revoke_slot(to, true);
                    return Err(status);
                }
            }
            Cap::Port => {
                if let Err(status) = self.set_port(dst, target, true) {
                    let _ = self.revoke_slot(to, true);
                    return Err(status);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Removes what was derived from `at` (and `at` itself if asked),
    /// undoing mappings and destroying objects whose last capability went.
    pub fn revoke_slot(&mut self, at: SlotRef, include_self: bool) -> Result<usize, Status> {
        let result = self.revoke_slot_deferred(at, include_self);
        self.destroy_doomed();
        result
    }

    /// `revoke_slot`, leaving the objects it dooms for the caller to
    /// destroy (a preemptible `revoke` does, in steps).
    pub fn revoke_slot_deferred(
        &mut self,
        at: SlotRef,
        include_self: bool,
    ) -> Result<usize, Status> {
        let mut removed = Vec::new();
        let result = self
            .caps
            .revoke(at, include_self, |slot, cap| removed.push((slot, cap)));
        for (slot, cap) in removed {
            self.capability_gone(slot, cap);
        }
        result.map_err(status_of)
    }

    /// Bookkeeping for one capability that just left its space.
    pub fn capability_gone(&mut self, slot: SlotRef, cap: Capability<Cap>) {
        let Some((pd, kind)) = self.pd_of_space(slot.space) else {
            return;
        };
        self.refund(pd, CAP_SLOT_COST);
        match cap.object {
            Cap::Object(object) => {
                if counts(pd, object) && self.object_ref(object, -1) == 0 {
                    self.doomed.push(object);
                }
            }
            Cap::Frame { phys, owned } => {
                if kind == Space::Memory {
                    self.unmap_page(pd, slot.key);
                }
                if owned {
                    self.free_after_shootdown(phys);
                }
            }
            Cap::Port => {
                if !self.pds.get(pd).is_some_and(|p| p.dying) {
                    let _ = self.set_port(pd, slot.key, false);
                }
            }
            Cap::Gsi => {}
        }
    }

    pub fn destroy_doomed(&mut self) {
        self.destroy_doomed_until(&|| false);
    }

    /// Destroys the doomed objects, the most recently doomed first; a PD
    /// goes in steps (`destroy_pd_step`), and between two steps `preempt`
    /// may stop the work: then it returns false, and what is left stays
    /// doomed for the next call to go on with. (Nothing runs in a PD once
    /// its teardown has begun.)
    pub fn destroy_doomed_until(&mut self, preempt: &dyn Fn() -> bool) -> bool {
        while let Some(&object) = self.doomed.last() {
            if let Object::Pd(id) = object {
                if self.destroy_pd_step(id, preempt) {
                    self.doomed.pop();
                } else if preempt() {
                    return false;
                }
                continue;
            }
            self.doomed.pop();
            match object {
                Object::Pd(_) => {}
                Object::Ec(id) => self.destroy_ec(id),
                Object::Sc(id) => self.destroy_sc(id),
                Object::Pt(id) => self.destroy_pt(id),
                Object::Sm(id) => self.destroy_sm(id),
                Object::Vcpu(id) => self.destroy_vcpu(id),
            }
        }
        true
    }

    /// The object to be destroyed next.
    pub fn next_doomed(&self) -> Option<Object> {
        self.doomed.last().copied()
    }

    /// Schedules destruction of an object (its owner PD is going away).
    pub fn doom(&mut self, object: Object) {
        self.doomed.push(object);
    }

    // ---- scheduling ----

    /// The EC running on this CPU.
    pub fn current(&self) -> Option<EcId> {
        self.cpus[self.me % MAX_CPUS].current
    }

    pub fn set_current(&mut self, ec: Option<EcId>) {
        self.cpus[self.me % MAX_CPUS].current = ec;
    }

    /// The CPU an SC runs on.
    fn sc_cpu(&self, sc: ScId) -> usize {
        self.scs.get(sc).map_or(self.me, |s| s.cpu)
    }

    /// Stops `ec` running on whichever CPU runs it; another CPU is sent a
    /// wake-up so that it leaves the EC at once.
    ///
    /// An EC can be current only on its own CPU (`Ec::cpu`: every path
    /// that makes an EC current on a CPU — a pick from that CPU's queue, a
    /// donation or return of an SC of that CPU — sets it), so one CPU is
    /// looked at, not all.
    pub fn take_off_cpu(&mut self, ec: EcId) {
        let Some(index) = self.ecs.get(ec).map(|e| e.cpu % MAX_CPUS) else {
            return;
        };
        if self.cpus[index].current == Some(ec) {
            self.cpus[index].current = None;
            if index != self.me % MAX_CPUS {
                ipi::kick(index);
            }
        }
    }

    /// The EC's SC goes on its CPU's run queue (unless the EC runs); a
    /// CPU other than this one is woken to look at it.
    pub fn make_ready(&mut self, ec: EcId) {
        let Some(sc) = self.ecs.get(ec).and_then(|e| e.sc) else {
            return;
        };
        let Some((priority, cpu)) = self.scs.get(sc).map(|s| (s.priority, s.cpu)) else {
            return;
        };
        if self.cpus[cpu].current == Some(ec) {
            return;
        }
        // A handler runs where the SC it holds runs.
        if let Some(e) = self.ecs.get_mut(ec) {
            e.cpu = cpu;
        }
        let queue = &mut self.cpus[cpu].run;
        if !queue.contains(sc) {
            // Cannot run out of memory: the SC's place was reserved when
            // it was made (`new_sc`).
            let _ = queue.enqueue(sc, priority);
            ipi::kick(cpu);
        }
    }

    /// Takes the EC off its CPU or its run queue (it blocks or dies).
    pub fn make_unready(&mut self, ec: EcId) {
        self.take_off_cpu(ec);
        if let Some(sc) = self.ecs.get(ec).and_then(|e| e.sc) {
            let cpu = self.sc_cpu(sc);
            self.cpus[cpu].run.remove(sc);
        }
    }

    /// Moves the SC held by `from` to `to` (donation on call, return on
    /// reply); `to` runs where the SC runs.
    pub fn pass_sc(&mut self, from: EcId, to: EcId) {
        let sc = self.ecs.get_mut(from).and_then(|e| e.sc.take());
        if let Some(sc) = sc {
            let cpu = self.sc_cpu(sc);
            self.cpus[cpu].run.remove(sc);
            if let Some(s) = self.scs.get_mut(sc) {
                s.holder = Some(to);
            }
            if let Some(e) = self.ecs.get_mut(to) {
                e.sc = Some(sc);
                e.cpu = cpu;
            }
        }
    }

    fn priority_of(&self, ec: EcId) -> Option<u8> {
        let sc = self.ecs.get(ec)?.sc?;
        Some(self.scs.get(sc)?.priority)
    }

    /// Lets a higher-priority ready SC take this CPU from the current one.
    pub fn preempt_if_needed(&mut self) {
        let me = self.me % MAX_CPUS;
        let (Some(current), Some(best)) =
            (self.cpus[me].current, self.cpus[me].run.peek_priority())
        else {
            return;
        };
        let Some(mine) = self.priority_of(current) else {
            return;
        };
        if best > mine {
            if let Some(sc) = self.ecs.get(current).and_then(|e| e.sc) {
                // Its place was reserved when it was made (`new_sc`).
                let _ = self.cpus[me].run.enqueue_front(sc, mine);
            }
            self.cpus[me].current = None;
        }
    }

    /// The current SC's budget ran out: to the tail of its priority.
    pub fn rotate_current(&mut self) {
        let me = self.me % MAX_CPUS;
        let Some(current) = self.cpus[me].current else {
            return;
        };
        let Some(sc) = self.ecs.get(current).and_then(|e| e.sc) else {
            return;
        };
        let expired = match self.scs.get_mut(sc) {
            Some(s) => {
                let expired = s.budget.charge(crate::arch::x86_64::lapic::TICK_US);
                if expired {
                    s.budget.replenish();
                }
                expired
            }
            None => false,
        };
        if expired && !self.cpus[me].run.is_empty() {
            let priority = self.priority_of(current).unwrap_or(0);
            // Its place was reserved when it was made (`new_sc`).
            let _ = self.cpus[me].run.enqueue(sc, priority);
            self.cpus[me].current = None;
        }
    }

    /// Who runs next on this CPU: the current EC, or the head of its run
    /// queue; and whether it runs a vCPU (one lookup for both).
    pub fn pick(&mut self) -> Option<(EcId, bool)> {
        let me = self.me % MAX_CPUS;
        if let Some(current) = self.cpus[me].current {
            if let Some(e) = self.ecs.get(current) {
                if e.state == EcState::Running && e.sc.is_some() {
                    return Some((current, e.vcpu.is_some()));
                }
            }
            self.cpus[me].current = None;
        }
        while let Some((sc, _)) = self.cpus[me].run.pick() {
            let holder = self.scs.get(sc).and_then(|s| s.holder);
            if let Some(ec) = holder {
                if let Some(e) = self.ecs.get(ec) {
                    if e.state == EcState::Running && e.sc == Some(sc) {
                        let vcpu = e.vcpu.is_some();
                        self.cpus[me].current = Some(ec);
                        return Some((ec, vcpu));
                    }
                }
            }
        }
        None
    }

    /// Memory or ports were revoked: every CPU flushes before the revoking
    /// call returns (`sync_tlbs`), and the frames that were mapped are
    /// freed only then.
    pub fn tlb_changed(&mut self) {
        self.tlb_dirty = true;
    }

    /// A frame that may still be in another CPU's TLB: freed after the
    /// shootdown.
    pub fn free_after_shootdown(&mut self, phys: u64) {
        // Also what makes `before_leaving` look.
        self.tlb_dirty = true;
        if self.free_after_shootdown.try_reserve(1).is_ok() {
            self.free_after_shootdown.push(phys);
        } else {
            self.sync_tlbs();
            crate::memory::free_frame(phys);
        }
    }

    /// Carries out the pending TLB shootdown on every CPU, then frees what
    /// waited for it. Called before this CPU leaves the kernel.
    /// What a CPU does before it leaves the kernel: the pending shootdown,
    /// the frees other CPUs left it, a requested state dump. One test in
    /// the common case where there is nothing to do.
    #[inline]
    pub fn before_leaving(&mut self) {
        if self.tlb_dirty || self.cpus[self.me % MAX_CPUS].left_work || crate::dump::pending() {
            self.before_leaving_slow();
        }
    }

    #[cold]
    #[inline(never)]
    fn before_leaving_slow(&mut self) {
        self.sync_tlbs();
        self.free_left_here();
        crate::dump::at_safe_point(self);
    }

    /// What other CPUs left this one to free: ECs it may have been
    /// running, vCPUs whose VMCS may be current here. Called when this CPU
    /// is in the kernel and off every EC's register area.
    pub fn free_left_here(&mut self) {
        let cpu = &mut self.cpus[self.me % MAX_CPUS];
        cpu.left_work = false;
        if cpu.zombies.is_empty() && cpu.dead_vcpus.is_empty() && cpu.dead_frames.is_empty() {
            return;
        }
        cpu.zombies.clear();
        for backend in core::mem::take(&mut cpu.dead_vcpus) {
            crate::vcpu::free_backend(backend);
        }
        for phys in core::mem::take(&mut cpu.dead_frames) {
            // The state page was mapped for the VMM too.
            self.free_after_shootdown(phys);
        }
    }

    #[inline]
    pub fn sync_tlbs(&mut self) {
        if self.tlb_dirty || !self.free_after_shootdown.is_empty() {
            self.sync_tlbs_now();
        }
    }

    fn sync_tlbs_now(&mut self) {
        if self.tlb_dirty {
            self.tlb_dirty = false;
            ipi::shootdown(None);
        }
        for phys in self.free_after_shootdown.drain(..) {
            crate::memory::free_frame(phys);
        }
    }

    /// Wakes ECs whose deadline passed, with `Timeout`.
    pub fn expire_timeouts(&mut self, now: u64) {
        let mut index = 0;
        while index < self.timeouts.len() {
            let (deadline, ec) = self.timeouts[index];
            if deadline <= now {
                self.timeouts.swap_remove(index);
                self.timeout(ec);
            } else {
                index += 1;
            }
        }
    }

    /// Everything the CPU needs to enter `ec`: its stack slot for the next
    /// entry, its address space; returns where its registers are.
    pub fn prepare_switch(&mut self, ec: EcId) -> *const TrapFrame {
        let Some(e) = self.ecs.get_mut(ec) else {
            return core::ptr::null();
        };
        let frame = &mut e.regs as *mut TrapFrame;
        let pd = e.pd;
        let (root, bitmap) = match self.pds.get(pd) {
            Some(p) => (Some(p.space.root()), p.io_bitmap.as_deref()),
            None => (None, None),
        };
        let wanted = bitmap.map(|_| pd);
        let me = self.me % MAX_CPUS;
        let block = percpu::current();
        if block.io_stale.load(Ordering::Relaxed) {
            block.io_stale.store(false, Ordering::Relaxed);
            self.cpus[me].io_loaded = None;
        }
        if self.cpus[me].io_loaded != Some(wanted) {
            gdt::load_io_bitmap(bitmap);
            self.cpus[me].io_loaded = Some(wanted);
        }
        self.cpus[me].entered = Some(ec);
        let top = frame as u64 + core::mem::size_of::<TrapFrame>() as u64;
        gdt::set_kernel_entry_stack(top);
        percpu::set_kernel_rsp(top);
        if let Some(root) = root {
            if cpu::read_cr3() != root {
                // SAFETY: every PD's tables share the kernel half of the
                // kernel's tables.
                unsafe { cpu::write_cr3(root) };
            }
        }
        frame
    }
}

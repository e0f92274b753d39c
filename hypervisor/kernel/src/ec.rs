//! Execution contexts (threads) and synchronous IPC between them.
//!
//! A global EC runs on its own SC. A handler EC has none: each call to one
//! of its portals starts an activation at the portal's entry, running on
//! the caller's SC (donation) until the handler replies, when the SC goes
//! back to the caller. Callers that find the handler busy wait in FIFO
//! order. Exceptions of an EC are calls to its exception portal made by
//! the kernel on the EC's behalf.

use crate::arch::x86_64::entry::TrapFrame;
use crate::arch::x86_64::layout::phys_to_virt;
use crate::kernel::{EcId, Kernel, Object, PdId, PtId, SmId};
use crate::memory;
use crate::pt::Pt;
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use moat_abi::syscall::{Cpu, CreateEc};
use moat_abi::{
    exception_reply, rights, ExceptionMessage, Space, Status, TypedItem, Utcb, EXIT_VECTOR,
    PAGE_SIZE, UTCB_WORDS,
};
use moat_kernel::paging::MapFlags;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EcKind {
    Global,
    Handler,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EcState {
    /// Runs whenever it holds an SC that is scheduled.
    Running,
    /// A handler between activations.
    Idle,
    /// Waiting for the handler to take its call.
    CallQueued(EcId),
    /// The handler works on its call.
    WaitReply(EcId),
    SmWait(SmId),
    Dead,
}

/// Why an EC is calling: an ordinary call, or its exception portal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    Message,
    /// The guest IPC hypercall of a vCPU this EC runs.
    Hypercall,
    Fault,
    Exit,
}

#[repr(C, align(16))]
pub struct Ec {
    /// User registers; kernel entries push them here directly.
    pub regs: TrapFrame,
    pub pd: PdId,
    pub kind: EcKind,
    /// The CPU a global EC is bound to (its SC runs there); a handler runs
    /// on the CPU of the SC it was lent.
    pub cpu: usize,
    pub handler_rsp: u64,
    pub utcb_phys: u64,
    pub utcb_virt: u64,
    pub exception_portal: u64,
    pub ec_id: u64,
    pub state: EcState,
    pub sc: Option<crate::kernel::ScId>,
    /// Handler: whom the current activation serves.
    pub caller: Option<EcId>,
    /// Handler: inside an activation.
    pub active: bool,
    /// Handler: callers waiting, with the portal each called.
    pub queue: VecDeque<(EcId, PtId)>,
    /// Caller: the words of its outstanding call, and why it calls.
    pub message: [u64; 6],
    pub calling: CallKind,
    pub caps: u32,
    /// The vCPU this EC runs (it is inside `vcpu_run`).
    pub vcpu: Option<crate::vcpu::VcpuId>,
    /// The answer to a guest hypercall, for the vCPU to pick up.
    pub hypercall_reply: Option<(u64, [u64; 6])>,
    /// How far a long `delegate` or `revoke` of this EC got before an
    /// interrupt stopped it (see `Kernel::delegate`).
    pub resume: Option<Resume>,
}

/// A long call stopped at a preemption point: the EC executes the same
/// call again, and the kernel goes on from `done` if the call (number and
/// arguments) is still the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub call: [u64; 7],
    pub done: u64,
}

/// Kernel memory an EC costs: the object and its UTCB page.
pub const EC_COST: u64 = core::mem::size_of::<Ec>() as u64 + PAGE_SIZE;

pub fn words_of(regs: &TrapFrame) -> [u64; 6] {
    [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9]
}

pub fn set_words(regs: &mut TrapFrame, words: [u64; 6]) {
    regs.rdi = words[0];
    regs.rsi = words[1];
    regs.rdx = words[2];
    regs.r10 = words[3];
    regs.r8 = words[4];
    regs.r9 = words[5];
}

/// The UTCB of an EC, through the direct map.
fn utcb(phys: u64) -> &'static mut Utcb {
    // SAFETY: `phys` is the UTCB frame the EC owns (allocated in
    // `sys_create_ec`, freed only when the EC is destroyed, never handed to
    // user space as a capability); callers use the reference only while
    // the kernel lock is held and never keep two to the same UTCB.
    unsafe { &mut *(phys_to_virt(phys) as *mut Utcb) }
}

impl Kernel {
    /// `create_ec`.
    pub fn sys_create_ec(&mut self, caller: PdId, call: &CreateEc) -> Result<(), Status> {
        let pd = self.lookup_pd(caller, call.pd, rights::PD_CONTROL)?;
        self.object_slot_free(caller, call.dst)?;
        // A handler runs wherever its callers' SCs run.
        let cpu = match call.cpu {
            Cpu::OfCaller => self.me,
            Cpu::Number(n) => usize::from(n),
        };
        if !call.handler && !crate::arch::x86_64::ipi::schedules(cpu) {
            return Err(Status::BadCpu);
        }
        let utcb_virt = call.utcb.check()?.address();
        if self.pds.get(pd).is_some_and(|p| p.guest.is_some()) {
            return Err(Status::BadParameter);
        }
        let kind = if call.handler {
            EcKind::Handler
        } else {
            EcKind::Global
        };
        let cpu = if call.handler { 0 } else { cpu };
        // No portal: a selector no lookup finds.
        let exception_portal = call.exception_portal.unwrap_or(u64::MAX);
        let id = self.new_ec(
            pd,
            kind,
            cpu,
            call.rip,
            call.rsp,
            utcb_virt,
            exception_portal,
            call.ec_id,
        )?;
        if let Err(status) = self.install_object(caller, call.dst, Object::Ec(id)) {
            self.destroy_ec(id);
            return Err(status);
        }
        Ok(())
    }

    /// An EC in `pd` with its UTCB mapped at `utcb_virt`, charged to `pd`.
    #[allow(clippy::too_many_arguments)]
    pub fn new_ec(
        &mut self,
        pd: PdId,
        kind: EcKind,
        cpu: usize,
        rip: u64,
        rsp: u64,
        utcb_virt: u64,
        exception_portal: u64,
        ec_id: u64,
    ) -> Result<EcId, Status> {
        self.charge(pd, EC_COST)?;
        let Some((utcb_phys, _)) = memory::alloc_zeroed_page() else {
            self.refund(pd, EC_COST);
            return Err(Status::QuotaExceeded);
        };
        let flags = MapFlags::USER | MapFlags::WRITABLE | memory::no_execute();
        let mapped = self.map_kernel_page(pd, utcb_virt, utcb_phys, flags);
        if let Err(status) = mapped {
            memory::free_frame(utcb_phys);
            self.refund(pd, EC_COST);
            return Err(status);
        }
        let ec = Box::new(Ec {
            regs: TrapFrame::new_user(rip, rsp),
            pd,
            kind,
            cpu,
            handler_rsp: rsp,
            utcb_phys,
            utcb_virt,
            exception_portal,
            ec_id,
            state: if kind == EcKind::Handler {
                EcState::Idle
            } else {
                EcState::Running
            },
            sc: None,
            caller: None,
            active: false,
            queue: VecDeque::new(),
            message: [0; 6],
            calling: CallKind::Message,
            caps: 0,
            vcpu: None,
            hypercall_reply: None,
            resume: None,
        });
        let Some(id) = self.ecs.insert(ec) else {
            self.unmap_page(pd, utcb_virt / PAGE_SIZE);
            memory::free_frame(utcb_phys);
            self.refund(pd, EC_COST);
            return Err(Status::QuotaExceeded);
        };
        if let Some(p) = self.pds.get_mut(pd) {
            if p.owned.try_reserve(1).is_ok() {
                p.owned.push(Object::Ec(id));
            }
        }
        Ok(id)
    }

    /// Maps a kernel-owned page (a UTCB) into `pd`, page tables charged to it.
    fn map_kernel_page(
        &mut self,
        pd: PdId,
        virt: u64,
        phys: u64,
        flags: MapFlags,
    ) -> Result<(), Status> {
        let rights_bits = rights::MEM_READ
            | if flags.contains(MapFlags::WRITABLE) {
                rights::MEM_WRITE
            } else {
                0
            };
        self.map_page(pd, virt / PAGE_SIZE, phys, rights_bits)
    }

    // ---- IPC ----

    /// The common `call`: a message without UTCB payload from the current
    /// EC to an idle handler. Switches to the handler with the caller's SC
    /// and returns true; false leaves everything untouched for the general
    /// path.
    pub fn fast_call(&mut self, caller: EcId, selector: u64) -> bool {
        if self.current() != Some(caller) {
            return false;
        }
        let Some(c) = self.ecs.get(caller) else {
            return false;
        };
        let pd = c.pd;
        let source = utcb(c.utcb_phys);
        if source.untyped != 0 || source.typed != 0 || c.sc.is_none() {
            return false;
        }
        let Ok(pt) = self.lookup_pt(pd, selector, rights::PT_CALL) else {
            return false;
        };
        let Some(&Pt {
            ec: handler,
            entry,
            id,
            ..
        }) = self.pts.get(pt)
        else {
            return false;
        };
        if handler == caller || self.ecs.get(handler).map(|h| h.state) != Some(EcState::Idle) {
            return false;
        }
        let Some(c) = self.ecs.get_mut(caller) else {
            return false;
        };
        let words = words_of(&c.regs);
        c.message = words;
        c.calling = CallKind::Message;
        c.state = EcState::WaitReply(handler);
        let Some(sc) = c.sc.take() else { return false };
        let Some(h) = self.ecs.get_mut(handler) else {
            return false;
        };
        h.regs.start_activation(entry, h.handler_rsp, id, words);
        h.caller = Some(caller);
        h.active = true;
        h.state = EcState::Running;
        h.sc = Some(sc);
        h.cpu = self.me;
        let target = utcb(h.utcb_phys);
        target.untyped = 0;
        target.typed = 0;
        if let Some(s) = self.scs.get_mut(sc) {
            s.holder = Some(handler);
        }
        self.set_current(Some(handler));
        true
    }

    /// The common `reply`: from the current handler to a caller waiting for
    /// a plain message, no UTCB payload, nobody queued. Switches back with
    /// the SC and returns true; false leaves everything to the general path.
    pub fn fast_reply(&mut self, handler: EcId) -> bool {
        if self.current() != Some(handler) {
            return false;
        }
        let Some(h) = self.ecs.get(handler) else {
            return false;
        };
        let Some(caller) = h.caller else { return false };
        let source = utcb(h.utcb_phys);
        if h.kind != EcKind::Handler
            || !h.active
            || h.sc.is_none()
            || !h.queue.is_empty()
            || source.untyped != 0
            || source.typed != 0
        {
            return false;
        }
        let words = words_of(&h.regs);
        let waiting = self.ecs.get(caller).is_some_and(|c| {
            c.state == EcState::WaitReply(handler)
                && matches!(c.calling, CallKind::Message | CallKind::Hypercall)
        });
        if !waiting {
            return false;
        }
        let Some(h) = self.ecs.get_mut(handler) else {
            return false;
        };
        let Some(sc) = h.sc.take() else { return false };
        h.active = false;
        h.caller = None;
        h.state = EcState::Idle;
        let Some(c) = self.ecs.get_mut(caller) else {
            return false;
        };
        if c.calling == CallKind::Hypercall {
            // The vCPU's loop puts the reply into the guest's registers.
            c.hypercall_reply = Some((Status::Success.code(), words));
        } else {
            set_words(&mut c.regs, words);
            c.regs.rax = Status::Success.code();
            let target = utcb(c.utcb_phys);
            target.untyped = 0;
            target.typed = 0;
        }
        c.state = EcState::Running;
        c.sc = Some(sc);
        if let Some(s) = self.scs.get_mut(sc) {
            s.holder = Some(caller);
        }
        self.set_current(Some(caller));
        true
    }

    /// `call`: on success the caller waits (or has switched to the
    /// handler); its status arrives with the reply.
    pub fn sys_call(&mut self, caller: EcId, selector: u64, nonblock: bool) -> Result<(), Status> {
        let ec = self.ecs.get_mut(caller).ok_or(Status::BadCapability)?;
        let pd = ec.pd;
        ec.message = words_of(&ec.regs);
        ec.calling = CallKind::Message;
        let utcb = utcb(ec.utcb_phys);
        if utcb.untyped as usize > UTCB_WORDS
            || (utcb.typed as usize).saturating_mul(TypedItem::WORDS)
                > UTCB_WORDS - utcb.untyped as usize
        {
            return Err(Status::BadParameter);
        }
        let pt = self.lookup_pt(pd, selector, rights::PT_CALL)?;
        self.call_portal(caller, pt, nonblock)
    }

    /// A blocking call on behalf of `caller` (used for guest hypercalls).
    pub fn call_portal_for(&mut self, caller: EcId, pt: PtId) -> Result<(), Status> {
        self.call_portal(caller, pt, false)
    }

    fn call_portal(&mut self, caller: EcId, pt: PtId, nonblock: bool) -> Result<(), Status> {
        let handler = self.pts.get(pt).ok_or(Status::BadCapability)?.ec;
        if handler == caller {
            return Err(Status::BadParameter);
        }
        let state = self.ecs.get(handler).map(|h| h.state);
        match state {
            None | Some(EcState::Dead) => Err(Status::Dead),
            Some(EcState::Idle) => {
                self.start_activation(handler, caller, pt);
                let was_current = self.current() == Some(caller);
                self.pass_sc(caller, handler);
                if was_current {
                    self.set_current(Some(handler));
                } else {
                    self.make_ready(handler);
                }
                Ok(())
            }
            Some(_) if nonblock => Err(Status::WouldBlock),
            Some(_) => {
                let h = self.ecs.get_mut(handler).ok_or(Status::Dead)?;
                h.queue.try_reserve(1).map_err(|_| Status::QuotaExceeded)?;
                h.queue.push_back((caller, pt));
                self.make_unready(caller);
                if let Some(c) = self.ecs.get_mut(caller) {
                    c.state = EcState::CallQueued(handler);
                }
                Ok(())
            }
        }
    }

    /// Starts `handler` at `pt`'s entry with `caller`'s message.
    fn start_activation(&mut self, handler: EcId, caller: EcId, pt: PtId) {
        let Some((entry, id)) = self.pts.get(pt).map(|p| (p.entry, p.id)) else {
            return;
        };
        let Some(c) = self.ecs.get_mut(caller) else {
            return;
        };
        c.state = EcState::WaitReply(handler);
        let message = c.message;
        let from_utcb = if c.calling == CallKind::Message {
            Some(c.utcb_phys)
        } else {
            None
        };
        let from_pd = c.pd;
        let Some(h) = self.ecs.get_mut(handler) else {
            return;
        };
        h.regs.start_activation(entry, h.handler_rsp, id, message);
        h.caller = Some(caller);
        h.active = true;
        h.state = EcState::Running;
        let (to_utcb, to_pd) = (h.utcb_phys, h.pd);
        match from_utcb {
            Some(from) => self.transfer_utcb(from, from_pd, to_utcb, to_pd),
            None => {
                let to = utcb(to_utcb);
                to.untyped = 0;
                to.typed = 0;
            }
        }
    }

    /// Copies extra words and performs typed items from one UTCB to another.
    fn transfer_utcb(&mut self, from: u64, from_pd: PdId, to: u64, to_pd: PdId) {
        {
            let source = utcb(from);
            if source.untyped == 0 && source.typed == 0 {
                let target = utcb(to);
                target.untyped = 0;
                target.typed = 0;
                return;
            }
        }
        let (untyped, typed) = {
            let source = utcb(from);
            let untyped = (source.untyped as usize).min(UTCB_WORDS);
            let typed = (source.typed as usize).min((UTCB_WORDS - untyped) / TypedItem::WORDS);
            let target = utcb(to);
            target.words[..untyped].copy_from_slice(&source.words[..untyped]);
            target.untyped = untyped as u64;
            (untyped, typed)
        };
        let mut arrived = 0usize;
        for index in 0..typed {
            let at = untyped + index * TypedItem::WORDS;
            let words = {
                let source = utcb(from);
                [source.words[at], source.words[at + 1], source.words[at + 2]]
            };
            let Some(item) = TypedItem::decode(words) else {
                continue;
            };
            let (base, count) = {
                let target = utcb(to);
                match item.space {
                    Space::Object => (target.recv_obj_base, target.recv_obj_count),
                    Space::Memory => (target.recv_mem_base, target.recv_mem_count),
                    Space::Io | Space::Irq => continue,
                }
            };
            let inside = item.count > 0
                && item.destination >= base
                && item
                    .destination
                    .checked_add(item.count)
                    .is_some_and(|end| end <= base.saturating_add(count));
            if !inside || item.count > 65536 {
                continue;
            }
            if self
                .delegate(
                    from_pd,
                    to_pd,
                    item.space,
                    item.source,
                    item.destination,
                    item.count,
                    item.rights,
                )
                .is_ok()
            {
                let slot = untyped + arrived * TypedItem::WORDS;
                let target = utcb(to);
                target.words[slot..slot + 3].copy_from_slice(&item.encode());
                arrived += 1;
            }
        }
        utcb(to).typed = arrived as u64;
    }

    /// `reply`. Returns a status only when the handler keeps running.
    pub fn sys_reply(&mut self, handler: EcId) -> Option<Status> {
        let h = self.ecs.get_mut(handler)?;
        if h.kind != EcKind::Handler || !h.active {
            return Some(Status::BadCall);
        }
        let words = words_of(&h.regs);
        let (from_utcb, from_pd) = (h.utcb_phys, h.pd);
        let caller = h.caller.take();
        let waiting = caller.filter(|&c| {
            self.ecs
                .get(c)
                .is_some_and(|e| e.state == EcState::WaitReply(handler))
        });
        match (caller, waiting) {
            (Some(_), None) => return Some(Status::Aborted),
            (None, _) => self.release_orphan_sc(handler),
            (Some(c), Some(_)) => {
                let calling = self.ecs.get(c).map(|e| e.calling)?;
                let was_current = self.current() == Some(handler);
                self.pass_sc(handler, c);
                match calling {
                    CallKind::Message => {
                        let (to_utcb, to_pd) = {
                            let e = self.ecs.get_mut(c)?;
                            set_words(&mut e.regs, words);
                            e.regs.rax = Status::Success.code();
                            e.state = EcState::Running;
                            (e.utcb_phys, e.pd)
                        };
                        self.transfer_utcb(from_utcb, from_pd, to_utcb, to_pd);
                    }
                    CallKind::Hypercall => {
                        if let Some(e) = self.ecs.get_mut(c) {
                            e.hypercall_reply = Some((Status::Success.code(), words));
                            e.state = EcState::Running;
                        }
                    }
                    CallKind::Fault if words[0] == exception_reply::RESUME => {
                        if let Some(e) = self.ecs.get_mut(c) {
                            e.state = EcState::Running;
                        }
                    }
                    CallKind::Fault | CallKind::Exit => {
                        if let Some(e) = self.ecs.get_mut(c) {
                            e.state = EcState::Running;
                        }
                        self.kill_ec(c, "ended by its exception handler");
                    }
                }
                if was_current && self.ecs.get(c).is_some_and(|e| e.state == EcState::Running) {
                    self.set_current(Some(c));
                } else {
                    if was_current {
                        self.set_current(None);
                    }
                    self.make_ready(c);
                }
            }
        }
        self.end_activation(handler);
        None
    }

    /// The handler is free again: the next queued caller's activation
    /// starts right away (on that caller's SC), else it idles.
    fn end_activation(&mut self, handler: EcId) {
        if self.current() == Some(handler) {
            self.set_current(None);
        }
        let Some(h) = self.ecs.get_mut(handler) else {
            return;
        };
        h.active = false;
        h.caller = None;
        h.state = EcState::Idle;
        loop {
            let Some(h) = self.ecs.get_mut(handler) else {
                return;
            };
            let Some((caller, pt)) = h.queue.pop_front() else {
                return;
            };
            if self
                .ecs
                .get(caller)
                .is_some_and(|c| c.state == EcState::CallQueued(handler))
            {
                self.start_activation(handler, caller, pt);
                self.pass_sc(caller, handler);
                self.make_ready(handler);
                return;
            }
        }
    }

    /// An activation whose caller died ran on the caller's SC: the SC goes
    /// back along its chain of calls (`return_sc`), or is left idle if no
    /// one there can run on it (its owner may bind it again or revoke it).
    fn release_orphan_sc(&mut self, handler: EcId) {
        let sc = self.ecs.get_mut(handler).and_then(|h| h.sc.take());
        if let Some(sc) = sc {
            let cpu = self.scs.get(sc).map_or(0, |s| s.cpu);
            self.cpus[cpu].run.remove(sc);
            if let Some(s) = self.scs.get_mut(sc) {
                s.holder = None;
                if s.zombie {
                    if let Some(gone) = self.scs.remove(sc) {
                        self.cpus[gone.cpu].run.release(gone.priority);
                    }
                    return;
                }
            }
            self.return_sc(sc);
        }
    }

    /// Gives an SC that nobody holds to the EC at the end of its chain of
    /// calls — from its bound EC along the handlers each waits for a reply
    /// from — if that EC runs without an SC: a caller whose handler died
    /// while the SC was lent on further (the handler itself waiting in a
    /// call, e.g. on its exception portal) was answered `Dead` at once but
    /// had nothing to run on; the SC reaches it when the last activation
    /// on it ends. (Without this, a VMM whose call to the modem was cut by
    /// the modem's crash never ran again.)
    fn return_sc(&mut self, sc: crate::kernel::ScId) {
        let Some(mut ec) = self.scs.get(sc).map(|s| s.bound) else {
            return;
        };
        // A chain is at most as long as there are ECs; bounded anyway.
        for _ in 0..64 {
            match self.ecs.get(ec).map(|e| e.state) {
                Some(EcState::WaitReply(next)) => ec = next,
                _ => break,
            }
        }
        let Some(e) = self.ecs.get_mut(ec) else {
            return;
        };
        if e.state != EcState::Running || e.sc.is_some() {
            return;
        }
        e.sc = Some(sc);
        if let Some(s) = self.scs.get_mut(sc) {
            s.holder = Some(ec);
        }
        self.make_ready(ec);
    }

    // ---- exceptions ----

    /// An exception in user mode, or `exit`: call the EC's exception
    /// portal, or end the EC if it has none.
    pub fn raise(&mut self, ec: EcId, message: ExceptionMessage) {
        let kind = if message.vector == EXIT_VECTOR {
            CallKind::Exit
        } else {
            CallKind::Fault
        };
        let Some(e) = self.ecs.get_mut(ec) else {
            return;
        };
        let mut message = message;
        message.ec_id = e.ec_id;
        e.message = message.to_words();
        e.calling = kind;
        let (pd, portal) = (e.pd, e.exception_portal);
        if kind == CallKind::Exit && Some(ec) == self.root_ec {
            if let Some(value) = moat_abi::exit_value(message.error_code) {
                crate::set_exit_value(value);
            }
        }
        let delivered = self
            .lookup_pt(pd, portal, rights::PT_CALL)
            .and_then(|pt| self.call_portal(ec, pt, false));
        if delivered.is_err() {
            let name = self.pd_name(pd);
            match kind {
                CallKind::Exit => log::info!(
                    "task '{name}' (ec {}) exited with code {}",
                    message.ec_id,
                    message.error_code as i64
                ),
                _ => log::error!(
                    "user fault in '{name}': {} at rip {:#x}, rsp {:#x}, error code {:#x}, cr2 {:#x}",
                    crate::arch::x86_64::trap::exception_name(message.vector),
                    message.rip,
                    message.rsp,
                    message.error_code,
                    message.fault_address
                ),
            }
            self.kill_ec(
                ec,
                if kind == CallKind::Exit {
                    ""
                } else {
                    "killed after the fault"
                },
            );
        }
    }

    pub fn pd_name(&self, pd: PdId) -> &'static str {
        if Some(pd) == self.root_pd {
            "roottask"
        } else {
            "a component"
        }
    }

    /// Ends an EC; everyone waiting on it is released with `Dead`.
    pub fn kill_ec(&mut self, ec: EcId, how: &str) {
        let Some(e) = self.ecs.get_mut(ec) else {
            return;
        };
        if e.state == EcState::Dead {
            return;
        }
        let previous = e.state;
        e.state = EcState::Dead;
        let (kind, active, caller) = (e.kind, e.active, e.caller.take());
        let queue = core::mem::take(&mut e.queue);
        self.take_off_cpu(ec);
        // The SC it holds goes back to whoever it was donated by.
        let serving = caller.filter(|&c| {
            kind == EcKind::Handler
                && active
                && self
                    .ecs
                    .get(c)
                    .is_some_and(|x| x.state == EcState::WaitReply(ec))
        });
        match serving {
            Some(c) => {
                self.pass_sc(ec, c);
                self.fail_caller(c);
            }
            None => self.release_orphan_sc(ec),
        }
        for (waiter, _) in queue {
            if self
                .ecs
                .get(waiter)
                .is_some_and(|x| x.state == EcState::CallQueued(ec))
            {
                self.fail_caller(waiter);
            }
        }
        match previous {
            EcState::CallQueued(handler) => {
                if let Some(h) = self.ecs.get_mut(handler) {
                    h.queue.retain(|&(c, _)| c != ec);
                }
            }
            EcState::SmWait(sm) => {
                if let Some(s) = self.sms.get_mut(sm) {
                    s.waiters.retain(|&w| w != ec);
                }
                self.timeouts.retain(|&(_, w)| w != ec);
            }
            _ => {}
        }
        if Some(ec) == self.root_ec {
            self.root_dead = true;
            if !how.is_empty() {
                log::info!("task 'roottask' {how}");
            }
        }
    }

    /// A caller whose handler died: `Dead` for a message, death for an
    /// exception that nobody can handle now.
    fn fail_caller(&mut self, caller: EcId) {
        let Some(c) = self.ecs.get_mut(caller) else {
            return;
        };
        c.state = EcState::Running;
        if c.calling == CallKind::Hypercall {
            c.hypercall_reply = Some((Status::Dead.code(), c.message));
            self.make_ready(caller);
        } else if c.calling == CallKind::Message {
            c.regs.rax = Status::Dead.code();
            self.make_ready(caller);
        } else {
            self.kill_ec(caller, "killed: its exception handler died");
        }
    }

    /// `sm_down` with a deadline ran out.
    pub fn timeout(&mut self, ec: EcId) {
        let Some(e) = self.ecs.get_mut(ec) else {
            return;
        };
        let EcState::SmWait(sm) = e.state else { return };
        e.state = EcState::Running;
        e.regs.rax = Status::Timeout.code();
        if let Some(s) = self.sms.get_mut(sm) {
            s.waiters.retain(|&w| w != ec);
        }
        self.make_ready(ec);
    }

    /// Removes an EC object (its PD is going, or its last capability went).
    pub fn destroy_ec(&mut self, id: EcId) {
        // Another CPU that entered this EC last may still be in it: its
        // next entry saves registers into the EC, so the EC is freed only
        // after that CPU has passed through its scheduler.
        let me = self.me;
        let busy = self
            .cpus
            .iter()
            .enumerate()
            .find(|&(index, cpu)| index != me && cpu.entered == Some(id))
            .map(|(index, _)| index);
        self.kill_ec(id, "destroyed");
        let Some(ec) = self.ecs.remove(id) else {
            return;
        };
        self.unmap_page(ec.pd, ec.utcb_virt / PAGE_SIZE);
        self.free_after_shootdown(ec.utcb_phys);
        self.refund(ec.pd, EC_COST);
        if let Some(p) = self.pds.get_mut(ec.pd) {
            p.owned.retain(|&o| o != Object::Ec(id));
        }
        // An SC bound to it that it held was released by `kill_ec`; one it
        // donated comes back to nobody when the activation ends.
        match busy {
            Some(cpu) if self.cpus[cpu].zombies.try_reserve(1).is_ok() => {
                self.cpus[cpu].entered = None;
                self.cpus[cpu].zombies.push(ec);
                self.cpus[cpu].left_work = true;
                crate::arch::x86_64::ipi::kick(cpu);
            }
            // Without room to defer it, it is leaked rather than freed
            // under a running CPU.
            Some(_) => core::mem::forget(ec),
            None => {}
        }
    }
}

//! System calls: decode the call word and the call's view of its
//! registers (`moat_abi::syscall`), look up and check capabilities, act.

use crate::arch::x86_64::entry::TrapFrame;
use crate::arch::x86_64::layout::{phys_to_virt, USER_END};
use crate::console;
use crate::ec::Resume;
use crate::kernel::{EcId, Kernel, Range, Stopped, PREEMPT_EVERY};
use moat_abi::syscall::{
    ConsoleWrite, Delegate, Exit, IpcCall, IrqAssign, IrqUnmask, MemPhys, Revoke, SmDown, SmUp,
    Syscall, VcpuPoke, VcpuRun,
};
use moat_abi::{
    rights, Call, CallWord, ExceptionMessage, Space, Status, CONSOLE_PORT, CONSOLE_WRITE_MAX,
    EXIT_VECTOR, PAGE_SIZE,
};
use moat_kernel::cap::{Rights, SlotRef};
use moat_kernel::paging::MapFlags;

/// `syscall` (0f 05): a preempted long call executes it again.
const SYSCALL_LENGTH: u64 = 2;

/// The SYSCALL entry's Rust half: acts for the current EC, then leaves the
/// kernel for whichever EC runs next.
pub extern "C" fn syscall_entry(_frame: *mut TrapFrame) -> *const TrapFrame {
    let mut guard = crate::kernel::lock();
    if let Some(kernel) = guard.as_mut() {
        if let Some(ec) = kernel.current() {
            kernel.syscall(ec);
        }
    }
    crate::scheduler::leave_with(guard)
}

impl Kernel {
    fn syscall(&mut self, ec: EcId) {
        let Some(e) = self.ecs.get(ec) else { return };
        let word = CallWord::decode(e.regs.rax);
        let sel = word.selector;
        // The IPC fast path: plain messages between the current EC and an
        // idle handler (and back); before the arguments are read out.
        if word.flags == 0 {
            if word.number == Call::Call.number() && self.fast_call(ec, sel) {
                return;
            }
            if word.number == Call::Reply.number() && self.fast_reply(ec) {
                return;
            }
        }
        // The other IPC paths stay inline too; every other call goes
        // through `dispatch`, which is never inlined, so that how those are
        // decoded does not shape the IPC paths' code (with all of it
        // inline, the null round trip took 32 more instructions).
        let status = if is_ipc(word) {
            self.ipc(ec, word)
        } else if word.number == Call::VcpuRun.number() {
            // A VMM's loop makes this call once per VM exit: inline beside
            // the IPC paths, since each exit pays for its decoding.
            self.run_vcpu(ec, word)
        } else {
            self.dispatch(ec, word)
        };
        if let Some(status) = status {
            if let Some(e) = self.ecs.get_mut(ec) {
                e.regs.rax = status.code();
            }
        }
    }

    /// `call` and `reply`: the status, if the EC gets one now.
    fn ipc(&mut self, ec: EcId, word: CallWord) -> Option<Status> {
        if word.number == Call::Reply.number() {
            return self.sys_reply(ec);
        }
        let e = self.ecs.get(ec)?;
        match view::<IpcCall>(word, crate::ec::words_of(&e.regs)) {
            Ok(call) => self.sys_call(ec, call.portal, call.nonblock).err(),
            Err(status) => Some(status),
        }
    }

    /// `vcpu_run`: the status, if the EC gets one now (else it runs the
    /// vCPU and gets the exit as its answer).
    fn run_vcpu(&mut self, ec: EcId, word: CallWord) -> Option<Status> {
        let e = self.ecs.get(ec)?;
        view::<VcpuRun>(word, crate::ec::words_of(&e.regs))
            .and_then(|call| self.sys_vcpu_run(ec, call.vcpu))
            .err()
    }

    /// Every call but `call` and `reply`: decodes its view and acts; the
    /// status, if the EC gets one now.
    #[inline(never)]
    fn dispatch(&mut self, ec: EcId, word: CallWord) -> Option<Status> {
        let e = self.ecs.get(ec)?;
        let regs = &e.regs;
        let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9];
        let (pd, rip, rsp) = (e.pd, regs.rip, regs.rsp);
        match Call::try_from(word.number) {
            Err(status) => Some(status),
            Ok(Call::ConsoleWrite) => Some(done(
                view(word, args).and_then(|call| self.console_write(pd, &call)),
            )),
            Ok(Call::Exit) => {
                let code = view::<Exit>(word, args).map_or(0, |call| call.code);
                let message = ExceptionMessage {
                    vector: EXIT_VECTOR,
                    error_code: code,
                    rip,
                    rsp,
                    fault_address: 0,
                    ec_id: 0,
                };
                self.raise(ec, message);
                None
            }
            Ok(Call::Call | Call::Reply) => self.ipc(ec, word),
            Ok(Call::CreatePd) => Some(done(
                view(word, args).and_then(|call| self.sys_create_pd(pd, &call)),
            )),
            Ok(Call::CreateEc) => Some(done(
                view(word, args).and_then(|call| self.sys_create_ec(pd, &call)),
            )),
            Ok(Call::CreateSc) => Some(done(
                view(word, args).and_then(|call| self.sys_create_sc(pd, &call)),
            )),
            Ok(Call::CreatePt) => Some(done(
                view(word, args).and_then(|call| self.sys_create_pt(pd, &call)),
            )),
            Ok(Call::CreateSm) => Some(done(
                view(word, args).and_then(|call| self.sys_create_sm(pd, &call)),
            )),
            Ok(Call::SmUp) => Some(done(view(word, args).and_then(|call: SmUp| {
                self.lookup_sm(pd, call.sm, rights::SM_UP)
                    .map(|sm| self.sm_up(sm))
            }))),
            Ok(Call::SmDown) => match view(word, args).and_then(|call: SmDown| {
                self.lookup_sm(pd, call.sm, rights::SM_DOWN)
                    .and_then(|sm| self.sm_down(ec, sm, call.nonblock, call.deadline_tsc))
            }) {
                Ok(true) => Some(Status::Success),
                Ok(false) => None,
                Err(status) => Some(status),
            },
            Ok(Call::Delegate) => self.long_call(ec, args, |k, start| {
                k.sys_delegate(pd, &view(word, args)?, start)
            }),
            Ok(Call::Revoke) => self.long_call(ec, args, |k, start| {
                k.sys_revoke(pd, &view(word, args)?, start)
            }),
            Ok(Call::IrqAssign) => {
                let assigned = view(word, args).and_then(|call| self.sys_irq_assign(pd, &call));
                self.answer::<IrqAssign>(ec, assigned)
            }
            Ok(Call::MapDevice) => Some(done(
                view(word, args).and_then(|call| self.sys_map_device(pd, &call)),
            )),
            Ok(Call::MemPhys) => {
                let phys =
                    view(word, args).and_then(|call: MemPhys| self.sys_mem_phys(pd, call.vpn));
                self.answer::<MemPhys>(ec, phys.map(Some))
            }
            Ok(Call::IrqUnmask) => {
                Some(done(view(word, args).and_then(|call: IrqUnmask| {
                    self.sys_irq_unmask(pd, call.key)
                })))
            }
            Ok(Call::CreateVcpu) => Some(done(
                view(word, args).and_then(|call| self.sys_create_vcpu(pd, &call)),
            )),
            Ok(Call::VcpuRun) => self.run_vcpu(ec, word),
            Ok(Call::VcpuPoke) => {
                Some(done(view(word, args).and_then(|call: VcpuPoke| {
                    self.sys_vcpu_poke(pd, call.vcpu)
                })))
            }
        }
    }

    /// The status of a call with an output: on success the registers the
    /// output names (if there is one) take it.
    fn answer<V: Syscall>(
        &mut self,
        ec: EcId,
        result: Result<Option<V::Output>, Status>,
    ) -> Option<Status> {
        match result {
            Ok(output) => {
                if let (Some(output), Some(e)) = (output, self.ecs.get_mut(ec)) {
                    let mut words = crate::ec::words_of(&e.regs);
                    V::write_output(&output, &mut words);
                    crate::ec::set_words(&mut e.regs, words);
                }
                Some(Status::Success)
            }
            Err(status) => Some(status),
        }
    }

    /// `raw`: as they are, for a PD that holds the console UART's data
    /// port; otherwise control characters become `?`, so no component
    /// garbles the kernel's log with terminal control sequences.
    fn console_write(&self, pd: crate::kernel::PdId, call: &ConsoleWrite) -> Result<(), Status> {
        if call.raw && !self.holds_console_port(pd) {
            return Err(Status::InsufficientRights);
        }
        let len = usize::from(call.len.check()?.get());
        let mut buffer = [0u8; CONSOLE_WRITE_MAX];
        let buffer = &mut buffer[..len];
        if !self.copy_from_user(pd, call.address, buffer) {
            return Err(Status::BadAddress);
        }
        if call.raw {
            console::write_raw(buffer);
            return Ok(());
        }
        for byte in buffer.iter_mut() {
            if (*byte < 0x20 && !matches!(*byte, b'\n' | b'\t')) || *byte == 0x7f {
                *byte = b'?';
            }
        }
        console::write_text(buffer);
        Ok(())
    }

    /// Whether `pd` may drive the console UART itself: it holds its data
    /// port (or, as the root task, every port).
    fn holds_console_port(&self, pd: crate::kernel::PdId) -> bool {
        if self.pds.get(pd).is_some_and(|p| p.all_io) {
            return true;
        }
        let Ok(space) = self.space_of(pd, Space::Io) else {
            return false;
        };
        self.caps
            .lookup_with(
                SlotRef::new(space, CONSOLE_PORT),
                Rights::from_bits_retain(rights::IO_ACCESS),
            )
            .is_ok()
    }

    /// Copies from `pd`'s memory; false if a byte is not user-readable.
    pub fn copy_from_user(&self, pd: crate::kernel::PdId, address: u64, buffer: &mut [u8]) -> bool {
        let Some(p) = self.pds.get(pd) else {
            return false;
        };
        let mem = &crate::memory::KernelTables;
        let mut done = 0;
        while done < buffer.len() {
            let Some(virt) = address.checked_add(done as u64) else {
                return false;
            };
            if virt >= USER_END {
                return false;
            }
            let Some(t) = p.space.translate(mem, virt) else {
                return false;
            };
            if !t.flags.contains(MapFlags::USER) {
                return false;
            }
            let take = ((PAGE_SIZE - virt % PAGE_SIZE) as usize).min(buffer.len() - done);
            // SAFETY: the translation names a user page of this PD (RAM the
            // kernel mapped for it), reached through the direct map.
            let source =
                unsafe { core::slice::from_raw_parts(phys_to_virt(t.phys) as *const u8, take) };
            buffer[done..done + take].copy_from_slice(source);
            done += take;
        }
        true
    }

    /// Runs a call that may stop at a preemption point: then the EC is
    /// set to execute the same SYSCALL again (its registers are as they
    /// were, RIP back on the instruction), with `resume` noting how far
    /// the call got, and the scheduler lets the due interrupt in. A call
    /// that comes back with other arguments starts afresh.
    fn long_call(
        &mut self,
        ec: EcId,
        args: [u64; 6],
        call: impl FnOnce(&mut Self, u64) -> Result<(), Stopped>,
    ) -> Option<Status> {
        let e = self.ecs.get_mut(ec)?;
        let key = [
            e.regs.rax, args[0], args[1], args[2], args[3], args[4], args[5],
        ];
        let start = match e.resume.take() {
            Some(resume) if resume.call == key => resume.done,
            _ => 0,
        };
        match call(self, start) {
            Ok(()) => Some(Status::Success),
            Err(Stopped::Failed(status)) => Some(status),
            Err(Stopped::Preempted { done }) => {
                if crate::kernel::lock_wanted() {
                    crate::arch::x86_64::ipi::hand_over();
                }
                let e = self.ecs.get_mut(ec)?;
                e.resume = Some(Resume { call: key, done });
                e.regs.rip = e.regs.rip.wrapping_sub(SYSCALL_LENGTH);
                None
            }
        }
    }

    fn sys_delegate(
        &mut self,
        pd: crate::kernel::PdId,
        call: &Delegate,
        start: u64,
    ) -> Result<(), Stopped> {
        let dst = self.lookup_pd(pd, call.dst_pd, rights::PD_CONTROL)?;
        let kind = call.space.check()?;
        let count = u64::from(call.count.check()?.get());
        let mask = call.rights.check()?;
        let (from, to) = (call.src, call.dst);
        if matches!(kind, Space::Io | Space::Irq) && start == 0 {
            self.materialize_platform_caps(pd, kind, from, count)?;
        }
        let range = Range { from, to, count };
        self.delegate_range(pd, dst, kind, range, mask, start, interrupt_due)
    }

    /// The root task may hand out any port or GSI: its capabilities are made
    /// when first delegated, so they can be revoked like any other.
    fn materialize_platform_caps(
        &mut self,
        pd: crate::kernel::PdId,
        kind: Space,
        from: u64,
        count: u64,
    ) -> Result<(), Status> {
        let all_io = self.pds.get(pd).is_some_and(|p| p.all_io);
        let limit = if kind == Space::Io {
            1 << 16
        } else {
            moat_abi::IRQ_KEYS
        };
        if !all_io {
            return Ok(());
        }
        if from.checked_add(count).is_none_or(|end| end > limit) {
            return Err(Status::BadParameter);
        }
        let space = self.space_of(pd, kind)?;
        for key in from..from + count {
            if self.caps.lookup(SlotRef::new(space, key)).is_err() {
                self.charge(pd, crate::kernel::CAP_SLOT_COST)?;
                let payload = if kind == Space::Io {
                    crate::kernel::Cap::Port
                } else {
                    crate::kernel::Cap::Gsi
                };
                if self
                    .caps
                    .insert_root(SlotRef::new(space, key), payload, Rights::ALL)
                    .is_err()
                {
                    self.refund(pd, crate::kernel::CAP_SLOT_COST);
                    return Err(Status::QuotaExceeded);
                }
            }
        }
        Ok(())
    }

    fn sys_revoke(
        &mut self,
        pd: crate::kernel::PdId,
        call: &Revoke,
        start: u64,
    ) -> Result<(), Stopped> {
        let (kind, base, count) = (call.space, call.base, u64::from(call.count.get()));
        let include_self = call.include_self;
        let space = self.space_of(pd, kind)?;
        for i in start..count {
            // A teardown a revoke began before it was preempted goes on
            // first, in steps too.
            if !self.destroy_doomed_until(&interrupt_due)
                || (i > start && (i - start).is_multiple_of(PREEMPT_EVERY) && interrupt_due())
            {
                return Err(Stopped::Preempted { done: i });
            }
            // Empty slots are fine: there is nothing to revoke.
            let _ = self.revoke_slot_deferred(SlotRef::new(space, base + i), include_self);
        }
        if !self.destroy_doomed_until(&interrupt_due) {
            return Err(Stopped::Preempted { done: count });
        }
        Ok(())
    }
}

/// Whether a long call should stop and let others in: this CPU's timer is
/// due (the interrupt may wake a component of higher priority), or another
/// CPU waits for the kernel lock (its component may be the urgent one).
pub fn interrupt_due() -> bool {
    crate::arch::x86_64::lapic::armed() <= crate::arch::x86_64::cpu::rdtsc()
        || crate::kernel::lock_wanted()
}

fn is_ipc(word: CallWord) -> bool {
    word.number == Call::Call.number() || word.number == Call::Reply.number()
}

/// The typed view of a call's registers.
fn view<V: Syscall>(word: CallWord, args: [u64; 6]) -> Result<V, Status> {
    V::decode(word, args)
}

fn done(result: Result<(), Status>) -> Status {
    result.err().unwrap_or(Status::Success)
}

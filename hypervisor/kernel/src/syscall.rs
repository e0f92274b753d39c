//! System calls: decode the call word, look up and check capabilities, act.

use crate::arch::x86_64::entry::TrapFrame;
use crate::arch::x86_64::layout::{phys_to_virt, USER_END};
use crate::console;
use crate::ec::Resume;
use crate::kernel::{EcId, Kernel, Range, Stopped, PREEMPT_EVERY};
use moat_abi::{
    flags, rights, Call, CallWord, ExceptionMessage, Space, Status, CONSOLE_PORT,
    CONSOLE_WRITE_MAX, EXIT_VECTOR, PAGE_SIZE,
};
use moat_kernel::cap::{Rights, SlotRef};
use moat_kernel::paging::MapFlags;

/// Largest `count` of one `delegate` or `revoke`.
const MAX_COUNT: u64 = 65536;
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
        let Some(e) = self.ecs.get(ec) else { return };
        let regs = &e.regs;
        let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9];
        let (pd, rip, rsp) = (e.pd, regs.rip, regs.rsp);
        let nonblock = word.flags & flags::NONBLOCK != 0;
        let status: Option<Status> = match Call::try_from(word.number) {
            Err(status) => Some(status),
            Ok(Call::ConsoleWrite) => {
                let raw = word.flags & flags::RAW != 0;
                Some(self.console_write(pd, args[0], args[1], raw))
            }
            Ok(Call::Exit) => {
                let message = ExceptionMessage {
                    vector: EXIT_VECTOR,
                    error_code: args[0],
                    rip,
                    rsp,
                    fault_address: 0,
                    ec_id: 0,
                };
                self.raise(ec, message);
                None
            }
            Ok(Call::Call) => self.sys_call(ec, sel, nonblock).err(),
            Ok(Call::Reply) => self.sys_reply(ec),
            Ok(Call::CreatePd) => {
                let status = self.sys_create_pd(
                    pd,
                    sel,
                    word.flags & flags::VM != 0,
                    args[0],
                    args[1],
                    args[2],
                    args[3],
                );
                if status == Status::Success && word.flags & flags::USER_HYPERCALLS != 0 {
                    if let Ok(made) = self.lookup_pd(pd, sel, rights::PD_CONTROL) {
                        if let Some(p) = self.pds.get_mut(made) {
                            p.user_hypercalls = p.guest.is_some();
                        }
                    }
                }
                Some(status)
            }
            Ok(Call::CreateEc) => Some(done(self.sys_create_ec(
                pd,
                sel,
                word.flags & flags::HANDLER != 0,
                args[0],
                args[1],
                args[2],
                args[3],
                args[4],
                args[5],
            ))),
            Ok(Call::CreateSc) => Some(done(
                self.sys_create_sc(pd, sel, args[0], args[1], args[2], args[3]),
            )),
            Ok(Call::CreatePt) => Some(done(
                self.sys_create_pt(pd, sel, args[0], args[1], args[2], args[3]),
            )),
            Ok(Call::CreateSm) => Some(done(self.sys_create_sm(pd, sel, args[0], args[1]))),
            Ok(Call::SmUp) => Some(done(
                self.lookup_sm(pd, sel, rights::SM_UP)
                    .map(|sm| self.sm_up(sm)),
            )),
            Ok(Call::SmDown) => match self
                .lookup_sm(pd, sel, rights::SM_DOWN)
                .and_then(|sm| self.sm_down(ec, sm, nonblock, args[0]))
            {
                Ok(true) => Some(Status::Success),
                Ok(false) => None,
                Err(status) => Some(status),
            },
            Ok(Call::Delegate) => {
                self.long_call(ec, args, |k, start| k.sys_delegate(pd, sel, args, start))
            }
            Ok(Call::Revoke) => self.long_call(ec, args, |k, start| {
                k.sys_revoke(pd, word.flags & flags::SELF != 0, args, start)
            }),
            Ok(Call::IrqAssign) => match self.sys_irq_assign(pd, sel, args[0], args[1]) {
                Ok(message) => {
                    if let (Some((address, data)), Some(e)) = (message, self.ecs.get_mut(ec)) {
                        e.regs.rdi = address;
                        e.regs.rsi = data;
                    }
                    Some(Status::Success)
                }
                Err(status) => Some(status),
            },
            Ok(Call::MapDevice) => Some(done(self.sys_map_device(pd, args[0], args[1], args[2]))),
            Ok(Call::MemPhys) => match self.sys_mem_phys(pd, args[0]) {
                Ok(phys) => {
                    if let Some(e) = self.ecs.get_mut(ec) {
                        e.regs.rdi = phys;
                    }
                    Some(Status::Success)
                }
                Err(status) => Some(status),
            },
            Ok(Call::IrqUnmask) => Some(done(self.sys_irq_unmask(pd, args[0]))),
            Ok(Call::CreateVcpu) => Some(done(self.sys_create_vcpu(pd, sel, args[0], args[1]))),
            Ok(Call::VcpuRun) => self.sys_vcpu_run(ec, sel).err(),
            Ok(Call::VcpuPoke) => Some(done(self.sys_vcpu_poke(pd, sel))),
        };
        if let Some(status) = status {
            if let Some(e) = self.ecs.get_mut(ec) {
                e.regs.rax = status.code();
            }
        }
    }

    /// `raw`: as they are, for a PD that holds the console UART's data
    /// port; otherwise control characters become `?`, so no component
    /// garbles the kernel's log with terminal control sequences.
    fn console_write(&self, pd: crate::kernel::PdId, address: u64, len: u64, raw: bool) -> Status {
        if raw && !self.holds_console_port(pd) {
            return Status::InsufficientRights;
        }
        let Ok(len) = usize::try_from(len) else {
            return Status::BadParameter;
        };
        if len > CONSOLE_WRITE_MAX {
            return Status::BadParameter;
        }
        let mut buffer = [0u8; CONSOLE_WRITE_MAX];
        let buffer = &mut buffer[..len];
        if !self.copy_from_user(pd, address, buffer) {
            return Status::BadAddress;
        }
        if raw {
            console::write_raw(buffer);
            return Status::Success;
        }
        for byte in buffer.iter_mut() {
            if (*byte < 0x20 && !matches!(*byte, b'\n' | b'\t')) || *byte == 0x7f {
                *byte = b'?';
            }
        }
        console::write_text(buffer);
        Status::Success
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
        sel: u64,
        args: [u64; 6],
        start: u64,
    ) -> Result<(), Stopped> {
        let dst = self.lookup_pd(pd, sel, rights::PD_CONTROL)?;
        let kind = Space::try_from(args[0])?;
        let (from, to, count, mask) = (args[1], args[2], args[3], args[4]);
        if count == 0 || count > MAX_COUNT || mask > u64::from(u8::MAX) {
            return Err(Status::BadParameter.into());
        }
        if matches!(kind, Space::Io | Space::Irq) && start == 0 {
            self.materialize_platform_caps(pd, kind, from, count)?;
        }
        let range = Range { from, to, count };
        self.delegate_range(pd, dst, kind, range, mask as u8, start, interrupt_due)
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
        include_self: bool,
        args: [u64; 6],
        start: u64,
    ) -> Result<(), Stopped> {
        let kind = Space::try_from(args[0])?;
        let (base, count) = (args[1], args[2]);
        if count == 0 || count > MAX_COUNT || base.checked_add(count).is_none() {
            return Err(Status::BadParameter.into());
        }
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

fn done(result: Result<(), Status>) -> Status {
    result.err().unwrap_or(Status::Success)
}

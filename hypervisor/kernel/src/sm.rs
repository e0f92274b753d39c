//! Semaphores: counting notifications between ECs and from interrupts.

use crate::arch::x86_64::{ioapic, lapic, msi};
use crate::ec::EcState;
use crate::kernel::{EcId, Kernel, Object, PdId, SmId};
use alloc::collections::VecDeque;
use moat_abi::syscall::{CreateSm, IrqAssign, IrqMode, MsiMessage};
use moat_abi::{rights, Space, Status, DEBUG_GSI, DEBUG_SMS_MAX};
use moat_kernel::cap::{Rights, SlotRef};

pub struct Sm {
    pub count: u64,
    pub waiters: VecDeque<EcId>,
    pub owner: PdId,
    pub caps: u32,
}

pub const SM_COST: u64 = core::mem::size_of::<Sm>() as u64 + 64;

impl Kernel {
    /// `create_sm`.
    pub fn sys_create_sm(&mut self, caller: PdId, call: &CreateSm) -> Result<(), Status> {
        let owner = self.lookup_pd(caller, call.owner, rights::PD_CONTROL)?;
        self.object_slot_free(caller, call.dst)?;
        self.charge(owner, SM_COST)?;
        let sm = Sm {
            count: call.count,
            waiters: VecDeque::new(),
            owner,
            caps: 0,
        };
        let Some(id) = self.sms.insert(sm) else {
            self.refund(owner, SM_COST);
            return Err(Status::QuotaExceeded);
        };
        if let Some(p) = self.pds.get_mut(owner) {
            if p.owned.try_reserve(1).is_ok() {
                p.owned.push(Object::Sm(id));
            }
        }
        if let Err(status) = self.install_object(caller, call.dst, Object::Sm(id)) {
            self.destroy_sm(id);
            return Err(status);
        }
        Ok(())
    }

    /// `sm_up`, also used for interrupts.
    pub fn sm_up(&mut self, id: SmId) {
        loop {
            let Some(sm) = self.sms.get_mut(id) else {
                return;
            };
            let Some(waiter) = sm.waiters.pop_front() else {
                sm.count = sm.count.saturating_add(1);
                return;
            };
            if let Some(e) = self.ecs.get_mut(waiter) {
                if e.state == EcState::SmWait(id) {
                    e.state = EcState::Running;
                    e.regs.rax = Status::Success.code();
                    self.timeouts.retain(|&(_, w)| w != waiter);
                    self.make_ready(waiter);
                    return;
                }
            }
        }
    }

    /// `sm_down`: Ok(true) counted down, Ok(false) the EC now waits.
    pub fn sm_down(
        &mut self,
        ec: EcId,
        id: SmId,
        nonblock: bool,
        deadline: u64,
    ) -> Result<bool, Status> {
        let sm = self.sms.get_mut(id).ok_or(Status::BadCapability)?;
        if sm.count > 0 {
            sm.count -= 1;
            return Ok(true);
        }
        if nonblock {
            return Err(Status::WouldBlock);
        }
        if deadline != 0 && deadline <= crate::arch::x86_64::cpu::rdtsc() {
            return Err(Status::Timeout);
        }
        sm.waiters
            .try_reserve(1)
            .map_err(|_| Status::QuotaExceeded)?;
        if deadline != 0 {
            self.timeouts
                .try_reserve(1)
                .map_err(|_| Status::QuotaExceeded)?;
            self.timeouts.push((deadline, ec));
            lapic::arm_if_earlier(deadline);
        }
        if let Some(sm) = self.sms.get_mut(id) {
            sm.waiters.push_back(ec);
        }
        self.make_unready(ec);
        if let Some(e) = self.ecs.get_mut(ec) {
            e.state = EcState::SmWait(id);
        }
        Ok(false)
    }

    /// A device interrupt on `gsi` (already masked and acknowledged).
    pub fn interrupt(&mut self, gsi: u64) {
        self.interrupt_slot(gsi as usize);
    }

    /// An interrupt of slot `slot` (a GSI, or an MSI after them) ups its
    /// semaphore.
    pub fn interrupt_slot(&mut self, slot: usize) {
        if let Some(sm) = self.irq_sms.get(slot).copied().flatten() {
            self.sm_up(sm);
            self.preempt_if_needed();
        }
    }

    /// Whether `pd` may control `gsi`.
    fn holds_gsi(&self, pd: PdId, gsi: u64) -> Result<(), Status> {
        if !ioapic::present(gsi) && gsi != DEBUG_GSI && msi::number(gsi).is_none() {
            return Err(Status::BadParameter);
        }
        if self.pds.get(pd).is_some_and(|p| p.all_io) {
            return Ok(());
        }
        let space = self.space_of(pd, Space::Irq)?;
        self.caps
            .lookup_with(
                SlotRef::new(space, gsi),
                Rights::from_bits_retain(rights::IRQ_CONTROL),
            )
            .map(|_| ())
            .map_err(crate::kernel::status_of)
    }

    /// `irq_assign`: the GSI now ups `sm` and is unmasked; for an MSI,
    /// the address and data that raise it.
    pub fn sys_irq_assign(
        &mut self,
        pd: PdId,
        call: &IrqAssign,
    ) -> Result<Option<MsiMessage>, Status> {
        let gsi = call.key;
        let sm = self.lookup_sm(pd, call.sm, rights::SM_UP)?;
        self.holds_gsi(pd, gsi)?;
        let mode = call.mode.check()?;
        if let Some(n) = msi::number(gsi) {
            if !mode.is_empty() {
                return Err(Status::BadParameter);
            }
            let apic_id = lapic::id();
            if apic_id > 0xff {
                return Err(Status::BadCpu);
            }
            self.irq_sms[msi::slot(n)] = Some(sm);
            let (address, data) = msi::message(n, apic_id);
            return Ok(Some(MsiMessage { address, data }));
        }
        if gsi == DEBUG_GSI {
            if !mode.is_empty() {
                return Err(Status::BadParameter);
            }
            if !self.debug_sms.contains(&sm) {
                if self.debug_sms.len() >= DEBUG_SMS_MAX {
                    return Err(Status::QuotaExceeded);
                }
                self.debug_sms
                    .try_reserve(1)
                    .map_err(|_| Status::QuotaExceeded)?;
                self.debug_sms.push(sm);
            }
            return Ok(None);
        }
        self.irq_sms[gsi as usize] = Some(sm);
        ioapic::route(
            gsi as u32,
            mode.contains(IrqMode::LEVEL),
            mode.contains(IrqMode::ACTIVE_LOW),
            lapic::id(),
        );
        Ok(None)
    }

    /// `irq_unmask`.
    pub fn sys_irq_unmask(&mut self, pd: PdId, gsi: u64) -> Result<(), Status> {
        self.holds_gsi(pd, gsi)?;
        if let Some(n) = msi::number(gsi) {
            // Edge-triggered: never masked.
            return match self.irq_sms[msi::slot(n)] {
                Some(_) => Ok(()),
                None => Err(Status::BadCapability),
            };
        }
        if gsi == DEBUG_GSI {
            return Ok(());
        }
        if self.irq_sms[gsi as usize].is_none() {
            return Err(Status::BadCapability);
        }
        ioapic::set_masked(gsi as u32, false);
        Ok(())
    }

    /// The debug event: ups every semaphore assigned to it.
    pub fn debug_event(&mut self) {
        for i in 0..self.debug_sms.len() {
            if let Some(&sm) = self.debug_sms.get(i) {
                self.sm_up(sm);
            }
        }
    }

    pub fn destroy_sm(&mut self, id: SmId) {
        self.debug_sms.retain(|&sm| sm != id);
        for (gsi, slot) in self.irq_sms.iter_mut().enumerate() {
            if *slot == Some(id) {
                *slot = None;
                if ioapic::present(gsi as u64) {
                    ioapic::set_masked(gsi as u32, true);
                }
            }
        }
        let Some(sm) = self.sms.remove(id) else {
            return;
        };
        for waiter in sm.waiters {
            if let Some(e) = self.ecs.get_mut(waiter) {
                if e.state == EcState::SmWait(id) {
                    e.state = EcState::Running;
                    e.regs.rax = Status::BadCapability.code();
                    self.timeouts.retain(|&(_, w)| w != waiter);
                    self.make_ready(waiter);
                }
            }
        }
        self.refund(sm.owner, SM_COST);
        if let Some(p) = self.pds.get_mut(sm.owner) {
            p.owned.retain(|&o| o != Object::Sm(id));
        }
    }
}

//! Scheduling contexts: a priority and a budget, bound to a global EC, and
//! passed along IPC calls (donation).

use crate::ec::{EcKind, EcState};
use crate::kernel::{EcId, Kernel, Object, PdId};
use moat_abi::syscall::CreateSc;
use moat_abi::{rights, Status};
use moat_kernel::sched::Budget;
use moat_kernel::smp::MAX_CPUS;

pub struct Sc {
    /// The EC running on it now (the bound EC, or a handler it was
    /// donated to), if any.
    pub holder: Option<EcId>,
    /// The global EC it was made for (its calls lend it on from there).
    pub bound: EcId,
    pub priority: u8,
    /// The CPU whose run queue it is on when ready: its EC's.
    pub cpu: usize,
    pub budget: Budget,
    pub owner: PdId,
    pub caps: u32,
    /// Destroyed while lent to a handler in another PD: it lives on until
    /// that activation ends, so the handler can finish (its reply is then
    /// `Aborted`) instead of hanging without an SC.
    pub zombie: bool,
}

pub const SC_COST: u64 = core::mem::size_of::<Sc>() as u64 + 32;

impl Kernel {
    /// `create_sc`: the EC starts running.
    pub fn sys_create_sc(&mut self, caller: PdId, call: &CreateSc) -> Result<(), Status> {
        let owner = self.lookup_pd(caller, call.owner, rights::PD_CONTROL)?;
        let ec = self.lookup_ec(caller, call.ec, rights::EC_BIND)?;
        let priority = call.priority.check()?.get();
        let budget_us = u64::from(call.budget.check()?.get());
        let e = self.ecs.get(ec).ok_or(Status::BadCapability)?;
        if e.kind != EcKind::Global || e.sc.is_some() || e.state != EcState::Running {
            return Err(Status::BadParameter);
        }
        // Neither the caller nor the EC's PD may run above its ceiling: a
        // component cannot make itself more urgent than its creator let it.
        let ceiling = |pd| self.pds.get(pd).map_or(0, |p| p.ceiling);
        if priority > ceiling(caller).min(ceiling(e.pd)) {
            return Err(Status::InsufficientRights);
        }
        self.object_slot_free(caller, call.dst)?;
        let sc = self.new_sc(owner, ec, priority, budget_us)?;
        if let Err(status) = self.install_object(caller, call.dst, Object::Sc(sc)) {
            self.destroy_sc(sc);
            return Err(status);
        }
        Ok(())
    }

    /// An SC for `ec`, charged to `owner`; the EC becomes ready.
    pub fn new_sc(
        &mut self,
        owner: PdId,
        ec: EcId,
        priority: u8,
        budget_us: u64,
    ) -> Result<crate::kernel::ScId, Status> {
        let cpu = self.ecs.get(ec).map_or(0, |e| e.cpu) % MAX_CPUS;
        self.charge(owner, SC_COST)?;
        // Room on its CPU's run queue for as long as it exists: making it
        // ready never needs memory.
        if self.cpus[cpu].run.reserve(priority).is_err() {
            self.refund(owner, SC_COST);
            return Err(Status::QuotaExceeded);
        }
        let sc = Sc {
            holder: Some(ec),
            bound: ec,
            priority,
            cpu,
            budget: Budget::new(budget_us),
            owner,
            caps: 0,
            zombie: false,
        };
        let Some(id) = self.scs.insert(sc) else {
            self.cpus[cpu].run.release(priority);
            self.refund(owner, SC_COST);
            return Err(Status::QuotaExceeded);
        };
        if let Some(p) = self.pds.get_mut(owner) {
            if p.owned.try_reserve(1).is_ok() {
                p.owned.push(Object::Sc(id));
            }
        }
        if let Some(e) = self.ecs.get_mut(ec) {
            e.sc = Some(id);
        }
        self.make_ready(ec);
        Ok(id)
    }

    pub fn destroy_sc(&mut self, id: crate::kernel::ScId) {
        let lent = self.scs.get(id).and_then(|sc| {
            let holder = sc.holder?;
            let e = self.ecs.get(holder)?;
            (e.state != EcState::Dead && e.pd != sc.owner && e.sc == Some(id)).then_some(sc.owner)
        });
        if let Some(owner) = lent {
            if let Some(sc) = self.scs.get_mut(id) {
                if !sc.zombie {
                    sc.zombie = true;
                    self.refund(owner, SC_COST);
                    if let Some(p) = self.pds.get_mut(owner) {
                        p.owned.retain(|&o| o != Object::Sc(id));
                    }
                }
            }
            return;
        }
        let Some(sc) = self.scs.remove(id) else {
            return;
        };
        self.cpus[sc.cpu].run.release(sc.priority);
        if sc.zombie {
            return;
        }
        self.cpus[sc.cpu].run.remove(id);
        if let Some(holder) = sc.holder {
            if let Some(e) = self.ecs.get_mut(holder) {
                if e.sc == Some(id) {
                    e.sc = None;
                }
            }
            self.take_off_cpu(holder);
        }
        self.refund(sc.owner, SC_COST);
        if let Some(p) = self.pds.get_mut(sc.owner) {
            p.owned.retain(|&o| o != Object::Sc(id));
        }
    }
}

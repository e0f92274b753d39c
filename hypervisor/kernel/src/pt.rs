//! Portals: IPC entry points bound to a handler EC. The id is set by the
//! portal's creator and delivered to the handler; callers cannot forge it.

use crate::ec::EcKind;
use crate::kernel::{EcId, Kernel, Object, PdId, PtId};
use moat_abi::syscall::CreatePt;
use moat_abi::{rights, Status};

pub struct Pt {
    pub ec: EcId,
    pub entry: u64,
    pub id: u64,
    pub owner: PdId,
    pub caps: u32,
}

pub const PT_COST: u64 = core::mem::size_of::<Pt>() as u64 + 32;

impl Kernel {
    /// `create_pt`.
    pub fn sys_create_pt(&mut self, caller: PdId, call: &CreatePt) -> Result<(), Status> {
        let owner = self.lookup_pd(caller, call.owner, rights::PD_CONTROL)?;
        let ec = self.lookup_ec(caller, call.ec, rights::EC_BIND)?;
        if self.ecs.get(ec).map(|e| e.kind) != Some(EcKind::Handler) {
            return Err(Status::BadParameter);
        }
        self.object_slot_free(caller, call.dst)?;
        let pt = self.new_pt(owner, ec, call.entry, call.id)?;
        if let Err(status) = self.install_object(caller, call.dst, Object::Pt(pt)) {
            self.destroy_pt(pt);
            return Err(status);
        }
        Ok(())
    }

    pub fn new_pt(&mut self, owner: PdId, ec: EcId, entry: u64, id: u64) -> Result<PtId, Status> {
        self.charge(owner, PT_COST)?;
        let Some(pt) = self.pts.insert(Pt {
            ec,
            entry,
            id,
            owner,
            caps: 0,
        }) else {
            self.refund(owner, PT_COST);
            return Err(Status::QuotaExceeded);
        };
        if let Some(p) = self.pds.get_mut(owner) {
            if p.owned.try_reserve(1).is_ok() {
                p.owned.push(Object::Pt(pt));
            }
        }
        Ok(pt)
    }

    pub fn destroy_pt(&mut self, id: PtId) {
        let Some(pt) = self.pts.remove(id) else {
            return;
        };
        self.refund(pt.owner, PT_COST);
        if let Some(p) = self.pds.get_mut(pt.owner) {
            p.owned.retain(|&o| o != Object::Pt(id));
        }
    }
}

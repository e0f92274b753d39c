//! Protection domains: an address space, four capability spaces and a
//! kernel-memory quota.

use crate::arch::x86_64::cpu;
use crate::arch::x86_64::gdt::IO_BITMAP_BYTES;
use crate::arch::x86_64::virt::{self, Vendor};
use crate::kernel::{Cap, Kernel, Object, PdId};
use crate::memory::{self, KernelTables};
use alloc::vec::Vec;
use moat_abi::syscall::{CreatePd, MapDevice};
use moat_abi::{rights, Space, Status, PAGE_SIZE};
use moat_kernel::cap::{Rights, SlotRef, SpaceId};
use moat_kernel::paging::{AddressSpace, MapFlags, PageSize, TableMemory, LOWER_HALF, UPPER_HALF};
use moat_kernel::quota::Quota;
use moat_kernel::virt::ept::Ept;
use moat_kernel::virt::npt::Npt;
use moat_kernel::virt::GuestSpace;
use moat_kernel::virt::{GuestMapError, GuestRights, GUEST_PHYS_LIMIT};

/// Kernel memory a PD object costs its owner (the object and its root table).
pub const PD_COST: u64 = 4096 + 512;
/// Memory-space and I/O-space slots are limited by the quota only.
const UNLIMITED: usize = usize::MAX;

pub struct Pd {
    pub space: AddressSpace,
    /// Capability spaces, indexed by `moat_abi::Space`.
    pub spaces: [SpaceId; 4],
    pub quota: Quota,
    /// The PD that paid for this one and gave its quota.
    pub owner: Option<PdId>,
    /// Quota taken from the owner when this PD was made (returned when it
    /// goes).
    pub granted: u64,
    /// Objects charged to this PD: they go when it goes.
    pub owned: Vec<Object>,
    pub caps: u32,
    /// The root task may delegate any I/O port and GSI.
    pub all_io: bool,
    pub dying: bool,
    /// The highest priority an SC may have that this PD makes or that
    /// runs one of its ECs (seL4's maximum controlled priority).
    pub ceiling: u8,
    /// How many of `spaces` a dying PD has destroyed.
    pub spaces_gone: usize,
    /// A dying PD with no capability left: every CPU is off its tables,
    /// which now go in steps.
    pub retired: bool,
    /// A VM's guest-physical space (EPT or NPT); its memory space maps
    /// there instead of `space`.
    pub guest: Option<Guest>,
    /// The guest IPC hypercall is allowed from guest CPL 3.
    pub user_hypercalls: bool,
    /// Ports this PD may use (bit set = denied), once it holds any.
    pub io_bitmap: Option<alloc::boxed::Box<[u8; IO_BITMAP_BYTES]>>,
}

/// Page tables of a PD, charged to its quota.
struct ChargedTables<'a> {
    quota: &'a mut Quota,
}

impl TableMemory for ChargedTables<'_> {
    fn read_entry(&self, table: u64, index: usize) -> u64 {
        KernelTables.read_entry(table, index)
    }

    fn write_entry(&mut self, table: u64, index: usize, value: u64) {
        KernelTables.write_entry(table, index, value)
    }

    fn alloc_table(&mut self) -> Option<u64> {
        self.quota.charge(PAGE_SIZE).ok()?;
        let table = KernelTables.alloc_table();
        if table.is_none() {
            self.quota.refund(PAGE_SIZE);
        }
        table
    }

    fn free_table(&mut self, table: u64) {
        self.quota.refund(PAGE_SIZE);
        KernelTables.free_table(table);
    }
}

/// A VM's guest-physical address space, by vendor.
pub enum Guest {
    Ept(GuestSpace<Ept>),
    Npt(GuestSpace<Npt>),
}

impl Guest {
    fn new(mem: &mut impl TableMemory) -> Option<Self> {
        match virt::vendor() {
            Vendor::Vmx => GuestSpace::new(mem).ok().map(Guest::Ept),
            Vendor::Svm => GuestSpace::new(mem).ok().map(Guest::Npt),
            Vendor::None => None,
        }
    }

    /// The EPTP or nCR3 value of this space.
    pub fn root_value(&self) -> u64 {
        match self {
            Guest::Ept(space) => space.eptp(),
            Guest::Npt(space) => space.ncr3(),
        }
    }

    fn map(
        &mut self,
        mem: &mut impl TableMemory,
        gpa: u64,
        hpa: u64,
        rights: GuestRights,
    ) -> Result<(), GuestMapError> {
        match self {
            Guest::Ept(space) => space.map(mem, gpa, hpa, PageSize::Size4K, rights),
            Guest::Npt(space) => space.map(mem, gpa, hpa, PageSize::Size4K, rights),
        }
    }

    /// Unmaps `gpa`; true if something was mapped (the guest TLB then
    /// needs a flush).
    fn unmap(&mut self, mem: &mut impl TableMemory, gpa: u64) -> bool {
        // The flush itself happens at the next entry of each vCPU
        // (`vcpu::guest_tlbs_stale`), so the tokens are consumed here.
        match self {
            Guest::Ept(space) => space.unmap(mem, gpa).map(|(_, _, _flush)| ()).is_ok(),
            Guest::Npt(space) => space.unmap(mem, gpa).map(|(_, _, _flush)| ()).is_ok(),
        }
    }

    /// See [`GuestSpace::free_tables_some`].
    fn free_tables_some(&mut self, mem: &mut impl TableMemory, budget: &mut usize) -> bool {
        match self {
            Guest::Ept(space) => space.free_tables_some(mem, budget),
            Guest::Npt(space) => space.free_tables_some(mem, budget),
        }
    }

    fn destroy(self, mem: &mut impl TableMemory) {
        let folds = match &self {
            Guest::Ept(space) => space.folds(),
            Guest::Npt(space) => space.folds(),
        };
        if folds > 0 {
            log::info!("vm: {folds} guest region(s) were mapped as 2 MiB pages");
        }
        match self {
            Guest::Ept(space) => {
                let _no_vcpu_left = space.destroy(mem);
            }
            Guest::Npt(space) => {
                let _no_vcpu_left = space.destroy(mem);
            }
        }
    }
}

fn guest_rights(rights_bits: u8) -> GuestRights {
    let mut guest = GuestRights::READ;
    if rights_bits & rights::MEM_WRITE != 0 {
        guest |= GuestRights::WRITE;
    }
    if rights_bits & rights::MEM_EXECUTE != 0 {
        guest |= GuestRights::EXECUTE;
    }
    guest
}

fn flags_for(rights_bits: u8) -> MapFlags {
    let mut flags = MapFlags::USER;
    if rights_bits & rights::MEM_WRITE != 0 {
        flags |= MapFlags::WRITABLE;
    }
    if rights_bits & rights::MEM_EXECUTE == 0 {
        flags |= memory::no_execute();
    }
    flags
}

fn flush_page(virt: u64) {
    // SAFETY: INVLPG only drops a TLB entry.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) virt, options(nostack, preserves_flags)) };
}

/// Capabilities a dying PD's spaces lose per teardown step (each with
/// what was derived from it: a VMM's guest RAM page and the VM's).
pub const TEARDOWN_STEP: usize = 16;

impl Kernel {
    /// A new PD with `quota` bytes, paid by `owner` (None: the root task,
    /// paid by nobody) and an object space of `capacity` capabilities.
    pub fn new_pd(
        &mut self,
        owner: Option<PdId>,
        quota: u64,
        capacity: usize,
        vm: bool,
    ) -> Result<PdId, Status> {
        if let Some(owner) = owner {
            self.charge(
                owner,
                quota.checked_add(PD_COST).ok_or(Status::QuotaExceeded)?,
            )?;
        }
        let undo = |k: &mut Kernel| {
            if let Some(owner) = owner {
                k.refund(owner, quota + PD_COST);
            }
        };
        let Ok(space) = AddressSpace::new(&mut KernelTables) else {
            undo(self);
            return Err(Status::QuotaExceeded);
        };
        let mut space = space;
        space.share_top_entries(&mut KernelTables, memory::kernel_root(), UPPER_HALF);
        let mut spaces = [0; 4];
        for (kind, slot) in spaces.iter_mut().enumerate() {
            let limit = if kind == Space::Object as usize {
                capacity
            } else {
                UNLIMITED
            };
            match self.caps.create_space(limit) {
                Ok(id) => *slot = id,
                Err(_) => {
                    for made in &spaces[..kind] {
                        let _ = self.caps.destroy_space(*made, |_, _| {});
                    }
                    space.free_tables(&mut KernelTables, LOWER_HALF);
                    undo(self);
                    return Err(Status::QuotaExceeded);
                }
            }
        }
        let pd = Pd {
            space,
            spaces,
            quota: Quota {
                limit: quota,
                used: 0,
            },
            owner,
            granted: quota,
            owned: Vec::new(),
            caps: 0,
            all_io: owner.is_none(),
            dying: false,
            ceiling: moat_abi::PRIORITIES - 1,
            spaces_gone: 0,
            retired: false,
            io_bitmap: None,
            guest: None,
            user_hypercalls: false,
        };
        let Some(id) = self.pds.insert(pd) else {
            undo(self);
            return Err(Status::QuotaExceeded);
        };
        let kinds = [Space::Object, Space::Memory, Space::Io, Space::Irq];
        for (space, kind) in spaces.into_iter().zip(kinds) {
            self.register_space(space, id, kind)?;
        }
        if vm {
            let Some(p) = self.pds.get_mut(id) else {
                return Err(Status::BadCapability);
            };
            match Guest::new(&mut ChargedTables {
                quota: &mut p.quota,
            }) {
                Some(guest) => p.guest = Some(guest),
                None => {
                    self.destroy_pd(id);
                    return Err(if virt::vendor() == Vendor::None {
                        Status::BadParameter
                    } else {
                        Status::QuotaExceeded
                    });
                }
            }
        }
        // The PD's capability to itself.
        if let Err(status) = self.install_object(id, moat_abi::selectors::SELF_PD, Object::Pd(id)) {
            self.destroy_pd(id);
            return Err(status);
        }
        Ok(id)
    }

    /// `create_pd`. `ceiling` 0 gives the new PD the caller's ceiling;
    /// else it may not be above it.
    pub fn sys_create_pd(&mut self, caller: PdId, call: &CreatePd) -> Result<(), Status> {
        let owner = self.lookup_pd(caller, call.owner, rights::PD_CONTROL)?;
        let capacity = call.capacity.check()?.get();
        let limit = self.pds.get(caller).ok_or(Status::BadCapability)?.ceiling;
        let ceiling = match call.ceiling.check()?.get() {
            0 => limit,
            c if c <= limit => c,
            _ => return Err(Status::InsufficientRights),
        };
        self.object_slot_free(caller, call.dst)?;
        let pd = self.new_pd(Some(owner), call.quota_bytes, capacity as usize, call.vm)?;
        if let Some(p) = self.pds.get_mut(pd) {
            p.ceiling = ceiling;
            p.user_hypercalls = call.user_hypercalls && p.guest.is_some();
        }
        if let Some(o) = self.pds.get_mut(owner) {
            let _ = o.owned.try_reserve(1);
            if o.owned.capacity() > o.owned.len() {
                o.owned.push(Object::Pd(pd));
            }
        }
        if let Err(status) = self.install_object(caller, call.dst, Object::Pd(pd)) {
            self.doom(Object::Pd(pd));
            self.destroy_doomed();
            return Err(status);
        }
        Ok(())
    }

    /// Maps a delegated page into `pd` at page number `vpn`.
    pub fn map_page(
        &mut self,
        pd: PdId,
        vpn: u64,
        phys: u64,
        rights_bits: u8,
    ) -> Result<(), Status> {
        let virt = vpn.checked_mul(PAGE_SIZE).ok_or(Status::BadParameter)?;
        let pd = self.pds.get_mut(pd).ok_or(Status::BadCapability)?;
        if let Some(guest) = pd.guest.as_mut() {
            let gpa = vpn
                .checked_mul(PAGE_SIZE)
                .filter(|&gpa| gpa < GUEST_PHYS_LIMIT)
                .ok_or(Status::BadParameter)?;
            let mut tables = ChargedTables {
                quota: &mut pd.quota,
            };
            return guest
                .map(&mut tables, gpa, phys, guest_rights(rights_bits))
                .map_err(|error| match error {
                    GuestMapError::OutOfMemory => Status::QuotaExceeded,
                    GuestMapError::AlreadyMapped(_) => Status::Occupied,
                    _ => Status::BadParameter,
                });
        }
        if !(PAGE_SIZE..crate::arch::x86_64::layout::USER_END).contains(&virt) {
            return Err(Status::BadParameter);
        }
        let mut tables = ChargedTables {
            quota: &mut pd.quota,
        };
        // A device's registers are mapped uncached (PCD and PWT: PAT entry
        // 3, UC), whatever the MTRRs say.
        let mut flags = flags_for(rights_bits);
        if !memory::is_ram(phys) {
            flags |= MapFlags::CACHE_DISABLE | MapFlags::WRITE_THROUGH;
        }
        pd.space
            .map(&mut tables, virt, phys, PageSize::Size4K, flags)
            .map_err(|error| match error {
                moat_kernel::paging::MapError::OutOfMemory => Status::QuotaExceeded,
                moat_kernel::paging::MapError::AlreadyMapped(_) => Status::Occupied,
                _ => Status::BadParameter,
            })
    }

    /// `map_device`: the root task makes capabilities for `count` device
    /// pages from physical page `first_frame` on and maps them, uncached,
    /// at page `vpn` of its own space, to delegate them to a driver.
    pub fn sys_map_device(&mut self, pd: PdId, call: &MapDevice) -> Result<(), Status> {
        if !self.pds.get(pd).is_some_and(|p| p.all_io) {
            return Err(Status::InsufficientRights);
        }
        let count = u64::from(call.checked_count()?.get());
        let (first_frame, vpn) = (call.first_frame, call.vpn);
        if !(0..count).all(|i| memory::is_device_page((first_frame + i) * PAGE_SIZE)) {
            return Err(Status::BadParameter);
        }
        let space = self.space_of(pd, Space::Memory)?;
        for i in 0..count {
            if self.caps.lookup(SlotRef::new(space, vpn + i)).is_ok() {
                self.undo_map_device(pd, vpn, i);
                return Err(Status::Occupied);
            }
            let given = crate::root::give_frame(
                self,
                pd,
                vpn + i,
                (first_frame + i) * PAGE_SIZE,
                false,
                rights::MEM_READ | rights::MEM_WRITE,
                rights::MEM_READ | rights::MEM_WRITE,
            );
            if let Err(status) = given {
                self.undo_map_device(pd, vpn, i);
                return Err(status);
            }
        }
        Ok(())
    }

    fn undo_map_device(&mut self, pd: PdId, vpn: u64, done: u64) {
        if let Ok(space) = self.space_of(pd, Space::Memory) {
            for i in 0..done {
                let _ = self.revoke_slot(SlotRef::new(space, vpn + i), true);
            }
        }
    }

    /// `mem_phys`: the physical address of the caller's page `vpn`, if its
    /// capability carries `MEM_DMA`.
    pub fn sys_mem_phys(&self, pd: PdId, vpn: u64) -> Result<u64, Status> {
        let space = self.space_of(pd, Space::Memory)?;
        let cap = self
            .caps
            .lookup(SlotRef::new(space, vpn))
            .map_err(|_| Status::BadCapability)?;
        if !Rights::from_bits_retain(rights::MEM_DMA).is_subset_of(cap.rights) {
            return Err(Status::InsufficientRights);
        }
        match cap.object {
            Cap::Frame { phys, .. } => Ok(phys),
            _ => Err(Status::BadCapability),
        }
    }

    pub fn unmap_page(&mut self, pd: PdId, vpn: u64) {
        let Some(p) = self.pds.get_mut(pd) else {
            return;
        };
        let virt = vpn.wrapping_mul(PAGE_SIZE);
        if let Some(guest) = p.guest.as_mut() {
            if guest.unmap(&mut KernelTables, virt) {
                crate::vcpu::guest_tlbs_stale();
                self.tlb_changed();
            }
            return;
        }
        if p.space.unmap(&mut KernelTables, virt).is_ok() {
            if cpu::read_cr3() == p.space.root() {
                flush_page(virt);
            }
            self.tlb_changed();
        }
    }

    /// Allows or denies `port` in `pd`'s I/O bitmap.
    pub fn set_port(&mut self, pd: PdId, port: u64, allowed: bool) -> Result<(), Status> {
        let Ok(port) = usize::try_from(port) else {
            return Err(Status::BadParameter);
        };
        if port >= IO_BITMAP_BYTES * 8 {
            return Err(Status::BadParameter);
        }
        let needs_bitmap = self.pds.get(pd).is_some_and(|p| p.io_bitmap.is_none());
        if needs_bitmap {
            if !allowed {
                return Ok(());
            }
            self.charge(pd, IO_BITMAP_BYTES as u64)?;
            let Some(p) = self.pds.get_mut(pd) else {
                return Err(Status::BadCapability);
            };
            p.io_bitmap = Some(alloc::boxed::Box::new([0xff; IO_BITMAP_BYTES]));
        }
        let Some(bitmap) = self.pds.get_mut(pd).and_then(|p| p.io_bitmap.as_mut()) else {
            return Err(Status::BadCapability);
        };
        if allowed {
            bitmap[port / 8] &= !(1 << (port % 8));
        } else {
            bitmap[port / 8] |= 1 << (port % 8);
        }
        // Every CPU reloads it at its next switch; one that runs the PD now
        // must not keep a revoked port.
        for cpu in self.cpus.iter_mut() {
            cpu.io_loaded = None;
        }
        if !allowed {
            self.tlb_changed();
        }
        Ok(())
    }

    /// Tears a PD down: its ECs die, its capabilities go (and with them
    /// what it delegated), its objects are destroyed, its memory and quota
    /// return.
    pub fn destroy_pd(&mut self, id: PdId) {
        self.doom(Object::Pd(id));
        self.destroy_doomed();
    }

    /// One step of tearing down a PD that is on top of the doomed list
    /// (`Kernel::destroy_doomed_until` drives it): first its ECs die and
    /// its own objects are doomed (above it, so they go first); then its
    /// spaces go [`TEARDOWN_STEP`] slots at a time — a VM's 65,536 guest
    /// pages are not one step — stopping when `preempt` says so or when
    /// objects whose last capability went are doomed above it; last, the
    /// PD itself. True once it is gone.
    pub fn destroy_pd_step(&mut self, id: PdId, preempt: &dyn Fn() -> bool) -> bool {
        let Some(pd) = self.pds.get_mut(id) else {
            return true;
        };
        if !pd.dying {
            pd.dying = true;
            let owned = core::mem::take(&mut pd.owned);
            // ECs running in this PD die first, so nobody runs in a
            // half-gone PD.
            let ecs: Vec<_> = self
                .ecs
                .ids()
                .filter(|&ec| self.ecs.get(ec).is_some_and(|e| e.pd == id))
                .collect();
            for ec in ecs {
                self.destroy_ec(ec);
            }
            for object in owned {
                self.doom(object);
            }
            return false;
        }
        loop {
            let Some(pd) = self.pds.get(id) else {
                return true;
            };
            let Some(&space) = pd.spaces.get(pd.spaces_gone) else {
                break;
            };
            let mut removed = Vec::new();
            let mut count = 0;
            let emptied = self
                .caps
                .destroy_space_some(space, TEARDOWN_STEP, &mut count, |slot, cap| {
                    removed.push((slot, cap))
                })
                .unwrap_or(true);
            for (slot, cap) in removed {
                self.capability_gone(slot, cap);
            }
            if emptied {
                if let Some(entry) = self.space_owner.get_mut(space as usize) {
                    *entry = None;
                }
                if let Some(pd) = self.pds.get_mut(id) {
                    pd.spaces_gone += 1;
                }
            }
            if self.next_doomed() != Some(Object::Pd(id)) || preempt() {
                return false;
            }
        }
        let root = self
            .pds
            .get(id)
            .filter(|p| !p.retired)
            .map(|p| p.space.root());
        if let Some(root) = root {
            // No CPU may walk the tables freed below: each one that has
            // them loaded moves to the kernel's own.
            self.sync_tlbs();
            crate::arch::x86_64::ipi::shootdown(Some(root));
            if let Some(pd) = self.pds.get_mut(id) {
                pd.retired = true;
            }
        }
        // The tables go TEARDOWN_STEP at a time (a VM's guest memory and
        // its VMM's mapping of it are hundreds of tables: freed at once,
        // they held the lock for milliseconds on Bochs).
        loop {
            let Some(pd) = self.pds.get_mut(id) else {
                return true;
            };
            let Pd {
                space,
                guest,
                quota,
                ..
            } = pd;
            let mut mem = ChargedTables { quota };
            let mut budget = TEARDOWN_STEP;
            let done = guest
                .as_mut()
                .is_none_or(|g| g.free_tables_some(&mut mem, &mut budget))
                && space.free_tables_some(&mut mem, LOWER_HALF, &mut budget);
            if done {
                break;
            }
            if self.next_doomed() != Some(Object::Pd(id)) || preempt() {
                return false;
            }
        }
        if let Some(pd) = self.pds.remove(id) {
            if pd.io_bitmap.is_some() {
                for cpu in self.cpus.iter_mut() {
                    cpu.io_loaded = None;
                }
            }
            let mut quota = pd.quota;
            if let Some(guest) = pd.guest {
                guest.destroy(&mut ChargedTables { quota: &mut quota });
            }
            if pd.io_bitmap.is_some() {
                quota.refund(IO_BITMAP_BYTES as u64);
            }
            // The root table was paid with PD_COST, but `free_tables`
            // refunds every table it frees.
            quota.used += PAGE_SIZE;
            pd.space
                .free_tables(&mut ChargedTables { quota: &mut quota }, LOWER_HALF);
            if quota.used != 0 {
                log::warn!(
                    "pd {id:?}: {} bytes of quota still charged after teardown",
                    quota.used
                );
            }
            if let Some(owner) = pd.owner {
                self.refund(owner, pd.granted + PD_COST);
                if let Some(o) = self.pds.get_mut(owner) {
                    o.owned.retain(|&object| object != Object::Pd(id));
                }
            }
        }
        true
    }
}

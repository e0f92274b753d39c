//! Virtual CPUs: guest CPU state in a VM, run by a VMM thread with
//! `vcpu_run`. The state page (`moat_abi::vcpu::VcpuState`) is shared with
//! the VMM; the control structures (VMCB or VMCS) are the kernel's.
//!
//! An EC in `vcpu_run` stays in the kernel: whenever the scheduler picks
//! it, `scheduler::leave` enters the guest instead of returning to user
//! mode, until an exit needs the VMM.

use crate::arch::x86_64::layout::phys_to_virt;
use crate::arch::x86_64::svm::vcpu::SvmVcpu;
use crate::arch::x86_64::virt::{self, finish_hypercall, RunOutcome, Vendor};
use crate::arch::x86_64::vmx::vcpu::VmxVcpu;
use crate::arch::x86_64::{debug, fpu, ipi, percpu};
use crate::ec::CallKind;
use crate::kernel::{EcId, Kernel, Object, PdId};
use crate::memory;
use core::sync::atomic::{AtomicU64, Ordering};
use moat_abi::syscall::CreateVcpu;
use moat_abi::vcpu::{exit_reason, group, VcpuState};
use moat_abi::{rights, Status, HYPERCALL_SELECTOR_MASK, PAGE_SIZE};
use moat_kernel::arena::Id;
use moat_kernel::smp::MAX_CPUS;

pub type VcpuId = Id<alloc::boxed::Box<Vcpu>>;

pub enum Backend {
    Svm(alloc::boxed::Box<SvmVcpu>),
    Vmx(alloc::boxed::Box<VmxVcpu>),
}

pub struct Vcpu {
    pub vm: PdId,
    /// Where the state page is mapped for the VMM.
    pub state_phys: u64,
    pub vmm: PdId,
    pub state_vpn: u64,
    pub backend: Option<Backend>,
    /// The guest's FPU/SSE registers between runs (an FXSAVE image).
    pub fpu_phys: u64,
    /// The guest's DR0-DR3 and DR6 between runs (neither VMCS nor VMCB
    /// holds DR0-DR3; DR6 only the VMCB).
    pub debug: [u64; 5],
    /// The guest's XCR0 (validated).
    pub xcr0: u64,
    pub poked: bool,
    pub caps: u32,
    /// The CPU it runs on: the one it was created for.
    pub cpu: usize,
    /// Its TLB tag (VPID / ASID) in that CPU's space.
    pub tag: u16,
    /// The [`GUEST_TLB_GENERATION`] its last entry flushed for.
    pub flushed: u64,
}

/// Counts the changes to guest-physical spaces that took mappings or
/// rights away: a vCPU whose last flush is older flushes its guest TLB at
/// its next entry. A vCPU inside its guest while the count moves is made
/// to exit by the TLB shootdown that follows every such change (the
/// revoking call returns only after each CPU has acknowledged, which a CPU
/// in guest mode does only after its exit), and enters again only after
/// reading the new count under the kernel lock.
static GUEST_TLB_GENERATION: AtomicU64 = AtomicU64::new(0);

/// A guest-physical space lost a mapping or rights.
pub fn guest_tlbs_stale() {
    GUEST_TLB_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Kernel memory a vCPU costs: the object, its state and FPU pages, and the
/// larger backend's frames (SVM: VMCB, host save area, 3 IOPM and 2 MSRPM
/// pages; VMX needs 4: VMCS, MSR bitmap, 2 I/O bitmaps).
pub const VCPU_COST: u64 = core::mem::size_of::<Vcpu>() as u64 + 9 * PAGE_SIZE;

fn page(phys: u64) -> &'static mut [u8; 4096] {
    // SAFETY: `phys` is a frame the vCPU owns (its FPU area), used by the
    // vCPU's CPU only: under the kernel lock while the vCPU exists, and by
    // a guest run, during which a destroyed vCPU's frames are left to that
    // CPU to free after the run (`leave_frames_to`).
    unsafe { &mut *(phys_to_virt(phys) as *mut [u8; 4096]) }
}

fn state(phys: u64) -> &'static mut VcpuState {
    // SAFETY: `phys` is the vCPU's state page (allocated in
    // `sys_create_vcpu`, freed only when the vCPU is destroyed); the VMM
    // writes it only while the vCPU is not running (its EC is in the kernel
    // during `vcpu_run`; a VMM that writes it from another thread meanwhile
    // only confuses its own guest), and the kernel uses it on the vCPU's
    // CPU, freeing it after a run in progress (`leave_frames_to`).
    unsafe { &mut *(phys_to_virt(phys) as *mut VcpuState) }
}

impl Kernel {
    /// `create_vcpu`.
    pub fn sys_create_vcpu(&mut self, caller: PdId, call: &CreateVcpu) -> Result<(), Status> {
        let vm = self.lookup_pd(caller, call.vm, rights::PD_CONTROL)?;
        let root = self
            .pds
            .get(vm)
            .and_then(|p| p.guest.as_ref())
            .map(|guest| guest.root_value())
            .ok_or(Status::BadParameter)?;
        let state_virt = call.state.check()?.address();
        self.object_slot_free(caller, call.dst)?;
        // A vCPU runs on the CPU that creates it: its VMCS takes this
        // CPU's host state, and its TLB tag (ASID / VPID) comes from this
        // CPU's space — all in use is `QuotaExceeded`.
        let cpu = self.me;
        let tag = self.cpus[cpu % MAX_CPUS]
            .tags
            .alloc()
            .ok_or(Status::QuotaExceeded)?;
        if let Err(status) = self.charge(vm, VCPU_COST) {
            self.cpus[cpu % MAX_CPUS].tags.release(tag);
            return Err(status);
        }
        let backend = match virt::vendor() {
            Vendor::Svm => SvmVcpu::new(root, tag).map(|b| Backend::Svm(alloc::boxed::Box::new(b))),
            Vendor::Vmx => VmxVcpu::new(root, tag).map(|b| Backend::Vmx(alloc::boxed::Box::new(b))),
            Vendor::None => Err(Status::BadParameter),
        };
        let backend = match backend {
            Ok(backend) => backend,
            Err(status) => {
                self.cpus[cpu % MAX_CPUS].tags.release(tag);
                self.refund(vm, VCPU_COST);
                return Err(status);
            }
        };
        let Some((state_phys, _)) = memory::alloc_zeroed_page() else {
            free_backend(backend);
            self.cpus[cpu % MAX_CPUS].tags.release(tag);
            self.refund(vm, VCPU_COST);
            return Err(Status::QuotaExceeded);
        };
        let Some((fpu_phys, fpu_area)) = memory::alloc_zeroed_page() else {
            memory::free_frame(state_phys);
            free_backend(backend);
            self.cpus[cpu % MAX_CPUS].tags.release(tag);
            self.refund(vm, VCPU_COST);
            return Err(Status::QuotaExceeded);
        };
        fpu::reset_area(fpu_area);
        let vpn = state_virt / PAGE_SIZE;
        if let Err(status) = self.map_page(
            caller,
            vpn,
            state_phys,
            rights::MEM_READ | rights::MEM_WRITE,
        ) {
            memory::free_frame(fpu_phys);
            memory::free_frame(state_phys);
            free_backend(backend);
            self.cpus[cpu % MAX_CPUS].tags.release(tag);
            self.refund(vm, VCPU_COST);
            return Err(status);
        }
        let vcpu = alloc::boxed::Box::new(Vcpu {
            vm,
            state_phys,
            vmm: caller,
            state_vpn: vpn,
            backend: Some(backend),
            fpu_phys,
            debug: [0, 0, 0, 0, 0xffff_0ff0],
            xcr0: 1,
            poked: false,
            caps: 0,
            cpu,
            tag,
            flushed: u64::MAX,
        });
        let Some(id) = self.vcpus.insert(vcpu) else {
            memory::free_frame(fpu_phys);
            self.destroy_vcpu_parts(vm, caller, vpn, state_phys, None);
            self.cpus[cpu % MAX_CPUS].tags.release(tag);
            return Err(Status::QuotaExceeded);
        };
        if let Some(p) = self.pds.get_mut(vm) {
            if p.owned.try_reserve(1).is_ok() {
                p.owned.push(Object::Vcpu(id));
            }
        }
        if let Err(status) = self.install_object(caller, call.dst, Object::Vcpu(id)) {
            self.destroy_vcpu(id);
            return Err(status);
        }
        Ok(())
    }

    fn lookup_vcpu(&self, pd: PdId, selector: u64) -> Result<VcpuId, Status> {
        match self.lookup_object(pd, selector, rights::VCPU_RUN)? {
            Object::Vcpu(id) if self.vcpus.contains(id) => Ok(id),
            _ => Err(Status::BadCapability),
        }
    }

    /// `vcpu_run`: the EC now runs the guest (see `scheduler::leave`).
    pub fn sys_vcpu_run(&mut self, ec: EcId, selector: u64) -> Result<(), Status> {
        let pd = self
            .ecs
            .get(ec)
            .map(|e| e.pd)
            .ok_or(Status::BadCapability)?;
        let vcpu = self.lookup_vcpu(pd, selector)?;
        let cpu = self.vcpus.get(vcpu).map(|v| v.cpu);
        let e = self.ecs.get_mut(ec).ok_or(Status::BadCapability)?;
        if cpu != Some(e.cpu) {
            return Err(Status::BadCpu);
        }
        e.vcpu = Some(vcpu);
        Ok(())
    }

    /// `vcpu_poke`: the vCPU returns to its VMM before it runs guest code
    /// again — at once if it is in guest mode on its CPU now, which a
    /// wake-up IPI makes exit.
    pub fn sys_vcpu_poke(&mut self, pd: PdId, selector: u64) -> Result<(), Status> {
        let vcpu = self.lookup_vcpu(pd, selector)?;
        if let Some(v) = self.vcpus.get_mut(vcpu) {
            v.poked = true;
            let cpu = v.cpu % MAX_CPUS;
            if self.cpus[cpu].guest == Some(vcpu) {
                ipi::kick(cpu);
            }
        }
        Ok(())
    }

    pub fn destroy_vcpu(&mut self, id: VcpuId) {
        // An EC running it returns to its VMM with the vCPU gone.
        let runners: alloc::vec::Vec<EcId> = self
            .ecs
            .ids()
            .filter(|&ec| self.ecs.get(ec).is_some_and(|e| e.vcpu == Some(id)))
            .collect();
        for ec in runners {
            if let Some(e) = self.ecs.get_mut(ec) {
                e.vcpu = None;
                e.regs.rax = Status::BadCapability.code();
            }
        }
        let Some(mut vcpu) = self.vcpus.remove(id) else {
            return;
        };
        let cpu = vcpu.cpu % MAX_CPUS;
        let mut backend = vcpu.backend.take();
        if self.cpus[cpu].guest == Some(id) {
            // In guest mode on its CPU right now: that CPU frees the
            // backend when the run ends (`vcpu_finish`) and the state and
            // FPU pages after it (`free_left_here`); the wake-up ends the
            // run soon.
            self.leave_frames_to(cpu, [vcpu.fpu_phys, vcpu.state_phys]);
            crate::arch::x86_64::ipi::kick(cpu);
            self.unmap_page(vcpu.vmm, vcpu.state_vpn);
            self.refund(vcpu.vm, VCPU_COST);
        } else {
            // Its VMCS may be current on its own CPU: that CPU frees it.
            if cpu != self.me {
                if let Some(b) = backend.take() {
                    self.free_backend_on(cpu, b);
                }
            }
            memory::free_frame(vcpu.fpu_phys);
            self.destroy_vcpu_parts(vcpu.vm, vcpu.vmm, vcpu.state_vpn, vcpu.state_phys, backend);
        }
        // The next vCPU given this tag flushes it at its first entry.
        self.cpus[cpu].tags.release(vcpu.tag);
        if let Some(p) = self.pds.get_mut(vcpu.vm) {
            p.owned.retain(|&o| o != Object::Vcpu(id));
        }
    }

    fn destroy_vcpu_parts(
        &mut self,
        vm: PdId,
        vmm: PdId,
        vpn: u64,
        state_phys: u64,
        backend: Option<Backend>,
    ) {
        self.unmap_page(vmm, vpn);
        self.free_after_shootdown(state_phys);
        if let Some(backend) = backend {
            free_backend(backend);
        }
        self.refund(vm, VCPU_COST);
    }

    /// One step of an EC in `vcpu_run`: enters the guest, handles what the
    /// kernel handles, and says what happens next.
    pub fn vcpu_step(&mut self, ec: EcId) -> Step {
        let Some(vcpu_id) = self.ecs.get(ec).and_then(|e| e.vcpu) else {
            return Step::ToUser;
        };
        let Some(v) = self.vcpus.get_mut(vcpu_id) else {
            if let Some(e) = self.ecs.get_mut(ec) {
                e.vcpu = None;
                e.regs.rax = Status::BadCapability.code();
            }
            return Step::ToUser;
        };
        let st = state(v.state_phys);
        // A hypercall this EC made has been answered: finish it in the guest.
        if let Some(e) = self.ecs.get_mut(ec) {
            if let Some((status, words)) = e.hypercall_reply.take() {
                finish_hypercall(st, status, words);
            }
        }
        let Some(v) = self.vcpus.get_mut(vcpu_id) else {
            return Step::ToUser;
        };
        if v.poked {
            v.poked = false;
            // An event the backend still holds for re-injection goes to the
            // VMM, so a new injection cannot overwrite it.
            let pending = match v.backend.as_mut() {
                Some(Backend::Svm(b)) => b.take_pending(),
                Some(Backend::Vmx(b)) => b.take_pending(),
                None => None,
            };
            st.exit = Default::default();
            st.exit.reason = exit_reason::POKED;
            if let Some(event) = pending {
                st.exit.pending = event;
                st.exit.pending_valid = 1;
            }
            return self.back_to_vmm(ec);
        }
        let generation = GUEST_TLB_GENERATION.load(Ordering::Relaxed);
        let flush = core::mem::replace(&mut v.flushed, generation) != generation;
        let Some(backend) = v.backend.take() else {
            return self.back_to_vmm(ec);
        };
        let run = GuestRun {
            vcpu: vcpu_id,
            backend,
            state_phys: v.state_phys,
            fpu_phys: v.fpu_phys,
            debug: v.debug,
            xcr0: v.xcr0,
            flush,
        };
        // Until `vcpu_finish`, the run owns the backend and uses the state
        // and FPU pages without the kernel lock; `destroy_vcpu` leaves them
        // to this CPU meanwhile, and `vcpu_poke` sends it a wake-up.
        self.cpus[self.me % MAX_CPUS].guest = Some(vcpu_id);
        Step::Enter(run)
    }

    /// After a guest run, with the kernel lock again: the vCPU takes its
    /// backend back (or, destroyed meanwhile, this CPU frees it), and what
    /// the exit asks for is done.
    pub fn vcpu_finish(&mut self, ec: EcId, run: GuestRun, outcome: RunOutcome) {
        let me = self.me % MAX_CPUS;
        self.cpus[me].guest = None;
        let GuestRun {
            vcpu: vcpu_id,
            backend,
            debug,
            xcr0,
            ..
        } = run;
        let Some(v) = self.vcpus.get_mut(vcpu_id) else {
            // Destroyed during the run: its VMCS may be current here, and
            // this is its CPU. (Its pages wait in `dead_frames`.)
            free_backend(backend);
            return;
        };
        v.backend = Some(backend);
        v.debug = debug;
        v.xcr0 = xcr0;
        let (vm, state_phys) = (v.vm, v.state_phys);
        // The EC may have been destroyed, or told to stop running it.
        if self.ecs.get(ec).and_then(|e| e.vcpu) != Some(vcpu_id) {
            return;
        }
        match outcome {
            RunOutcome::Vmm => {
                self.back_to_vmm(ec);
            }
            RunOutcome::Host => {}
            RunOutcome::Hypercall { cpl } => self.hypercall(ec, vm, state(state_phys), cpl),
        }
    }

    fn back_to_vmm(&mut self, ec: EcId) -> Step {
        if let Some(e) = self.ecs.get_mut(ec) {
            e.vcpu = None;
            e.regs.rax = Status::Success.code();
        }
        Step::ToUser
    }

    /// The guest IPC hypercall: a call from the vCPU's EC to a portal the
    /// VM holds, with the guest's registers as the message.
    fn hypercall(&mut self, ec: EcId, vm: PdId, st: &mut VcpuState, cpl: u8) {
        let allowed = cpl < 3 || self.pds.get(vm).is_some_and(|p| p.user_hypercalls);
        if !allowed {
            finish_hypercall(
                st,
                Status::InsufficientRights.code(),
                [st.rdi, st.rsi, st.rdx, st.r10, st.r8, st.r9],
            );
            return;
        }
        let selector = st.rax & HYPERCALL_SELECTOR_MASK;
        let words = [st.rdi, st.rsi, st.rdx, st.r10, st.r8, st.r9];
        let result = self
            .lookup_pt(vm, selector, rights::PT_CALL)
            .and_then(|pt| {
                let e = self.ecs.get_mut(ec).ok_or(Status::BadCapability)?;
                e.message = words;
                e.calling = CallKind::Hypercall;
                self.call_portal_for(ec, pt)
            });
        if let Err(status) = result {
            finish_hypercall(st, status.code(), words);
        }
    }
}

/// What `scheduler::leave` does after a `vcpu_step`.
pub enum Step {
    /// Return to the EC's user mode (the VMM).
    ToUser,
    /// Drop the kernel lock, run the guest, take the lock again and
    /// `vcpu_finish`.
    Enter(GuestRun),
}

/// A guest run, prepared under the kernel lock and carried out without it
/// (`go`): what it needs of the vCPU is here, owned or by frame address,
/// so no other CPU's kernel work can reach into it meanwhile.
pub struct GuestRun {
    vcpu: VcpuId,
    backend: Backend,
    state_phys: u64,
    fpu_phys: u64,
    debug: [u64; 5],
    xcr0: u64,
    flush: bool,
}

impl GuestRun {
    /// Enters the guest and returns at its next exit. Runs on the vCPU's
    /// CPU with interrupts off and without the kernel lock.
    pub fn go(&mut self) -> RunOutcome {
        let st = state(self.state_phys);
        if st.dirty & group::DEBUG != 0 {
            self.debug = debug::sanitize([st.dr0, st.dr1, st.dr2, st.dr3, st.dr6]);
        }
        if st.dirty & group::CONTROL_REGISTERS != 0 && fpu::valid_xcr0(st.xcr0) {
            self.xcr0 = st.xcr0;
        }
        debug::load(&self.debug);
        let fpu_area = page(self.fpu_phys);
        fpu::load_guest(fpu_area, self.xcr0);
        percpu::current().in_guest.store(true, Ordering::Relaxed);
        let outcome = match &mut self.backend {
            Backend::Svm(b) => b.run(st, self.flush),
            Backend::Vmx(b) => b.run(st, self.flush),
        };
        percpu::current().in_guest.store(false, Ordering::Relaxed);
        self.xcr0 = fpu::save_guest(fpu_area, self.xcr0);
        debug::save(&mut self.debug);
        // Also when the backend marked the control registers dirty for the
        // next entry (a CR write it emulated): they must all be current.
        if (st.want | st.dirty) & group::CONTROL_REGISTERS != 0 {
            st.xcr0 = self.xcr0;
        }
        if st.want & group::DEBUG != 0 {
            [st.dr0, st.dr1, st.dr2, st.dr3] =
                [self.debug[0], self.debug[1], self.debug[2], self.debug[3]];
            // On SVM the guest's DR6 lives in the VMCB (the backend stored
            // it); the register holds the host's again.
            if !matches!(self.backend, Backend::Svm(_)) {
                st.dr6 = self.debug[4];
            }
        }
        outcome
    }
}

impl Kernel {
    /// Hands a vCPU's control structures to `cpu` to free at its next pass
    /// through the scheduler.
    fn free_backend_on(&mut self, cpu: usize, backend: Backend) {
        if self.cpus[cpu].dead_vcpus.try_reserve(1).is_ok() {
            self.cpus[cpu].dead_vcpus.push(backend);
            self.cpus[cpu].left_work = true;
            crate::arch::x86_64::ipi::kick(cpu);
        } else {
            // Leaked rather than freed while another CPU may use it.
            core::mem::forget(backend);
        }
    }

    /// Hands the pages of a vCPU that `cpu` is running to that CPU, to free
    /// once its run has ended.
    fn leave_frames_to(&mut self, cpu: usize, frames: [u64; 2]) {
        let dead = &mut self.cpus[cpu].dead_frames;
        if dead.try_reserve(frames.len()).is_ok() {
            dead.extend_from_slice(&frames);
            self.cpus[cpu].left_work = true;
        }
        // Otherwise leaked rather than freed while the guest runs on them.
    }
}

/// Frees a vCPU's control structures; on the CPU it ran on.
pub fn free_backend(backend: Backend) {
    match backend {
        Backend::Svm(b) => (*b).free(),
        Backend::Vmx(b) => (*b).free(),
    }
}

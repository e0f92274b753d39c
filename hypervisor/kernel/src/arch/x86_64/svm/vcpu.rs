//! AMD SVM vCPUs: one VMCB per vCPU, entered with VMRUN. The host's
//! FS/GS/TR/LDTR and syscall MSRs are saved with VMSAVE into a host area
//! around the run and restored with VMLOAD; the guest's with VMLOAD/VMSAVE
//! on its VMCB.

use crate::arch::x86_64::layout::phys_to_virt;
use crate::arch::x86_64::virt::{fill_exit, RunOutcome};
use crate::memory;
use moat_abi::vcpu::{exit_on, group, Inject, Segment, VcpuState};
use moat_abi::{Status, HYPERCALL_IPC, HYPERCALL_SELECTOR_MASK};
use moat_kernel::virt::event::{Event, EventKind};
use moat_kernel::virt::exit::{decode_svm, Exit, SvmExitInfo};
use moat_kernel::virt::vmcb::{
    control, save, svm_attrib, vmx_access_rights, InterceptMisc1, InterceptMisc2, SaveSegment,
    Segment as VmcbSegment, TlbControl, VIntr, Vmcb,
};

const EFER_SVME: u64 = 1 << 12;
const IOPM_PAGES: usize = 3;
const MSRPM_PAGES: usize = 2;
const NP_ENABLE: u64 = 1;
/// The power-on PAT.
const DEFAULT_PAT: u64 = 0x0007_0406_0007_0406;

/// Guest registers the VMCB does not hold, in the order the entry code
/// loads and stores them.
#[repr(C)]
#[derive(Default)]
struct Gprs {
    rbx: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    rbp: u64,
    r8: u64,
    r9: u64,
    r10: u64,
    r11: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
}

pub struct SvmVcpu {
    vmcb: u64,
    host_save: u64,
    iopm: u64,
    msrpm: u64,
    gprs: Gprs,
    flush_next: bool,
    /// An external interrupt the VMM injected, offered to the guest as
    /// the virtual interrupt (V_IRQ) until the guest takes it.
    virq: Option<u8>,
    /// The VMM asked for an interrupt-window exit.
    window: bool,
    /// `(virq, window)` as the VMCB's V_INTR and VINTR intercept have
    /// them, so an entry rewrites those only when they change.
    offered: (Option<u8>, bool),
}

/// External interrupts go to the guest as the virtual interrupt (V_IRQ,
/// APM Vol. 2, 15.21.4), not through EVENTINJ: QEMU's TCG (7.2 and later)
/// delivers an EVENTINJ interrupt inside VMRUN but leaves it as the CPU's
/// pending exception, so the next exit request of its main loop before
/// the guest's next exit delivers it a second time, with the guest's
/// interrupts disabled — Linux then deadlocks on the interrupt's own
/// descriptor lock. The virtual interrupt is taken like a physical one,
/// when the guest can take it, on hardware and in QEMU alike; it is
/// highest priority and ignores V_TPR (the VMM's LAPIC model decided).
const VIRQ_PRIORITY: u8 = 0xf;

fn page(phys: u64) -> &'static mut [u8; 4096] {
    // SAFETY: `phys` is a frame this vCPU allocated and owns until `free`;
    // it is only reached through the vCPU, under the kernel lock.
    unsafe { &mut *(phys_to_virt(phys) as *mut [u8; 4096]) }
}

fn vmcb(phys: u64) -> Vmcb<&'static mut [u8; 4096]> {
    Vmcb::new(page(phys))
}

fn to_vmcb(segment: &Segment) -> VmcbSegment {
    VmcbSegment {
        selector: segment.selector,
        attrib: svm_attrib(segment.access),
        limit: segment.limit,
        base: segment.base,
    }
}

fn from_vmcb(segment: VmcbSegment) -> Segment {
    Segment {
        selector: segment.selector,
        access: vmx_access_rights(segment.attrib),
        limit: segment.limit,
        base: segment.base,
        ..Segment::default()
    }
}

const SEGMENTS: [SaveSegment; 6] = [
    SaveSegment::Es,
    SaveSegment::Cs,
    SaveSegment::Ss,
    SaveSegment::Ds,
    SaveSegment::Fs,
    SaveSegment::Gs,
];

impl SvmVcpu {
    /// A vCPU whose guest-physical tables are at `ncr3`, tagged `asid`.
    pub fn new(ncr3: u64, asid: u16) -> Result<Self, Status> {
        let (vmcb_phys, _) = memory::alloc_zeroed_page().ok_or(Status::QuotaExceeded)?;
        let Some((host_save, _)) = memory::alloc_zeroed_page() else {
            memory::free_frame(vmcb_phys);
            return Err(Status::QuotaExceeded);
        };
        let iopm = memory::alloc_contiguous(IOPM_PAGES);
        let msrpm = memory::alloc_contiguous(MSRPM_PAGES);
        let (Some(iopm), Some(msrpm)) = (iopm, msrpm) else {
            for frame in [Some(vmcb_phys), Some(host_save), iopm, msrpm]
                .into_iter()
                .flatten()
            {
                memory::free_frame(frame);
            }
            return Err(Status::QuotaExceeded);
        };
        // Every port and every MSR exits to the VMM.
        for i in 0..IOPM_PAGES as u64 {
            page(iopm + i * 4096).fill(0xff);
        }
        for i in 0..MSRPM_PAGES as u64 {
            page(msrpm + i * 4096).fill(0xff);
        }
        let mut v = vmcb(vmcb_phys);
        v.set_intercept_misc1(
            InterceptMisc1::INTR
                | InterceptMisc1::NMI
                | InterceptMisc1::SMI
                | InterceptMisc1::INIT
                | InterceptMisc1::CPUID
                | InterceptMisc1::HLT
                | InterceptMisc1::INVD
                | InterceptMisc1::IOIO_PROT
                | InterceptMisc1::MSR_PROT
                | InterceptMisc1::SHUTDOWN,
        );
        v.set_intercept_misc2(
            InterceptMisc2::VMRUN
                | InterceptMisc2::VMMCALL
                | InterceptMisc2::VMLOAD
                | InterceptMisc2::VMSAVE
                | InterceptMisc2::STGI
                | InterceptMisc2::CLGI
                | InterceptMisc2::SKINIT
                | InterceptMisc2::XSETBV
                // Not offered to guests (CPUID): they exit, and the VMM
                // answers #UD — RDTSCP would read the host's TSC_AUX,
                // MWAIT would wait on the host's monitor.
                | InterceptMisc2::RDTSCP
                | InterceptMisc2::MONITOR
                | InterceptMisc2::MWAIT
                | InterceptMisc2::MWAIT_ARMED,
        );
        v.set(control::IOPM_BASE_PA, iopm);
        v.set(control::MSRPM_BASE_PA, msrpm);
        v.set(control::GUEST_ASID, u32::from(asid.max(1)));
        v.set(control::NP_CONTROL, NP_ENABLE);
        v.set(control::N_CR3, ncr3);
        v.set_v_intr(VIntr::V_INTR_MASKING);
        v.set(save::G_PAT, DEFAULT_PAT);
        v.set(save::EFER, EFER_SVME);
        Ok(Self {
            vmcb: vmcb_phys,
            host_save,
            iopm,
            msrpm,
            gprs: Gprs::default(),
            flush_next: true,
            virq: None,
            window: false,
            offered: (None, false),
        })
    }

    fn load(&mut self, state: &mut VcpuState) {
        let dirty = state.dirty;
        let mut v = vmcb(self.vmcb);
        let g = &mut self.gprs;
        g.rbx = state.rbx;
        g.rcx = state.rcx;
        g.rdx = state.rdx;
        g.rsi = state.rsi;
        g.rdi = state.rdi;
        g.rbp = state.rbp;
        g.r8 = state.r8;
        g.r9 = state.r9;
        g.r10 = state.r10;
        g.r11 = state.r11;
        g.r12 = state.r12;
        g.r13 = state.r13;
        g.r14 = state.r14;
        g.r15 = state.r15;
        v.set(save::RAX, state.rax);
        v.set(save::RSP, state.rsp);
        v.set(save::RIP, state.rip);
        v.set(save::RFLAGS, state.rflags | 2);
        if dirty & group::CONTROL_REGISTERS != 0 {
            v.set(save::CR0, state.cr0);
            v.set(save::CR2, state.cr2);
            v.set(save::CR3, state.cr3);
            v.set(save::CR4, state.cr4);
            v.set_v_tpr(state.cr8 as u8);
            v.set(save::EFER, state.efer | EFER_SVME);
        }
        if dirty & group::SEGMENTS != 0 {
            let segments = [
                &state.es, &state.cs, &state.ss, &state.ds, &state.fs, &state.gs,
            ];
            for (which, segment) in SEGMENTS.into_iter().zip(segments) {
                v.set_segment(which, to_vmcb(segment));
            }
            v.set(save::CPL, ((state.ss.access >> 5) & 3) as u8);
        }
        if dirty & group::SYSTEM_SEGMENTS != 0 {
            v.set_segment(SaveSegment::Ldtr, to_vmcb(&state.ldtr));
            v.set_segment(SaveSegment::Tr, to_vmcb(&state.tr));
            for (which, table) in [
                (SaveSegment::Gdtr, &state.gdtr),
                (SaveSegment::Idtr, &state.idtr),
            ] {
                v.set_segment(
                    which,
                    VmcbSegment {
                        selector: 0,
                        attrib: 0,
                        limit: table.limit as u32,
                        base: table.base,
                    },
                );
            }
        }
        if dirty & group::MSRS != 0 {
            v.set(save::STAR, state.star);
            v.set(save::LSTAR, state.lstar);
            v.set(save::CSTAR, state.cstar);
            v.set(save::SFMASK, state.sfmask);
            v.set(save::KERNEL_GS_BASE, state.kernel_gs_base);
            v.set(save::SYSENTER_CS, state.sysenter_cs);
            v.set(save::SYSENTER_ESP, state.sysenter_esp);
            v.set(save::SYSENTER_EIP, state.sysenter_eip);
            v.set(save::G_PAT, state.pat);
        }
        if dirty & group::DEBUG != 0 {
            v.set(save::DR7, state.dr7);
            v.set(save::DR6, state.dr6);
        }
        if dirty & group::TSC_OFFSET != 0 {
            v.set(control::TSC_OFFSET, state.tsc_offset);
        }
        if dirty & group::INTERRUPTIBILITY != 0 {
            // Blocking by STI or MOV SS is SVM's interrupt shadow.
            v.set(
                control::INTERRUPT_SHADOW,
                u64::from(state.interruptibility & 0b11 != 0),
            );
        }
        if dirty & group::INJECT != 0 {
            let event = Event::from_abi(&state.inject);
            match (event.kind, self.virq) {
                (EventKind::ExternalInterrupt, None) => self.virq = Some(event.vector),
                // Only if an earlier one is still untaken (see `run`).
                _ => v.set(control::EVENTINJ, event.to_svm()),
            }
        }
        if dirty & group::EXIT_ON != 0 {
            self.window = state.exit_on & exit_on::INTERRUPT_WINDOW != 0;
            let mut misc1 = v.intercept_misc1();
            misc1.set(
                InterceptMisc1::IRET,
                state.exit_on & exit_on::NMI_WINDOW != 0,
            );
            v.set_intercept_misc1(misc1);
        }
        state.dirty = 0;
    }

    /// The virtual interrupt for the next entry: an injected interrupt
    /// until it is taken, else the interrupt-window request (an exit
    /// instead of the interrupt, VINTR intercepted), else none.
    fn offer_virtual_interrupt(&mut self) {
        if self.offered == (self.virq, self.window) {
            return;
        }
        self.offered = (self.virq, self.window);
        let mut v = vmcb(self.vmcb);
        let mut misc1 = v.intercept_misc1();
        match (self.virq, self.window) {
            (Some(vector), _) => {
                v.set_v_intr_request(vector, VIRQ_PRIORITY);
                misc1.remove(InterceptMisc1::VINTR);
            }
            (None, true) => {
                v.set_v_intr_request(0, VIRQ_PRIORITY);
                misc1.insert(InterceptMisc1::VINTR);
            }
            (None, false) => {
                let mut vintr = v.v_intr();
                vintr.remove(VIntr::V_IRQ | VIntr::V_IGN_TPR);
                v.set_v_intr(vintr);
                misc1.remove(InterceptMisc1::VINTR);
            }
        }
        v.set_intercept_misc1(misc1);
    }

    /// The injected interrupt, if the guest has not taken it yet; the
    /// backend forgets it (the next entry's `offer_virtual_interrupt`
    /// withdraws V_IRQ).
    fn take_untaken_virq(&mut self) -> Option<Event> {
        self.virq.take().map(|vector| Event {
            vector,
            kind: EventKind::ExternalInterrupt,
            error_code: None,
        })
    }

    fn store(&mut self, state: &mut VcpuState) {
        let v = vmcb(self.vmcb);
        let g = &self.gprs;
        state.rax = v.get(save::RAX);
        state.rbx = g.rbx;
        state.rcx = g.rcx;
        state.rdx = g.rdx;
        state.rsi = g.rsi;
        state.rdi = g.rdi;
        state.rbp = g.rbp;
        state.rsp = v.get(save::RSP);
        state.r8 = g.r8;
        state.r9 = g.r9;
        state.r10 = g.r10;
        state.r11 = g.r11;
        state.r12 = g.r12;
        state.r13 = g.r13;
        state.r14 = g.r14;
        state.r15 = g.r15;
        state.rip = v.get(save::RIP);
        state.rflags = v.get(save::RFLAGS);
        let want = state.want;
        if want & group::CONTROL_REGISTERS != 0 {
            state.cr0 = v.get(save::CR0);
            state.cr2 = v.get(save::CR2);
            state.cr3 = v.get(save::CR3);
            state.cr4 = v.get(save::CR4);
            state.cr8 = v.v_tpr().into();
            state.efer = v.get(save::EFER) & !EFER_SVME;
        }
        if want & group::SEGMENTS != 0 {
            let segments = [
                &mut state.es,
                &mut state.cs,
                &mut state.ss,
                &mut state.ds,
                &mut state.fs,
                &mut state.gs,
            ];
            for (which, segment) in SEGMENTS.into_iter().zip(segments) {
                *segment = from_vmcb(v.segment(which));
            }
        }
        if want & group::SYSTEM_SEGMENTS != 0 {
            state.ldtr = from_vmcb(v.segment(SaveSegment::Ldtr));
            state.tr = from_vmcb(v.segment(SaveSegment::Tr));
            let gdtr = v.segment(SaveSegment::Gdtr);
            let idtr = v.segment(SaveSegment::Idtr);
            state.gdtr.limit = gdtr.limit.into();
            state.gdtr.base = gdtr.base;
            state.idtr.limit = idtr.limit.into();
            state.idtr.base = idtr.base;
        }
        if want & group::MSRS != 0 {
            state.star = v.get(save::STAR);
            state.lstar = v.get(save::LSTAR);
            state.cstar = v.get(save::CSTAR);
            state.sfmask = v.get(save::SFMASK);
            state.kernel_gs_base = v.get(save::KERNEL_GS_BASE);
            state.sysenter_cs = v.get(save::SYSENTER_CS);
            state.sysenter_esp = v.get(save::SYSENTER_ESP);
            state.sysenter_eip = v.get(save::SYSENTER_EIP);
            state.pat = v.get(save::G_PAT);
        }
        if want & group::DEBUG != 0 {
            state.dr7 = v.get(save::DR7);
            state.dr6 = v.get(save::DR6);
        }
        if want & group::INTERRUPTIBILITY != 0 {
            state.interruptibility = (v.get(control::INTERRUPT_SHADOW) & 1) as u32;
            state.activity = 0;
        }
    }

    /// Enters the guest; see `arch::x86_64::virt` for the contract.
    pub fn run(&mut self, state: &mut VcpuState, flush: bool) -> RunOutcome {
        self.load(state);
        self.offer_virtual_interrupt();
        {
            let mut v = vmcb(self.vmcb);
            // QEMU has no flush-by-ASID: flush everything when needed.
            let tlb = if flush || self.flush_next {
                TlbControl::FlushAll
            } else {
                TlbControl::DoNothing
            };
            v.set_tlb_control(tlb);
            v.set(control::VMCB_CLEAN, 0);
        }
        self.flush_next = false;
        // SAFETY: the VMCB was set up by `new` (intercepts include VMRUN,
        // NPT on, valid IOPM/MSRPM) and loaded with the guest state; the
        // host save area is a page of ours; EFER.SVME and VM_HSAVE_PA were
        // set at boot. GIF is cleared around the switch, so the STI that
        // lets physical interrupts end the guest's run (V_INTR_MASKING)
        // lets none into the host; IF is clear again before STGI.
        unsafe { svm_run(&mut self.gprs, self.vmcb, self.host_save) };
        let (info, exit_int) = {
            let mut v = vmcb(self.vmcb);
            // The injected event was delivered (or is now in EXITINTINFO).
            v.set(control::EVENTINJ, 0);
            let info = SvmExitInfo {
                exitcode: v.get(control::EXITCODE),
                exitinfo1: v.get(control::EXITINFO1),
                exitinfo2: v.get(control::EXITINFO2),
            };
            // The CPU clears V_IRQ when the guest takes the interrupt
            // (and a CPU may when it exits for the window): the next
            // entry offers afresh.
            if self.offered != (None, false) && !v.v_intr().contains(VIntr::V_IRQ) {
                self.virq = None;
                self.offered = (None, false);
            }
            (info, v.get(control::EXITINTINFO))
        };
        self.store(state);
        let exit = decode_svm(&info);
        match exit {
            Exit::ExternalInterrupt { .. } | Exit::Nmi | Exit::PreemptionTimer => {
                // An event the exit interrupted must be delivered on the
                // next entry, without the VMM.
                if let Some(event) = Event::from_svm(exit_int) {
                    vmcb(self.vmcb).set(control::EVENTINJ, event.to_svm());
                }
                return RunOutcome::Host;
            }
            Exit::Hypercall if state.rax & !HYPERCALL_SELECTOR_MASK == HYPERCALL_IPC => {
                let cpl = vmcb(self.vmcb).get(save::CPL);
                return RunOutcome::Hypercall { cpl };
            }
            _ => {}
        }
        fill_exit(state, &exit);
        let v = vmcb(self.vmcb);
        state.exit.raw = info.exitcode;
        state.exit.qualification = info.exitinfo1;
        // Without NRIP save, an IOIO exit still has the next RIP in
        // EXITINFO2 (APM Vol. 2, 15.10.2).
        let next = match (v.get(control::NRIP), &exit) {
            (0, Exit::Io { .. }) => info.exitinfo2,
            (next, _) => next,
        };
        state.exit.instruction_length = next.saturating_sub(state.rip);
        // An interrupted delivery first; an untaken injected interrupt
        // otherwise (it stays offered if both: the VMM has one slot).
        match Event::from_svm(exit_int).or_else(|| self.take_untaken_virq()) {
            Some(event) => {
                state.exit.pending = event.to_abi();
                state.exit.pending_valid = 1;
            }
            None => state.exit.pending_valid = 0,
        }
        RunOutcome::Vmm
    }

    /// An event kept for re-injection after a host interrupt, or an
    /// injected interrupt the guest has not taken yet, handed to the VMM
    /// instead.
    pub fn take_pending(&mut self) -> Option<Inject> {
        let mut v = vmcb(self.vmcb);
        let stashed = Event::from_svm(v.get(control::EVENTINJ));
        v.set(control::EVENTINJ, 0);
        stashed
            .or_else(|| self.take_untaken_virq())
            .map(Event::to_abi)
    }

    pub fn free(self) {
        memory::free_frame(self.vmcb);
        memory::free_frame(self.host_save);
        for i in 0..IOPM_PAGES as u64 {
            memory::free_frame(self.iopm + i * 4096);
        }
        for i in 0..MSRPM_PAGES as u64 {
            memory::free_frame(self.msrpm + i * 4096);
        }
    }
}

extern "C" {
    fn svm_enter(gprs: *mut Gprs, vmcb: u64, host_save: u64);
}

/// # Safety
/// As for the call in `SvmVcpu::run`.
unsafe fn svm_run(gprs: &mut Gprs, vmcb: u64, host_save: u64) {
    // SAFETY: forwarded from the caller; `gprs` is valid for the call.
    unsafe { svm_enter(gprs, vmcb, host_save) }
}

core::arch::global_asm!(
    ".pushsection .text.svm_enter, \"ax\"",
    ".global svm_enter",
    // rdi = guest GPRs, rsi = guest VMCB (physical), rdx = host save area.
    "svm_enter:",
    "    push rbx",
    "    push rbp",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    push rdx",
    "    push rdi",
    "    clgi",
    "    mov rax, rdx",
    "    vmsave rax",
    "    mov rax, rsi",
    "    push rax",
    "    mov rbx, [rdi + 0]",
    "    mov rcx, [rdi + 8]",
    "    mov rdx, [rdi + 16]",
    "    mov rsi, [rdi + 24]",
    "    mov rbp, [rdi + 40]",
    "    mov r8, [rdi + 48]",
    "    mov r9, [rdi + 56]",
    "    mov r10, [rdi + 64]",
    "    mov r11, [rdi + 72]",
    "    mov r12, [rdi + 80]",
    "    mov r13, [rdi + 88]",
    "    mov r14, [rdi + 96]",
    "    mov r15, [rdi + 104]",
    "    mov rdi, [rdi + 32]",
    "    vmload rax",
    // With V_INTR_MASKING, the host's RFLAGS.IF at VMRUN decides whether
    // a physical interrupt ends the guest's run: it must be set, or a
    // guest that makes no exits would keep the CPU from every other EC.
    // GIF is clear, so the host takes no interrupt here; CLI before STGI
    // leaves a pending one for the exit path to let in.
    "    sti",
    "    vmrun rax",
    "    cli",
    "    vmsave rax",
    // Stack: [guest VMCB][gprs pointer][host save][r15]...
    "    mov rax, [rsp + 8]",
    "    mov [rax + 0], rbx",
    "    mov [rax + 8], rcx",
    "    mov [rax + 16], rdx",
    "    mov [rax + 24], rsi",
    "    mov [rax + 32], rdi",
    "    mov [rax + 40], rbp",
    "    mov [rax + 48], r8",
    "    mov [rax + 56], r9",
    "    mov [rax + 64], r10",
    "    mov [rax + 72], r11",
    "    mov [rax + 80], r12",
    "    mov [rax + 88], r13",
    "    mov [rax + 96], r14",
    "    mov [rax + 104], r15",
    "    add rsp, 16",
    "    pop rax",
    "    vmload rax",
    "    stgi",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    ".popsection",
);

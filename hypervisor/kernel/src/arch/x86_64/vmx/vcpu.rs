//! Intel VMX vCPUs: one VMCS per vCPU, entered with VMLAUNCH/VMRESUME.
//!
//! The CPU switches CR0/CR3/CR4, the segments, EFER, PAT, DR7 and the
//! SYSENTER MSRs. The SYSCALL MSRs, KERNEL_GS_BASE and CR2 are switched
//! here, and TR is reloaded after an exit: VM exits cut its limit to 0x67,
//! which would cut off the TSS I/O bitmap user mode relies on.
//!
//! A vCPU lives on the CPU that created it: the host state written at
//! creation (GDT, IDT, TSS, GS base) is that CPU's, and the VMCS current on
//! each CPU is tracked in `CURRENT_VMCS[cpu]`.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use moat_abi::vcpu::{event_kind, exit_on, exit_reason, group, Inject, Segment, VcpuState};
use moat_abi::{Status, HYPERCALL_IPC, HYPERCALL_SELECTOR_MASK};
use moat_kernel::virt::ept::InveptType;
use moat_kernel::virt::event::{Event, EventKind};
use moat_kernel::virt::exit::{decode_vmx, vmx_reason, CrAccess, Exit, VmxExitInfo};
use moat_kernel::virt::vmcs::{
    msr as vmx_msr, ActivityState, EntryControls, Interruptibility, PrimaryControls,
    SecondaryControls, VmcsField as F,
};
use moat_kernel::virt::vmx_state::{self, InvalidateScope, VmxCapabilities, VmxSetup};
use moat_kernel::virt::SegmentRegister;
use x86::msr;

use super::insn::{self, GuestRegisters, InvvpidType, VmFail};
use crate::arch::x86_64::cpu::{self, read_cr0, read_cr3, read_cr4, read_msr, write_msr};
use crate::arch::x86_64::gdt::{KERNEL_CS, KERNEL_DS};
use crate::arch::x86_64::lapic;
use crate::arch::x86_64::virt::{fill_exit, RunOutcome};
use crate::memory;

const NO_VMCS: u64 = u64::MAX;
/// Offset of the virtual TPR in the virtual-APIC page; CR8 is its bits 7:4
/// (SDM Vol. 3C, 30.3 "Virtualizing CR8-based TPR accesses").
const VTPR: usize = 0x80;
const CR8_MASK: u64 = 0xf;
/// The VMCS current on this (the only) CPU.
static CURRENT_VMCS: [AtomicU64; moat_kernel::smp::MAX_CPUS] =
    [const { AtomicU64::new(NO_VMCS) }; moat_kernel::smp::MAX_CPUS];

/// This CPU's entry of `CURRENT_VMCS`.
fn current_vmcs() -> &'static AtomicU64 {
    &CURRENT_VMCS[crate::arch::x86_64::percpu::current_id()]
}

/// Used for the preemption-timer period until `set_tsc_hz` is called.
const ASSUMED_TSC_HZ: u64 = 1_000_000_000;
static TSC_HZ: AtomicU64 = AtomicU64::new(ASSUMED_TSC_HZ);
/// The preemption timer ends a run after 10 ms at the latest, so a guest
/// that keeps interrupts off still comes back (not every emulator exits on
/// a host interrupt then).
const TIMER_PERIODS_PER_SECOND: u64 = 100;

/// Tells the backend the TSC frequency, for the preemption-timer period of
/// vCPUs created afterwards.
pub fn set_tsc_hz(hz: u64) {
    TSC_HZ.store(hz.max(1), Ordering::Relaxed);
}

/// IA32_VMX_BASIC bits 30:0.
const VMCS_REVISION_MASK: u64 = 0x7fff_ffff;
/// Bits the VMCS link pointer must hold when there is no shadow VMCS.
const NO_LINK: u64 = u64::MAX;
const RFLAGS_RESERVED_ONE: u64 = 1 << 1;
/// Access-rights bits the VMCS keeps: type, S, DPL, P (7:0), AVL, L, D/B,
/// G (15:12), unusable (16). Bits 11:8 and 31:17 must be 0.
const ACCESS_RIGHTS_MASK: u32 = 0x1_f0ff;
/// The TSS descriptor type's busy bit.
const TSS_BUSY: u64 = 1 << 41;
/// The TR limit a VM exit leaves behind.
const VM_EXIT_TR_LIMIT: u32 = 0x67;
const SELECTOR_INDEX_MASK: u16 = !0b111;
const SYSCALL_MSRS: [u32; 4] = [
    msr::IA32_STAR,
    msr::IA32_LSTAR,
    msr::IA32_CSTAR,
    msr::IA32_FMASK,
];

const GUEST_SEGMENTS: [SegmentRegister; 6] = [
    SegmentRegister::Es,
    SegmentRegister::Cs,
    SegmentRegister::Ss,
    SegmentRegister::Ds,
    SegmentRegister::Fs,
    SegmentRegister::Gs,
];

fn write(field: F, value: u64) -> Result<(), VmFail> {
    insn::vmwrite(field, value)
}

fn read(field: F) -> Result<u64, VmFail> {
    insn::vmread(field)
}

fn read32(field: F) -> Result<u32, VmFail> {
    read(field).map(|value| value as u32)
}

/// The host's descriptor tables and TSS, as the VMCS host area wants them.
#[derive(Clone, Copy, Debug)]
struct HostTables {
    gdtr_base: u64,
    idtr_base: u64,
    tr: u16,
    tr_base: u64,
    tr_limit: u32,
}

#[repr(C, packed(2))]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

impl HostTables {
    fn current() -> Self {
        let mut gdtr = DescriptorPointer { limit: 0, base: 0 };
        let mut idtr = DescriptorPointer { limit: 0, base: 0 };
        let tr: u16;
        // SAFETY: SGDT, SIDT and STR only store the CPU's registers, into
        // the two locals.
        unsafe {
            asm!(
                "sgdt [{gdtr}]",
                "sidt [{idtr}]",
                "str {tr:x}",
                gdtr = in(reg) &mut gdtr,
                idtr = in(reg) &mut idtr,
                tr = out(reg) tr,
                options(nostack, preserves_flags),
            );
        }
        let descriptor = (gdtr.base + u64::from(tr & SELECTOR_INDEX_MASK)) as *const u64;
        // SAFETY: GDTR points at the kernel's GDT, in which TR selects the
        // 16-byte descriptor of the loaded TSS.
        let (low, high) = unsafe {
            (
                descriptor.read_volatile(),
                descriptor.add(1).read_volatile(),
            )
        };
        let base = ((low >> 16) & 0xff_ffff) | (((low >> 56) & 0xff) << 24) | (high << 32);
        let limit = (low & 0xffff) | (((low >> 48) & 0xf) << 16);
        Self {
            gdtr_base: gdtr.base,
            idtr_base: idtr.base,
            tr,
            tr_base: base,
            tr_limit: limit as u32,
        }
    }

    /// Gives TR its full limit again after a VM exit set it to 0x67.
    fn restore_tr(&self) {
        if self.tr_limit <= VM_EXIT_TR_LIMIT {
            return;
        }
        let descriptor = (self.gdtr_base + u64::from(self.tr & SELECTOR_INDEX_MASK)) as *mut u64;
        // SAFETY: the descriptor is the loaded TSS's in the kernel's GDT
        // (writable memory the kernel only writes at boot); LTR needs it
        // marked available and marks it busy again. The TSS stays the same.
        unsafe {
            descriptor.write_volatile(descriptor.read_volatile() & !TSS_BUSY);
            asm!("ltr {tr:x}", tr = in(reg) self.tr, options(nostack, preserves_flags));
        }
    }
}

fn read_capabilities() -> VmxCapabilities {
    use vmx_msr::*;
    let basic = read_msr(IA32_VMX_BASIC);
    let has_true = basic & BASIC_TRUE_CONTROLS != 0;
    let read_true = |register| if has_true { read_msr(register) } else { 0 };
    let procbased = read_msr(IA32_VMX_PROCBASED_CTLS);
    let secondary = PrimaryControls::ACTIVATE_SECONDARY_CONTROLS.bits();
    // These MSRs exist only if the CPU has what they describe.
    let procbased2 = if (procbased >> 32) as u32 & secondary != 0 {
        read_msr(IA32_VMX_PROCBASED_CTLS2)
    } else {
        0
    };
    let ept_or_vpid = (SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_VPID).bits();
    let ept_vpid = if (procbased2 >> 32) as u32 & ept_or_vpid != 0 {
        read_msr(IA32_VMX_EPT_VPID_CAP)
    } else {
        0
    };
    VmxCapabilities {
        basic,
        pinbased: read_msr(IA32_VMX_PINBASED_CTLS),
        procbased,
        procbased2,
        exit: read_msr(IA32_VMX_EXIT_CTLS),
        entry: read_msr(IA32_VMX_ENTRY_CTLS),
        true_pinbased: read_true(IA32_VMX_TRUE_PINBASED_CTLS),
        true_procbased: read_true(IA32_VMX_TRUE_PROCBASED_CTLS),
        true_exit: read_true(IA32_VMX_TRUE_EXIT_CTLS),
        true_entry: read_true(IA32_VMX_TRUE_ENTRY_CTLS),
        misc: read_msr(msr::IA32_VMX_MISC),
        ept_vpid,
        cr0_fixed0: read_msr(msr::IA32_VMX_CR0_FIXED0),
        cr0_fixed1: read_msr(msr::IA32_VMX_CR0_FIXED1),
        cr4_fixed0: read_msr(msr::IA32_VMX_CR4_FIXED0),
        cr4_fixed1: read_msr(msr::IA32_VMX_CR4_FIXED1),
    }
}

/// An event a host-handled exit interrupted, to deliver on the next entry
/// (SDM Vol. 3C, 27.2.4): the raw entry fields.
#[derive(Clone, Copy, Debug)]
struct Reinjection {
    info: u32,
    error_code: u32,
    instruction_length: u64,
}

pub struct VmxVcpu {
    vmcs: u64,
    /// With a TPR shadow, the guest's CR8 lives in byte [`VTPR`] of this
    /// page; without one, the kernel keeps it there for the VMM.
    virtual_apic: u64,
    vtpr: &'static mut u8,
    msr_bitmap: u64,
    io_bitmap_a: u64,
    io_bitmap_b: u64,
    launched: bool,
    registers: GuestRegisters,
    setup: VmxSetup,
    host: HostTables,
    host_syscall: [u64; 4],
    /// The HOST_CR3 and HOST_FS_BASE in the VMCS: they follow the EC.
    host_cr3: u64,
    host_fs_base: u64,
    primary: PrimaryControls,
    entry: EntryControls,
    guest_syscall: [u64; 4],
    guest_kernel_gs_base: u64,
    /// The guest's PAT when the CPU cannot switch it (it then runs with the
    /// host's).
    guest_pat: u64,
    eptp: u64,
    vpid: u16,
    timer: u32,
    /// RIP at the last exit: if the VMM moves it, the interrupt shadow is
    /// over.
    exit_rip: u64,
    reinjection: Option<Reinjection>,
    flush_ept: bool,
    flush_vpid: bool,
}

impl VmxVcpu {
    /// A vCPU whose guest-physical space is the EPT `eptp`, tagged `vpid`
    /// (never 0).
    pub fn new(eptp: u64, vpid: u16) -> Result<Self, Status> {
        let caps = read_capabilities();
        let setup = vmx_state::setup(&caps).map_err(|error| {
            log::warn!("vmx: cannot run guests: {error}");
            Status::BadParameter
        })?;
        let mut frames = [0u64; 5];
        let mut vtpr = None;
        for i in 0..frames.len() {
            match memory::alloc_zeroed_page() {
                Some((phys, page)) => {
                    frames[i] = phys;
                    match i {
                        0 => {
                            let revision = (caps.basic & VMCS_REVISION_MASK) as u32;
                            page[..4].copy_from_slice(&revision.to_le_bytes());
                        }
                        1 => vtpr = Some(&mut page[VTPR]),
                        // Every MSR and every port exits.
                        _ => page.fill(0xff),
                    }
                }
                None => {
                    frames[..i].iter().for_each(|&f| memory::free_frame(f));
                    return Err(Status::QuotaExceeded);
                }
            }
        }
        let [vmcs, virtual_apic, msr_bitmap, io_bitmap_a, io_bitmap_b] = frames;
        let Some(vtpr) = vtpr else {
            frames.iter().for_each(|&f| memory::free_frame(f));
            return Err(Status::QuotaExceeded);
        };
        let host_syscall = SYSCALL_MSRS.map(read_msr);
        let mut vcpu = Self {
            vmcs,
            virtual_apic,
            vtpr,
            msr_bitmap,
            io_bitmap_a,
            io_bitmap_b,
            launched: false,
            registers: GuestRegisters::default(),
            setup,
            host: HostTables::current(),
            host_syscall,
            host_cr3: 0,
            host_fs_base: 0,
            primary: setup.primary,
            entry: setup.entry,
            guest_syscall: host_syscall,
            guest_kernel_gs_base: 0,
            guest_pat: 0,
            eptp,
            vpid: vpid.max(1),
            timer: vmx_state::preemption_timer_value(
                TSC_HZ.load(Ordering::Relaxed) / TIMER_PERIODS_PER_SECOND,
                setup.timer_rate,
            ),
            exit_rip: 0,
            reinjection: None,
            flush_ept: true,
            flush_vpid: true,
        };
        if let Err(fail) = vcpu.init() {
            let error = read(F::VmInstructionError).unwrap_or(0);
            log::warn!("vmx: VMCS setup failed: {fail} (VM-instruction error {error})");
            vcpu.free();
            return Err(Status::BadParameter);
        }
        Ok(vcpu)
    }

    fn init(&mut self) -> Result<(), VmFail> {
        // SAFETY: `vmcs` is our frame with the revision identifier; VMX
        // root operation was entered at boot.
        unsafe { insn::vmclear(self.vmcs) }?;
        self.make_current()?;
        let s = self.setup;
        write(F::PinBasedControls, s.pin.bits().into())?;
        write(F::PrimaryProcessorControls, self.primary.bits().into())?;
        write(F::SecondaryProcessorControls, s.secondary.bits().into())?;
        write(F::ExitControls, s.exit.bits().into())?;
        write(F::EntryControls, self.entry.bits().into())?;
        write(F::ExceptionBitmap, 0)?;
        write(F::PageFaultErrorCodeMask, 0)?;
        write(F::PageFaultErrorCodeMatch, 0)?;
        write(F::Cr3TargetCount, 0)?;
        write(F::ExitMsrStoreCount, 0)?;
        write(F::ExitMsrLoadCount, 0)?;
        write(F::EntryMsrLoadCount, 0)?;
        write(F::EntryInterruptionInfo, 0)?;
        write(F::IoBitmapA, self.io_bitmap_a)?;
        write(F::IoBitmapB, self.io_bitmap_b)?;
        write(F::MsrBitmap, self.msr_bitmap)?;
        if s.primary.contains(PrimaryControls::USE_TPR_SHADOW) {
            write(F::VirtualApicPage, self.virtual_apic)?;
            // Never an exit for the guest lowering its TPR: the VMM
            // checks CR8 whenever it is about to inject.
            write(F::TprThreshold, 0)?;
        }
        write(F::TscOffset, 0)?;
        write(F::EptPointer, self.eptp)?;
        write(F::Vpid, self.vpid.into())?;
        write(F::Cr0GuestHostMask, s.cr0.mask())?;
        write(F::Cr4GuestHostMask, s.cr4.mask())?;

        write(F::HostCr0, read_cr0())?;
        write(F::HostCr4, read_cr4())?;
        write(F::HostCsSelector, KERNEL_CS.into())?;
        for field in [F::HostSsSelector, F::HostDsSelector, F::HostEsSelector] {
            write(field, KERNEL_DS.into())?;
        }
        write(F::HostFsSelector, 0)?;
        write(F::HostGsSelector, 0)?;
        write(F::HostTrSelector, self.host.tr.into())?;
        write(F::HostTrBase, self.host.tr_base)?;
        write(F::HostGdtrBase, self.host.gdtr_base)?;
        write(F::HostIdtrBase, self.host.idtr_base)?;
        // This CPU's per-CPU block (the kernel runs with its GS).
        write(F::HostGsBase, read_msr(msr::IA32_GS_BASE))?;
        write(F::HostSysenterCs, 0)?;
        write(F::HostSysenterEsp, 0)?;
        write(F::HostSysenterEip, 0)?;
        write(F::HostEfer, read_msr(msr::IA32_EFER))?;
        if s.pat() {
            write(F::HostPat, read_msr(msr::IA32_PAT))?;
        }
        write(F::HostRip, insn::host_rip())?;
        self.refresh_host()?;

        write(F::VmcsLinkPointer, NO_LINK)?;
        write(F::GuestDebugCtl, 0)?;
        write(F::GuestPendingDebugExceptions, 0)?;
        for field in [
            F::GuestPdpte0,
            F::GuestPdpte1,
            F::GuestPdpte2,
            F::GuestPdpte3,
        ] {
            write(field, 0)?;
        }
        let mut reset = vmx_state::reset_state();
        self.load(&mut reset)
    }

    fn make_current(&self) -> Result<(), VmFail> {
        if current_vmcs().load(Ordering::Relaxed) != self.vmcs {
            // SAFETY: our VMCS region, cleared in `init`; it is only ever
            // current on this CPU.
            unsafe { insn::vmptrld(self.vmcs) }?;
            current_vmcs().store(self.vmcs, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The host state that changes with the running EC: its address space
    /// and its user FS base (the kernel does not switch FS).
    fn refresh_host(&mut self) -> Result<(), VmFail> {
        let cr3 = read_cr3();
        if cr3 != self.host_cr3 {
            write(F::HostCr3, cr3)?;
            self.host_cr3 = cr3;
        }
        let fs_base = read_msr(msr::IA32_FS_BASE);
        if fs_base != self.host_fs_base {
            write(F::HostFsBase, fs_base)?;
            self.host_fs_base = fs_base;
        }
        Ok(())
    }

    fn load(&mut self, state: &mut VcpuState) -> Result<(), VmFail> {
        let dirty = state.dirty;
        state.dirty = 0;
        let r = &mut self.registers;
        r.rax = state.rax;
        r.rbx = state.rbx;
        r.rcx = state.rcx;
        r.rdx = state.rdx;
        r.rsi = state.rsi;
        r.rdi = state.rdi;
        r.rbp = state.rbp;
        r.r8 = state.r8;
        r.r9 = state.r9;
        r.r10 = state.r10;
        r.r11 = state.r11;
        r.r12 = state.r12;
        r.r13 = state.r13;
        r.r14 = state.r14;
        r.r15 = state.r15;
        write(F::GuestRsp, state.rsp)?;
        write(F::GuestRip, state.rip)?;
        write(F::GuestRflags, state.rflags | RFLAGS_RESERVED_ONE)?;
        let s = self.setup;
        if dirty & group::CONTROL_REGISTERS != 0 {
            write(F::GuestCr0, s.cr0.actual(state.cr0))?;
            write(F::Cr0ReadShadow, state.cr0)?;
            write(F::GuestCr4, s.cr4.actual(state.cr4))?;
            write(F::Cr4ReadShadow, state.cr4)?;
            write(F::GuestCr3, state.cr3)?;
            write(F::GuestEfer, vmx_state::entry_efer(state.efer, state.cr0))?;
            r.cr2 = state.cr2;
            *self.vtpr = ((state.cr8 & CR8_MASK) << 4) as u8;
            // VM entry does not flush the VPID's translations for a new CR3.
            self.flush_vpid = true;
        }
        if dirty & group::SEGMENTS != 0 {
            let segments = [
                &state.es, &state.cs, &state.ss, &state.ds, &state.fs, &state.gs,
            ];
            for (register, segment) in GUEST_SEGMENTS.into_iter().zip(segments) {
                write_segment(register, segment)?;
            }
        }
        if dirty & group::SYSTEM_SEGMENTS != 0 {
            write_segment(SegmentRegister::Ldtr, &state.ldtr)?;
            write_segment(SegmentRegister::Tr, &state.tr)?;
            write(F::GuestGdtrBase, state.gdtr.base)?;
            write(F::GuestGdtrLimit, state.gdtr.limit)?;
            write(F::GuestIdtrBase, state.idtr.base)?;
            write(F::GuestIdtrLimit, state.idtr.limit)?;
        }
        if dirty & group::MSRS != 0 {
            // These go into the real MSRs with WRMSR around the run: a
            // non-canonical address or a reserved SFMASK bit would fault in
            // the kernel, so the VMM's values are made loadable first.
            use moat_kernel::paging::canonicalize as canonical;
            self.guest_syscall = [
                state.star,
                canonical(state.lstar),
                canonical(state.cstar),
                state.sfmask & 0xffff_ffff,
            ];
            self.guest_kernel_gs_base = canonical(state.kernel_gs_base);
            write(F::GuestSysenterCs, state.sysenter_cs)?;
            write(F::GuestSysenterEsp, state.sysenter_esp)?;
            write(F::GuestSysenterEip, state.sysenter_eip)?;
            if s.pat() {
                write(F::GuestPat, state.pat)?;
            } else {
                self.guest_pat = state.pat;
            }
        }
        if dirty & group::TSC_OFFSET != 0 {
            write(F::TscOffset, state.tsc_offset)?;
        }
        if dirty & group::DEBUG != 0 {
            write(F::GuestDr7, state.dr7)?;
        }
        if dirty & group::INTERRUPTIBILITY != 0 {
            write(F::GuestInterruptibility, state.interruptibility.into())?;
            let activity = match ActivityState::from_raw(state.activity) {
                Some(ActivityState::Hlt) if s.activity_hlt => ActivityState::Hlt,
                _ => ActivityState::Active,
            };
            write(F::GuestActivityState, activity as u64)?;
        } else if state.rip != self.exit_rip {
            let current = read32(F::GuestInterruptibility)?;
            let next = vmx_state::interruptibility_after(current, true);
            if next != current {
                write(F::GuestInterruptibility, next.into())?;
            }
        }
        if dirty & group::INJECT != 0 {
            // The VMM's event replaces one the kernel kept (`take_pending`
            // handed that to the VMM).
            self.reinjection = None;
            let protected = read(F::GuestCr0)? & CR0_PE != 0;
            let event = vmx_state::entry_event(Event::from_abi(&state.inject), protected);
            let (info, error_code) = event.to_vmx();
            write(F::EntryInterruptionInfo, info.into())?;
            write(F::EntryExceptionErrorCode, error_code.into())?;
            if event.kind == EventKind::SoftwareInterrupt {
                let length = vmx_state::software_interrupt_length(state.exit.instruction_length);
                write(F::EntryInstructionLength, length.into())?;
            }
        } else if let Some(again) = self.reinjection.take() {
            write(F::EntryInterruptionInfo, again.info.into())?;
            write(F::EntryExceptionErrorCode, again.error_code.into())?;
            write(F::EntryInstructionLength, again.instruction_length)?;
        }
        let mut primary = self.primary;
        if dirty & group::EXIT_ON != 0 {
            primary.set(
                PrimaryControls::INTERRUPT_WINDOW_EXITING,
                state.exit_on & exit_on::INTERRUPT_WINDOW != 0,
            );
            primary.set(
                PrimaryControls::NMI_WINDOW_EXITING,
                state.exit_on & exit_on::NMI_WINDOW != 0,
            );
        }
        if primary != self.primary {
            write(F::PrimaryProcessorControls, primary.bits().into())?;
            self.primary = primary;
        }
        // The guest may have entered or left long mode since the last exit.
        let mut entry = self.entry;
        entry.set(
            EntryControls::IA32E_MODE_GUEST,
            vmx_state::ia32e_mode(read(F::GuestEfer)?),
        );
        if entry != self.entry {
            write(F::EntryControls, entry.bits().into())?;
            self.entry = entry;
        }
        Ok(())
    }

    fn store_registers(&self, state: &mut VcpuState) -> Result<(), VmFail> {
        let r = &self.registers;
        state.rax = r.rax;
        state.rbx = r.rbx;
        state.rcx = r.rcx;
        state.rdx = r.rdx;
        state.rsi = r.rsi;
        state.rdi = r.rdi;
        state.rbp = r.rbp;
        state.r8 = r.r8;
        state.r9 = r.r9;
        state.r10 = r.r10;
        state.r11 = r.r11;
        state.r12 = r.r12;
        state.r13 = r.r13;
        state.r14 = r.r14;
        state.r15 = r.r15;
        state.rsp = read(F::GuestRsp)?;
        state.rip = read(F::GuestRip)?;
        state.rflags = read(F::GuestRflags)?;
        Ok(())
    }

    fn store_control_registers(&self, state: &mut VcpuState) -> Result<(), VmFail> {
        let s = self.setup;
        state.cr0 = s.cr0.visible(read(F::GuestCr0)?, read(F::Cr0ReadShadow)?);
        state.cr4 = s.cr4.visible(read(F::GuestCr4)?, read(F::Cr4ReadShadow)?);
        state.cr3 = read(F::GuestCr3)?;
        state.cr2 = self.registers.cr2;
        state.cr8 = u64::from(*self.vtpr >> 4);
        state.efer = read(F::GuestEfer)?;
        Ok(())
    }

    /// A guest's MOV to CR0 or CR4 that touched a bit the host owns (VMX
    /// forces it, e.g. CR0.NE): done here, as the CPU would without VMX,
    /// so the guest keeps its own view and the VMM sees no VMX artefact.
    /// The guest resumes after the instruction, or takes #GP.
    fn write_control_register(
        &self,
        state: &mut VcpuState,
        cr: u8,
        gpr: u8,
        instruction_length: u64,
    ) -> Result<(), VmFail> {
        let value = gpr_value(state, gpr);
        self.store_control_registers(state)?;
        let cs_long = read32(F::GuestCsAccessRights)? & ACCESS_RIGHTS_L != 0;
        let s = self.setup;
        let faults = if cr == 0 {
            vmx_state::cr0_write_faults(value, state.cr4, state.efer, cs_long)
        } else {
            vmx_state::cr4_write_faults(value, s.cr4, s.cr4.mask(), state.efer)
        };
        if faults {
            state.inject = Inject {
                vector: GP_VECTOR,
                kind: event_kind::HARDWARE_EXCEPTION,
                has_error_code: 1,
                reserved: 0,
                error_code: 0,
            };
            state.dirty |= group::INJECT;
            return Ok(());
        }
        if cr == 0 {
            state.cr0 = value;
        } else {
            state.cr4 = value;
        }
        // The next entry loads them all (and flushes the VPID's
        // translations) and leaves the interrupt shadow with the new RIP.
        state.dirty |= group::CONTROL_REGISTERS;
        state.rip = state.rip.wrapping_add(instruction_length);
        Ok(())
    }

    fn store(&self, state: &mut VcpuState) -> Result<(), VmFail> {
        let want = state.want;
        let s = self.setup;
        if want & group::CONTROL_REGISTERS != 0 {
            self.store_control_registers(state)?;
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
            for (register, segment) in GUEST_SEGMENTS.into_iter().zip(segments) {
                *segment = read_segment(register)?;
            }
        }
        if want & group::SYSTEM_SEGMENTS != 0 {
            state.ldtr = read_segment(SegmentRegister::Ldtr)?;
            state.tr = read_segment(SegmentRegister::Tr)?;
            state.gdtr.base = read(F::GuestGdtrBase)?;
            state.gdtr.limit = read(F::GuestGdtrLimit)?;
            state.idtr.base = read(F::GuestIdtrBase)?;
            state.idtr.limit = read(F::GuestIdtrLimit)?;
        }
        if want & group::MSRS != 0 {
            [state.star, state.lstar, state.cstar, state.sfmask] = self.guest_syscall;
            state.kernel_gs_base = self.guest_kernel_gs_base;
            state.sysenter_cs = read(F::GuestSysenterCs)?;
            state.sysenter_esp = read(F::GuestSysenterEsp)?;
            state.sysenter_eip = read(F::GuestSysenterEip)?;
            state.pat = if s.pat() {
                read(F::GuestPat)?
            } else {
                self.guest_pat
            };
        }
        if want & group::DEBUG != 0 {
            state.dr7 = read(F::GuestDr7)?;
        }
        if want & group::INTERRUPTIBILITY != 0 {
            state.interruptibility = read32(F::GuestInterruptibility)?;
            state.activity = read32(F::GuestActivityState)?;
        }
        Ok(())
    }

    /// Everything before the entry: the current VMCS, the state the VMM
    /// changed, the host state of this EC, flushes, the timer.
    fn prepare(&mut self, state: &mut VcpuState, flush: bool) -> Result<(), VmFail> {
        self.make_current()?;
        self.load(state)?;
        self.refresh_host()?;
        if flush || self.flush_ept {
            let (kind, eptp) = match self.setup.invept {
                InvalidateScope::SingleContext => (InveptType::SingleContext, self.eptp),
                InvalidateScope::AllContext => (InveptType::AllContext, 0),
            };
            insn::invept(kind, eptp)?;
            self.flush_ept = false;
        }
        if self.flush_vpid {
            let kind = match self.setup.invvpid {
                InvalidateScope::SingleContext => InvvpidType::SingleContext,
                InvalidateScope::AllContext => InvvpidType::AllContext,
            };
            insn::invvpid(kind, self.vpid)?;
            self.flush_vpid = false;
        }
        if self.setup.preemption_timer() {
            // No later than the host's own next timer event: Bochs may not
            // exit on a host interrupt while the guest runs with IF=0, and
            // a component waiting for a deadline must not wait for the
            // 10 ms backstop.
            // A deadline already passed has its interrupt pending or about
            // to be (the LAPIC timer counts in its own, coarser units):
            // exit at once, or Bochs runs a guest with IF=0 on for the
            // whole backstop period with the interrupt held.
            let until_timer = lapic::armed().saturating_sub(cpu::rdtsc());
            let value = match until_timer {
                0 => 1,
                ticks => {
                    vmx_state::preemption_timer_value(ticks, self.setup.timer_rate).min(self.timer)
                }
            };
            write(F::PreemptionTimerValue, value.into())?;
        }
        Ok(())
    }

    /// The SYSCALL MSRs and KERNEL_GS_BASE are the guest's while it runs
    /// (VMX does not switch them; SWAPGS in the guest changes the latter).
    fn enter_guest_msrs(&self, host_kernel_gs_base: u64) {
        for ((register, guest), host) in SYSCALL_MSRS
            .into_iter()
            .zip(self.guest_syscall)
            .zip(self.host_syscall)
        {
            if guest != host {
                write_msr(register, guest);
            }
        }
        if self.guest_kernel_gs_base != host_kernel_gs_base {
            write_msr(msr::IA32_KERNEL_GSBASE, self.guest_kernel_gs_base);
        }
    }

    fn leave_guest_msrs(&mut self, host_kernel_gs_base: u64) {
        for ((register, guest), host) in SYSCALL_MSRS
            .into_iter()
            .zip(self.guest_syscall)
            .zip(self.host_syscall)
        {
            if guest != host {
                write_msr(register, host);
            }
        }
        self.guest_kernel_gs_base = read_msr(msr::IA32_KERNEL_GSBASE);
        if self.guest_kernel_gs_base != host_kernel_gs_base {
            write_msr(msr::IA32_KERNEL_GSBASE, host_kernel_gs_base);
        }
    }

    /// Enters the guest; see `arch::x86_64::virt` for the contract. An
    /// entry the CPU refuses is an `INVALID_STATE` exit whose `raw` is the
    /// VM-instruction error (or `u64::MAX` for VMfailInvalid), or for a
    /// guest-state failure the exit reason with bit 31 set.
    pub fn run(&mut self, state: &mut VcpuState, flush: bool) -> RunOutcome {
        if let Err(fail) = self.prepare(state, flush) {
            return refused(state, fail);
        }
        let host_kernel_gs_base = read_msr(msr::IA32_KERNEL_GSBASE);
        self.enter_guest_msrs(host_kernel_gs_base);
        // SAFETY: the VMCS is current and complete: controls from the
        // capability MSRs, host state of this CPU and of the running EC
        // (refreshed in `prepare`), HOST_RIP = `insn::host_rip()`, the
        // guest-physical space is the VM's EPT. The kernel runs with
        // interrupts disabled.
        let entered = unsafe { insn::enter(&mut self.registers, self.launched) };
        self.leave_guest_msrs(host_kernel_gs_base);
        if let Err(fail) = entered {
            return refused(state, fail);
        }
        self.host.restore_tr();
        match self.exit(state) {
            Ok(outcome) => outcome,
            Err(fail) => refused(state, fail),
        }
    }

    fn exit(&mut self, state: &mut VcpuState) -> Result<RunOutcome, VmFail> {
        let reason = read32(F::ExitReason)?;
        if reason & vmx_reason::ENTRY_FAILURE == 0 {
            self.launched = true;
        }
        let info = VmxExitInfo {
            reason,
            qualification: read(F::ExitQualification)?,
            guest_physical: read(F::GuestPhysicalAddress)?,
            interruption_info: read32(F::ExitInterruptionInfo)?,
            interruption_error: read32(F::ExitInterruptionErrorCode)?,
        };
        let vectoring = read32(F::IdtVectoringInfo)?;
        let vectoring_error = read32(F::IdtVectoringErrorCode)?;
        let instruction_length = read(F::ExitInstructionLength)?;
        let basic = (reason & vmx_reason::BASIC_MASK) as u16;
        if vmx_state::nmi_unblocked_by_iret(
            basic,
            info.qualification,
            info.interruption_info,
            vectoring,
        ) {
            let blocked =
                read32(F::GuestInterruptibility)? | Interruptibility::BLOCKING_BY_NMI.bits();
            write(F::GuestInterruptibility, blocked.into())?;
        }
        self.store_registers(state)?;
        // Also for exits the kernel handles: a `vcpu_poke` may return to the
        // VMM after any of them.
        self.store(state)?;
        self.exit_rip = state.rip;
        let exit = decode_vmx(&info);
        if exit == Exit::Nmi {
            raise_host_nmi();
        }
        if let Exit::ControlRegister {
            cr: cr @ (0 | 4),
            access: CrAccess::Write { gpr: Some(gpr) },
        } = exit
        {
            self.write_control_register(state, cr, gpr, instruction_length)?;
            return Ok(RunOutcome::Host);
        }
        match exit {
            // The host takes its interrupt (still pending: the exit does not
            // acknowledge it) once the kernel enables interrupts; its NMI it
            // took above.
            Exit::ExternalInterrupt { .. } | Exit::Nmi | Exit::PreemptionTimer => {
                self.reinjection = vmx_state::reinjection(vectoring).map(|info| Reinjection {
                    info,
                    error_code: vectoring_error,
                    instruction_length,
                });
                return Ok(RunOutcome::Host);
            }
            Exit::Hypercall if state.rax & !HYPERCALL_SELECTOR_MASK == HYPERCALL_IPC => {
                let cpl = vmx_state::cpl(read32(F::GuestSsAccessRights)?);
                return Ok(RunOutcome::Hypercall { cpl });
            }
            _ => {}
        }
        fill_exit(state, &exit);
        state.exit.raw = reason.into();
        state.exit.qualification = info.qualification;
        state.exit.instruction_length = instruction_length;
        match Event::from_vmx(vectoring, vectoring_error) {
            Some(event) => {
                state.exit.pending = event.to_abi();
                state.exit.pending_valid = 1;
            }
            None => {
                state.exit.pending = Inject::default();
                state.exit.pending_valid = 0;
            }
        }
        Ok(RunOutcome::Vmm)
    }

    /// The event a host-handled exit interrupted and the kernel would
    /// deliver on the next entry, handed to the VMM instead: for a return
    /// to the VMM without a guest exit (`vcpu_poke`), so that it lands in
    /// `exit.pending` and an event the VMM injects next does not lose it.
    pub fn take_pending(&mut self) -> Option<Inject> {
        let again = self.reinjection.take()?;
        Event::from_vmx(again.info, again.error_code).map(Event::to_abi)
    }

    pub fn free(self) {
        // SAFETY: our VMCS region; after VMCLEAR the CPU no longer uses it.
        if let Err(fail) = unsafe { insn::vmclear(self.vmcs) } {
            log::error!("vmx: VMCLEAR of a freed vCPU failed: {fail}; leaking its VMCS");
        } else {
            let _ = current_vmcs().compare_exchange(
                self.vmcs,
                NO_VMCS,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            memory::free_frame(self.vmcs);
        }
        for frame in [
            self.virtual_apic,
            self.msr_bitmap,
            self.io_bitmap_a,
            self.io_bitmap_b,
        ] {
            memory::free_frame(frame);
        }
    }
}

const CR0_PE: u64 = 1 << 0;
const GP_VECTOR: u8 = 13;
/// VMX access rights: 64-bit code segment.
const ACCESS_RIGHTS_L: u32 = 1 << 13;

/// General-purpose register `gpr` (0 = RAX … 15 = R15) from the state page.
fn gpr_value(state: &VcpuState, gpr: u8) -> u64 {
    let s = state;
    [
        s.rax, s.rcx, s.rdx, s.rbx, s.rsp, s.rbp, s.rsi, s.rdi, s.r8, s.r9, s.r10, s.r11, s.r12,
        s.r13, s.r14, s.r15,
    ][usize::from(gpr & 0xf)]
}

/// An NMI that caused a VM exit was consumed by it: unlike an external
/// interrupt it does not stay pending for the host. INT 2 runs the host's
/// NMI handler now, as KVM does, and that handler's IRET ends any NMI
/// blocking left by the exit.
fn raise_host_nmi() {
    // SAFETY: vector 2 is the kernel's NMI gate (its own IST stack); the
    // handler only logs and returns.
    unsafe { asm!("int 2", options(nomem)) };
}

/// The CPU refused the entry (or a VMCS access failed): an
/// `INVALID_STATE` exit for the VMM.
fn refused(state: &mut VcpuState, fail: VmFail) -> RunOutcome {
    state.exit = Default::default();
    state.exit.reason = exit_reason::INVALID_STATE;
    state.exit.raw = match fail {
        VmFail::Valid => read(F::VmInstructionError).unwrap_or(u64::MAX),
        VmFail::Invalid => u64::MAX,
    };
    RunOutcome::Vmm
}

fn write_segment(register: SegmentRegister, segment: &Segment) -> Result<(), VmFail> {
    let fields = F::guest_segment(register);
    write(fields.selector, segment.selector.into())?;
    write(fields.base, segment.base)?;
    write(fields.limit, segment.limit.into())?;
    write(
        fields.access_rights,
        (segment.access & ACCESS_RIGHTS_MASK).into(),
    )
}

fn read_segment(register: SegmentRegister) -> Result<Segment, VmFail> {
    let fields = F::guest_segment(register);
    Ok(Segment {
        selector: read(fields.selector)? as u16,
        base: read(fields.base)?,
        limit: read32(fields.limit)?,
        access: read32(fields.access_rights)? & ACCESS_RIGHTS_MASK,
        ..Segment::default()
    })
}

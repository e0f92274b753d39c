//! What the kernel's vCPU object needs from a virtualization backend (VMX
//! in `vmx/vcpu.rs`, SVM in `svm/vcpu.rs`). Both have the same shape:
//!
//! ```ignore
//! impl Backend {
//!     /// The control structures of one vCPU whose guest-physical space has
//!     /// the root `guest_root` (EPTP value / nCR3) and TLB tag `tag`
//!     /// (VPID / ASID, never 0).
//!     fn new(guest_root: u64, tag: u16) -> Result<Self, Status>;
//!     /// Enters the guest with `state` (see `RunOutcome`); `flush`: the
//!     /// guest-physical mappings lost rights since the last entry.
//!     fn run(&mut self, state: &mut VcpuState, flush: bool) -> RunOutcome;
//!     /// Frees the frames `new` took.
//!     fn free(self);
//! }
//! ```
//!
//! `run` loads GPRs, RIP and RFLAGS from the state page on every entry and
//! the other groups marked in `state.dirty` (then clears `dirty`), delivers
//! `state.inject` if `INJECT` is dirty, arms interrupt-/NMI-window exiting
//! from `state.exit_on` if `EXIT_ON` is dirty, enters the guest with host
//! interrupts disabled (a host interrupt makes the guest exit), and on the
//! exit stores GPRs, RIP, RFLAGS and the groups in `state.want`.

use core::sync::atomic::{AtomicU8, Ordering};

/// Which virtualization the CPU offers and the kernel turned on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    None,
    Vmx,
    Svm,
}

static VENDOR: AtomicU8 = AtomicU8::new(0);

pub fn set_vendor(vendor: Vendor) {
    VENDOR.store(vendor as u8, Ordering::Relaxed);
}

/// The highest VPID or ASID a vCPU may have (set with the vendor).
static HIGHEST_TLB_TAG: core::sync::atomic::AtomicU16 = core::sync::atomic::AtomicU16::new(0);

/// Intel: every 16-bit VPID; AMD: one less than the ASIDs CPUID reports.
pub fn set_highest_tlb_tag(tag: u16) {
    HIGHEST_TLB_TAG.store(tag, Ordering::Relaxed);
}

pub fn highest_tlb_tag() -> u16 {
    HIGHEST_TLB_TAG.load(Ordering::Relaxed)
}

pub fn vendor() -> Vendor {
    match VENDOR.load(Ordering::Relaxed) {
        1 => Vendor::Vmx,
        2 => Vendor::Svm,
        _ => Vendor::None,
    }
}

/// How a guest run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// An exit for the VMM: `state.exit` is filled in (ABI
    /// `moat_abi::vcpu::exit_reason`), with any event whose delivery the
    /// exit interrupted in `state.exit.pending`.
    Vmm,
    /// A host interrupt, NMI or the backend's preemption timer ended the
    /// run; the kernel takes the interrupt and enters the guest again.
    Host,
    /// VMCALL/VMMCALL with `rax` = `moat_abi::HYPERCALL_IPC` + selector:
    /// the kernel performs the IPC, then calls `finish_hypercall`. RIP
    /// still points at the instruction; `cpl` is the guest's privilege
    /// level.
    Hypercall { cpl: u8 },
}

/// Bytes of VMCALL (0f 01 c1) and VMMCALL (0f 01 d9).
pub const HYPERCALL_LENGTH: u64 = 3;

/// After the kernel performed a guest IPC hypercall: the status in `rax`,
/// the reply in the message registers, RIP past the instruction.
pub fn finish_hypercall(state: &mut moat_abi::vcpu::VcpuState, status: u64, words: [u64; 6]) {
    state.rax = status;
    state.rdi = words[0];
    state.rsi = words[1];
    state.rdx = words[2];
    state.r10 = words[3];
    state.r8 = words[4];
    state.r9 = words[5];
    state.rip = state.rip.wrapping_add(HYPERCALL_LENGTH);
}

/// Fills the ABI exit record from a decoded exit (for the exits that go to
/// the VMM).
pub fn fill_exit(state: &mut moat_abi::vcpu::VcpuState, exit: &moat_kernel::virt::exit::Exit) {
    use moat_abi::vcpu::{exit_flags, exit_reason};
    use moat_kernel::virt::exit::Exit;
    let record = &mut state.exit;
    record.flags = 0;
    record.port = 0;
    record.size = 0;
    record.vector = 0;
    record.error_code = 0;
    record.gpa = 0;
    record.reason = match *exit {
        Exit::Io {
            port,
            size,
            write,
            string,
            rep,
        } => {
            record.port = port;
            record.size = size;
            if !write {
                record.flags |= exit_flags::IO_IN;
            }
            if string {
                record.flags |= exit_flags::IO_STRING;
            }
            if rep {
                record.flags |= exit_flags::IO_REP;
            }
            exit_reason::IO
        }
        Exit::NestedPageFault {
            gpa,
            read,
            write,
            fetch,
            ..
        } => {
            record.gpa = gpa;
            if read {
                record.flags |= exit_flags::ACCESS_READ;
            }
            if write {
                record.flags |= exit_flags::ACCESS_WRITE;
            }
            if fetch {
                record.flags |= exit_flags::ACCESS_EXECUTE;
            }
            exit_reason::MEMORY
        }
        Exit::Cpuid => exit_reason::CPUID,
        Exit::Msr { write: false } => exit_reason::MSR_READ,
        Exit::Msr { write: true } => exit_reason::MSR_WRITE,
        Exit::Hlt => exit_reason::HLT,
        Exit::Hypercall => exit_reason::HYPERCALL,
        Exit::InterruptWindow => exit_reason::INTERRUPT_WINDOW,
        Exit::NmiWindow | Exit::Iret => exit_reason::NMI_WINDOW,
        Exit::Exception {
            vector, error_code, ..
        } => {
            record.vector = vector;
            if let Some(code) = error_code {
                record.error_code = code;
                record.flags |= exit_flags::ERROR_CODE_VALID;
            }
            exit_reason::EXCEPTION
        }
        Exit::Shutdown => exit_reason::SHUTDOWN,
        Exit::Xsetbv => exit_reason::XSETBV,
        Exit::InvalidGuestState | Exit::EntryFailure { .. } => exit_reason::INVALID_STATE,
        _ => exit_reason::OTHER,
    };
}

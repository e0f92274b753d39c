//! VMX instructions. Each reports VMfailInvalid (CF) and VMfailValid (ZF)
//! from inside its own asm block, where the flags are still those the
//! instruction set. (The `x86` crate's wrappers read RFLAGS in a second asm
//! block, and nothing stops the compiler from changing the flags in
//! between, so they are written here.)

use core::arch::asm;

use moat_kernel::virt::ept::InveptType;
use moat_kernel::virt::vmcs::VmcsField;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// CF=1: no current VMCS, or the operand is invalid.
    Invalid,
    /// ZF=1: the error number is in the VM-instruction error field.
    Valid,
}

impl core::fmt::Display for VmFail {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            VmFail::Invalid => "VMfailInvalid",
            VmFail::Valid => "VMfailValid",
        })
    }
}

fn result(carry: u8, zero: u8) -> Result<(), VmFail> {
    match (carry, zero) {
        (0, 0) => Ok(()),
        (0, _) => Err(VmFail::Valid),
        _ => Err(VmFail::Invalid),
    }
}

/// Runs the VMX instruction `$insn` on the 64-bit memory operand holding
/// the physical address `$region` and returns its VMfail status.
macro_rules! region_op {
    ($insn:literal, $region:expr) => {{
        let carry: u8;
        let zero: u8;
        asm!(
            concat!($insn, " [{region}]"),
            "setc {carry}",
            "setz {zero}",
            region = in(reg) &$region,
            carry = out(reg_byte) carry,
            zero = out(reg_byte) zero,
            options(nostack),
        );
        result(carry, zero)
    }};
}

/// VMXON with the region at physical address `region`.
pub fn vmxon(region: u64) -> Result<(), VmFail> {
    // SAFETY: `region` is a page-aligned frame owned by the kernel that holds
    // the VMCS revision identifier; CR0/CR4 satisfy the VMX fixed bits and
    // IA32_FEATURE_CONTROL allows VMXON (checked by the caller).
    unsafe { region_op!("vmxon", region) }
}

/// VMCLEAR: writes the VMCS at physical address `region` back to memory and
/// makes it clear (not launched, not current).
///
/// # Safety
/// `region` must be a 4 KiB frame the caller owns as a VMCS region (the
/// CPU writes it); VMX root operation must be on.
pub unsafe fn vmclear(region: u64) -> Result<(), VmFail> {
    // SAFETY: forwarded from the caller: the frame is a VMCS region the CPU
    // may write; `region` is read from the stack operand.
    unsafe { region_op!("vmclear", region) }
}

/// VMPTRLD: makes the VMCS at physical address `region` the current one.
///
/// # Safety
/// `region` must be a VMCS region the caller owns, initialized with the
/// revision identifier (and cleared with VMCLEAR before its first use or
/// after it was current on another CPU); the CPU reads and writes it
/// until it is cleared.
pub unsafe fn vmptrld(region: u64) -> Result<(), VmFail> {
    // SAFETY: forwarded from the caller.
    unsafe { region_op!("vmptrld", region) }
}

/// VMREAD of `field` of the current VMCS (zero-extended to 64 bits).
pub fn vmread(field: VmcsField) -> Result<u64, VmFail> {
    let value: u64;
    let carry: u8;
    let zero: u8;
    // SAFETY: VMREAD only reads the current VMCS; without one, or with a
    // field the CPU lacks, it fails and reports it in the flags.
    unsafe {
        asm!(
            "vmread {value}, {field}",
            "setc {carry}",
            "setz {zero}",
            field = in(reg) u64::from(field.encoding()),
            value = out(reg) value,
            carry = out(reg_byte) carry,
            zero = out(reg_byte) zero,
            options(nostack),
        );
    }
    result(carry, zero).map(|()| value)
}

/// VMWRITE of `value` into `field` of the current VMCS.
pub fn vmwrite(field: VmcsField, value: u64) -> Result<(), VmFail> {
    let carry: u8;
    let zero: u8;
    // SAFETY: VMWRITE changes only the current VMCS, whose fields take
    // effect at the next VM entry (which is the unsafe step: `enter`).
    unsafe {
        asm!(
            "vmwrite {field}, {value}",
            "setc {carry}",
            "setz {zero}",
            field = in(reg) u64::from(field.encoding()),
            value = in(reg) value,
            carry = out(reg_byte) carry,
            zero = out(reg_byte) zero,
            options(nostack),
        );
    }
    result(carry, zero)
}

/// INVEPT: drops the cached translations derived from the EPT of `eptp`
/// (single context) or of every EPT.
pub fn invept(kind: InveptType, eptp: u64) -> Result<(), VmFail> {
    let descriptor: [u64; 2] = [eptp, 0];
    let carry: u8;
    let zero: u8;
    // SAFETY: INVEPT only invalidates TLB and paging-structure caches; the
    // descriptor is a live local.
    unsafe {
        asm!(
            "invept {kind}, [{descriptor}]",
            "setc {carry}",
            "setz {zero}",
            kind = in(reg) kind as u64,
            descriptor = in(reg) &descriptor,
            carry = out(reg_byte) carry,
            zero = out(reg_byte) zero,
            options(nostack),
        );
    }
    result(carry, zero)
}

/// INVVPID types the kernel uses (SDM Vol. 2B, "INVVPID—Invalidate
/// Translations Based on VPID").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum InvvpidType {
    SingleContext = 1,
    AllContext = 2,
}

/// INVVPID: drops the linear and combined translations tagged with `vpid`
/// (every VPID's with `AllContext`).
pub fn invvpid(kind: InvvpidType, vpid: u16) -> Result<(), VmFail> {
    let descriptor: [u64; 2] = [u64::from(vpid), 0];
    let carry: u8;
    let zero: u8;
    // SAFETY: INVVPID only invalidates TLB and paging-structure caches; the
    // descriptor is a live local.
    unsafe {
        asm!(
            "invvpid {kind}, [{descriptor}]",
            "setc {carry}",
            "setz {zero}",
            kind = in(reg) kind as u64,
            descriptor = in(reg) &descriptor,
            carry = out(reg_byte) carry,
            zero = out(reg_byte) zero,
            options(nostack),
        );
    }
    result(carry, zero)
}

/// The guest registers the VMCS does not hold (RSP, RIP and RFLAGS are in
/// it), in the layout `vmx_enter` loads and stores. CR2 is here because
/// VMX does not switch it.
#[repr(C)]
#[derive(Clone, Debug, Default)]
pub struct GuestRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub cr2: u64,
}

const ENTER_EXITED: u64 = 0;
const ENTER_FAIL_INVALID: u64 = 1;
const ENTER_FAIL_VALID: u64 = 2;

extern "C" {
    fn vmx_enter(registers: *mut GuestRegisters, launched: u64) -> u64;
    fn vmx_exit();
}

/// HOST_RIP: where a VM exit continues, inside `vmx_enter`.
pub fn host_rip() -> u64 {
    vmx_exit as *const () as u64
}

/// Enters the guest of the current VMCS with VMLAUNCH (`launched` false) or
/// VMRESUME, and returns at its next VM exit. HOST_RSP is written here;
/// HOST_RIP must be [`host_rip`]. `Err` if the entry failed as an
/// instruction (VMfailInvalid / VMfailValid): nothing of the guest ran.
///
/// # Safety
/// The current VMCS must be fully set up: host state describing this CPU
/// and the kernel (CR3 of the running address space, GS base of this CPU,
/// selectors of this GDT), guest-physical space of frames the guest may
/// use. Host interrupts must be disabled.
pub unsafe fn enter(registers: &mut GuestRegisters, launched: bool) -> Result<(), VmFail> {
    // SAFETY: forwarded from the caller; `registers` is valid for reads and
    // writes for the whole call and `vmx_enter` preserves the callee-saved
    // registers and the stack.
    match unsafe { vmx_enter(registers, u64::from(launched)) } {
        ENTER_EXITED => Ok(()),
        ENTER_FAIL_INVALID => Err(VmFail::Invalid),
        _ => Err(VmFail::Valid),
    }
}

core::arch::global_asm!(
    ".pushsection .text.vmx_enter, \"ax\"",
    ".global vmx_enter",
    ".global vmx_exit",
    // rdi = guest registers, rsi = launched.
    "vmx_enter:",
    "    push rbx",
    "    push rbp",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    push rdi",
    // The exit comes back with this stack: [registers][r15]...[rbx][ret].
    "    mov rax, {host_rsp}",
    "    vmwrite rax, rsp",
    "    jbe 2f",
    // CR2 is not in the VMCS; writing it serializes, so only if it differs.
    "    mov rax, cr2",
    "    cmp rax, [rdi + {cr2}]",
    "    je 5f",
    "    mov rax, [rdi + {cr2}]",
    "    mov cr2, rax",
    "5:",
    "    test rsi, rsi",
    "    mov rax, [rdi + {rax}]",
    "    mov rbx, [rdi + {rbx}]",
    "    mov rcx, [rdi + {rcx}]",
    "    mov rdx, [rdi + {rdx}]",
    "    mov rsi, [rdi + {rsi}]",
    "    mov rbp, [rdi + {rbp}]",
    "    mov r8, [rdi + {r8}]",
    "    mov r9, [rdi + {r9}]",
    "    mov r10, [rdi + {r10}]",
    "    mov r11, [rdi + {r11}]",
    "    mov r12, [rdi + {r12}]",
    "    mov r13, [rdi + {r13}]",
    "    mov r14, [rdi + {r14}]",
    "    mov r15, [rdi + {r15}]",
    "    mov rdi, [rdi + {rdi}]",
    // MOVs keep the flags of the TEST.
    "    jnz 3f",
    "    vmlaunch",
    "    jmp 2f",
    "3:",
    "    vmresume",
    // Still here: the entry failed; CF = VMfailInvalid, ZF = VMfailValid.
    "2:",
    "    mov eax, {fail_invalid}",
    "    jc 4f",
    "    mov eax, {fail_valid}",
    "    jmp 4f",
    "vmx_exit:",
    "    push rax",
    "    mov rax, [rsp + 8]",
    "    mov [rax + {rbx}], rbx",
    "    mov [rax + {rcx}], rcx",
    "    mov [rax + {rdx}], rdx",
    "    mov [rax + {rsi}], rsi",
    "    mov [rax + {rdi}], rdi",
    "    mov [rax + {rbp}], rbp",
    "    mov [rax + {r8}], r8",
    "    mov [rax + {r9}], r9",
    "    mov [rax + {r10}], r10",
    "    mov [rax + {r11}], r11",
    "    mov [rax + {r12}], r12",
    "    mov [rax + {r13}], r13",
    "    mov [rax + {r14}], r14",
    "    mov [rax + {r15}], r15",
    "    pop qword ptr [rax + {rax}]",
    "    mov rbx, cr2",
    "    mov [rax + {cr2}], rbx",
    "    mov eax, {exited}",
    "4:",
    "    add rsp, 8",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    ".popsection",
    host_rsp = const VmcsField::HostRsp as u32,
    fail_invalid = const ENTER_FAIL_INVALID,
    fail_valid = const ENTER_FAIL_VALID,
    exited = const ENTER_EXITED,
    rax = const core::mem::offset_of!(GuestRegisters, rax),
    rbx = const core::mem::offset_of!(GuestRegisters, rbx),
    rcx = const core::mem::offset_of!(GuestRegisters, rcx),
    rdx = const core::mem::offset_of!(GuestRegisters, rdx),
    rsi = const core::mem::offset_of!(GuestRegisters, rsi),
    rdi = const core::mem::offset_of!(GuestRegisters, rdi),
    rbp = const core::mem::offset_of!(GuestRegisters, rbp),
    r8 = const core::mem::offset_of!(GuestRegisters, r8),
    r9 = const core::mem::offset_of!(GuestRegisters, r9),
    r10 = const core::mem::offset_of!(GuestRegisters, r10),
    r11 = const core::mem::offset_of!(GuestRegisters, r11),
    r12 = const core::mem::offset_of!(GuestRegisters, r12),
    r13 = const core::mem::offset_of!(GuestRegisters, r13),
    r14 = const core::mem::offset_of!(GuestRegisters, r14),
    r15 = const core::mem::offset_of!(GuestRegisters, r15),
    cr2 = const core::mem::offset_of!(GuestRegisters, cr2),
);

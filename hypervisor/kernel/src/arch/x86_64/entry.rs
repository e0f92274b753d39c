//! Entries into the kernel: interrupt/exception stubs and SYSCALL. Both build
//! the same [`TrapFrame`] on the kernel stack and call into Rust with it.

use super::cpu;
use super::gdt::{KERNEL_CS, SYSRET_BASE, USER_CS, USER_DS};
use super::percpu::{PERCPU_KERNEL_RSP, PERCPU_STACK_TOP, PERCPU_USER_RSP};
use x86::msr;

/// The `vector` of a frame built by the SYSCALL entry.
pub const SYSCALL_VECTOR: u64 = 0x100;
/// Exceptions that push an error code: 8, 10-14, 17, 21, 29, 30.
const ERROR_CODE_VECTORS: u64 = 0x6022_7d00;

/// Registers of the interrupted context, in stack order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrapFrame {
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
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    #[allow(dead_code)]
    pub fn is_user(&self) -> bool {
        self.cs & 3 == 3
    }

    /// A handler activation: starts at `rip` with `rsp`, the portal id in
    /// `rax`, the message in the argument registers, everything else 0.
    pub fn start_activation(&mut self, rip: u64, rsp: u64, id: u64, words: [u64; 6]) {
        *self = Self {
            rax: id,
            rdi: words[0],
            rsi: words[1],
            rdx: words[2],
            r10: words[3],
            r8: words[4],
            r9: words[5],
            ..Self::new_user(rip, rsp)
        };
    }

    /// A fresh user-mode context starting at `rip` with stack `rsp`.
    pub fn new_user(rip: u64, rsp: u64) -> Self {
        Self {
            rip,
            rsp,
            cs: USER_CS.into(),
            ss: USER_DS.into(),
            rflags: RFLAGS_IF | RFLAGS_RESERVED,
            ..Self::default()
        }
    }
}

const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IF: u64 = 1 << 9;
/// Cleared on SYSCALL: TF, IF, DF, IOPL, NT, RF, AC.
const SYSCALL_RFLAGS_MASK: u64 = 0x4_7700;

const _: () = assert!(core::mem::size_of::<TrapFrame>() == 22 * 8);

core::arch::global_asm!(
    // The general registers in TrapFrame order (rax lowest).
    ".macro push_gprs",
    "    push r15; push r14; push r13; push r12; push r11; push r10; push r9; push r8",
    "    push rbp; push rdi; push rsi; push rdx; push rcx; push rbx; push rax",
    ".endm",
    ".macro pop_gprs",
    "    pop rax; pop rbx; pop rcx; pop rdx; pop rsi; pop rdi; pop rbp",
    "    pop r8; pop r9; pop r10; pop r11; pop r12; pop r13; pop r14; pop r15",
    ".endm",

    // One 16-byte stub per vector: push a zero error code where the CPU
    // pushes none, push the vector, join the common path.
    ".pushsection .text.interrupt_stubs, \"ax\"",
    ".balign 16",
    ".global interrupt_stubs",
    "interrupt_stubs:",
    ".set vector, 0",
    ".rept 256",
    "    .balign 16",
    "    .if vector < 32",
    "        .if ((({errmask}) >> vector) & 1) == 0",
    "            push 0",
    "        .endif",
    "    .else",
    "        push 0",
    "    .endif",
    "    push vector",
    "    jmp interrupt_common",
    "    .set vector, vector + 1",
    ".endr",

    // From user mode the CPU pushed the frame at TSS.RSP0, the end of the
    // running EC's register area, so the registers land in the EC; Rust
    // code then runs on the kernel stack and returns the frame to resume.
    "interrupt_common:",
    "    test byte ptr [rsp + 24], 3",
    "    jz 2f",
    "    swapgs",
    "    push_gprs",
    "    mov rdi, rsp",
    "    mov rsp, gs:[{stack_top}]",
    "    cld",
    "    call {user_interrupt}",
    "    mov rdi, rax",
    "    jmp return_to_frame",
    // From kernel mode (the idle loop, or a kernel fault): on this stack.
    "2:",
    "    push_gprs",
    "    mov rdi, rsp",
    "    cld",
    "    call {kernel_interrupt}",
    "    pop_gprs",
    "    add rsp, 16",
    "    iretq",

    ".global return_to_frame",
    // rdi = the frame of a user context to enter.
    "return_to_frame:",
    "    mov rsp, rdi",
    "    pop_gprs",
    "    add rsp, 16",
    "    swapgs",
    "    iretq",

    // SYSCALL: rcx = user rip, r11 = user rflags, interrupts masked. The
    // frame is built in the running EC's register area, like an interrupt's.
    ".global syscall_entry",
    "syscall_entry:",
    "    swapgs",
    "    mov gs:[{user_rsp}], rsp",
    "    mov rsp, gs:[{kernel_rsp}]",
    "    push {user_ss}",
    "    push gs:[{user_rsp}]",
    "    push r11",
    "    push {user_cs}",
    "    push rcx",
    "    push 0",
    "    push {syscall_vector}",
    "    push_gprs",
    "    mov rdi, rsp",
    "    mov rsp, gs:[{stack_top}]",
    "    cld",
    "    call {syscall}",
    "    mov rdi, rax",
    "    jmp return_to_frame",
    ".popsection",
    errmask = const ERROR_CODE_VECTORS,
    user_interrupt = sym super::trap::user_interrupt,
    kernel_interrupt = sym super::trap::kernel_interrupt,
    syscall = sym crate::syscall::syscall_entry,
    stack_top = const PERCPU_STACK_TOP,
    user_rsp = const PERCPU_USER_RSP,
    kernel_rsp = const PERCPU_KERNEL_RSP,
    user_ss = const USER_DS as u64,
    user_cs = const USER_CS as u64,
    syscall_vector = const SYSCALL_VECTOR,
);

extern "C" {
    static interrupt_stubs: u8;
    fn syscall_entry();
    fn return_to_frame(frame: *const TrapFrame) -> !;
}

/// The entry stub of `vector`.
pub fn stub_address(vector: u8) -> u64 {
    let base = core::ptr::addr_of!(interrupt_stubs) as u64;
    base + 16 * u64::from(vector)
}

/// Enables SYSCALL/SYSRET and points LSTAR at the entry.
pub fn init_syscall() {
    let efer = cpu::read_msr(msr::IA32_EFER);
    cpu::write_msr(msr::IA32_EFER, efer | 1); // SCE
    let star = (u64::from(SYSRET_BASE) << 48) | (u64::from(KERNEL_CS) << 32);
    cpu::write_msr(msr::IA32_STAR, star);
    cpu::write_msr(msr::IA32_LSTAR, syscall_entry as *const () as u64);
    cpu::write_msr(msr::IA32_FMASK, SYSCALL_RFLAGS_MASK);
}

/// Leaves the kernel for the user context in `frame`.
///
/// # Safety
/// `frame` must be the register area of an EC prepared for entry
/// (`Kernel::prepare_switch`): a user-mode context (CS and SS with RPL 3, a
/// canonical rip) that stays valid until the iret has read it.
pub unsafe fn enter_user(frame: *const TrapFrame) -> ! {
    // SAFETY: forwarded from the caller.
    unsafe { return_to_frame(frame) }
}

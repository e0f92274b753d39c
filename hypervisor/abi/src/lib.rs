//! The kernel ABI, shared by the kernel and the user runtime.
//!
//! A call is a `syscall` instruction. `rax` holds the call number (bits
//! 0..8), flags (bits 8..16) and the selector of the object the call acts on
//! (bits 16..64); the arguments are in `rdi`, `rsi`, `rdx`, `r10`, `r8`,
//! `r9`. The kernel returns a [`Status`] in `rax`; IPC calls return message
//! words in the argument registers. `rcx` and `r11` are clobbered by the
//! instruction itself; every other register is preserved unless the call
//! says otherwise. README.md documents every call; [`syscall`] has each
//! call's arguments as a typed view, which both sides use.
#![no_std]
#![forbid(unsafe_code)]

mod status;
pub mod syscall;
mod utcb;
pub mod vcpu;

pub use status::Status;
pub use utcb::{
    exception_reply, BootInfo, BootModule, ExceptionMessage, TypedItem, Utcb, BOOT_INFO_MAGIC,
    BOOT_MODULES_MAX, TYPED_COUNT_MAX, UTCB_WORDS,
};

/// Largest number of bytes one `console_write` call takes.
pub const CONSOLE_WRITE_MAX: usize = 4096;
/// Message words carried in registers (`rdi`, `rsi`, `rdx`, `r10`, `r8`, `r9`).
pub const MESSAGE_REGISTERS: usize = 6;
/// Scheduling priorities: 0 (lowest) to 63.
pub const PRIORITIES: u8 = 64;
pub const PAGE_SIZE: u64 = 4096;
/// `create_ec`: the CPU number travels in the low 12 bits of the UTCB
/// address (as in NOVA); this value there means the calling EC's CPU.
pub const CPU_OF_CALLER: u64 = 0xfff;

/// The kernel's debug event, as a GSI of the IRQ space: `irq_assign` of
/// it ties a semaphore to the kernel's state dump (an NMI, see
/// docs/architecture.md "A stalled run explains itself"), which ups the
/// semaphore after printing the kernel's part, so that the holder prints
/// its own. No device interrupt has this number; `irq_unmask` of it does
/// nothing.
pub const DEBUG_GSI: u64 = 255;
/// Message-signalled interrupts, as keys of the IRQ space after the
/// GSIs: `MSI_FIRST + n` is MSI `n`. `irq_assign` of one routes it to a
/// semaphore and tells the MSI address and data a device must write to
/// raise it; it is edge-triggered and never masked by the kernel.
pub const MSI_FIRST: u64 = 256;
pub const MSI_COUNT: u64 = 16;
/// The end (exclusive) of the IRQ space's keys.
pub const IRQ_KEYS: u64 = MSI_FIRST + MSI_COUNT;

/// Semaphores the debug event ups at most (one per `irq_assign` of it).
pub const DEBUG_SMS_MAX: usize = 16;

/// Call numbers (`rax` bits 0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Call {
    ConsoleWrite = 0,
    Exit = 1,
    Call = 2,
    Reply = 3,
    CreatePd = 4,
    CreateEc = 5,
    CreateSc = 6,
    CreatePt = 7,
    CreateSm = 8,
    SmUp = 9,
    SmDown = 10,
    Delegate = 11,
    Revoke = 12,
    IrqAssign = 13,
    IrqUnmask = 14,
    CreateVcpu = 15,
    VcpuRun = 16,
    VcpuPoke = 17,
    MapDevice = 18,
    MemPhys = 19,
}

impl Call {
    pub const ALL: [Call; 20] = [
        Call::ConsoleWrite,
        Call::Exit,
        Call::Call,
        Call::Reply,
        Call::CreatePd,
        Call::CreateEc,
        Call::CreateSc,
        Call::CreatePt,
        Call::CreateSm,
        Call::SmUp,
        Call::SmDown,
        Call::Delegate,
        Call::Revoke,
        Call::IrqAssign,
        Call::IrqUnmask,
        Call::CreateVcpu,
        Call::VcpuRun,
        Call::VcpuPoke,
        Call::MapDevice,
        Call::MemPhys,
    ];

    pub const fn number(self) -> u8 {
        self as u8
    }
}

impl TryFrom<u8> for Call {
    type Error = Status;

    fn try_from(number: u8) -> Result<Self, Status> {
        Ok(match number {
            0 => Call::ConsoleWrite,
            1 => Call::Exit,
            2 => Call::Call,
            3 => Call::Reply,
            4 => Call::CreatePd,
            5 => Call::CreateEc,
            6 => Call::CreateSc,
            7 => Call::CreatePt,
            8 => Call::CreateSm,
            9 => Call::SmUp,
            10 => Call::SmDown,
            11 => Call::Delegate,
            12 => Call::Revoke,
            13 => Call::IrqAssign,
            14 => Call::IrqUnmask,
            15 => Call::CreateVcpu,
            16 => Call::VcpuRun,
            17 => Call::VcpuPoke,
            18 => Call::MapDevice,
            19 => Call::MemPhys,
            _ => return Err(Status::BadCall),
        })
    }
}

/// Flags (`rax` bits 8..16); which apply is said per call.
pub mod flags {
    /// `call`, `sm_down`: fail with `WouldBlock` instead of waiting.
    pub const NONBLOCK: u8 = 1 << 0;
    /// `create_ec`: the EC is a portal handler (no SC of its own; it runs
    /// when a portal bound to it is called, on the caller's SC).
    pub const HANDLER: u8 = 1 << 1;
    /// `revoke`: remove the named capabilities themselves too, not only
    /// what was delegated from them.
    pub const SELF: u8 = 1 << 2;
    /// `create_pd`: a VM, whose memory space is guest-physical (EPT/NPT).
    pub const VM: u8 = 1 << 3;
    /// `create_pd` with `VM`: the guest IPC hypercall may be made from
    /// guest CPL 3 too (otherwise only from CPL 0-2).
    pub const USER_HYPERCALLS: u8 = 1 << 4;
    /// `console_write`: the bytes go to the console as they are (escape
    /// sequences, `\r`, backspace), not sanitised; only for a PD that
    /// holds the console UART's data port ([`CONSOLE_PORT`]).
    pub const RAW: u8 = 1 << 5;
}

/// COM1's data port: holding it (`IO_ACCESS`) is what lets a PD write raw
/// bytes with `console_write` and `flags::RAW` — it could drive the UART
/// itself anyway.
pub const CONSOLE_PORT: u64 = 0x3f8;

/// The decoded `rax` of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallWord {
    pub number: u8,
    pub flags: u8,
    pub selector: u64,
}

/// Largest selector (48 bits).
pub const SELECTOR_MAX: u64 = (1 << 48) - 1;

impl CallWord {
    pub const fn new(call: Call, flags: u8, selector: u64) -> Self {
        Self {
            number: call.number(),
            flags,
            selector,
        }
    }

    pub const fn encode(self) -> u64 {
        self.number as u64 | (self.flags as u64) << 8 | (self.selector & SELECTOR_MAX) << 16
    }

    pub const fn decode(rax: u64) -> Self {
        Self {
            number: rax as u8,
            flags: (rax >> 8) as u8,
            selector: rax >> 16,
        }
    }
}

/// The kinds of capability space each PD has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Space {
    /// Kernel objects, by selector.
    Object = 0,
    /// Memory, by virtual page number (address / 4096).
    Memory = 1,
    /// I/O ports, by port number.
    Io = 2,
    /// Interrupts, by global system interrupt (GSI) number.
    Irq = 3,
}

impl TryFrom<u64> for Space {
    type Error = Status;

    fn try_from(value: u64) -> Result<Self, Status> {
        match value {
            0 => Ok(Space::Object),
            1 => Ok(Space::Memory),
            2 => Ok(Space::Io),
            3 => Ok(Space::Irq),
            _ => Err(Status::BadParameter),
        }
    }
}

/// Rights bits, whose meaning depends on what the capability names.
pub mod rights {
    /// PD: create objects charged to it, delegate into it, destroy it (by
    /// revoking).
    pub const PD_CONTROL: u8 = 1 << 0;
    /// EC: bind an SC (global EC) or portals (handler EC) to it.
    pub const EC_BIND: u8 = 1 << 0;
    /// SC: reserved for scheduling control.
    pub const SC_CONTROL: u8 = 1 << 0;
    /// PT: call it.
    pub const PT_CALL: u8 = 1 << 0;
    /// SM: up.
    pub const SM_UP: u8 = 1 << 0;
    /// SM: down.
    pub const SM_DOWN: u8 = 1 << 1;
    /// Memory: read, write, execute.
    pub const MEM_READ: u8 = 1 << 0;
    pub const MEM_WRITE: u8 = 1 << 1;
    pub const MEM_EXECUTE: u8 = 1 << 2;
    /// Memory: learn the page's physical address (`mem_phys`), e.g. to
    /// hand it to a device for DMA. Without an IOMMU a device can reach
    /// all memory, so the root task gives this right only to memory a
    /// manifest marks `dma`, and only a trusted driver should get that.
    pub const MEM_DMA: u8 = 1 << 3;
    /// vCPU: run it and poke it.
    pub const VCPU_RUN: u8 = 1 << 0;
    /// I/O port: access it.
    pub const IO_ACCESS: u8 = 1 << 0;
    /// Interrupt: assign it to a semaphore and unmask it.
    pub const IRQ_CONTROL: u8 = 1 << 0;
    pub const ALL: u8 = 0xff;
}

/// Selectors the kernel fills in the object space of every new PD.
pub mod selectors {
    /// The PD itself (with `PD_CONTROL`).
    pub const SELF_PD: u64 = 0;
    /// The root task's first EC and its SC (root task only).
    pub const ROOT_EC: u64 = 1;
    pub const ROOT_SC: u64 = 2;
    /// The first selector free for the PD's own use.
    pub const FIRST_FREE: u64 = 16;
}

/// Fixed addresses of every task's address space.
///
/// A task starts at its ELF entry with `rsp` 16-byte aligned and pointing at
/// a `u64` length `n` followed by `n` bytes of its argument string (UTF-8).
/// Its first EC's UTCB is at [`layout::MAIN_UTCB`]; its stack ends at
/// [`layout::STACK_TOP`]. The kernel sets the root task up this way, and the
/// root task does the same for the components it starts.
pub mod layout {
    /// The root task's read-only [`crate::BootInfo`] page.
    pub const BOOT_INFO: u64 = 0x0000_7fff_f000_0000;
    /// User addresses are below this (the canonical lower half).
    pub const USER_END: u64 = 0x0000_8000_0000_0000;
    /// The UTCB of a task's first EC.
    pub const MAIN_UTCB: u64 = 0x0000_7fff_f000_1000;
    /// The top of a task's first stack (exclusive).
    pub const STACK_TOP: u64 = 0x0000_7fff_e000_0000;
    /// The root task's stack size; components get what the root gives.
    pub const ROOT_STACK_SIZE: u64 = 64 * 1024;
    /// Where the kernel maps the root task's memory pool.
    pub const ROOT_POOL: u64 = 0x0000_1000_0000_0000;
    /// Where the kernel maps the other boot modules into the root task
    /// (each page aligned, one after the other).
    pub const ROOT_MODULES: u64 = 0x0000_2000_0000_0000;
}

/// `rax` of the guest IPC hypercall: this value plus the portal's selector
/// in the VM's object space (see README.md, "The guest IPC hypercall").
pub const HYPERCALL_IPC: u64 = 0x4d4f_4154_0000_0000;
/// Mask of the portal selector in a hypercall's `rax`.
pub const HYPERCALL_SELECTOR_MASK: u64 = 0xffff_ffff;

/// The vector of an [`ExceptionMessage`] that reports an `exit` call rather
/// than a CPU exception.
pub const EXIT_VECTOR: u64 = 0x100;

/// Exit codes `EXIT_WITH_VALUE + v` (`v` a byte) of the root task ask the
/// kernel, when it stops the machine (`debug-exit`), to write `v` to QEMU's
/// isa-debug-exit port instead of its own "done" value, so that the
/// emulator's exit status is `(v << 1) | 1`; the root task passes on what
/// a component (a VMM whose guest wrote `v` there) exited with.
pub const EXIT_WITH_VALUE: u64 = 0x100;

/// The byte an exit code asks to be written to the debug-exit port, if it
/// is one of `EXIT_WITH_VALUE..=EXIT_WITH_VALUE + 0xff`.
pub fn exit_value(code: u64) -> Option<u8> {
    code.checked_sub(EXIT_WITH_VALUE)
        .and_then(|v| u8::try_from(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_values_are_one_byte_above_the_base() {
        assert_eq!(exit_value(EXIT_WITH_VALUE + 0x31), Some(0x31));
        assert_eq!(exit_value(EXIT_WITH_VALUE), Some(0));
        assert_eq!(exit_value(EXIT_WITH_VALUE + 0x100), None);
        assert_eq!(exit_value(1), None);
        assert_eq!(exit_value(u64::MAX), None);
    }

    #[test]
    fn call_numbers_round_trip() {
        for call in Call::ALL {
            assert_eq!(Call::try_from(call.number()), Ok(call));
        }
        assert_eq!(Call::try_from(Call::ALL.len() as u8), Err(Status::BadCall));
        assert_eq!(Call::try_from(u8::MAX), Err(Status::BadCall));
    }

    #[test]
    fn call_word_round_trips() {
        for call in Call::ALL {
            for flags in [0, flags::NONBLOCK, 0xff] {
                for selector in [0, 1, 4095, SELECTOR_MAX] {
                    let word = CallWord::new(call, flags, selector);
                    assert_eq!(CallWord::decode(word.encode()), word);
                }
            }
        }
        // A selector wider than 48 bits is cut, never spills into flags.
        let wide = CallWord::new(Call::Call, 0, u64::MAX).encode();
        assert_eq!(CallWord::decode(wide).flags, 0);
        assert_eq!(CallWord::decode(wide).selector, SELECTOR_MAX);
    }

    #[test]
    fn spaces_decode() {
        for space in [Space::Object, Space::Memory, Space::Io, Space::Irq] {
            assert_eq!(Space::try_from(space as u64), Ok(space));
        }
        assert_eq!(Space::try_from(4), Err(Status::BadParameter));
    }
}

//! The vCPU state the emulator reads and changes: a plain copy the VMM
//! fills from its vCPU state page before emulating and writes back after.
#![forbid(unsafe_code)]

/// Segment access rights in VMX form (the VMCS "access rights" field; an
/// SVM VMM converts from the VMCB's packed attribute word).
pub mod access {
    /// Descriptor type (bits 0-3); for code segments bit 3 is set.
    pub const TYPE_MASK: u32 = 0xf;
    /// S: code/data (1) versus system (0) descriptor.
    pub const S: u32 = 1 << 4;
    pub const DPL_SHIFT: u32 = 5;
    pub const DPL_MASK: u32 = 3 << DPL_SHIFT;
    /// P: present.
    pub const P: u32 = 1 << 7;
    pub const AVL: u32 = 1 << 12;
    /// L: 64-bit code segment (only meaningful with EFER.LMA).
    pub const L: u32 = 1 << 13;
    /// D/B: default operand and address size 32 (code) / big stack (data).
    pub const DB: u32 = 1 << 14;
    /// G: limit in 4 KiB units.
    pub const G: u32 = 1 << 15;
    /// VMX "segment unusable" (null selector loaded).
    pub const UNUSABLE: u32 = 1 << 16;
}

pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const WP: u64 = 1 << 16;
    pub const PG: u64 = 1 << 31;
}

pub mod cr4 {
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const LA57: u64 = 1 << 12;
    pub const SMEP: u64 = 1 << 20;
    pub const SMAP: u64 = 1 << 21;
}

pub mod efer {
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
}

pub mod rflags {
    pub const CF: u64 = 1 << 0;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    /// The flags the arithmetic and logic instructions define.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
}

/// A segment register with its hidden (cached descriptor) part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// VMX access-rights layout, see [`access`].
    pub access: u32,
}

impl Segment {
    pub fn dpl(&self) -> u8 {
        ((self.access & access::DPL_MASK) >> access::DPL_SHIFT) as u8
    }
}

/// The registers the emulator needs. `gpr` is in encoding order:
/// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 (see [`Gpr`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
}

/// Indices into [`CpuState::gpr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Gpr {
    Rax,
    Rcx,
    Rdx,
    Rbx,
    Rsp,
    Rbp,
    Rsi,
    Rdi,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
}

/// Execution mode, from CR0.PE, RFLAGS.VM, EFER.LMA, CS.L and CS.D.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Real,
    /// Legacy protected mode (including virtual-8086, which is 16-bit).
    Protected16,
    Protected32,
    /// A 16- or 32-bit code segment under long mode.
    Compat16,
    Compat32,
    Long,
}

impl Mode {
    /// Default operand/address size of the code segment, in bits.
    pub fn bits(self) -> u32 {
        match self {
            Mode::Real | Mode::Protected16 | Mode::Compat16 => 16,
            Mode::Protected32 | Mode::Compat32 => 32,
            Mode::Long => 64,
        }
    }
}

impl CpuState {
    pub fn gpr(&self, reg: Gpr) -> u64 {
        self.gpr[reg as usize]
    }

    pub fn set_gpr(&mut self, reg: Gpr, value: u64) {
        self.gpr[reg as usize] = value;
    }

    pub fn mode(&self) -> Mode {
        let big = self.cs.access & access::DB != 0;
        if self.cr0 & cr0::PE == 0 {
            Mode::Real
        } else if self.efer & efer::LMA != 0 {
            if self.cs.access & access::L != 0 {
                Mode::Long
            } else if big {
                Mode::Compat32
            } else {
                Mode::Compat16
            }
        } else if big && self.rflags & rflags::VM == 0 {
            Mode::Protected32
        } else {
            Mode::Protected16
        }
    }

    /// Current privilege level: SS.DPL as VMX keeps it (an SVM VMM copies
    /// the VMCB's CPL there); 0 in real mode, 3 in virtual-8086 mode.
    pub fn cpl(&self) -> u8 {
        if self.cr0 & cr0::PE == 0 {
            0
        } else if self.rflags & rflags::VM != 0 {
            3
        } else {
            self.ss.dpl()
        }
    }
}

//! A decoder for the few instructions behind the exits the test VMM
//! handles: port I/O (including string forms), HLT, CPUID, RDMSR, WRMSR,
//! VMCALL/VMMCALL and the `mov` forms of an MMIO access. It gives the
//! length (QEMU's SVM reports none: no NRIP save, no decode assists) and
//! what the VMM needs to emulate the access. Anything else is an error;
//! no input makes it panic.

/// The default operand and address size of the code segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeSize {
    Bits16,
    Bits32,
    Bits64,
}

impl CodeSize {
    /// From the guest's state: 64-bit with EFER.LMA and CS.L, else CS.D/B.
    pub fn of(efer: u64, cs_access: u32) -> Self {
        const EFER_LMA: u64 = 1 << 10;
        const CS_L: u32 = 1 << 13;
        const CS_DB: u32 = 1 << 14;
        if efer & EFER_LMA != 0 && cs_access & CS_L != 0 {
            CodeSize::Bits64
        } else if cs_access & CS_DB != 0 {
            CodeSize::Bits32
        } else {
            CodeSize::Bits16
        }
    }

    pub fn bytes(self) -> u8 {
        match self {
            CodeSize::Bits16 => 2,
            CodeSize::Bits32 => 4,
            CodeSize::Bits64 => 8,
        }
    }
}

/// A general register by its encoding (0 rax … 15 r15).
pub type Reg = u8;

pub const RAX: Reg = 0;
pub const RDX: Reg = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `in`/`out` with `al`/`ax`/`eax`; `port` is the immediate, if any
    /// (else `dx`).
    In {
        size: u8,
        port: Option<u8>,
    },
    Out {
        size: u8,
        port: Option<u8>,
    },
    /// `ins`/`outs` (`rep` with `rep`), addressing with `address` bytes.
    Ins {
        size: u8,
        rep: bool,
        address: u8,
    },
    Outs {
        size: u8,
        rep: bool,
        address: u8,
    },
    Hlt,
    Cpuid,
    Rdmsr,
    Wrmsr,
    Vmcall,
    Vmmcall,
    /// A memory store of register `src`.
    Store {
        size: u8,
        src: Reg,
    },
    /// A memory store of an immediate.
    StoreImmediate {
        size: u8,
        value: u64,
    },
    /// A memory load into register `dst`.
    Load {
        size: u8,
        dst: Reg,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub len: u8,
    pub op: Op,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does.
    Truncated,
    /// More than 15 bytes.
    TooLong,
    /// An opcode this decoder does not know.
    Unsupported(u8),
    /// A `mov` between registers, or with an operand this decoder does not
    /// handle (`ah`..`bh`): not what an MMIO exit comes from.
    NotMemory,
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "truncated instruction"),
            DecodeError::TooLong => write!(f, "instruction longer than 15 bytes"),
            DecodeError::Unsupported(op) => write!(f, "unsupported opcode {op:#04x}"),
            DecodeError::NotMemory => write!(f, "not a memory operand"),
        }
    }
}

const MAX_LEN: usize = 15;

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        if self.at >= MAX_LEN {
            return Err(DecodeError::TooLong);
        }
        let b = *self.bytes.get(self.at).ok_or(DecodeError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        let end = self.at + n;
        if end > MAX_LEN {
            return Err(DecodeError::TooLong);
        }
        if end > self.bytes.len() {
            return Err(DecodeError::Truncated);
        }
        self.at = end;
        Ok(())
    }

    fn immediate(&mut self, n: usize) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for i in 0..n {
            value |= u64::from(self.byte()?) << (8 * i);
        }
        Ok(value)
    }
}

#[derive(Default)]
struct Prefixes {
    operand: bool,
    address: bool,
    rep: bool,
    /// REX bits W R X B (only in 64-bit code, only right before the opcode).
    rex: u8,
}

const REX_W: u8 = 8;
const REX_R: u8 = 4;

/// Decodes the instruction at the start of `bytes`.
pub fn decode(bytes: &[u8], code: CodeSize) -> Result<Insn, DecodeError> {
    let mut c = Cursor { bytes, at: 0 };
    let mut p = Prefixes::default();
    let opcode = loop {
        let b = c.byte()?;
        match b {
            0x66 => p.operand = true,
            0x67 => p.address = true,
            0xf3 => p.rep = true,
            // Segment overrides (the test guests' segments are flat).
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            0x40..=0x4f if code == CodeSize::Bits64 => {
                p.rex = b & 0xf;
                let next = c.byte()?;
                // A REX prefix counts only right before the opcode.
                if matches!(
                    next,
                    0x66 | 0x67 | 0xf3 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65
                ) || (0x40..=0x4f).contains(&next)
                {
                    return Err(DecodeError::Unsupported(b));
                }
                break next;
            }
            _ => break b,
        }
    };
    let operand = operand_size(code, &p);
    let address = address_size(code, &p);
    let op = match opcode {
        0xe4..=0xe7 => {
            let port = Some(c.byte()?);
            let size = if opcode & 1 == 0 { 1 } else { io_size(operand) };
            if opcode & 2 == 0 {
                Op::In { size, port }
            } else {
                Op::Out { size, port }
            }
        }
        0xec..=0xef => {
            let size = if opcode & 1 == 0 { 1 } else { io_size(operand) };
            if opcode & 2 == 0 {
                Op::In { size, port: None }
            } else {
                Op::Out { size, port: None }
            }
        }
        0x6c..=0x6f => {
            let size = if opcode & 1 == 0 { 1 } else { io_size(operand) };
            let rep = p.rep;
            if opcode & 2 == 0 {
                Op::Ins { size, rep, address }
            } else {
                Op::Outs { size, rep, address }
            }
        }
        0xf4 => Op::Hlt,
        0x0f => match c.byte()? {
            0xa2 => Op::Cpuid,
            0x30 => Op::Wrmsr,
            0x32 => Op::Rdmsr,
            0x01 => match c.byte()? {
                0xc1 => Op::Vmcall,
                0xd9 => Op::Vmmcall,
                other => return Err(DecodeError::Unsupported(other)),
            },
            other => return Err(DecodeError::Unsupported(other)),
        },
        0x88..=0x8b => {
            let size = if opcode & 1 == 0 { 1 } else { operand };
            let reg = modrm_memory(&mut c, address, &p)?;
            if size == 1 && p.rex == 0 && reg >= 4 {
                return Err(DecodeError::NotMemory);
            }
            if opcode & 2 == 0 {
                Op::Store { size, src: reg }
            } else {
                Op::Load { size, dst: reg }
            }
        }
        0xa0..=0xa3 => {
            c.skip(usize::from(address))?;
            let size = if opcode & 1 == 0 { 1 } else { operand };
            if opcode & 2 == 0 {
                Op::Load { size, dst: RAX }
            } else {
                Op::Store { size, src: RAX }
            }
        }
        0xc6 | 0xc7 => {
            let size = if opcode & 1 == 0 { 1 } else { operand };
            if modrm_memory(&mut c, address, &p)? & 7 != 0 {
                return Err(DecodeError::Unsupported(opcode));
            }
            // A 64-bit store takes a sign-extended 32-bit immediate.
            let value = match size {
                8 => c.immediate(4)? as u32 as i32 as i64 as u64,
                n => c.immediate(usize::from(n))?,
            };
            Op::StoreImmediate { size, value }
        }
        other => return Err(DecodeError::Unsupported(other)),
    };
    Ok(Insn {
        len: c.at as u8,
        op,
    })
}

fn operand_size(code: CodeSize, p: &Prefixes) -> u8 {
    if p.rex & REX_W != 0 {
        return 8;
    }
    match (code, p.operand) {
        (CodeSize::Bits16, false) | (CodeSize::Bits32 | CodeSize::Bits64, true) => 2,
        _ => 4,
    }
}

/// Port I/O is at most 32 bits wide (REX.W is ignored).
fn io_size(operand: u8) -> u8 {
    operand.min(4)
}

fn address_size(code: CodeSize, p: &Prefixes) -> u8 {
    match (code, p.address) {
        (CodeSize::Bits64, false) => 8,
        (CodeSize::Bits64, true) | (CodeSize::Bits32, false) | (CodeSize::Bits16, true) => 4,
        (CodeSize::Bits32, true) | (CodeSize::Bits16, false) => 2,
    }
}

/// Reads a ModRM byte (and SIB and displacement) naming memory; returns
/// the `reg` field with REX.R.
fn modrm_memory(c: &mut Cursor, address: u8, p: &Prefixes) -> Result<Reg, DecodeError> {
    let modrm = c.byte()?;
    let mode = modrm >> 6;
    let reg = (modrm >> 3) & 7 | if p.rex & REX_R != 0 { 8 } else { 0 };
    let rm = modrm & 7;
    if mode == 3 {
        return Err(DecodeError::NotMemory);
    }
    let displacement = if address == 2 {
        match (mode, rm) {
            (0, 6) | (2, _) => 2,
            (1, _) => 1,
            _ => 0,
        }
    } else {
        let mut base = rm;
        if rm == 4 {
            base = c.byte()? & 7;
        }
        match (mode, base) {
            (0, 5) | (2, _) => 4,
            (1, _) => 1,
            _ => 0,
        }
    };
    c.skip(displacement)?;
    Ok(reg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d64(bytes: &[u8]) -> Result<Insn, DecodeError> {
        decode(bytes, CodeSize::Bits64)
    }

    #[test]
    fn port_io() {
        assert_eq!(
            d64(&[0xee]),
            Ok(Insn {
                len: 1,
                op: Op::Out {
                    size: 1,
                    port: None
                }
            })
        );
        assert_eq!(
            d64(&[0x66, 0xef]).map(|i| (i.len, i.op)),
            Ok((
                2,
                Op::Out {
                    size: 2,
                    port: None
                }
            ))
        );
        assert_eq!(
            d64(&[0xef]).map(|i| i.op),
            Ok(Op::Out {
                size: 4,
                port: None
            })
        );
        assert_eq!(
            d64(&[0xe6, 0x80]),
            Ok(Insn {
                len: 2,
                op: Op::Out {
                    size: 1,
                    port: Some(0x80)
                }
            })
        );
        assert_eq!(
            d64(&[0xe4, 0x81]).map(|i| i.op),
            Ok(Op::In {
                size: 1,
                port: Some(0x81)
            })
        );
        assert_eq!(
            d64(&[0xed]).map(|i| i.op),
            Ok(Op::In {
                size: 4,
                port: None
            })
        );
        // 16-bit code: no prefix is 16 bits, 0x66 makes 32.
        assert_eq!(
            decode(&[0xef], CodeSize::Bits16).map(|i| i.op),
            Ok(Op::Out {
                size: 2,
                port: None
            })
        );
        assert_eq!(
            decode(&[0x66, 0xef], CodeSize::Bits16).map(|i| i.op),
            Ok(Op::Out {
                size: 4,
                port: None
            })
        );
        // REX.W does not widen port I/O.
        assert_eq!(
            d64(&[0x48, 0xef]).map(|i| i.op),
            Ok(Op::Out {
                size: 4,
                port: None
            })
        );
    }

    #[test]
    fn string_io() {
        assert_eq!(
            d64(&[0xf3, 0x6e]),
            Ok(Insn {
                len: 2,
                op: Op::Outs {
                    size: 1,
                    rep: true,
                    address: 8
                }
            })
        );
        assert_eq!(
            d64(&[0xf3, 0x6c]).map(|i| i.op),
            Ok(Op::Ins {
                size: 1,
                rep: true,
                address: 8
            })
        );
        assert_eq!(
            d64(&[0x67, 0x6f]).map(|i| (i.len, i.op)),
            Ok((
                2,
                Op::Outs {
                    size: 4,
                    rep: false,
                    address: 4
                }
            ))
        );
        assert_eq!(
            decode(&[0xf3, 0x6e], CodeSize::Bits16).map(|i| i.op),
            Ok(Op::Outs {
                size: 1,
                rep: true,
                address: 2
            })
        );
    }

    #[test]
    fn system_instructions() {
        assert_eq!(d64(&[0xf4]).map(|i| (i.len, i.op)), Ok((1, Op::Hlt)));
        assert_eq!(
            d64(&[0x0f, 0xa2]).map(|i| (i.len, i.op)),
            Ok((2, Op::Cpuid))
        );
        assert_eq!(d64(&[0x0f, 0x32]).map(|i| i.op), Ok(Op::Rdmsr));
        assert_eq!(d64(&[0x0f, 0x30]).map(|i| i.op), Ok(Op::Wrmsr));
        assert_eq!(
            d64(&[0x0f, 0x01, 0xc1]).map(|i| (i.len, i.op)),
            Ok((3, Op::Vmcall))
        );
        assert_eq!(
            d64(&[0x0f, 0x01, 0xd9]).map(|i| (i.len, i.op)),
            Ok((3, Op::Vmmcall))
        );
    }

    #[test]
    fn mmio_moves() {
        // mov [rbx], eax
        assert_eq!(
            d64(&[0x89, 0x03]),
            Ok(Insn {
                len: 2,
                op: Op::Store { size: 4, src: RAX }
            })
        );
        // mov edx, [rbx + 4]
        assert_eq!(
            d64(&[0x8b, 0x53, 0x04]),
            Ok(Insn {
                len: 3,
                op: Op::Load { size: 4, dst: RDX }
            })
        );
        // mov r9d, [rbx]
        assert_eq!(
            d64(&[0x44, 0x8b, 0x0b]),
            Ok(Insn {
                len: 3,
                op: Op::Load { size: 4, dst: 9 }
            })
        );
        // movabs eax, [0xfee00000] and back
        let moffs = [0xa1, 0, 0, 0xe0, 0xfe, 0, 0, 0, 0];
        assert_eq!(
            d64(&moffs),
            Ok(Insn {
                len: 9,
                op: Op::Load { size: 4, dst: RAX }
            })
        );
        let mut store = moffs;
        store[0] = 0xa3;
        assert_eq!(
            d64(&store).map(|i| (i.len, i.op)),
            Ok((9, Op::Store { size: 4, src: RAX }))
        );
        // mov [0x22000], eax (SIB, no base, disp32)
        assert_eq!(
            d64(&[0x89, 0x04, 0x25, 0, 0x20, 2, 0]).map(|i| i.len),
            Ok(7)
        );
        // mov rax, [rip + disp32]
        assert_eq!(
            d64(&[0x48, 0x8b, 0x05, 1, 2, 3, 4]),
            Ok(Insn {
                len: 7,
                op: Op::Load { size: 8, dst: RAX }
            })
        );
        // mov dword [rbx + 0x100], 0x12345678
        assert_eq!(
            d64(&[0xc7, 0x83, 0, 1, 0, 0, 0x78, 0x56, 0x34, 0x12]),
            Ok(Insn {
                len: 10,
                op: Op::StoreImmediate {
                    size: 4,
                    value: 0x1234_5678
                }
            })
        );
        // 16-bit addressing: mov [0x1234], ax
        assert_eq!(
            decode(&[0x89, 0x06, 0x34, 0x12], CodeSize::Bits16),
            Ok(Insn {
                len: 4,
                op: Op::Store { size: 2, src: RAX }
            })
        );
        // 32-bit moffs: 4 address bytes.
        assert_eq!(
            decode(&[0xa1, 0, 0, 0xe0, 0xfe], CodeSize::Bits32).map(|i| i.len),
            Ok(5)
        );
    }

    #[test]
    fn what_it_refuses() {
        assert_eq!(d64(&[]), Err(DecodeError::Truncated));
        assert_eq!(d64(&[0x0f]), Err(DecodeError::Truncated));
        assert_eq!(d64(&[0x89]), Err(DecodeError::Truncated));
        assert_eq!(d64(&[0xa1, 0, 0]), Err(DecodeError::Truncated));
        assert_eq!(d64(&[0x90]), Err(DecodeError::Unsupported(0x90)));
        assert_eq!(d64(&[0x89, 0xc0]), Err(DecodeError::NotMemory));
        assert_eq!(d64(&[0x88, 0x20]), Err(DecodeError::NotMemory)); // ah
        assert_eq!(d64(&[0x66; 20]), Err(DecodeError::TooLong));
        assert_eq!(
            d64(&[0x48, 0x66, 0xee]),
            Err(DecodeError::Unsupported(0x48))
        );
        // Outside 64-bit code 0x48 is an instruction (dec eax), not REX.
        assert_eq!(
            decode(&[0x48, 0xee], CodeSize::Bits32),
            Err(DecodeError::Unsupported(0x48))
        );
    }

    #[test]
    fn garbage_never_panics() {
        // Every one- and two-byte input, and pseudo-random longer ones.
        for a in 0..=255u8 {
            let _ = d64(&[a]);
            for b in 0..=255u8 {
                for code in [CodeSize::Bits16, CodeSize::Bits32, CodeSize::Bits64] {
                    let _ = decode(&[a, b], code);
                }
            }
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..100_000 {
            let mut bytes = [0u8; 16];
            for byte in &mut bytes {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            let len = (x >> 8) as usize % 17;
            if let Ok(insn) = d64(&bytes[..len]) {
                assert!(usize::from(insn.len) <= len && insn.len as usize <= MAX_LEN);
            }
        }
    }

    #[test]
    fn code_size_from_state() {
        assert_eq!(CodeSize::of(0x500, 0xa09b), CodeSize::Bits64);
        assert_eq!(CodeSize::of(0x500, 0xc09b), CodeSize::Bits32);
        assert_eq!(CodeSize::of(0, 0x9b), CodeSize::Bits16);
        // CS.L without EFER.LMA is not 64-bit code.
        assert_eq!(CodeSize::of(0, 0xa09b), CodeSize::Bits16);
    }
}

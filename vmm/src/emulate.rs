//! The instruction emulator for MMIO exits.
//!
//! [`emulate`] fetches the instruction at CS:RIP through the guest's page
//! tables, decodes it, checks that its memory operand reaches the exit's
//! guest-physical address (the guest may have changed its page tables
//! since the exit), and performs it. Handled: the forms Linux uses on
//! device memory — `mov` (all widths and directions, immediates, moffs),
//! `movzx`, `movsx`, `movsxd`, `add`/`or`/`and`/`sub`/`xor`/`cmp`/`test`
//! with a register or immediate, `xchg`, and `movs`/`stos` with or without
//! REP. Anything else, and any LOCK-prefixed form, is
//! [`Outcome::Unsupported`].
//!
//! Not modelled: segment limit and type checks (Linux runs with flat
//! segments), alignment checks, and the single-step trap (RFLAGS.TF) after
//! an emulated instruction.
#![forbid(unsafe_code)]

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction, OpKind, Register};

use crate::cpu::{cr4, rflags, CpuState, Mode};
use crate::paging::{self, AccessKind, WalkError, PAGE_SIZE};
use crate::{Exception, NotRam, Platform};

const MAX_INSN_LEN: usize = 15;
/// Elements of a REP string instruction done per call. The guest
/// re-executes the instruction for the rest, as on an interrupt, so one
/// exit never runs unbounded and pending interrupts get delivered.
pub const REP_CHUNK: u64 = 1024;
const CANONICAL_BITS_4LEVEL: u32 = 48;
const CANONICAL_BITS_5LEVEL: u32 = 57;

/// What the VMM does next. Except for `Done` and `Repeat` the vCPU state
/// is as before the call, apart from the progress a REP string
/// instruction made before a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Emulated: registers and flags updated, RIP advanced past it. The
    /// VMM clears any interrupt shadow (STI / MOV SS blocking).
    Done,
    /// A bounded chunk of a REP string instruction is done: RSI/RDI/RCX
    /// advanced, RIP unchanged. Resume the guest; it re-executes the
    /// instruction for the rest.
    Repeat,
    /// Inject this exception; RIP unchanged.
    Fault(Exception),
    /// Not an instruction this emulator handles (`Code::INVALID` for bytes
    /// that do not decode): inject #UD and log the code.
    Unsupported(Code),
    /// The instruction's memory operand does not reach the exit's address:
    /// the guest changed its page tables since the exit (or while the
    /// emulator walked them). Resume the guest unchanged; it re-executes.
    /// A VMM that sees this repeat at one RIP should stop the VM.
    Mismatch,
    /// The instruction or a page-table entry lies at this guest-physical
    /// address, which is no RAM. Stop the VM.
    NotRam(u64),
}

/// Emulate the instruction at `cpu`'s CS:RIP, which made a memory access
/// to `exit_gpa` that exited to the VMM.
pub fn emulate<P: Platform + ?Sized>(
    platform: &mut P,
    cpu: &mut CpuState,
    exit_gpa: u64,
) -> Outcome {
    let mode = cpu.mode();
    let mut emulator = Emulator {
        platform,
        cpu,
        mode,
        exit_gpa,
    };
    emulator.run().unwrap_or_else(|stop| stop)
}

/// `Err` carries an outcome that ends the emulation early.
type Step<T> = Result<T, Outcome>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Mov,
    Movzx,
    Movsx,
    Alu(Alu),
    Test,
    Xchg,
    Movs,
    Stos,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Alu {
    Add,
    Or,
    And,
    Sub,
    Xor,
    Cmp,
}

/// The operation and the width of its memory operand in bytes.
fn classify(code: Code) -> Option<(Op, usize)> {
    use Code::*;
    let alu = |code| {
        Some(match code {
            Add_rm8_r8 | Add_r8_rm8 | Add_rm8_imm8 | Add_rm8_imm8_82 => (Alu::Add, 1),
            Add_rm16_r16 | Add_r16_rm16 | Add_rm16_imm16 | Add_rm16_imm8 => (Alu::Add, 2),
            Add_rm32_r32 | Add_r32_rm32 | Add_rm32_imm32 | Add_rm32_imm8 => (Alu::Add, 4),
            Add_rm64_r64 | Add_r64_rm64 | Add_rm64_imm32 | Add_rm64_imm8 => (Alu::Add, 8),
            Or_rm8_r8 | Or_r8_rm8 | Or_rm8_imm8 | Or_rm8_imm8_82 => (Alu::Or, 1),
            Or_rm16_r16 | Or_r16_rm16 | Or_rm16_imm16 | Or_rm16_imm8 => (Alu::Or, 2),
            Or_rm32_r32 | Or_r32_rm32 | Or_rm32_imm32 | Or_rm32_imm8 => (Alu::Or, 4),
            Or_rm64_r64 | Or_r64_rm64 | Or_rm64_imm32 | Or_rm64_imm8 => (Alu::Or, 8),
            And_rm8_r8 | And_r8_rm8 | And_rm8_imm8 | And_rm8_imm8_82 => (Alu::And, 1),
            And_rm16_r16 | And_r16_rm16 | And_rm16_imm16 | And_rm16_imm8 => (Alu::And, 2),
            And_rm32_r32 | And_r32_rm32 | And_rm32_imm32 | And_rm32_imm8 => (Alu::And, 4),
            And_rm64_r64 | And_r64_rm64 | And_rm64_imm32 | And_rm64_imm8 => (Alu::And, 8),
            Sub_rm8_r8 | Sub_r8_rm8 | Sub_rm8_imm8 | Sub_rm8_imm8_82 => (Alu::Sub, 1),
            Sub_rm16_r16 | Sub_r16_rm16 | Sub_rm16_imm16 | Sub_rm16_imm8 => (Alu::Sub, 2),
            Sub_rm32_r32 | Sub_r32_rm32 | Sub_rm32_imm32 | Sub_rm32_imm8 => (Alu::Sub, 4),
            Sub_rm64_r64 | Sub_r64_rm64 | Sub_rm64_imm32 | Sub_rm64_imm8 => (Alu::Sub, 8),
            Xor_rm8_r8 | Xor_r8_rm8 | Xor_rm8_imm8 | Xor_rm8_imm8_82 => (Alu::Xor, 1),
            Xor_rm16_r16 | Xor_r16_rm16 | Xor_rm16_imm16 | Xor_rm16_imm8 => (Alu::Xor, 2),
            Xor_rm32_r32 | Xor_r32_rm32 | Xor_rm32_imm32 | Xor_rm32_imm8 => (Alu::Xor, 4),
            Xor_rm64_r64 | Xor_r64_rm64 | Xor_rm64_imm32 | Xor_rm64_imm8 => (Alu::Xor, 8),
            Cmp_rm8_r8 | Cmp_r8_rm8 | Cmp_rm8_imm8 | Cmp_rm8_imm8_82 => (Alu::Cmp, 1),
            Cmp_rm16_r16 | Cmp_r16_rm16 | Cmp_rm16_imm16 | Cmp_rm16_imm8 => (Alu::Cmp, 2),
            Cmp_rm32_r32 | Cmp_r32_rm32 | Cmp_rm32_imm32 | Cmp_rm32_imm8 => (Alu::Cmp, 4),
            Cmp_rm64_r64 | Cmp_r64_rm64 | Cmp_rm64_imm32 | Cmp_rm64_imm8 => (Alu::Cmp, 8),
            _ => return None,
        })
    };
    if let Some((op, width)) = alu(code) {
        return Some((Op::Alu(op), width));
    }
    Some(match code {
        Mov_rm8_r8 | Mov_r8_rm8 | Mov_rm8_imm8 | Mov_AL_moffs8 | Mov_moffs8_AL => (Op::Mov, 1),
        Mov_rm16_r16 | Mov_r16_rm16 | Mov_rm16_imm16 | Mov_AX_moffs16 | Mov_moffs16_AX => {
            (Op::Mov, 2)
        }
        Mov_rm32_r32 | Mov_r32_rm32 | Mov_rm32_imm32 | Mov_EAX_moffs32 | Mov_moffs32_EAX => {
            (Op::Mov, 4)
        }
        Mov_rm64_r64 | Mov_r64_rm64 | Mov_rm64_imm32 | Mov_RAX_moffs64 | Mov_moffs64_RAX => {
            (Op::Mov, 8)
        }
        Movzx_r16_rm8 | Movzx_r32_rm8 | Movzx_r64_rm8 => (Op::Movzx, 1),
        Movzx_r16_rm16 | Movzx_r32_rm16 | Movzx_r64_rm16 => (Op::Movzx, 2),
        Movsx_r16_rm8 | Movsx_r32_rm8 | Movsx_r64_rm8 => (Op::Movsx, 1),
        Movsx_r16_rm16 | Movsx_r32_rm16 | Movsx_r64_rm16 | Movsxd_r16_rm16 => (Op::Movsx, 2),
        Movsxd_r32_rm32 | Movsxd_r64_rm32 => (Op::Movsx, 4),
        Test_rm8_r8 | Test_rm8_imm8 | Test_rm8_imm8_F6r1 => (Op::Test, 1),
        Test_rm16_r16 | Test_rm16_imm16 | Test_rm16_imm16_F7r1 => (Op::Test, 2),
        Test_rm32_r32 | Test_rm32_imm32 | Test_rm32_imm32_F7r1 => (Op::Test, 4),
        Test_rm64_r64 | Test_rm64_imm32 | Test_rm64_imm32_F7r1 => (Op::Test, 8),
        Xchg_rm8_r8 => (Op::Xchg, 1),
        Xchg_rm16_r16 => (Op::Xchg, 2),
        Xchg_rm32_r32 => (Op::Xchg, 4),
        Xchg_rm64_r64 => (Op::Xchg, 8),
        Movsb_m8_m8 => (Op::Movs, 1),
        Movsw_m16_m16 => (Op::Movs, 2),
        Movsd_m32_m32 => (Op::Movs, 4),
        Movsq_m64_m64 => (Op::Movs, 8),
        Stosb_m8_AL => (Op::Stos, 1),
        Stosw_m16_AX => (Op::Stos, 2),
        Stosd_m32_EAX => (Op::Stos, 4),
        Stosq_m64_RAX => (Op::Stos, 8),
        _ => return None,
    })
}

fn width_mask(bytes: usize) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * bytes)) - 1
    }
}

fn sign_extend(value: u64, bytes: usize) -> u64 {
    let unused = 64 - 8 * bytes.clamp(1, 8) as u32;
    (((value << unused) as i64) >> unused) as u64
}

/// Result and status flags of a logic operation: CF = OF = 0, AF cleared
/// (architecturally undefined), SF/ZF/PF from the result.
fn logic_flags(result: u64, bytes: usize) -> u64 {
    let mut flags = 0;
    if result == 0 {
        flags |= rflags::ZF;
    }
    if result & (1 << (8 * bytes - 1)) != 0 {
        flags |= rflags::SF;
    }
    if (result as u8).count_ones().is_multiple_of(2) {
        flags |= rflags::PF;
    }
    flags
}

impl Alu {
    /// `a op b` on `bytes`-wide operands (already masked), with the status
    /// flags it defines.
    fn apply(self, a: u64, b: u64, bytes: usize) -> (u64, u64) {
        let mask = width_mask(bytes);
        let sign = 1u64 << (8 * bytes - 1);
        let (result, carry, overflow) = match self {
            Alu::Add => {
                let r = a.wrapping_add(b) & mask;
                let carry = u128::from(a) + u128::from(b) > u128::from(mask);
                (r, carry, (a ^ r) & (b ^ r) & sign != 0)
            }
            Alu::Sub | Alu::Cmp => {
                let r = a.wrapping_sub(b) & mask;
                (r, a < b, (a ^ b) & (a ^ r) & sign != 0)
            }
            Alu::And => return (a & b, logic_flags(a & b, bytes)),
            Alu::Or => return (a | b, logic_flags(a | b, bytes)),
            Alu::Xor => return (a ^ b, logic_flags(a ^ b, bytes)),
        };
        let mut flags = logic_flags(result, bytes);
        if carry {
            flags |= rflags::CF;
        }
        if overflow {
            flags |= rflags::OF;
        }
        if (a ^ b ^ result) & 0x10 != 0 {
            flags |= rflags::AF;
        }
        (result, flags)
    }
}

/// Which part of a GPR an iced register names.
#[derive(Clone, Copy)]
enum Part {
    Low8,
    High8,
    Word,
    Dword,
    Qword,
}

// The register-number arithmetic below relies on iced's register order.
const _: () = assert!(
    Register::AH as u32 == Register::AL as u32 + 4
        && Register::SPL as u32 == Register::AL as u32 + 8
        && Register::R15L as u32 == Register::SPL as u32 + 11
        && Register::R15W as u32 == Register::AX as u32 + 15
        && Register::R15D as u32 == Register::EAX as u32 + 15
        && Register::R15 as u32 == Register::RAX as u32 + 15
);

fn gpr_part(reg: Register) -> Option<(usize, Part)> {
    let r = reg as usize;
    let offset =
        |first: Register, count: usize| r.checked_sub(first as usize).filter(|&i| i < count);
    if let Some(i) = offset(Register::AL, 4) {
        Some((i, Part::Low8))
    } else if let Some(i) = offset(Register::AH, 4) {
        Some((i, Part::High8))
    } else if let Some(i) = offset(Register::SPL, 12) {
        Some((i + 4, Part::Low8))
    } else if let Some(i) = offset(Register::AX, 16) {
        Some((i, Part::Word))
    } else if let Some(i) = offset(Register::EAX, 16) {
        Some((i, Part::Dword))
    } else {
        offset(Register::RAX, 16).map(|i| (i, Part::Qword))
    }
}

fn gpr_read(cpu: &CpuState, reg: Register) -> Option<u64> {
    let (index, part) = gpr_part(reg)?;
    let full = *cpu.gpr.get(index)?;
    Some(match part {
        Part::Low8 => full & 0xff,
        Part::High8 => (full >> 8) & 0xff,
        Part::Word => full & 0xffff,
        Part::Dword => full & 0xffff_ffff,
        Part::Qword => full,
    })
}

/// Write as the hardware does: 8- and 16-bit writes keep the other bits,
/// 32-bit writes zero the upper half.
fn gpr_write(cpu: &mut CpuState, reg: Register, value: u64) -> Option<()> {
    let (index, part) = gpr_part(reg)?;
    let full = cpu.gpr.get_mut(index)?;
    *full = match part {
        Part::Low8 => (*full & !0xff) | (value & 0xff),
        Part::High8 => (*full & !0xff00) | ((value & 0xff) << 8),
        Part::Word => (*full & !0xffff) | (value & 0xffff),
        Part::Dword => value & 0xffff_ffff,
        Part::Qword => value,
    };
    Some(())
}

/// Up to two guest-physical pieces of one memory operand (it may cross a
/// page boundary).
#[derive(Clone, Copy, Default)]
struct Location {
    spans: [(u64, usize); 2],
}

impl Location {
    fn spans(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.spans.iter().copied().filter(|&(_, len)| len != 0)
    }

    fn covers(&self, gpa: u64) -> bool {
        self.spans()
            .any(|(start, len)| gpa.wrapping_sub(start) < len as u64)
    }
}

struct Emulator<'a, P: ?Sized> {
    platform: &'a mut P,
    cpu: &'a mut CpuState,
    mode: Mode,
    exit_gpa: u64,
}

impl<P: Platform + ?Sized> Emulator<'_, P> {
    fn run(&mut self) -> Step<Outcome> {
        let instr = self.fetch()?;
        let unsupported = Outcome::Unsupported(instr.code());
        if instr.is_invalid() || instr.has_lock_prefix() || instr.op_count() != 2 {
            return Err(unsupported);
        }
        match classify(instr.code()).ok_or(unsupported)? {
            (op @ (Op::Movs | Op::Stos), width) => self.string(&instr, op, width),
            (op, width) => {
                self.single(&instr, op, width)?;
                self.advance(&instr);
                Ok(Outcome::Done)
            }
        }
    }

    fn fetch(&mut self) -> Step<Instruction> {
        let bits = self.mode.bits();
        let rip = self.cpu.rip & width_mask(bits as usize / 8);
        let start = self.linear(Register::CS, rip)?;
        let mut bytes = [0u8; MAX_INSN_LEN];
        let (head, tail) =
            bytes.split_at_mut((PAGE_SIZE - start % PAGE_SIZE).min(MAX_INSN_LEN as u64) as usize);
        self.fetch_bytes(start, head)?;
        let (instr, short) = decode(bits, head, rip);
        if !short || tail.is_empty() {
            return Ok(instr);
        }
        // Only an instruction that needs bytes from the next page touches it.
        let next = self.canonical(start.wrapping_add(head.len() as u64), Register::CS)?;
        self.fetch_bytes(next, tail)?;
        Ok(decode(bits, &bytes, rip).0)
    }

    fn fetch_bytes(&mut self, linear: u64, buf: &mut [u8]) -> Step<()> {
        let gpa = self.translate(linear, AccessKind::Fetch)?;
        self.platform
            .read_ram(gpa, buf)
            .map_err(|NotRam(at)| Outcome::NotRam(at))
    }

    /// mov, movzx/movsx, ALU, test, xchg: one memory operand and one
    /// register or immediate.
    fn single(&mut self, instr: &Instruction, op: Op, width: usize) -> Step<()> {
        let unsupported = Outcome::Unsupported(instr.code());
        let mem = (0..2)
            .find(|&i| instr.op_kind(i) == OpKind::Memory)
            .ok_or(unsupported)?;
        let other = 1 - mem;
        // Read (and so validate) the other operand before any device access.
        let other_value = self.operand_value(instr, other).ok_or(unsupported)?;
        let mem_is_dst = mem == 0;
        let kind = match op {
            Op::Mov | Op::Alu(Alu::Add | Alu::Or | Alu::And | Alu::Sub | Alu::Xor)
                if mem_is_dst =>
            {
                AccessKind::Write
            }
            Op::Xchg => AccessKind::Write,
            _ => AccessKind::Read,
        };
        let (linear, segment) = self.operand_linear(instr, mem)?;
        let loc = self.locate(linear, segment, width, kind)?;
        if !loc.covers(self.exit_gpa) {
            return Err(Outcome::Mismatch);
        }
        let other_reg = instr.op_register(other);
        match op {
            Op::Mov if mem_is_dst => self.write(&loc, other_value),
            Op::Mov | Op::Movzx => {
                let value = self.read(&loc);
                self.set_reg(other_reg, value, unsupported)?;
            }
            Op::Movsx => {
                let value = sign_extend(self.read(&loc), width);
                self.set_reg(other_reg, value, unsupported)?;
            }
            Op::Xchg => {
                let old = self.read(&loc);
                self.write(&loc, other_value);
                self.set_reg(other_reg, old, unsupported)?;
            }
            Op::Test => {
                let value = self.read(&loc) & other_value;
                self.set_status(logic_flags(value & width_mask(width), width));
            }
            Op::Alu(alu) => {
                let in_memory = self.read(&loc);
                let other_value = other_value & width_mask(width);
                let (a, b) = if mem_is_dst {
                    (in_memory, other_value)
                } else {
                    (other_value, in_memory)
                };
                let (result, flags) = alu.apply(a, b, width);
                self.set_status(flags);
                if alu != Alu::Cmp {
                    if mem_is_dst {
                        self.write(&loc, result);
                    } else {
                        self.set_reg(other_reg, result, unsupported)?;
                    }
                }
            }
            Op::Movs | Op::Stos => return Err(unsupported),
        }
        Ok(())
    }

    /// movs/stos, with REP counting in the address size and DF choosing
    /// the direction. Either side of movs may be RAM or MMIO.
    fn string(&mut self, instr: &Instruction, op: Op, width: usize) -> Step<Outcome> {
        let unsupported = Outcome::Unsupported(instr.code());
        let (counter, source_index, dest_index) = match instr.op_kind(0) {
            OpKind::MemoryESDI => (Register::CX, Register::SI, Register::DI),
            OpKind::MemoryESEDI => (Register::ECX, Register::ESI, Register::EDI),
            OpKind::MemoryESRDI => (Register::RCX, Register::RSI, Register::RDI),
            _ => return Err(unsupported),
        };
        let rep = instr.has_rep_prefix() || instr.has_repne_prefix();
        let mut count = if rep {
            gpr_read(self.cpu, counter).ok_or(unsupported)?
        } else {
            1
        };
        let stored = match op {
            Op::Stos => self.operand_value(instr, 1).ok_or(unsupported)?,
            _ => 0,
        };
        let step = if self.cpu.rflags & rflags::DF != 0 {
            (width as u64).wrapping_neg()
        } else {
            width as u64
        };

        for element in 0..REP_CHUNK {
            if count == 0 {
                break;
            }
            let source = match op {
                Op::Movs => {
                    let (linear, segment) = self.operand_linear(instr, 1)?;
                    Some(self.locate(linear, segment, width, AccessKind::Read)?)
                }
                _ => None,
            };
            let (linear, segment) = self.operand_linear(instr, 0)?;
            let dest = self.locate(linear, segment, width, AccessKind::Write)?;
            // The exit was for the first element of this call.
            if element == 0
                && !dest.covers(self.exit_gpa)
                && !source.is_some_and(|s| s.covers(self.exit_gpa))
            {
                return Err(Outcome::Mismatch);
            }
            let value = match &source {
                Some(source) => self.read(source),
                None => stored,
            };
            self.write(&dest, value);
            if source.is_some() {
                self.add_reg(source_index, step, unsupported)?;
            }
            self.add_reg(dest_index, step, unsupported)?;
            count -= 1;
            if rep {
                self.set_reg(counter, count, unsupported)?;
            }
        }
        if count == 0 {
            self.advance(instr);
            Ok(Outcome::Done)
        } else {
            Ok(Outcome::Repeat)
        }
    }

    fn advance(&mut self, instr: &Instruction) {
        let mask = width_mask(self.mode.bits() as usize / 8);
        self.cpu.rip = self.cpu.rip.wrapping_add(instr.len() as u64) & mask;
    }

    fn set_status(&mut self, flags: u64) {
        self.cpu.rflags = (self.cpu.rflags & !rflags::STATUS) | flags;
    }

    fn set_reg(&mut self, reg: Register, value: u64, unsupported: Outcome) -> Step<()> {
        gpr_write(self.cpu, reg, value).ok_or(unsupported)
    }

    fn add_reg(&mut self, reg: Register, step: u64, unsupported: Outcome) -> Step<()> {
        let value = gpr_read(self.cpu, reg).ok_or(unsupported)?;
        self.set_reg(reg, value.wrapping_add(step), unsupported)
    }

    /// A register or immediate operand's value (immediates sign-extended
    /// as the instruction defines; the caller masks to the width).
    fn operand_value(&self, instr: &Instruction, operand: u32) -> Option<u64> {
        match instr.op_kind(operand) {
            OpKind::Register => gpr_read(self.cpu, instr.op_register(operand)),
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => Some(instr.immediate(operand)),
            _ => None,
        }
    }

    fn segment_base(&self, segment: Register) -> Option<u64> {
        let long = self.mode == Mode::Long;
        let cpu = &*self.cpu;
        Some(match segment {
            // 64-bit mode ignores the bases of ES, CS, SS and DS.
            Register::ES | Register::CS | Register::SS | Register::DS if long => 0,
            Register::ES => cpu.es.base,
            Register::CS => cpu.cs.base,
            Register::SS => cpu.ss.base,
            Register::DS => cpu.ds.base,
            Register::FS => cpu.fs.base,
            Register::GS => cpu.gs.base,
            _ => return None,
        })
    }

    /// Linear address of `segment:offset` (offset already in the address size).
    fn linear(&self, segment: Register, offset: u64) -> Step<u64> {
        let base = self.segment_base(segment).unwrap_or(0);
        self.canonical(base.wrapping_add(offset), segment)
    }

    /// Outside 64-bit mode linear addresses wrap at 4 GiB; in it they must
    /// be canonical (#SS for stack accesses, #GP otherwise).
    fn canonical(&self, linear: u64, segment: Register) -> Step<u64> {
        if self.mode != Mode::Long {
            return Ok(linear & 0xffff_ffff);
        }
        let bits = if self.cpu.cr4 & cr4::LA57 != 0 {
            CANONICAL_BITS_5LEVEL
        } else {
            CANONICAL_BITS_4LEVEL
        };
        let unused = 64 - bits;
        if (((linear << unused) as i64) >> unused) as u64 == linear {
            return Ok(linear);
        }
        let vector = if segment == Register::SS {
            Exception::SS
        } else {
            Exception::GP
        };
        Err(Outcome::Fault(Exception::with_zero_code(vector)))
    }

    /// Linear address of memory operand `operand`: every addressing form
    /// (base, index*scale, displacement, RIP-relative, 16-bit) comes from
    /// iced; registers and segment bases from the vCPU.
    fn operand_linear(&self, instr: &Instruction, operand: u32) -> Step<(u64, Register)> {
        let segment = match instr.op_kind(operand) {
            OpKind::MemoryESDI | OpKind::MemoryESEDI | OpKind::MemoryESRDI => Register::ES,
            _ => instr.memory_segment(),
        };
        let linear = instr
            .virtual_address(operand, 0, |reg, _, _| match reg {
                Register::ES
                | Register::CS
                | Register::SS
                | Register::DS
                | Register::FS
                | Register::GS => self.segment_base(reg),
                _ => gpr_read(self.cpu, reg),
            })
            .ok_or(Outcome::Unsupported(instr.code()))?;
        Ok((self.canonical(linear, segment)?, segment))
    }

    /// Translate every page an access touches before any of it is done,
    /// so a fault leaves no half-performed device access behind.
    fn locate(
        &mut self,
        linear: u64,
        segment: Register,
        width: usize,
        kind: AccessKind,
    ) -> Step<Location> {
        let head = (PAGE_SIZE - linear % PAGE_SIZE).min(width as u64) as usize;
        let mut loc = Location::default();
        loc.spans[0] = (self.translate(linear, kind)?, head);
        if head < width {
            let next = self.canonical(linear.wrapping_add(head as u64), segment)?;
            loc.spans[1] = (self.translate(next, kind)?, width - head);
        }
        Ok(loc)
    }

    fn translate(&mut self, linear: u64, kind: AccessKind) -> Step<u64> {
        paging::translate(self.platform, self.cpu, linear, kind).map_err(|error| match error {
            WalkError::PageFault(exception) => Outcome::Fault(exception),
            WalkError::TableNotRam(gpa) => Outcome::NotRam(gpa),
            WalkError::Raced => Outcome::Mismatch,
        })
    }

    /// RAM if the platform has it there, the bus otherwise.
    fn read(&mut self, loc: &Location) -> u64 {
        let mut bytes = [0u8; 8];
        let mut rest = &mut bytes[..];
        for (gpa, len) in loc.spans() {
            let (part, tail) = rest.split_at_mut(len.min(rest.len()));
            if self.platform.read_ram(gpa, part).is_err() {
                self.platform.mmio_read(gpa, part);
            }
            rest = tail;
        }
        u64::from_le_bytes(bytes)
    }

    fn write(&mut self, loc: &Location, value: u64) {
        let bytes = value.to_le_bytes();
        let mut rest = &bytes[..];
        for (gpa, len) in loc.spans() {
            let (part, tail) = rest.split_at(len.min(rest.len()));
            if self.platform.write_ram(gpa, part).is_err() {
                self.platform.mmio_write(gpa, part);
            }
            rest = tail;
        }
    }
}

/// Decode at `rip`; the flag says the bytes ran out mid-instruction.
fn decode(bits: u32, bytes: &[u8], rip: u64) -> (Instruction, bool) {
    match Decoder::try_with_ip(bits, bytes, rip, DecoderOptions::NONE) {
        Ok(mut decoder) => {
            let instr = decoder.decode();
            (instr, decoder.last_error() == DecoderError::NoMoreBytes)
        }
        Err(_) => (Instruction::default(), false),
    }
}

#[cfg(test)]
mod tests;

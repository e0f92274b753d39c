//! One guest's run: what the VMM does at each exit, on the vCPU state page
//! and the guest's RAM, until the guest ends or fails.
//!
//! Instructions are skipped by the length the CPU reported (VMX) or, when
//! it reported none (SVM without NRIP save), by the length [`decode`]
//! finds at CS:RIP in guest RAM; when both exist they must agree.

use core::fmt;

use moat_abi::vcpu::{event_kind, exit_flags, exit_on, exit_reason, group, Inject, VcpuState};
use moat_testvm::{mark, mmio, port, End, Event, PortWrite, TestGuest, CPUID_LEAF};
use moat_testvm::{CPUID_SIGNATURE, MSR_EFER, TEST_MSR};

use crate::decode::{decode, CodeSize, DecodeError, Insn, Op, Reg};
use crate::line::Line;
use crate::setup::{code_address, EFER_LMA, RFLAGS_DF, RFLAGS_IF};

/// What the VMM needs from its surroundings.
pub trait Host {
    /// CPUID on the real CPU, for the leaves the VMM passes through.
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// A line about `guest`: printed as `testvmm: <guest>: <text>`.
    fn line(&mut self, guest: &str, text: fmt::Arguments<'_>);
}

/// What to do after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Resume,
    Stop,
}

/// More exits than any test guest needs: a guest in a loop of exits.
pub const MAX_EXITS: u64 = 100_000;
/// Elements of a `rep ins`/`rep outs` done per exit; the rest re-exits.
const STRING_CHUNK: u64 = 4096;
/// CPUID leaf 1, ECX bit 31: running under a hypervisor.
const CPUID_HYPERVISOR: u32 = 1 << 31;
const RECORDED_MAX: usize = 8;
/// STI and MOV SS blocking.
const SHADOW: u32 = 0b11;
const NMI_VECTOR: u8 = 2;

/// Why a guest failed; printed after `FAIL `.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Fetch { address: u64 },
    Decode { address: u64, error: DecodeError },
    Length { reported: u64, decoded: u8 },
    NotThisExit { exit: u32, op: Op },
    Port { port: u16, input: bool },
    TooManyRecords,
    Msr { msr: u32, write: bool },
    Mmio { gpa: u64, op: Op },
    AccessKind { gpa: u64, flags: u32 },
    MemoryExit { gpa: u64 },
    NoMemoryExit { gpa: u64 },
    Exit { reason: u32, raw: u64 },
    Exception { vector: u8, error_code: u32 },
    Hypercall { rax: u64 },
    Shutdown,
    InvalidState { raw: u64, qualification: u64 },
    UnexpectedWindow,
    EventPending,
    NeverDelivered { vector: u8 },
    Marks { value: u8 },
    MarksOpen,
    ExitsBetweenMarks { exits: u64, first: u32 },
    GuestCheck { exits: u64 },
    PortWrites { seen: usize },
    TooManyExits,
}

pub fn reason_name(reason: u32) -> &'static str {
    match reason {
        exit_reason::POKED => "POKED",
        exit_reason::IO => "IO",
        exit_reason::MEMORY => "MEMORY",
        exit_reason::CPUID => "CPUID",
        exit_reason::MSR_READ => "MSR_READ",
        exit_reason::MSR_WRITE => "MSR_WRITE",
        exit_reason::HLT => "HLT",
        exit_reason::HYPERCALL => "HYPERCALL",
        exit_reason::INTERRUPT_WINDOW => "INTERRUPT_WINDOW",
        exit_reason::NMI_WINDOW => "NMI_WINDOW",
        exit_reason::EXCEPTION => "EXCEPTION",
        exit_reason::SHUTDOWN => "SHUTDOWN",
        exit_reason::INVALID_STATE => "INVALID_STATE",
        exit_reason::OTHER => "OTHER",
        _ => "unknown",
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Failure::Fetch { address } => {
                write!(f, "instruction at {address:#x} is outside guest RAM")
            }
            Failure::Decode { address, error } => write!(f, "at {address:#x}: {error}"),
            Failure::Length { reported, decoded } => write!(
                f,
                "the CPU reported instruction length {reported}, the decoder found {decoded}"
            ),
            Failure::NotThisExit { exit, op } => {
                write!(f, "{} exit at an instruction {op:?}", reason_name(exit))
            }
            Failure::Port { port, input } => {
                let dir = if input { "IN from" } else { "OUT to" };
                write!(f, "unexpected {dir} port {port:#x}")
            }
            Failure::TooManyRecords => write!(f, "too many writes to the record port"),
            Failure::Msr { msr, write } => {
                let what = if write { "WRMSR" } else { "RDMSR" };
                write!(f, "unexpected {what} {msr:#x}")
            }
            Failure::Mmio { gpa, op } => write!(f, "unsupported MMIO access {op:?} at {gpa:#x}"),
            Failure::AccessKind { gpa, flags } => write!(
                f,
                "memory exit at {gpa:#x}: access flags {flags:#x} contradict the instruction"
            ),
            Failure::MemoryExit { gpa } => write!(f, "memory exit at {gpa:#x} (not given)"),
            Failure::NoMemoryExit { gpa } => {
                write!(f, "halted without a memory exit at {gpa:#x}")
            }
            Failure::Exit { reason, raw } => {
                write!(f, "unexpected exit {} (raw {raw:#x})", reason_name(reason))
            }
            Failure::Exception { vector, error_code } => {
                write!(
                    f,
                    "exception exit, vector {vector}, error code {error_code:#x}"
                )
            }
            Failure::Hypercall { rax } => write!(f, "hypercall exit with rax {rax:#x}"),
            Failure::Shutdown => write!(f, "shutdown (triple fault)"),
            Failure::InvalidState { raw, qualification } => write!(
                f,
                "the CPU refused the guest state (raw {raw:#x}, qualification {qualification:#x})"
            ),
            Failure::UnexpectedWindow => write!(f, "a window exit with nothing to inject"),
            Failure::EventPending => {
                write!(f, "an interrupted event is pending where one is due")
            }
            Failure::NeverDelivered { vector } => {
                write!(f, "interrupt {vector:#x} was never delivered")
            }
            Failure::Marks { value } => write!(f, "mark {value} out of order"),
            Failure::MarksOpen => write!(f, "the guest never wrote its closing mark"),
            Failure::ExitsBetweenMarks { exits, first } => write!(
                f,
                "{exits} exits between the marks (first {})",
                reason_name(first)
            ),
            Failure::GuestCheck { exits } => {
                write!(
                    f,
                    "the guest's own check failed ({exits} exits between the marks)"
                )
            }
            Failure::PortWrites { seen } => write!(
                f,
                "the record port saw {seen} writes, not the expected sizes and values"
            ),
            Failure::TooManyExits => write!(f, "more than {MAX_EXITS} exits"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Marks {
    Idle,
    Counting { exits: u64, first: Option<u32> },
    Done,
}

pub struct Session<'g> {
    guest: &'g TestGuest,
    line: Line,
    next_event: usize,
    /// An external interrupt waiting for the interrupt window.
    window_for: Option<u8>,
    /// An NMI waiting for the NMI window.
    nmi_due: bool,
    recorded: [PortWrite; RECORDED_MAX],
    records: usize,
    msr: u64,
    scratch: u32,
    marks: Marks,
    exits: u64,
    completed: bool,
    failed: bool,
}

type Handled = Result<Next, Failure>;

impl<'g> Session<'g> {
    pub fn new(guest: &'g TestGuest) -> Self {
        Self {
            guest,
            line: Line::new(),
            next_event: 0,
            window_for: None,
            nmi_due: false,
            recorded: [PortWrite::default(); RECORDED_MAX],
            records: 0,
            msr: 0,
            scratch: 0,
            marks: Marks::Idle,
            exits: 0,
            completed: false,
            failed: false,
        }
    }

    /// Whether the guest ended as it should, without a failure.
    pub fn passed(&self) -> bool {
        self.completed && !self.failed
    }

    pub fn exits(&self) -> u64 {
        self.exits
    }

    /// Handles the exit recorded in `state`; `ram` is guest-physical 0 on.
    /// The changes for the next entry are in `state` (with `dirty` set).
    pub fn handle(&mut self, state: &mut VcpuState, ram: &mut [u8], host: &mut dyn Host) -> Next {
        if self.completed || self.failed {
            return Next::Stop;
        }
        self.exits += 1;
        let result = if self.exits > MAX_EXITS {
            Err(Failure::TooManyExits)
        } else {
            self.dispatch(state, ram, host)
        };
        match result.and_then(|next| match next {
            Next::Stop => self.finish(host).map(|()| Next::Stop),
            Next::Resume => Ok(Next::Resume),
        }) {
            Ok(next) => next,
            Err(failure) => {
                self.fail(failure, host);
                Next::Stop
            }
        }
    }

    /// Reports a failure that is not an exit's (e.g. a kernel call that
    /// failed) and ends the session.
    pub fn fail(&mut self, failure: impl fmt::Display, host: &mut dyn Host) {
        self.flush(host);
        host.line(self.guest.name, format_args!("FAIL {failure}"));
        self.failed = true;
    }

    fn flush(&mut self, host: &mut dyn Host) {
        if let Some(text) = self.line.flush() {
            host.line(self.guest.name, format_args!("{text}"));
        }
    }

    fn dispatch(&mut self, state: &mut VcpuState, ram: &mut [u8], host: &mut dyn Host) -> Handled {
        let exit = state.exit;
        let is_mark = exit.reason == exit_reason::IO && exit.port == port::MARK;
        if let Marks::Counting { exits, first } = &mut self.marks {
            if !is_mark {
                *exits += 1;
                first.get_or_insert(exit.reason);
            }
        }
        // An event whose delivery the exit interrupted goes first.
        let reinjecting = exit.pending_valid != 0;
        if reinjecting {
            state.inject = exit.pending;
            state.dirty |= group::INJECT;
        }
        match exit.reason {
            exit_reason::IO => self.io(state, ram, host),
            exit_reason::MEMORY => self.memory(state, ram, host),
            exit_reason::CPUID => self.cpuid(state, ram, host),
            exit_reason::MSR_READ | exit_reason::MSR_WRITE => self.msr(state, ram),
            exit_reason::HLT => self.hlt(state, ram, reinjecting),
            exit_reason::INTERRUPT_WINDOW => self.window(state, reinjecting),
            exit_reason::NMI_WINDOW => self.nmi_window(state, reinjecting),
            exit_reason::POKED => Ok(Next::Resume),
            exit_reason::EXCEPTION => Err(Failure::Exception {
                vector: exit.vector,
                error_code: exit.error_code,
            }),
            exit_reason::HYPERCALL => Err(Failure::Hypercall { rax: state.rax }),
            exit_reason::SHUTDOWN => Err(Failure::Shutdown),
            exit_reason::INVALID_STATE => Err(Failure::InvalidState {
                raw: exit.raw,
                qualification: exit.qualification,
            }),
            reason => Err(Failure::Exit {
                reason,
                raw: exit.raw,
            }),
        }
    }

    /// The guest ended: the checks that need the whole run.
    fn finish(&mut self, host: &mut dyn Host) -> Result<(), Failure> {
        self.flush(host);
        if let Some(vector) = self.window_for {
            return Err(Failure::NeverDelivered { vector });
        }
        if self.nmi_due {
            return Err(Failure::NeverDelivered { vector: NMI_VECTOR });
        }
        if let Marks::Counting { .. } = self.marks {
            return Err(Failure::MarksOpen);
        }
        if &self.recorded[..self.records] != self.guest.port_writes {
            return Err(Failure::PortWrites { seen: self.records });
        }
        self.completed = true;
        Ok(())
    }

    /// Decodes the instruction at CS:RIP; checks its length against the
    /// one the CPU reported, if it did (`check_length`: not for memory
    /// exits, where VMX defines none).
    fn instruction(
        &self,
        state: &VcpuState,
        ram: &[u8],
        check_length: bool,
    ) -> Result<Insn, Failure> {
        let address = code_address(state);
        let start = usize::try_from(address)
            .ok()
            .filter(|&a| a < ram.len())
            .ok_or(Failure::Fetch { address })?;
        let bytes = &ram[start..ram.len().min(start + 15)];
        let insn = decode(bytes, CodeSize::of(state.efer, state.cs.access))
            .map_err(|error| Failure::Decode { address, error })?;
        let reported = state.exit.instruction_length;
        if check_length && reported != 0 && reported != u64::from(insn.len) {
            return Err(Failure::Length {
                reported,
                decoded: insn.len,
            });
        }
        Ok(insn)
    }

    fn io(&mut self, state: &mut VcpuState, ram: &mut [u8], host: &mut dyn Host) -> Handled {
        let insn = self.instruction(state, ram, true)?;
        let exit = state.exit;
        let input = exit.flags & exit_flags::IO_IN != 0;
        let string = exit.flags & exit_flags::IO_STRING != 0;
        let not_this = Failure::NotThisExit {
            exit: exit.reason,
            op: insn.op,
        };
        let port_matches = |p: Option<u8>| p.is_none_or(|p| u16::from(p) == exit.port);
        match insn.op {
            Op::Out { size, port }
                if !input && !string && size == exit.size && port_matches(port) =>
            {
                let value = state.rax & mask(size);
                self.port_out(exit.port, size, value, host)?;
            }
            Op::In { size, port }
                if input && !string && size == exit.size && port_matches(port) =>
            {
                let value = self.port_in(exit.port)?;
                state.rax = match size {
                    4 => value & 0xffff_ffff,
                    _ => state.rax & !mask(size) | value & mask(size),
                };
                state.dirty |= group::GPRS;
            }
            Op::Outs { size, rep, address } | Op::Ins { size, rep, address }
                if string && size == exit.size && matches!(insn.op, Op::Ins { .. }) == input =>
            {
                if !self.string_io(state, ram, size, rep, address, host)? {
                    // More elements to go: the instruction runs (exits) again.
                    return Ok(Next::Resume);
                }
            }
            _ => return Err(not_this),
        }
        advance(state, insn.len);
        Ok(Next::Resume)
    }

    /// Emulates up to [`STRING_CHUNK`] elements of `ins`/`outs`; whether
    /// the instruction is done.
    fn string_io(
        &mut self,
        state: &mut VcpuState,
        ram: &mut [u8],
        size: u8,
        rep: bool,
        address: u8,
        host: &mut dyn Host,
    ) -> Result<bool, Failure> {
        let exit = state.exit;
        let input = exit.flags & exit_flags::IO_IN != 0;
        let counter_mask = mask(address);
        let wanted = if rep { state.rcx & counter_mask } else { 1 };
        let count = wanted.min(STRING_CHUNK);
        let step = if state.rflags & RFLAGS_DF != 0 {
            u64::from(size).wrapping_neg()
        } else {
            u64::from(size)
        };
        let len = usize::from(size);
        for _ in 0..count {
            if input {
                let linear = state.es.base.wrapping_add(state.rdi & counter_mask);
                let value = self.port_in(exit.port)?;
                let slot = guest_bytes(ram, linear, len)?;
                slot.copy_from_slice(&value.to_le_bytes()[..len]);
                state.rdi = bump(state.rdi, step, counter_mask);
            } else {
                let linear = state.ds.base.wrapping_add(state.rsi & counter_mask);
                let mut value = [0u8; 8];
                value[..len].copy_from_slice(guest_bytes(ram, linear, len)?);
                self.port_out(exit.port, size, u64::from_le_bytes(value), host)?;
                state.rsi = bump(state.rsi, step, counter_mask);
            }
        }
        if rep {
            state.rcx = bump(state.rcx, count.wrapping_neg(), counter_mask);
        }
        state.dirty |= group::GPRS;
        Ok(wanted == count)
    }

    fn port_out(
        &mut self,
        port: u16,
        size: u8,
        value: u64,
        host: &mut dyn Host,
    ) -> Result<(), Failure> {
        match port {
            port::DEBUG => {
                if let Some(text) = self.line.push(value as u8) {
                    host.line(self.guest.name, format_args!("{text}"));
                }
            }
            port::RECORD => {
                let slot = self
                    .recorded
                    .get_mut(self.records)
                    .ok_or(Failure::TooManyRecords)?;
                *slot = PortWrite {
                    size,
                    value: value as u32,
                };
                self.records += 1;
            }
            port::MARK => self.mark(value as u8, host)?,
            _ => return Err(Failure::Port { port, input: false }),
        }
        Ok(())
    }

    fn port_in(&mut self, port: u16) -> Result<u64, Failure> {
        match port {
            port::ANSWER => Ok(u64::from(moat_testvm::ANSWER)),
            _ => Err(Failure::Port { port, input: true }),
        }
    }

    fn mark(&mut self, value: u8, host: &mut dyn Host) -> Result<(), Failure> {
        self.marks = match (self.marks, value) {
            (Marks::Idle, mark::BEGIN) => Marks::Counting {
                exits: 0,
                first: None,
            },
            (Marks::Counting { exits, first }, mark::PASSED) => {
                if let Some(first) = first {
                    return Err(Failure::ExitsBetweenMarks { exits, first });
                }
                host.line(self.guest.name, format_args!("ok, {exits} exits"));
                Marks::Done
            }
            (Marks::Counting { exits, .. }, mark::FAILED) => {
                return Err(Failure::GuestCheck { exits });
            }
            _ => return Err(Failure::Marks { value }),
        };
        Ok(())
    }

    fn memory(&mut self, state: &mut VcpuState, ram: &mut [u8], host: &mut dyn Host) -> Handled {
        let gpa = state.exit.gpa;
        let Some(offset) = gpa.checked_sub(mmio::BASE).filter(|&o| o < mmio::SIZE) else {
            return match self.guest.end {
                End::MemoryExit(expected) if expected == gpa => {
                    host.line(
                        self.guest.name,
                        format_args!("memory exit at {gpa:#x} (not given)"),
                    );
                    Ok(Next::Stop)
                }
                _ => Err(Failure::MemoryExit { gpa }),
            };
        };
        let insn = self.instruction(state, ram, false)?;
        let flags = state.exit.flags;
        let write = flags & exit_flags::ACCESS_WRITE != 0;
        let store = matches!(insn.op, Op::Store { .. } | Op::StoreImmediate { .. });
        if write != store && flags & (exit_flags::ACCESS_READ | exit_flags::ACCESS_WRITE) != 0 {
            return Err(Failure::AccessKind { gpa, flags });
        }
        let unsupported = Failure::Mmio { gpa, op: insn.op };
        match insn.op {
            Op::Store { size: 4, src } => self.device_write(offset, reg(state, src) as u32),
            Op::StoreImmediate { size: 4, value } => self.device_write(offset, value as u32),
            Op::Load { size: 4, dst } => {
                let value = self.device_read(offset).ok_or(unsupported)?;
                set_reg(state, dst, 4, u64::from(value));
                Some(())
            }
            _ => None,
        }
        .ok_or(unsupported)?;
        advance(state, insn.len);
        Ok(Next::Resume)
    }

    fn device_read(&self, offset: u64) -> Option<u32> {
        match offset {
            mmio::SCRATCH => Some(self.scratch),
            mmio::ID_OFFSET => Some(mmio::ID),
            _ => None,
        }
    }

    fn device_write(&mut self, offset: u64, value: u32) -> Option<()> {
        match offset {
            mmio::SCRATCH => self.scratch = value,
            // Read-only: the write is dropped.
            mmio::ID_OFFSET => {}
            _ => return None,
        }
        Some(())
    }

    fn cpuid(&mut self, state: &mut VcpuState, ram: &[u8], host: &mut dyn Host) -> Handled {
        let insn = self.expect(state, ram, Op::Cpuid)?;
        let leaf = state.rax as u32;
        let subleaf = state.rcx as u32;
        let word = |i: usize| u32::from_le_bytes([0, 1, 2, 3].map(|j| CPUID_SIGNATURE[4 * i + j]));
        let regs = match leaf {
            CPUID_LEAF => [CPUID_LEAF, word(0), word(1), word(2)],
            moat_testvm::TSC_OFFSET_LEAF => {
                state.tsc_offset = moat_testvm::TSC_OFFSET;
                state.dirty |= group::TSC_OFFSET;
                [0; 4]
            }
            moat_testvm::DEBUG_CHECK_LEAF => {
                // The `debug` guest set DR0-DR3 and DR6: the kernel must
                // report them; then the guest must see the DR3 given here.
                let reported = [state.dr0, state.dr1, state.dr2, state.dr3];
                let right = reported == moat_testvm::DEBUG_VALUES && state.dr6 & 0xf == 5;
                state.dr3 = if right {
                    moat_testvm::DEBUG_NEW_DR3
                } else {
                    0xbad
                };
                state.dirty |= group::DEBUG;
                [0; 4]
            }
            moat_testvm::CR8_CHECK_LEAF => {
                let right = state.cr8 == moat_testvm::CR8_GUEST;
                state.cr8 = if right { moat_testvm::CR8_NEW } else { 0 };
                state.dirty |= group::CONTROL_REGISTERS;
                [0; 4]
            }
            l if (CPUID_LEAF..=CPUID_LEAF + 0xff).contains(&l) => [0; 4],
            1 => {
                let [a, b, c, d] = host.cpuid(leaf, subleaf);
                [a, b, c | CPUID_HYPERVISOR, d]
            }
            _ => host.cpuid(leaf, subleaf),
        };
        state.rax = u64::from(regs[0]);
        state.rbx = u64::from(regs[1]);
        state.rcx = u64::from(regs[2]);
        state.rdx = u64::from(regs[3]);
        state.dirty |= group::GPRS;
        advance(state, insn.len);
        Ok(Next::Resume)
    }

    fn msr(&mut self, state: &mut VcpuState, ram: &[u8]) -> Handled {
        let write = state.exit.reason == exit_reason::MSR_WRITE;
        let insn = self.expect(state, ram, if write { Op::Wrmsr } else { Op::Rdmsr })?;
        let msr = state.rcx as u32;
        if write {
            let value = state.rdx << 32 | state.rax & 0xffff_ffff;
            match msr {
                // LMA is the CPU's to set; the guest only asks with LME.
                MSR_EFER => {
                    state.efer = value & !EFER_LMA | state.efer & EFER_LMA;
                    state.dirty |= group::CONTROL_REGISTERS;
                }
                TEST_MSR => self.msr = value,
                _ => return Err(Failure::Msr { msr, write }),
            }
        } else {
            let value = match msr {
                MSR_EFER => state.efer,
                TEST_MSR => self.msr,
                _ => return Err(Failure::Msr { msr, write }),
            };
            state.rax = value & 0xffff_ffff;
            state.rdx = value >> 32;
            state.dirty |= group::GPRS;
        }
        advance(state, insn.len);
        Ok(Next::Resume)
    }

    fn expect(&self, state: &VcpuState, ram: &[u8], op: Op) -> Result<Insn, Failure> {
        let insn = self.instruction(state, ram, true)?;
        if insn.op != op {
            return Err(Failure::NotThisExit {
                exit: state.exit.reason,
                op: insn.op,
            });
        }
        Ok(insn)
    }

    /// A HLT: the guest's end, or the point to deliver its next event.
    fn hlt(&mut self, state: &mut VcpuState, ram: &[u8], reinjecting: bool) -> Handled {
        let insn = self.expect(state, ram, Op::Hlt)?;
        advance(state, insn.len);
        let Some(&event) = self.guest.events.get(self.next_event) else {
            return match self.guest.end {
                End::Halt => Ok(Next::Stop),
                End::MemoryExit(gpa) => Err(Failure::NoMemoryExit { gpa }),
            };
        };
        self.next_event += 1;
        match event {
            Event::Interrupt(vector) => {
                let blocked = state.rflags & RFLAGS_IF == 0 || state.interruptibility & SHADOW != 0;
                if blocked || reinjecting {
                    self.window_for = Some(vector);
                    state.exit_on |= exit_on::INTERRUPT_WINDOW;
                    state.dirty |= group::EXIT_ON;
                } else {
                    inject(state, vector, event_kind::EXTERNAL_INTERRUPT);
                }
            }
            _ if reinjecting => return Err(Failure::EventPending),
            Event::Exception(vector) => inject(state, vector, event_kind::HARDWARE_EXCEPTION),
            Event::Nmi => inject(state, NMI_VECTOR, event_kind::NMI),
            Event::NmiWindow => {
                self.nmi_due = true;
                state.exit_on |= exit_on::NMI_WINDOW;
                state.dirty |= group::EXIT_ON;
            }
        }
        Ok(Next::Resume)
    }

    fn window(&mut self, state: &mut VcpuState, reinjecting: bool) -> Handled {
        if reinjecting {
            // Keep the window open; ours goes after the pending event.
            return Ok(Next::Resume);
        }
        let vector = self.window_for.take().ok_or(Failure::UnexpectedWindow)?;
        state.exit_on &= !exit_on::INTERRUPT_WINDOW;
        state.dirty |= group::EXIT_ON;
        inject(state, vector, event_kind::EXTERNAL_INTERRUPT);
        Ok(Next::Resume)
    }

    fn nmi_window(&mut self, state: &mut VcpuState, reinjecting: bool) -> Handled {
        if reinjecting {
            return Ok(Next::Resume);
        }
        if !core::mem::take(&mut self.nmi_due) {
            return Err(Failure::UnexpectedWindow);
        }
        state.exit_on &= !exit_on::NMI_WINDOW;
        state.dirty |= group::EXIT_ON;
        inject(state, NMI_VECTOR, event_kind::NMI);
        Ok(Next::Resume)
    }
}

fn inject(state: &mut VcpuState, vector: u8, kind: u8) {
    state.inject = Inject {
        vector,
        kind,
        ..Inject::default()
    };
    state.dirty |= group::INJECT;
}

/// Skips the instruction; that ends an STI or MOV SS shadow.
fn advance(state: &mut VcpuState, len: u8) {
    state.rip = state.rip.wrapping_add(u64::from(len));
    state.dirty |= group::RIP_RFLAGS;
    if state.interruptibility & SHADOW != 0 {
        state.interruptibility &= !SHADOW;
        state.dirty |= group::INTERRUPTIBILITY;
    }
}

fn mask(bytes: u8) -> u64 {
    match bytes {
        0 => 0,
        1..=7 => (1u64 << (8 * u32::from(bytes))) - 1,
        _ => u64::MAX,
    }
}

/// `value + step` within the low bits of `mask` (the rest kept), as an
/// address-size register update does; a 32-bit one zero-extends.
fn bump(value: u64, step: u64, mask: u64) -> u64 {
    let low = value.wrapping_add(step) & mask;
    if mask == 0xffff_ffff {
        low
    } else {
        value & !mask | low
    }
}

/// `len` bytes of guest RAM at `linear` (identity-mapped for these guests).
fn guest_bytes(ram: &mut [u8], linear: u64, len: usize) -> Result<&mut [u8], Failure> {
    usize::try_from(linear)
        .ok()
        .and_then(|start| ram.get_mut(start..start.checked_add(len)?))
        .ok_or(Failure::Fetch { address: linear })
}

fn reg(state: &VcpuState, r: Reg) -> u64 {
    match r & 15 {
        0 => state.rax,
        1 => state.rcx,
        2 => state.rdx,
        3 => state.rbx,
        4 => state.rsp,
        5 => state.rbp,
        6 => state.rsi,
        7 => state.rdi,
        8 => state.r8,
        9 => state.r9,
        10 => state.r10,
        11 => state.r11,
        12 => state.r12,
        13 => state.r13,
        14 => state.r14,
        _ => state.r15,
    }
}

/// Writes `size` bytes of register `r` as a `mov` does: 32-bit writes
/// zero-extend, narrower ones keep the rest.
fn set_reg(state: &mut VcpuState, r: Reg, size: u8, value: u64) {
    let slot = match r & 15 {
        0 => &mut state.rax,
        1 => &mut state.rcx,
        2 => &mut state.rdx,
        3 => &mut state.rbx,
        4 => &mut state.rsp,
        5 => &mut state.rbp,
        6 => &mut state.rsi,
        7 => &mut state.rdi,
        8 => &mut state.r8,
        9 => &mut state.r9,
        10 => &mut state.r10,
        11 => &mut state.r11,
        12 => &mut state.r12,
        13 => &mut state.r13,
        14 => &mut state.r14,
        _ => &mut state.r15,
    };
    *slot = match size {
        4 => value & 0xffff_ffff,
        8 => value,
        n => *slot & !mask(n) | value & mask(n),
    };
    state.dirty |= group::GPRS;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup::{long_mode, prepare, real_mode};
    use moat_testvm::layout::{LOAD_ADDRESS, RAM_SIZE};

    #[derive(Default)]
    struct Recorder {
        lines: Vec<String>,
    }

    impl Host for Recorder {
        fn cpuid(&mut self, leaf: u32, _subleaf: u32) -> [u32; 4] {
            [leaf, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]
        }
        fn line(&mut self, guest: &str, text: fmt::Arguments<'_>) {
            self.lines.push(format!("{guest}: {text}"));
        }
    }

    struct Rig {
        guest: &'static TestGuest,
        ram: Vec<u8>,
        state: VcpuState,
        host: Recorder,
    }

    impl Rig {
        fn new(name: &str) -> Self {
            let guest = moat_testvm::find(name).unwrap();
            let mut ram = vec![0; RAM_SIZE as usize];
            let mut state = prepare(guest, &mut ram).unwrap();
            state.dirty = 0;
            Self {
                guest,
                ram,
                state,
                host: Recorder::default(),
            }
        }

        /// Places `code` at RIP and makes the exit `reason`.
        fn at(&mut self, code: &[u8], reason: u32) -> &mut VcpuState {
            let at = code_address(&self.state) as usize;
            self.ram[at..at + code.len()].copy_from_slice(code);
            self.state.exit = moat_abi::vcpu::Exit {
                reason,
                ..Default::default()
            };
            self.state.dirty = 0;
            &mut self.state
        }

        fn io(&mut self, code: &[u8], port: u16, size: u8, flags: u32) -> &mut VcpuState {
            let state = self.at(code, exit_reason::IO);
            state.exit.port = port;
            state.exit.size = size;
            state.exit.flags = flags;
            state
        }

        fn run(&mut self, session: &mut Session) -> Next {
            session.handle(&mut self.state, &mut self.ram, &mut self.host)
        }
    }

    #[test]
    fn debug_port_lines_and_rip_advance_on_both_vendors() {
        let mut rig = Rig::new("portio");
        let mut s = Session::new(rig.guest);
        for (i, byte) in b"hi\n".iter().enumerate() {
            let rip = rig.state.rip;
            let state = rig.io(&[0xee], port::DEBUG, 1, 0);
            state.rax = u64::from(*byte);
            // VMX reports the length, SVM (no NRIP) does not.
            state.exit.instruction_length = (i % 2) as u64;
            assert_eq!(rig.run(&mut s), Next::Resume);
            assert_eq!(rig.state.rip, rip + 1);
            assert_ne!(rig.state.dirty & group::RIP_RFLAGS, 0);
        }
        assert_eq!(rig.host.lines, ["portio: hi"]);
    }

    #[test]
    fn a_wrong_reported_length_fails() {
        let mut rig = Rig::new("portio");
        let mut s = Session::new(rig.guest);
        rig.io(&[0xee], port::DEBUG, 1, 0).exit.instruction_length = 2;
        assert_eq!(rig.run(&mut s), Next::Stop);
        assert!(rig.host.lines[0].contains("FAIL the CPU reported instruction length 2"));
        assert!(!s.passed());
    }

    #[test]
    fn port_input_and_string_forms() {
        let mut rig = Rig::new("portio");
        let mut s = Session::new(rig.guest);
        let state = rig.io(&[0xed], port::ANSWER, 4, exit_flags::IO_IN);
        state.rax = u64::MAX;
        rig.run(&mut s);
        assert_eq!(rig.state.rax, 0x5a);
        let state = rig.io(&[0xe4, 0x81], port::ANSWER, 1, exit_flags::IO_IN);
        state.rax = 0x1234;
        rig.run(&mut s);
        assert_eq!(rig.state.rax, 0x125a);
        // rep outsb of "ok\n" from guest RAM.
        rig.ram[0x3000..0x3003].copy_from_slice(b"ok\n");
        let state = rig.io(
            &[0xf3, 0x6e],
            port::DEBUG,
            1,
            exit_flags::IO_STRING | exit_flags::IO_REP,
        );
        state.rsi = 0x3000;
        state.rcx = 3;
        let rip = state.rip;
        rig.run(&mut s);
        assert_eq!(
            (rig.state.rsi, rig.state.rcx, rig.state.rip),
            (0x3003, 0, rip + 2)
        );
        assert_eq!(rig.host.lines, ["portio: ok"]);
        // rep insb of two answers.
        let state = rig.io(
            &[0xf3, 0x6c],
            port::ANSWER,
            1,
            exit_flags::IO_IN | exit_flags::IO_STRING | exit_flags::IO_REP,
        );
        state.rdi = 0x3100;
        state.rcx = 2;
        rig.run(&mut s);
        assert_eq!(&rig.ram[0x3100..0x3103], &[0x5a, 0x5a, 0]);
        assert_eq!((rig.state.rdi, rig.state.rcx), (0x3102, 0));
        assert!(rig.host.lines.iter().all(|l| !l.contains("FAIL")));
    }

    #[test]
    fn an_exit_that_does_not_match_the_instruction_fails() {
        let mut rig = Rig::new("portio");
        let mut s = Session::new(rig.guest);
        // An OUT exit, but the instruction is IN.
        rig.io(&[0xec], port::DEBUG, 1, 0);
        assert_eq!(rig.run(&mut s), Next::Stop);
        assert!(rig.host.lines[0].contains("FAIL IO exit at an instruction In"));
    }

    #[test]
    fn recorded_writes_are_checked_at_the_end() {
        let mut rig = Rig::new("portio");
        let mut s = Session::new(rig.guest);
        for w in moat_testvm::PORTIO_WRITES {
            let code: &[u8] = if w.size == 2 {
                &[0x66, 0xef]
            } else if w.size == 4 {
                &[0xef]
            } else {
                &[0xee]
            };
            rig.io(code, port::RECORD, w.size, 0).rax = u64::from(w.value) | 0xff00_0000_0000_0000;
            assert_eq!(rig.run(&mut s), Next::Resume);
        }
        rig.at(&[0xf4], exit_reason::HLT);
        assert_eq!(rig.run(&mut s), Next::Stop);
        assert!(s.passed(), "{:?}", rig.host.lines);

        let mut rig = Rig::new("portio");
        let mut s = Session::new(rig.guest);
        rig.at(&[0xf4], exit_reason::HLT);
        rig.run(&mut s);
        assert!(!s.passed());
        assert!(rig.host.lines[0].contains("record port saw 0 writes"));
    }

    #[test]
    fn mmio_is_emulated() {
        let mut rig = Rig::new("mmio");
        let mut s = Session::new(rig.guest);
        // mov [rbx], eax
        let state = rig.at(&[0x89, 0x03], exit_reason::MEMORY);
        state.exit.gpa = mmio::BASE;
        state.exit.flags = exit_flags::ACCESS_WRITE;
        state.rax = 0xffff_ffff_1234_5678;
        let rip = state.rip;
        assert_eq!(rig.run(&mut s), Next::Resume);
        assert_eq!(rig.state.rip, rip + 2);
        // movabs eax, [BASE]
        let mut load = [0xa1, 0, 0, 0, 0, 0, 0, 0, 0];
        load[1..].copy_from_slice(&mmio::BASE.to_le_bytes());
        let state = rig.at(&load, exit_reason::MEMORY);
        state.exit.gpa = mmio::BASE;
        state.exit.flags = exit_flags::ACCESS_READ;
        state.rax = u64::MAX;
        rig.run(&mut s);
        assert_eq!(rig.state.rax, 0x1234_5678);
        assert_eq!(rig.state.rip, rip + 2 + 9);
        // mov r9d, [rbx + 4]: the ID register.
        let state = rig.at(&[0x44, 0x8b, 0x4b, 0x04], exit_reason::MEMORY);
        state.exit.gpa = mmio::BASE + mmio::ID_OFFSET;
        rig.run(&mut s);
        assert_eq!(rig.state.r9, u64::from(mmio::ID));
        // A load where the CPU says write.
        let state = rig.at(&[0x8b, 0x03], exit_reason::MEMORY);
        state.exit.gpa = mmio::BASE;
        state.exit.flags = exit_flags::ACCESS_WRITE;
        assert_eq!(rig.run(&mut s), Next::Stop);
        assert!(rig.host.lines[0].contains("contradict"));
    }

    #[test]
    fn memory_not_given_ends_nogive_and_fails_others() {
        let mut rig = Rig::new("nogive");
        let mut s = Session::new(rig.guest);
        rig.at(&[0x8b, 0x10], exit_reason::MEMORY).exit.gpa = moat_testvm::NOT_GIVEN;
        assert_eq!(rig.run(&mut s), Next::Stop);
        assert!(s.passed());
        assert_eq!(
            rig.host.lines,
            ["nogive: memory exit at 0x8000000 (not given)"]
        );

        let mut rig = Rig::new("mmio");
        let mut s = Session::new(rig.guest);
        rig.at(&[0x8b, 0x10], exit_reason::MEMORY).exit.gpa = moat_testvm::NOT_GIVEN;
        rig.run(&mut s);
        assert!(!s.passed());
        assert_eq!(
            rig.host.lines,
            ["mmio: FAIL memory exit at 0x8000000 (not given)"]
        );

        // nogive halting instead is a failure.
        let mut rig = Rig::new("nogive");
        let mut s = Session::new(rig.guest);
        rig.at(&[0xf4], exit_reason::HLT);
        rig.run(&mut s);
        assert!(!s.passed());
    }

    #[test]
    fn cpuid_and_msrs() {
        let mut rig = Rig::new("cpuid_msr");
        let mut s = Session::new(rig.guest);
        rig.at(&[0x0f, 0xa2], exit_reason::CPUID).rax = u64::from(CPUID_LEAF);
        rig.run(&mut s);
        let st = &rig.state;
        let mut sig = Vec::new();
        for r in [st.rbx, st.rcx, st.rdx] {
            sig.extend_from_slice(&(r as u32).to_le_bytes());
        }
        assert_eq!(sig, CPUID_SIGNATURE);
        rig.at(&[0x0f, 0xa2], exit_reason::CPUID).rax = 0;
        rig.run(&mut s);
        assert_eq!(rig.state.rbx, 0x756e_6547, "passed through");

        let state = rig.at(&[0x0f, 0x30], exit_reason::MSR_WRITE);
        state.rcx = u64::from(TEST_MSR);
        state.rdx = 0x1234_5678;
        state.rax = 0x9abc_def0;
        rig.run(&mut s);
        let state = rig.at(&[0x0f, 0x32], exit_reason::MSR_READ);
        state.rcx = u64::from(TEST_MSR);
        rig.run(&mut s);
        assert_eq!((rig.state.rdx, rig.state.rax), (0x1234_5678, 0x9abc_def0));
        rig.at(&[0x0f, 0x32], exit_reason::MSR_READ).rcx = 0x1b;
        assert_eq!(rig.run(&mut s), Next::Stop);
        assert!(rig.host.lines[0].contains("unexpected RDMSR 0x1b"));
    }

    #[test]
    fn efer_writes_keep_lma_and_reload_control_registers() {
        let mut rig = Rig::new("modes");
        let mut s = Session::new(rig.guest);
        rig.state = real_mode(LOAD_ADDRESS);
        let state = rig.at(&[0x0f, 0x30], exit_reason::MSR_WRITE);
        state.rcx = u64::from(MSR_EFER);
        state.rax = 0x100 | EFER_LMA;
        rig.run(&mut s);
        assert_eq!(rig.state.efer, 0x100);
        assert_ne!(rig.state.dirty & group::CONTROL_REGISTERS, 0);
        rig.state = long_mode(LOAD_ADDRESS);
        let state = rig.at(&[0x0f, 0x30], exit_reason::MSR_WRITE);
        state.rcx = u64::from(MSR_EFER);
        state.rax = 0x100;
        rig.run(&mut s);
        assert_eq!(rig.state.efer, 0x100 | EFER_LMA);
    }

    #[test]
    fn interrupt_waits_for_the_window_then_exception_and_nmi() {
        let mut rig = Rig::new("interrupt");
        let mut s = Session::new(rig.guest);
        // HLT with IF=0: no injection, the window is asked for.
        rig.at(&[0xf4], exit_reason::HLT).rflags = 2;
        assert_eq!(rig.run(&mut s), Next::Resume);
        assert_eq!(rig.state.dirty & group::INJECT, 0);
        assert_eq!(rig.state.exit_on, exit_on::INTERRUPT_WINDOW);
        rig.at(&[0x90], exit_reason::INTERRUPT_WINDOW).rflags = 0x202;
        rig.run(&mut s);
        assert_eq!(rig.state.exit_on, 0);
        assert_eq!(
            (rig.state.inject.vector, rig.state.inject.kind),
            (
                moat_testvm::INTERRUPT_VECTOR,
                event_kind::EXTERNAL_INTERRUPT
            )
        );
        assert_ne!(rig.state.dirty & group::INJECT, 0);
        rig.at(&[0xf4], exit_reason::HLT);
        rig.run(&mut s);
        assert_eq!(
            (rig.state.inject.vector, rig.state.inject.kind),
            (6, event_kind::HARDWARE_EXCEPTION)
        );
        rig.at(&[0xf4], exit_reason::HLT);
        rig.run(&mut s);
        assert_eq!(rig.state.inject.kind, event_kind::NMI);
        // In the NMI handler: the second NMI waits for the NMI window.
        rig.at(&[0xf4], exit_reason::HLT);
        rig.run(&mut s);
        assert_eq!(rig.state.dirty & group::INJECT, 0);
        assert_eq!(rig.state.exit_on, exit_on::NMI_WINDOW);
        rig.at(&[0x48, 0xcf], exit_reason::NMI_WINDOW);
        rig.run(&mut s);
        assert_eq!(rig.state.exit_on, 0);
        assert_eq!(rig.state.inject.kind, event_kind::NMI);
        rig.at(&[0xf4], exit_reason::HLT);
        assert_eq!(rig.run(&mut s), Next::Stop);
        assert!(s.passed(), "{:?}", rig.host.lines);
    }

    #[test]
    fn an_interrupt_is_injected_at_once_when_the_guest_can_take_it() {
        let mut rig = Rig::new("interrupt");
        let mut s = Session::new(rig.guest);
        let state = rig.at(&[0xf4], exit_reason::HLT);
        state.rflags = 0x202;
        state.interruptibility = 1; // sti; hlt
        rig.run(&mut s);
        assert_eq!(
            rig.state.interruptibility, 0,
            "skipping HLT ends the shadow"
        );
        assert_ne!(rig.state.dirty & group::INTERRUPTIBILITY, 0);
        assert_ne!(rig.state.dirty & group::INJECT, 0);
        assert_eq!(rig.state.exit_on, 0);
    }

    #[test]
    fn interrupted_events_are_reinjected() {
        let mut rig = Rig::new("mmio");
        let mut s = Session::new(rig.guest);
        let pending = Inject {
            vector: 14,
            kind: event_kind::HARDWARE_EXCEPTION,
            has_error_code: 1,
            reserved: 0,
            error_code: 2,
        };
        let state = rig.at(&[], exit_reason::POKED);
        state.exit.pending = pending;
        state.exit.pending_valid = 1;
        rig.run(&mut s);
        assert_eq!(rig.state.inject, pending);
        assert_ne!(rig.state.dirty & group::INJECT, 0);
    }

    #[test]
    fn marks_count_exits() {
        let mut rig = Rig::new("pagefault");
        let mut s = Session::new(rig.guest);
        rig.io(&[0xe6, 0x82], port::MARK, 1, 0).rax = u64::from(mark::BEGIN);
        rig.run(&mut s);
        rig.io(&[0xe6, 0x82], port::MARK, 1, 0).rax = u64::from(mark::PASSED);
        rig.run(&mut s);
        rig.at(&[0xf4], exit_reason::HLT);
        assert_eq!(rig.run(&mut s), Next::Stop);
        assert!(s.passed());
        assert_eq!(rig.host.lines, ["pagefault: ok, 0 exits"]);

        let mut rig = Rig::new("pagefault");
        let mut s = Session::new(rig.guest);
        rig.io(&[0xe6, 0x82], port::MARK, 1, 0).rax = u64::from(mark::BEGIN);
        rig.run(&mut s);
        rig.at(&[], exit_reason::POKED);
        rig.run(&mut s);
        rig.io(&[0xe6, 0x82], port::MARK, 1, 0).rax = u64::from(mark::PASSED);
        assert_eq!(rig.run(&mut s), Next::Stop);
        assert_eq!(
            rig.host.lines,
            ["pagefault: FAIL 1 exits between the marks (first POKED)"]
        );
    }

    #[test]
    fn fatal_exits_fail_with_a_reason() {
        for (reason, text) in [
            (exit_reason::SHUTDOWN, "shutdown"),
            (exit_reason::INVALID_STATE, "refused the guest state"),
            (exit_reason::EXCEPTION, "exception exit"),
            (exit_reason::OTHER, "unexpected exit OTHER"),
            (99, "unexpected exit unknown"),
        ] {
            let mut rig = Rig::new("modes");
            let mut s = Session::new(rig.guest);
            rig.at(&[], reason);
            assert_eq!(rig.run(&mut s), Next::Stop);
            assert!(rig.host.lines[0].contains(text), "{:?}", rig.host.lines);
            assert!(rig.host.lines[0].starts_with("modes: FAIL "));
            assert_eq!(rig.run(&mut s), Next::Stop, "stays stopped");
        }
    }

    #[test]
    fn garbage_exits_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000 {
            let name = moat_testvm::all()[round % 8].name;
            let mut rig = Rig::new(name);
            let mut s = Session::new(rig.guest);
            for _ in 0..4 {
                let at = (next() % RAM_SIZE) as usize;
                let n = (next() % 16) as usize;
                for i in 0..n.min(rig.ram.len() - at) {
                    rig.ram[at + i] = next() as u8;
                }
                let st = &mut rig.state;
                st.rip = match next() % 4 {
                    0 => next(),
                    1 => RAM_SIZE - (next() % 8),
                    _ => at as u64,
                };
                st.cs.access = next() as u32;
                st.cs.base = if next() % 4 == 0 { next() } else { 0 };
                st.efer = next();
                st.rax = next();
                st.rcx = next() % 10_000;
                st.rsi = next();
                st.rdi = next() % (RAM_SIZE + 16);
                st.rflags = next();
                st.interruptibility = next() as u32;
                st.exit = moat_abi::vcpu::Exit {
                    reason: (next() % 16) as u32,
                    flags: next() as u32,
                    port: [0xe9, 0x80, 0x81, 0x82, next() as u16][(next() % 5) as usize],
                    size: (next() % 9) as u8,
                    vector: next() as u8,
                    error_code: next() as u32,
                    gpa: [mmio::BASE + next() % 16, next()][(next() % 2) as usize],
                    instruction_length: next() % 3,
                    pending_valid: (next() % 2) as u32,
                    ..Default::default()
                };
                if rig.run(&mut s) == Next::Stop {
                    break;
                }
            }
        }
    }
}

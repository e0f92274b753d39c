//! The VMM: its instruction emulator against a platform that checks the
//! emulator's side of the `Platform` contract, and the whole exit handler
//! (`Machine::handle_exit`) with every device model behind it.

use std::cell::Cell;
use std::rc::Rc;

use arbitrary::{Arbitrary, Unstructured};
use moat_abi::vcpu::{exit_reason, Segment as AbiSegment, VcpuState};
use vdev::virtio::rng::SplitMix64;
use vdev::GuestMemory;
use vmm::cpu::{access, cr0, cr4, efer};
use vmm::machine::{Config, Hvc0, Machine, NamedPort, TimeSource};
use vmm::{CpuState, NotRam, Outcome, Platform, Segment};

use crate::{for_each_op, Ram};

const RAM_SIZE: usize = 1 << 20;
const PAGE: u64 = 4096;
/// Where the harness puts the instruction and its page tables.
const CODE: u64 = 0x8000;
const PML4: u64 = 0x1000;

/// Guest RAM plus an MMIO side that answers reads with `mmio_value`.
struct FuzzPlatform {
    ram: Vec<u8>,
    mmio_value: u64,
    phys_bits: u32,
}

/// The contract: every access lies within one 4 KiB guest page.
fn one_page(gpa: u64, len: usize) {
    if len > 0 {
        let last = gpa.wrapping_add(len as u64 - 1);
        assert_eq!(
            gpa / PAGE,
            last / PAGE,
            "access at {gpa:#x}+{len} crosses a page"
        );
    }
}

impl FuzzPlatform {
    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, NotRam> {
        one_page(gpa, len);
        let start = usize::try_from(gpa).map_err(|_| NotRam(gpa))?;
        let end = start.checked_add(len).ok_or(NotRam(gpa))?;
        (end <= self.ram.len())
            .then_some(start..end)
            .ok_or(NotRam(gpa))
    }
}

impl Platform for FuzzPlatform {
    fn read_ram(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        let range = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.ram[range]);
        Ok(())
    }

    fn write_ram(&mut self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        let range = self.range(gpa, data.len())?;
        self.ram[range].copy_from_slice(data);
        Ok(())
    }

    fn cmpxchg_ram_u32(&mut self, gpa: u64, current: u32, new: u32) -> Result<bool, NotRam> {
        assert_eq!(gpa % 4, 0, "cmpxchg of an unaligned dword");
        let range = self.range(gpa, 4)?;
        let old = u32::from_le_bytes(self.ram[range.clone()].try_into().expect("4 bytes"));
        if old != current {
            return Ok(false);
        }
        self.ram[range].copy_from_slice(&new.to_le_bytes());
        Ok(true)
    }

    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        one_page(gpa, data.len());
        assert!(
            (1..=8).contains(&data.len()),
            "MMIO read of {} bytes",
            data.len()
        );
        let bytes = self.mmio_value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        one_page(gpa, data.len());
        assert!(
            (1..=8).contains(&data.len()),
            "MMIO write of {} bytes",
            data.len()
        );
    }

    fn phys_addr_bits(&self) -> u32 {
        self.phys_bits
    }
}

/// The CPU mode the harness sets up around the instruction.
#[derive(Arbitrary, Debug)]
enum Preset {
    /// Every register as the input says.
    Raw(RawCpu),
    /// 32-bit protected mode, flat segments, no paging.
    Flat32,
    /// 64-bit mode, the first GiB identity-mapped with 2 MiB pages.
    Long64 { user: bool },
    /// Real mode.
    Real,
}

#[derive(Arbitrary, Debug)]
struct RawCpu {
    rip: u64,
    rflags: u64,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    segments: [(u16, u64, u32, u32); 6],
}

#[derive(Arbitrary, Debug)]
enum ExitAddress {
    /// The value of general-purpose register N (the usual base).
    Register(u8),
    /// A register plus a displacement.
    Offset(u8, i32),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
struct EmulateInput {
    preset: Preset,
    gpr: [u64; 16],
    rflags_df: bool,
    code: [u8; 15],
    exit: ExitAddress,
    mmio_value: u64,
    phys_bits: u8,
    /// Extra RAM contents (page tables, operands).
    pokes: Vec<(u32, Vec<u8>)>,
}

fn segment(selector: u16, base: u64, limit: u32, access: u32) -> Segment {
    Segment {
        selector,
        base,
        limit,
        access,
    }
}

const CODE32: u32 = 0xb | access::S | access::P | access::DB | access::G;
const DATA32: u32 = 0x3 | access::S | access::P | access::DB | access::G;
const CODE64: u32 = 0xb | access::S | access::P | access::L | access::G;

/// The identity map of the first GiB: PML4 -> PDPT -> one PD of 2 MiB pages.
fn identity_map(ram: &mut [u8], user: bool) {
    let flags = if user { 0x7 } else { 0x3 };
    let mut put = |at: u64, value: u64| {
        let at = at as usize;
        ram[at..at + 8].copy_from_slice(&value.to_le_bytes());
    };
    put(PML4, (PML4 + PAGE) | flags);
    put(PML4 + PAGE, (PML4 + 2 * PAGE) | flags);
    for i in 0..512 {
        put(PML4 + 2 * PAGE + 8 * i, (i << 21) | flags | 0x80);
    }
}

fn cpu_for(preset: &Preset, ram: &mut [u8]) -> CpuState {
    let mut cpu = CpuState {
        rip: CODE,
        rflags: 0x2,
        ..CpuState::default()
    };
    match preset {
        Preset::Raw(raw) => {
            cpu.rip = raw.rip;
            cpu.rflags = raw.rflags;
            cpu.cr0 = raw.cr0;
            cpu.cr3 = raw.cr3;
            cpu.cr4 = raw.cr4;
            cpu.efer = raw.efer;
            let [cs, ss, ds, es, fs, gs] = raw.segments.map(|(s, b, l, a)| segment(s, b, l, a));
            (cpu.cs, cpu.ss, cpu.ds, cpu.es, cpu.fs, cpu.gs) = (cs, ss, ds, es, fs, gs);
        }
        Preset::Flat32 => {
            cpu.cr0 = cr0::PE;
            cpu.cs = segment(0x8, 0, u32::MAX, CODE32);
            let data = segment(0x10, 0, u32::MAX, DATA32);
            (cpu.ss, cpu.ds, cpu.es, cpu.fs, cpu.gs) = (data, data, data, data, data);
        }
        Preset::Long64 { user } => {
            identity_map(ram, *user);
            cpu.cr0 = cr0::PE | cr0::PG;
            cpu.cr3 = PML4;
            cpu.cr4 = cr4::PAE;
            cpu.efer = efer::LME | efer::LMA;
            let dpl = if *user { 3 << access::DPL_SHIFT } else { 0 };
            cpu.cs = segment(0x8, 0, u32::MAX, CODE64 | dpl);
            let data = segment(0x10, 0, u32::MAX, DATA32 | dpl);
            (cpu.ss, cpu.ds, cpu.es, cpu.fs, cpu.gs) = (data, data, data, data, data);
        }
        Preset::Real => {
            let code = segment(0, 0, 0xffff, 0xb | access::S | access::P);
            let data = segment(0, 0, 0xffff, 0x3 | access::S | access::P);
            cpu.cs = code;
            (cpu.ss, cpu.ds, cpu.es, cpu.fs, cpu.gs) = (data, data, data, data, data);
        }
    }
    cpu
}

/// Repeats of a REP chunk followed per input.
const MAX_REPEATS: usize = 8;

/// The instruction emulator on one instruction (REP forms run to their
/// end or [`MAX_REPEATS`] chunks).
pub fn emulate(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(input) = EmulateInput::arbitrary(&mut u) else {
        return;
    };
    let mut ram = vec![0u8; RAM_SIZE];
    let mut cpu = cpu_for(&input.preset, &mut ram);
    cpu.gpr = input.gpr;
    if input.rflags_df {
        cpu.rflags |= vmm::cpu::rflags::DF;
    }
    let code = CODE as usize;
    ram[code..code + 15].copy_from_slice(&input.code);
    for (at, bytes) in input.pokes.iter().take(16) {
        let at = *at as usize % RAM_SIZE;
        let len = bytes.len().min(RAM_SIZE - at);
        ram[at..at + len].copy_from_slice(&bytes[..len]);
    }
    let gpr = |r: u8| input.gpr[usize::from(r % 16)];
    let exit_gpa = match input.exit {
        ExitAddress::Register(r) => gpr(r),
        ExitAddress::Offset(r, d) => gpr(r).wrapping_add(d as i64 as u64),
        ExitAddress::Any(gpa) => gpa,
    };
    let mut platform = FuzzPlatform {
        ram,
        mmio_value: input.mmio_value,
        phys_bits: u32::from(input.phys_bits % 64).max(32),
    };
    for _ in 0..MAX_REPEATS {
        let before = cpu;
        let outcome = vmm::emulate(&mut platform, &mut cpu, exit_gpa);
        match outcome {
            Outcome::Repeat => continue,
            Outcome::Done => {}
            // Only a REP string instruction may have made progress.
            Outcome::Fault(_)
            | Outcome::Unsupported(_)
            | Outcome::Mismatch
            | Outcome::NotRam(_) => {
                assert_eq!(cpu.rip, before.rip, "{outcome:?} moved RIP");
            }
        }
        break;
    }
}

/// Guest time as the kernel would report the guest TSC.
struct FakeTime(Cell<u64>);

impl TimeSource for FakeTime {
    fn guest_tsc(&self) -> u64 {
        self.0.get()
    }
}

fn host_cpuid(leaf: u32, _subleaf: u32) -> [u32; 4] {
    match leaf {
        0 => [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
        1 => [0x00a2_0f10, 0, 0x7ed8_320b, 0x178b_fbff],
        0xd => [0x7, 0x340, 0x340, 0],
        0x8000_0000 => [0x8000_0008, 0, 0, 0],
        0x8000_0008 => [0x3030, 0, 0, 0],
        _ => [0; 4],
    }
}

/// The ports and MMIO addresses where the machine has devices.
const PORTS: &[u16] = &[
    0x20, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x70, 0x71, 0x3f8, 0x3f9, 0x3fa, 0x3fb,
    0x3fc, 0x3fd, 0x3fe, 0x3ff, 0x505, 0x600, 0x601, 0x602, 0xcf8, 0xcfc, 0xcfd, 0xcfe, 0xcff,
];
const MMIO: &[u64] = &[0xfec0_0000, 0xfee0_0000, 0xc000_0000, 0xe000_0000];

#[derive(Arbitrary, Debug)]
enum Port {
    Known(u8),
    Any(u16),
}

#[derive(Arbitrary, Debug)]
enum Gpa {
    Device { which: u8, offset: u32 },
    Any(u64),
}

#[derive(Arbitrary, Debug)]
struct Exit {
    /// Mostly one of the reasons the kernel reports.
    reason: u8,
    raw_reason: Option<u32>,
    flags: u32,
    port: Port,
    size: u8,
    gpa: Gpa,
    instruction_length: u8,
    vector: u8,
    long_mode: bool,
    rax: u64,
    rcx: u64,
    rdx: u64,
    rbx: u64,
    rsi: u64,
    rdi: u64,
    rflags: u64,
    cr4: u64,
    cr8: u64,
    xcr0: u64,
    code: [u8; 15],
    interruptibility: u32,
    pending_valid: bool,
}

#[derive(Arbitrary, Debug)]
enum MachineOp {
    Exit(Exit),
    Advance(u32),
    Poll,
    Kick,
    ConsoleInput(Vec<u8>),
    PortInput(Vec<u8>),
    PortOpen(bool),
    Poke { at: u32, bytes: Vec<u8> },
}

fn exit_state(exit: &Exit, ram: &Ram) -> VcpuState {
    let mut state = VcpuState {
        rip: CODE,
        ..VcpuState::default()
    };
    state.exit.reason = exit
        .raw_reason
        .unwrap_or(u32::from(exit.reason % (exit_reason::XSETBV as u8 + 1)));
    state.exit.flags = exit.flags;
    state.exit.port = match exit.port {
        Port::Known(i) => PORTS[usize::from(i) % PORTS.len()],
        Port::Any(p) => p,
    };
    state.exit.size = exit.size;
    state.exit.gpa = match exit.gpa {
        Gpa::Device { which, offset } => {
            MMIO[usize::from(which) % MMIO.len()] + u64::from(offset % 0x10_0000)
        }
        Gpa::Any(gpa) => gpa,
    };
    state.exit.instruction_length = u64::from(exit.instruction_length % 16);
    state.exit.vector = exit.vector;
    state.exit.pending_valid = u32::from(exit.pending_valid);
    (state.rax, state.rcx, state.rdx, state.rbx) = (exit.rax, exit.rcx, exit.rdx, exit.rbx);
    (state.rsi, state.rdi) = (exit.rsi, exit.rdi);
    state.rflags = exit.rflags | 0x2;
    (state.cr4, state.cr8, state.xcr0) = (exit.cr4, exit.cr8, exit.xcr0);
    state.interruptibility = exit.interruptibility;
    if exit.long_mode {
        identity_map(&mut ram.0.borrow_mut(), false);
        state.cr0 = cr0::PE | cr0::PG;
        state.cr3 = PML4;
        state.cr4 |= cr4::PAE;
        state.efer = efer::LME | efer::LMA;
        state.cs = abi_segment(0x8, CODE64);
    } else {
        state.cr0 = cr0::PE;
        state.cs = abi_segment(0x8, CODE32);
    }
    let data = abi_segment(0x10, DATA32);
    (state.ss, state.ds, state.es, state.fs, state.gs) = (data, data, data, data, data);
    let _ = ram.write(CODE, &exit.code);
    state
}

fn abi_segment(selector: u16, access: u32) -> AbiSegment {
    AbiSegment {
        selector,
        access,
        limit: u32::MAX,
        ..AbiSegment::default()
    }
}

/// The whole exit handler: port I/O, MMIO (emulated, then dispatched to
/// the device models and the virtio devices on PCI), CPUID, MSRs, HLT,
/// XSETBV, hypercalls and the rest, with time passing and host input.
pub fn exit(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let ram = Rc::new(Ram::new(RAM_SIZE));
    let time = Rc::new(FakeTime(Cell::new(0)));
    let config = Config {
        ram_size: RAM_SIZE as u64,
        tsc_hz: 1_000_000_000,
        boot_unix_secs: 1_700_000_000,
        vcpus: 1,
    };
    let mut machine = Machine::new(&config, ram.clone(), time.clone(), Box::new(host_cpuid))
        .expect("the standard machine");
    machine
        .add_pci_devices(
            Some(Box::new(vdev::virtio::block::MemDisk::new(vec![
                0;
                64 * 512
            ]))),
            Box::new(SplitMix64(7)),
            NamedPort::Echo,
            Hvc0::Echo,
        )
        .expect("the PCI devices");
    for_each_op(&mut u, |op| match op {
        MachineOp::Exit(exit) => {
            let mut state = exit_state(&exit, &ram);
            machine.prepare_entry(0, &mut state);
            machine.handle_exit(0, &mut state);
            machine.take_refusals();
        }
        MachineOp::Advance(ns) => {
            time.0.set(time.0.get().saturating_add(u64::from(ns)));
        }
        MachineOp::Poll => {
            machine.poll();
            machine.next_deadline_ns();
            machine.interrupt_pending(0);
        }
        MachineOp::Kick => machine.kick_devices(),
        MachineOp::ConsoleInput(bytes) => {
            machine.console_input(&bytes);
            machine.take_console_output();
        }
        MachineOp::PortInput(bytes) => {
            machine.port_input(&bytes);
            machine.take_port_output();
        }
        MachineOp::PortOpen(open) => machine.set_port_open(open),
        MachineOp::Poke { at, bytes } => {
            let at = u64::from(at) % RAM_SIZE as u64;
            let len = bytes.len().min(RAM_SIZE - at as usize);
            let _ = ram.write(at, &bytes[..len]);
        }
    });
}

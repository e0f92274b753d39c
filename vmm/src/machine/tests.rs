use alloc::collections::VecDeque;
use alloc::vec;
use core::cell::Cell;

use moat_abi::vcpu::{event_kind, exit_on, Inject};

use super::*;

const RAM: u64 = 1 << 20;
const TSC_HZ: u64 = 1_000_000_000;

struct FakeRam(RefCell<Vec<u8>>);

impl GuestMemory for FakeRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), BadGuestAddress> {
        let ram = self.0.borrow();
        let start = usize::try_from(gpa).map_err(|_| BadGuestAddress(gpa))?;
        let bytes = ram
            .get(start..start + buf.len())
            .ok_or(BadGuestAddress(gpa))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), BadGuestAddress> {
        let mut ram = self.0.borrow_mut();
        let start = usize::try_from(gpa).map_err(|_| BadGuestAddress(gpa))?;
        ram.get_mut(start..start + data.len())
            .ok_or(BadGuestAddress(gpa))?
            .copy_from_slice(data);
        Ok(())
    }
}

struct FakeTime(Cell<u64>);

impl TimeSource for FakeTime {
    fn guest_tsc(&self) -> u64 {
        self.0.get()
    }
}

fn host_cpuid(leaf: u32, _subleaf: u32) -> [u32; 4] {
    match leaf {
        0 => [0xd, 0, 0, 0],
        0xd => [0x7, 0, 0, 0],
        0x8000_0000 => [0x8000_0008, 0, 0, 0],
        0x8000_0008 => [40, 0, 0, 0],
        _ => [0; 4],
    }
}

struct Setup {
    machine: Machine,
    ram: Rc<FakeRam>,
    time: Rc<FakeTime>,
}

/// Entropy of zeros, for the virtio devices' set-up.
struct Zeros;

impl EntropySource for Zeros {
    fn fill(&mut self, buf: &mut [u8]) {
        buf.fill(0);
    }
}

fn setup() -> Setup {
    setup_with(1)
}

fn setup_with(vcpus: usize) -> Setup {
    let ram = Rc::new(FakeRam(RefCell::new(vec![0; RAM as usize])));
    let time = Rc::new(FakeTime(Cell::new(0)));
    let config = Config {
        ram_size: RAM,
        tsc_hz: TSC_HZ,
        boot_unix_secs: 1_700_000_000,
        vcpus,
    };
    let machine = Machine::new(&config, ram.clone(), time.clone(), Box::new(host_cpuid)).unwrap();
    Setup { machine, ram, time }
}

fn exit(reason: u32) -> VcpuState {
    let mut state = VcpuState {
        rip: 0x1000,
        ..VcpuState::default()
    };
    state.exit.reason = reason;
    state
}

fn out(port: u16, size: u8, value: u64) -> VcpuState {
    let mut state = exit(exit_reason::IO);
    state.exit.port = port;
    state.exit.size = size;
    state.exit.instruction_length = 1;
    state.rax = value;
    state
}

fn wrmsr(index: u32, value: u64) -> VcpuState {
    let mut state = exit(exit_reason::MSR_WRITE);
    state.rcx = index.into();
    state.rax = value & 0xffff_ffff;
    state.rdx = value >> 32;
    state
}

fn injected(state: &VcpuState) -> Option<(u8, u8)> {
    (state.dirty & group::INJECT != 0).then_some((state.inject.vector, state.inject.kind))
}

#[test]
fn serial_output_reaches_the_console_and_rip_advances() {
    let mut s = setup();
    for byte in b"hi\n" {
        let mut state = out(0x3f8, 1, u64::from(*byte));
        assert_eq!(s.machine.handle_exit(0, &mut state), Action::Resume);
        assert_eq!(state.rip, 0x1001);
    }
    assert_eq!(s.machine.take_console_output(), b"hi\n");
    assert!(s.machine.take_console_output().is_empty());
    // LSR: transmitter empty; an unclaimed port reads all ones.
    let mut state = exit(exit_reason::IO);
    state.exit.port = 0x3fd;
    state.exit.size = 1;
    state.exit.flags = exit_flags::IO_IN;
    state.rax = 0x1234_5600;
    s.machine.handle_exit(0, &mut state);
    assert_eq!(state.rax & 0x60, 0x60);
    assert_eq!(state.rax & !0xff, 0x1234_5600, "the rest of rax stays");
    state.exit.port = 0x2e8;
    state.exit.size = 4;
    s.machine.handle_exit(0, &mut state);
    assert_eq!(state.rax, 0xffff_ffff, "a 32-bit IN zero-extends");
    assert_eq!(s.machine.stats.unclaimed_ports, 1);
}

#[test]
fn cpuid_shows_kvm_and_skips_without_nrip() {
    let mut s = setup();
    let mut state = exit(exit_reason::CPUID);
    state.rax = 0x4000_0000;
    s.machine.handle_exit(0, &mut state);
    assert_eq!(state.rbx, u64::from(u32::from_le_bytes(*b"KVMK")));
    assert_eq!(state.rip, 0x1002, "CPUID is two bytes");
}

#[test]
fn kvm_clock_is_written_where_the_guest_asks() {
    let mut s = setup();
    s.time.0.set(3 * TSC_HZ);
    let gpa = 0x8000;
    let mut state = wrmsr(pvclock::MSR_KVM_SYSTEM_TIME_NEW, gpa | 1);
    assert_eq!(s.machine.handle_exit(0, &mut state), Action::Resume);
    assert_eq!(injected(&state), None);
    let ram = s.ram.0.borrow();
    let info = &ram[gpa as usize..gpa as usize + 32];
    assert_eq!(&info[8..16], &(3 * TSC_HZ).to_le_bytes(), "tsc_timestamp");
    let ns = u64::from_le_bytes(info[16..24].try_into().unwrap());
    assert!(ns.abs_diff(3_000_000_000) <= 1, "system_time {ns}");
    assert_eq!(info[29], pvclock::FLAG_TSC_STABLE);
}

#[test]
fn tsc_deadline_timer_interrupts_an_interruptible_guest() {
    let mut s = setup();
    // x2APIC on, APIC software-enabled, timer in TSC-deadline mode, vector 0xec.
    for (msr, value) in [
        (
            lapic::APIC_BASE_MSR,
            0xfee0_0000 | (1 << 11) | (1 << 10) | (1 << 8),
        ),
        (0x80f, 0x1ff),
        (0x832, 0xec | (0b10 << 17)),
        (lapic::TSC_DEADLINE_MSR, 5000),
    ] {
        let mut state = wrmsr(msr, value);
        s.machine.handle_exit(0, &mut state);
        assert_eq!(injected(&state), None, "wrmsr {msr:#x}");
    }
    assert_eq!(s.machine.next_deadline_ns(), Some(5000));

    let mut state = exit(exit_reason::HLT);
    state.rflags = state::RFLAGS_IF;
    assert_eq!(s.machine.handle_exit(0, &mut state), Action::Halt);
    s.time.0.set(5000);
    s.machine.poll();
    assert!(s.machine.interrupt_pending(0));

    // IF clear: an interrupt-window exit is requested, nothing injected.
    let mut blocked = exit(exit_reason::POKED);
    s.machine.prepare_entry(0, &mut blocked);
    assert_eq!(injected(&blocked), None);
    assert_ne!(blocked.exit_on & exit_on::INTERRUPT_WINDOW, 0);

    let mut open = exit(exit_reason::INTERRUPT_WINDOW);
    open.rflags = state::RFLAGS_IF;
    open.exit_on = exit_on::INTERRUPT_WINDOW;
    s.machine.handle_exit(0, &mut open);
    s.machine.prepare_entry(0, &mut open);
    assert_eq!(
        injected(&open),
        Some((0xec, event_kind::EXTERNAL_INTERRUPT))
    );
    assert_eq!(open.exit_on & exit_on::INTERRUPT_WINDOW, 0);
    assert!(!s.machine.interrupt_pending(0), "acknowledged");
}

#[test]
fn a_pending_event_is_reinjected_before_interrupts() {
    let mut s = setup();
    let mut state = exit(exit_reason::MEMORY);
    state.exit.pending = Inject {
        vector: 14,
        kind: event_kind::HARDWARE_EXCEPTION,
        has_error_code: 1,
        reserved: 0,
        error_code: 2,
    };
    state.exit.pending_valid = 1;
    state.rflags = state::RFLAGS_IF;
    s.machine.prepare_entry(0, &mut state);
    assert_eq!(injected(&state), Some((14, event_kind::HARDWARE_EXCEPTION)));
    assert_eq!(state.inject.error_code, 2);
}

#[test]
fn halting_with_interrupts_off_stops() {
    let mut s = setup();
    let mut state = exit(exit_reason::HLT);
    assert_eq!(
        s.machine.handle_exit(0, &mut state),
        Action::Stop(Stop::HaltedForever)
    );
}

#[test]
fn debug_exit_stops_with_the_value_only_when_added() {
    let mut s = setup();
    let mut state = out(0xf4, 1, 0x31);
    assert_eq!(s.machine.handle_exit(0, &mut state), Action::Resume);
    let mut s = setup();
    s.machine.add_debug_exit().unwrap();
    let mut state = out(0xf6, 2, 0x1234);
    assert_eq!(
        s.machine.handle_exit(0, &mut state),
        Action::Stop(Stop::DebugExit(0x1234))
    );
    assert!(s.machine.add_debug_exit().is_err(), "the port is taken");
}

#[test]
fn power_off_reset_and_panic_are_reported() {
    let mut s = setup();
    let mut state = out(0x600, 1, (5 << 2) | (1 << 5));
    assert_eq!(
        s.machine.handle_exit(0, &mut state),
        Action::Stop(Stop::PowerOff)
    );
    let mut s = setup();
    let mut state = out(0x602, 1, 1);
    assert_eq!(
        s.machine.handle_exit(0, &mut state),
        Action::Stop(Stop::Reset)
    );
    let mut s = setup();
    let mut state = out(0x505, 1, 1);
    assert_eq!(
        s.machine.handle_exit(0, &mut state),
        Action::Stop(Stop::Panic)
    );
    let mut state = exit(exit_reason::SHUTDOWN);
    assert_eq!(
        setup().machine.handle_exit(0, &mut state),
        Action::Stop(Stop::TripleFault)
    );
}

#[test]
fn unknown_msrs_and_bad_xcr0_give_gp_and_keep_rip() {
    let mut s = setup();
    let mut state = wrmsr(0x48, 1);
    s.machine.handle_exit(0, &mut state);
    assert_eq!(
        injected(&state),
        Some((state::GP, event_kind::HARDWARE_EXCEPTION))
    );
    assert_eq!(state.rip, 0x1000);
    let mut state = exit(exit_reason::XSETBV);
    state.rax = 0b1001; // x87 and a component the host lacks
    s.machine.handle_exit(0, &mut state);
    assert_eq!(
        injected(&state),
        Some((state::GP, event_kind::HARDWARE_EXCEPTION))
    );
    let mut state = exit(exit_reason::XSETBV);
    state.rax = 0b111;
    s.machine.handle_exit(0, &mut state);
    assert_eq!((injected(&state), state.xcr0, state.rip), (None, 7, 0x1003));
}

/// 32-bit flat protected mode without paging, code at 0x1000.
fn protected_mode(code: &[u8], ram: &FakeRam) -> VcpuState {
    ram.write(0x1000, code).unwrap();
    let mut state = exit(exit_reason::MEMORY);
    state.cr0 = 1;
    state.cs.access = 0xc09b;
    state.cs.limit = u32::MAX;
    for segment in [&mut state.ds, &mut state.ss, &mut state.es] {
        segment.access = 0xc093;
        segment.limit = u32::MAX;
    }
    state
}

#[test]
fn mmio_to_the_xapic_is_emulated() {
    let mut s = setup();
    // mov eax, [0xfee00030]: the APIC version register.
    let mut state = protected_mode(&[0xa1, 0x30, 0x00, 0xe0, 0xfe], &s.ram);
    state.exit.gpa = 0xfee0_0030;
    assert_eq!(s.machine.handle_exit(0, &mut state), Action::Resume);
    assert_eq!(injected(&state), None);
    assert_eq!(state.rax & 0xff, 0x14, "version");
    assert_eq!(state.rip, 0x1005);
    // mov dword [0xfee00080], 0x20: TPR, which is CR8 too.
    let mut state = protected_mode(&[0xc7, 0x05, 0x80, 0x00, 0xe0, 0xfe, 0x20, 0, 0, 0], &s.ram);
    state.exit.gpa = 0xfee0_0080;
    s.machine.handle_exit(0, &mut state);
    assert_eq!(state.cr8, 2);
}

#[test]
fn garbage_behind_an_mmio_exit_gives_ud_and_never_panics() {
    let mut s = setup();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..2000 {
        let mut code = [0u8; 15];
        for byte in &mut code {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *byte = seed as u8;
        }
        let mut state = protected_mode(&code, &s.ram);
        state.exit.gpa = 0xfec0_0000 + (seed & 0xff);
        let action = s.machine.handle_exit(0, &mut state);
        assert!(
            matches!(action, Action::Resume | Action::Stop(_)),
            "{action:?}"
        );
    }
    assert!(s.machine.stats.unsupported > 1000);
    let refusals = s.machine.take_refusals();
    assert_eq!(refusals.len(), MAX_REFUSALS, "the log is bounded");
    assert!(matches!(refusals[0], (0x1000, Refused::Mmio(_))));
    assert!(s.machine.take_refusals().is_empty());
}

/// Hostile guests (issue 11): an instruction whose operand is not the
/// exit's address is retried as a page-table race, but one that keeps
/// missing it gets #UD; it used to stop the whole guest.
#[test]
fn an_mmio_exit_the_instruction_never_matches_gives_ud_not_a_stop() {
    let mut s = setup();
    // mov eax, [0xfee00030], but the exit names the IOAPIC.
    for round in 1..=MISMATCH_LIMIT {
        let mut state = protected_mode(&[0xa1, 0x30, 0x00, 0xe0, 0xfe], &s.ram);
        state.exit.gpa = 0xfec0_0000;
        assert_eq!(s.machine.handle_exit(0, &mut state), Action::Resume);
        assert_eq!(state.rip, 0x1000, "not emulated");
        let expected = (round == MISMATCH_LIMIT).then_some((6, event_kind::HARDWARE_EXCEPTION));
        assert_eq!(injected(&state), expected, "round {round}");
    }
    let refusals = s.machine.take_refusals();
    assert_eq!(refusals, [(0x1000, Refused::Mismatch(0xfec0_0000))]);
}

#[test]
fn pci_enumerates_the_virtio_devices() {
    let mut s = setup();
    s.machine
        .add_pci_devices(
            Some(Box::new(MemDisk::new(vec![0; 4096]))),
            Box::new(Zeros),
            NamedPort::Echo,
            Hvc0::Echo,
        )
        .unwrap();
    let mut ids = Vec::new();
    for slot in 0..6u64 {
        let mut select = out(0xcf8, 4, 0x8000_0000 | (slot << 11));
        s.machine.handle_exit(0, &mut select);
        let mut read = exit(exit_reason::IO);
        read.exit.port = 0xcfc;
        read.exit.size = 4;
        read.exit.flags = exit_flags::IO_IN;
        s.machine.handle_exit(0, &mut read);
        ids.push(read.rax as u32);
    }
    assert_eq!(
        ids,
        [
            0x0008_1b36, // host bridge
            0x1043_1af4, // console
            0x1042_1af4, // block
            0x1041_1af4, // net
            0x1044_1af4, // entropy
            0xffff_ffff, // nothing
        ]
    );
    assert_eq!(s.machine.take_disk().map(|d| d.sectors()), Some(8));
    assert_eq!(s.machine.take_disk().map(|d| d.sectors()), Some(0));
}

/// The state dump: exits by reason, the last one with its RIP, the APIC's
/// vectors, and a line per virtqueue of every device (off until the
/// driver enables it).
#[test]
fn the_dump_shows_exits_interrupts_and_every_queue() {
    let mut s = setup();
    assert_eq!(s.machine.dump()[..2], ["exits 0:", "last exit none"]);
    s.machine
        .add_pci_devices(
            Some(Box::new(MemDisk::new(vec![0; 4096]))),
            Box::new(Zeros),
            NamedPort::Echo,
            Hvc0::Echo,
        )
        .unwrap();
    let mut state = out(0x3f8, 1, u64::from(b'x'));
    s.machine.handle_exit(0, &mut state);
    let mut state = exit(exit_reason::CPUID);
    state.rip = 0xffff_ffff_8100_0000;
    s.machine.handle_exit(0, &mut state);
    let dump = s.machine.dump();
    assert_eq!(dump[0], "exits 2: io 1 cpuid 1");
    assert_eq!(dump[1], "last exit cpuid at rip 0xffffffff81000000");
    assert!(dump[2].starts_with("interrupts: lapic highest requested none in service none"));
    let queues = |name: &str| queues_in(&dump, name);
    // Console: receive and transmit of two ports plus the control pair.
    assert_eq!(queues("console"), 6, "{dump:#?}");
    assert_eq!(queues("block"), 1, "{dump:#?}");
    assert_eq!(queues("net"), 2, "{dump:#?}");
    assert_eq!(queues("rng"), 1, "{dump:#?}");
    assert!(dump[3..].iter().all(|l| l.ends_with(": off")), "{dump:#?}");
    // A device held while the dump is asked for is said to be busy; the
    // dump does not panic (it did once, at a Debian guest's login prompt).
    let virtio = s.machine.virtio.as_ref().unwrap();
    let held = virtio.console.borrow_mut();
    let dump = s.machine.dump();
    drop(held);
    assert!(
        dump.iter().any(|l| l == "virtio-console: busy, not shown"),
        "{dump:#?}"
    );
    assert_eq!(queues_in(&dump, "net"), 2, "{dump:#?}");
}

fn queues_in(dump: &[String], name: &str) -> usize {
    dump.iter()
        .filter(|l| l.starts_with(&format!("virtio-{name} (status 0x0) queue ")))
        .count()
}

/// x2APIC on and software-enabled on `vcpu`.
fn x2apic_on(s: &mut Setup, vcpu: usize) {
    let bsp = if vcpu == 0 { 1 << 8 } else { 0 };
    for (msr, value) in [
        (
            lapic::APIC_BASE_MSR,
            0xfee0_0000 | (1 << 11) | (1 << 10) | bsp,
        ),
        (0x80f, 0x1ff),
    ] {
        let mut state = wrmsr(msr, value);
        s.machine.handle_exit(vcpu, &mut state);
        assert_eq!(injected(&state), None, "wrmsr {msr:#x}");
    }
}

/// vCPU `from` writes its x2APIC ICR.
fn send_ipi(s: &mut Setup, from: usize, destination: u32, low: u32) {
    let mut state = wrmsr(0x830, u64::from(destination) << 32 | u64::from(low));
    assert_eq!(s.machine.handle_exit(from, &mut state), Action::Resume);
    assert_eq!(injected(&state), None);
}

const INIT: u32 = 0x4500;
const STARTUP: u32 = 0x4600;
const ALL_BUT_SELF: u32 = 3 << 18;

#[test]
fn application_processors_start_with_init_and_startup() {
    let mut s = setup_with(3);
    x2apic_on(&mut s, 0);
    let mut ap = exit(exit_reason::POKED);
    ap.tsc_offset = 42;
    assert_eq!(s.machine.run_state(1), Some(RunState::WaitForSipi));
    assert_eq!(s.machine.prepare_entry(1, &mut ap), Entry::Wait);
    // A STARTUP before INIT also counts: an AP waits for SIPI from reset.
    send_ipi(&mut s, 0, 1, INIT);
    assert_eq!(s.machine.take_kicks(), 0b010);
    assert_eq!(s.machine.prepare_entry(1, &mut ap), Entry::Wait);
    send_ipi(&mut s, 0, 1, STARTUP | 0x9a);
    assert_eq!(s.machine.take_kicks(), 0b010);
    assert_eq!(s.machine.prepare_entry(1, &mut ap), Entry::Run);
    assert_eq!((ap.cs.selector, ap.cs.base, ap.rip), (0x9a00, 0x9a000, 0));
    assert_eq!(ap.tsc_offset, 42, "one TSC for all vCPUs");
    assert_eq!(s.machine.run_state(1), Some(RunState::Running));
    // The second STARTUP (Linux sends two) finds it running.
    ap.rip = 0x10;
    send_ipi(&mut s, 0, 1, STARTUP | 0x9a);
    assert_eq!(s.machine.take_kicks(), 0);
    assert_eq!(s.machine.prepare_entry(1, &mut ap), Entry::Run);
    assert_eq!(ap.rip, 0x10);
    // vCPU 2 was never started; INIT stops vCPU 1 again.
    let mut other = exit(exit_reason::POKED);
    assert_eq!(s.machine.prepare_entry(2, &mut other), Entry::Wait);
    send_ipi(&mut s, 0, 1, INIT);
    assert_eq!(s.machine.prepare_entry(1, &mut ap), Entry::Wait);
    // INIT to the bootstrap processor is ignored (a hostile guest's ICR
    // write must not stop it for good).
    send_ipi(&mut s, 0, 0, INIT);
    let mut bsp = exit(exit_reason::POKED);
    assert_eq!(s.machine.prepare_entry(0, &mut bsp), Entry::Run);
    assert_eq!(s.machine.stats.ignored_inits, 1);
    // No such vCPU: the guest stops, the VMM does not panic.
    let mut state = exit(exit_reason::HLT);
    assert_eq!(
        s.machine.handle_exit(3, &mut state),
        Action::Stop(Stop::Failed(Failure::NoSuchVcpu(3)))
    );
}

#[test]
fn ipis_wake_a_halted_vcpu_and_reach_only_their_targets() {
    let mut s = setup_with(3);
    x2apic_on(&mut s, 0);
    send_ipi(&mut s, 0, 0xffff_ffff, INIT | ALL_BUT_SELF);
    send_ipi(&mut s, 0, 0, STARTUP | ALL_BUT_SELF | 0x10);
    assert_eq!(s.machine.take_kicks(), 0b110);
    for ap in 1..3 {
        let mut state = exit(exit_reason::POKED);
        assert_eq!(s.machine.prepare_entry(ap, &mut state), Entry::Run);
        x2apic_on(&mut s, ap);
    }
    // vCPU 1 halts: it waits until something is deliverable to it.
    let mut halted = exit(exit_reason::HLT);
    halted.rflags = state::RFLAGS_IF;
    assert_eq!(s.machine.handle_exit(1, &mut halted), Action::Halt);
    assert_eq!(s.machine.prepare_entry(1, &mut halted), Entry::Wait);
    // A fixed IPI to APIC 1 only: vCPU 1 is kicked and takes it.
    send_ipi(&mut s, 0, 1, 0x41);
    assert_eq!(s.machine.take_kicks(), 0b010);
    assert!(!s.machine.interrupt_pending(2));
    assert_eq!(s.machine.prepare_entry(1, &mut halted), Entry::Run);
    assert_eq!(
        injected(&halted),
        Some((0x41, event_kind::EXTERNAL_INTERRUPT))
    );
    // All including self, from vCPU 2.
    send_ipi(&mut s, 2, 0, 2 << 18 | 0x52);
    assert_eq!(s.machine.take_kicks(), 0b111);
    assert!((0..3).all(|v| s.machine.interrupt_pending(v)));
    // An NMI is injected as one, unless the guest is in its NMI handler.
    send_ipi(&mut s, 0, 2, 0x400);
    let mut nmi = exit(exit_reason::POKED);
    nmi.interruptibility = state::NMI_BLOCKED;
    s.machine.prepare_entry(2, &mut nmi);
    assert_ne!(nmi.exit_on & exit_on::NMI_WINDOW, 0);
    nmi.interruptibility = 0;
    nmi.dirty = 0;
    s.machine.prepare_entry(2, &mut nmi);
    assert_eq!(injected(&nmi), Some((state::NMI, event_kind::NMI)));
}

#[test]
fn device_interrupts_go_to_the_vcpu_their_destination_names() {
    let mut s = setup_with(2);
    x2apic_on(&mut s, 0);
    send_ipi(&mut s, 0, 1, INIT);
    send_ipi(&mut s, 0, 1, STARTUP | 0x10);
    let mut state = exit(exit_reason::POKED);
    s.machine.prepare_entry(1, &mut state);
    x2apic_on(&mut s, 1);
    s.machine.take_kicks();
    let target = s.machine.lapic_target();
    let to = |id, lowest_priority| Destination {
        id,
        logical: false,
        lowest_priority,
    };
    // An IOAPIC entry with destination 1 (physical).
    assert!(target.deliver_to(0x31, false, to(1, false)));
    assert_eq!(s.machine.take_kicks(), 0b10);
    assert!(s.machine.interrupt_pending(1) && !s.machine.interrupt_pending(0));
    // 0xff: every vCPU, also in x2APIC mode.
    assert!(target.deliver_to(0x32, false, to(0xff, false)));
    assert_eq!(s.machine.take_kicks(), 0b11);
    // An MSI to APIC 1: address bits 19:12.
    MsiToLapic(target.clone()).send(0xfee0_1000, 0x33);
    assert_eq!(s.machine.take_kicks(), 0b10);
    // Nobody there: dropped.
    assert!(!target.deliver_to(0x34, false, to(7, false)));
    assert_eq!(s.machine.take_kicks(), 0);
    // With one vCPU, it takes every message.
    let one = setup_with(1);
    let lone = one.machine.lapic_target();
    let mut one = one;
    x2apic_on(&mut one, 0);
    assert!(lone.deliver_to(0x35, false, to(7, false)));
    assert!(one.machine.interrupt_pending(0));
}

#[test]
fn a_vcpu_halted_with_interrupts_off_sleeps_until_the_last_one_does() {
    let mut s = setup_with(2);
    x2apic_on(&mut s, 0);
    send_ipi(&mut s, 0, 1, INIT);
    send_ipi(&mut s, 0, 1, STARTUP | 0x10);
    let mut ap = exit(exit_reason::POKED);
    assert_eq!(s.machine.prepare_entry(1, &mut ap), Entry::Run);
    // vCPU 1 stops itself as Linux's stop_this_cpu does: it sleeps, an
    // interrupt does not wake it, an NMI does.
    let mut stopped = exit(exit_reason::HLT);
    assert_eq!(s.machine.handle_exit(1, &mut stopped), Action::Halt);
    send_ipi(&mut s, 0, 1, 0x41);
    assert_eq!(s.machine.prepare_entry(1, &mut stopped), Entry::Wait);
    send_ipi(&mut s, 0, 1, 0x400);
    assert_eq!(s.machine.prepare_entry(1, &mut stopped), Entry::Run);
    assert_eq!(injected(&stopped), Some((state::NMI, event_kind::NMI)));
    // Both halted with interrupts off: the guest is dead.
    let mut again = exit(exit_reason::HLT);
    assert_eq!(s.machine.handle_exit(1, &mut again), Action::Halt);
    let mut last = exit(exit_reason::HLT);
    assert_eq!(
        s.machine.handle_exit(0, &mut last),
        Action::Stop(Stop::HaltedForever)
    );
}

/// Frames queued for the guest, and what the guest sent.
type Wire = (VecDeque<Vec<u8>>, Vec<Vec<u8>>);

/// A switch port as the machine sees it; the test keeps a handle.
#[derive(Clone, Default)]
struct FakePort(Rc<RefCell<Wire>>);

impl NetBackend for FakePort {
    fn send(&mut self, frame: &[u8]) {
        self.0.borrow_mut().1.push(frame.to_vec());
    }
    fn poll(&mut self) -> Option<Vec<u8>> {
        self.0.borrow_mut().0.pop_front()
    }
    fn ready(&self) -> bool {
        !self.0.borrow().0.is_empty()
    }
}

/// The network's back end: a connected port is pulled from before each
/// entry, and kept across a reset (taken, leaving the echo peer).
#[test]
fn a_connected_switch_port_is_polled_and_taken_back() {
    let mut s = setup();
    s.machine
        .add_pci_devices(None, Box::new(Zeros), NamedPort::Echo, Hvc0::Echo)
        .unwrap();
    let port = FakePort::default();
    port.0.borrow_mut().0.extend([vec![1; 60], vec![2; 60]]);
    s.machine
        .connect_net(Box::new(port.clone()), [2, 0, 0, 0, 0, 7]);
    s.machine.poll_net();
    assert!(
        port.0.borrow().0.is_empty(),
        "both frames went to the device"
    );
    let mut taken = s.machine.take_net().expect("a back end");
    taken.send(b"after the reset");
    assert_eq!(port.0.borrow().1, [b"after the reset".to_vec()]);
    // The machine is left with the echo peer, which has nothing by itself.
    s.machine.poll_net();
    assert!(!s.machine.take_net().expect("the echo peer").ready());
}

#[test]
fn hvc0_is_a_console_when_the_command_line_names_it() {
    let role = |cmdline: &str| Hvc0::from_cmdline(cmdline.as_bytes());
    assert_eq!(role(""), Hvc0::Echo);
    assert_eq!(role("console=ttyS0 panic=-1"), Hvc0::Echo);
    assert_eq!(role("xconsole=hvc0 console=hvc01"), Hvc0::Echo);
    assert_eq!(
        role("console=hvc0 earlycon=uart8250,io,0x3f8"),
        Hvc0::Console { input: true }
    );
    // The last `console=` is /dev/console, the one typed at.
    assert_eq!(
        role("console=hvc0\tconsole=ttyS0,115200"),
        Hvc0::Console { input: false }
    );
    assert_eq!(
        role("console=ttyS0 console=hvc0,9600"),
        Hvc0::Console { input: true }
    );
}

//! The virtual PC as the VMM runs it: guest RAM, the device models on a
//! port bus and an MMIO bus, interrupt routing, and what to do on each
//! exit. Safe and host-tested: the VMM binary supplies guest memory and
//! time, runs the vCPU, and prints what the guest's console wrote.
#![forbid(unsafe_code)]

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, Ref, RefCell};

use moat_abi::vcpu::{exit_flags, exit_reason, group, VcpuState};
use vdev::acpi_pm::{self, AcpiPm, PowerRequest};
use vdev::debug_exit::{self, DebugExit};
use vdev::ioapic::{self, Destination, InterruptTarget, IoApic};
use vdev::lapic::{self, Delivery, Ipi, Lapic, LapicConfig, Shorthand};
use vdev::pci::{PciConfigIo, PciEcam, PciMmio, PciRoot};
use vdev::pic::{Pic, PicChip, PicPorts};
use vdev::pit::{Pit, SystemControlPort};
use vdev::rtc::Rtc;
use vdev::uart::{self, SerialOut, Uart};
use vdev::virtio::block::{Block, BlockBackend, MemDisk};
use vdev::virtio::console::{Console, PortBackend};
use vdev::virtio::net::{EchoPeer, Net, NetBackend, ECHO_PEER_IP, ECHO_PEER_MAC};
use vdev::virtio::pci::{VirtioPci, VirtioPciWiring};
use vdev::virtio::rng::{EntropySource, Rng};
use vdev::{BadGuestAddress, Bus, BusDevice, Clock, GuestMemory, IrqLine, MsiSink, Shared};

use crate::emulate::{emulate, Outcome};
use crate::msr::{Effect, MsrState};
use crate::pvclock::{self, Scale};
use crate::state::{self, cpu_state, store_cpu_state};
use crate::{cpuid, NotRam, Platform};

/// The guest's TSC, which the binary derives from the host's.
pub trait TimeSource {
    fn guest_tsc(&self) -> u64;
}

/// Guest time for the device models: the guest TSC scaled like kvm-clock
/// scales it, so the guest and the models agree on every nanosecond.
#[derive(Clone)]
pub struct GuestClock {
    time: Rc<dyn TimeSource>,
    scale: Scale,
}

impl GuestClock {
    pub fn new(time: Rc<dyn TimeSource>, scale: Scale) -> Self {
        Self { time, scale }
    }

    pub fn tsc(&self) -> u64 {
        self.time.guest_tsc()
    }
}

impl Clock for GuestClock {
    fn now_ns(&self) -> u64 {
        self.scale.ns(self.time.guest_tsc())
    }
}

/// Where the standard PC devices sit.
pub mod ports {
    pub const PIC_MASTER: u64 = 0x20;
    pub const PIC_SLAVE: u64 = 0xa0;
    pub const PIT: u64 = 0x40;
    pub const SYSTEM_CONTROL: u64 = 0x61;
    pub const RTC: u64 = 0x70;
    pub const COM1: u64 = 0x3f8;
    /// QEMU's pvpanic device, which Linux's pvpanic driver finds in the
    /// DSDT (`QEMU0001`).
    pub const PVPANIC: u64 = 0x505;
    pub const ACPI_PM: u64 = 0x600;
}

/// IOAPIC pins of the ISA devices (IRQ 0 arrives at GSI 2, as the MADT's
/// override says).
mod pins {
    pub const PIT: usize = 2;
    pub const COM1: usize = 4;
    pub const RTC: usize = 8;
}

/// The named port's number on the virtio console (hvc0 is 0).
const NAMED_PORT_INDEX: usize = 1;

/// The PCI side of the standard layout (`firmware::GuestLayout::standard`).
pub mod pci {
    pub const CONFIG_PORT: u64 = 0xcf8;
    pub const MMIO_BASE: u64 = 0xc000_0000;
    pub const MMIO_LEN: u64 = 0x2000_0000;
    pub const ECAM_BASE: u64 = 0xe000_0000;
    pub const ECAM_LEN: u64 = 1 << 20;
    /// INTA# of slot `s` reaches GSI `INTX_GSI_BASE + s % 4`.
    pub const INTX_GSI_BASE: usize = 16;
}

/// The name of the virtio-console port besides hvc0 when the VMM echoes
/// it; relayed to a native service it takes that service's name.
pub const ECHO_PORT: &str = "moat0";

/// What the named virtio-console port is connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamedPort {
    /// [`ECHO_PORT`]: the VMM echoes what the guest writes.
    Echo,
    /// A port of this name whose traffic the binary relays
    /// ([`Machine::take_port_output`], [`Machine::port_input`]).
    Relay(&'static str),
}
/// What hvc0, the virtio console's first port, is to the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hvc0 {
    /// A test fixture beside the guest's console on COM1: the VMM echoes
    /// what the guest writes.
    Echo,
    /// A console of the guest (`console=hvc0`): what it writes goes where
    /// COM1's output goes; with `input` (hvc0 is the last `console=`, the
    /// guest's `/dev/console`) what is typed goes to it instead of COM1.
    Console { input: bool },
}

impl Hvc0 {
    /// hvc0's role from the guest's kernel command line: a console when a
    /// `console=` names it, the one typed at when the last one does.
    pub fn from_cmdline(cmdline: &[u8]) -> Hvc0 {
        let mut named = false;
        let mut last = None;
        for word in cmdline.split(u8::is_ascii_whitespace) {
            let Some(value) = word.strip_prefix(b"console=") else {
                continue;
            };
            // `console=hvc0,115200`: options after the name.
            let name = value.split(|&b| b == b',').next().unwrap_or_default();
            named |= name == b"hvc0";
            last = Some(name);
        }
        if named {
            Hvc0::Console {
                input: last == Some(&b"hvc0"[..]),
            }
        } else {
            Hvc0::Echo
        }
    }
}

/// The guest's MAC address.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// What a virtio-console port's guest wrote, kept until the machine
/// echoes it back.
#[derive(Clone, Default)]
struct EchoPort(Rc<RefCell<Vec<u8>>>);

impl PortBackend for EchoPort {
    fn output(&mut self, data: &[u8]) {
        if let Ok(mut pending) = self.0.try_borrow_mut() {
            pending.extend_from_slice(data);
        }
    }
}

/// MSIs to the local APIC: fixed and lowest-priority messages to the
/// 0xFEEx_xxxx window; anything else is dropped.
struct MsiToLapic(LapicTarget);

const MSI_WINDOW: u64 = 0xfee0_0000;
const MSI_WINDOW_MASK: u64 = 0xfff0_0000;
const MSI_DELIVERY_SHIFT: u32 = 8;
const MSI_LEVEL: u32 = 1 << 15;
/// Address bits 19:12: the destination APIC ID; bit 2: logical.
const MSI_DESTINATION_SHIFT: u32 = 12;
const MSI_LOGICAL: u64 = 1 << 2;

impl MsiSink for MsiToLapic {
    fn send(&self, address: u64, data: u32) {
        let delivery = (data >> MSI_DELIVERY_SHIFT) & 0b111;
        if address & MSI_WINDOW_MASK == MSI_WINDOW && delivery <= 1 {
            let destination = Destination {
                id: ((address >> MSI_DESTINATION_SHIFT) & 0xff) as u32,
                logical: address & MSI_LOGICAL != 0,
                lowest_priority: delivery == 1,
            };
            self.0
                .deliver_to(data as u8, data & MSI_LEVEL != 0, destination);
        }
    }
}

/// The test fixture the guest's network reaches when no switch port is
/// connected: a host at 10.0.2.2 that answers ARP and ping.
fn echo_peer() -> Box<dyn NetBackend> {
    Box::new(EchoPeer::new(ECHO_PEER_MAC, ECHO_PEER_IP))
}

/// The virtio disk's storage: the block service or a RAM disk.
type Storage = Box<dyn BlockBackend>;

/// The virtio devices and what feeds them.
struct Virtio {
    console: Shared<VirtioPci<Console>>,
    /// hvc0's and the named port's output, echoed back (hvc0's only as
    /// [`Hvc0::Echo`]).
    echo: [EchoPort; 2],
    hvc0: Hvc0,
    named: NamedPort,
    block: Option<Shared<VirtioPci<Block<Storage>>>>,
    net: Shared<VirtioPci<Net<Box<dyn NetBackend>>>>,
    rng: Shared<VirtioPci<Rng>>,
}

/// The guest's console bytes, collected for the binary to print.
#[derive(Clone, Default)]
pub struct ConsoleOutput(Rc<RefCell<Vec<u8>>>);

impl ConsoleOutput {
    pub fn take(&self) -> Vec<u8> {
        self.0
            .try_borrow_mut()
            .map(|mut b| core::mem::take(&mut *b))
            .unwrap_or_default()
    }
}

impl SerialOut for ConsoleOutput {
    fn write_byte(&mut self, byte: u8) {
        if let Ok(mut buffer) = self.0.try_borrow_mut() {
            buffer.push(byte);
        }
    }
}

/// hvc0 as a console ([`Hvc0::Console`]): its output joins COM1's.
impl PortBackend for ConsoleOutput {
    fn output(&mut self, data: &[u8]) {
        if let Ok(mut buffer) = self.0.try_borrow_mut() {
            buffer.extend_from_slice(data);
        }
    }
}

type GuestLapic = Lapic<GuestClock>;

/// The vCPUs' local APICs, one per vCPU (APIC ID = vCPU index), and the
/// vCPUs that were given something since the binary last looked
/// ([`Machine::take_kicks`]): a halted one must wake, a running one be
/// poked so that it sees it.
#[derive(Clone)]
pub struct Apics {
    lapics: Rc<Vec<Shared<GuestLapic>>>,
    kicks: Rc<Cell<u64>>,
}

impl Apics {
    fn kick(&self, vcpu: usize) {
        if vcpu < 64 {
            self.kicks.set(self.kicks.get() | 1 << vcpu);
        }
    }

    /// The vCPUs `ipi` from vCPU `sender` reaches (bit i: vCPU i). `None`
    /// if a LAPIC is borrowed, which no path here allows.
    fn route(&self, ipi: &Ipi, sender: usize) -> Option<u64> {
        let borrowed: Vec<Ref<GuestLapic>> = self
            .lapics
            .iter()
            .map(|l| l.try_borrow().ok())
            .collect::<Option<_>>()?;
        let lapics: Vec<&GuestLapic> = borrowed.iter().map(|l| &**l).collect();
        Some(lapic::route(ipi, sender, &lapics))
    }

    /// Hands a fixed or lowest-priority interrupt to vCPU `vcpu`'s LAPIC.
    fn accept(&self, vcpu: usize, vector: u8, level_triggered: bool) -> bool {
        let accepted = self
            .lapics
            .get(vcpu)
            .and_then(|l| l.try_borrow_mut().ok())
            .is_some_and(|mut lapic| lapic.accept(vector, level_triggered));
        if accepted {
            self.kick(vcpu);
        }
        accepted
    }
}

/// Interrupts from the IOAPIC and MSIs go to the local APICs their
/// destination names. No path reaches here while a LAPIC is borrowed
/// (its EOIs are forwarded after its borrow ends), so a failed borrow is
/// a bug that loses one interrupt rather than a panic.
#[derive(Clone)]
pub struct LapicTarget(Apics);

impl InterruptTarget for LapicTarget {
    /// To the first vCPU (a source that names no destination).
    fn deliver(&self, vector: u8, level_triggered: bool) -> bool {
        self.0.accept(0, vector, level_triggered)
    }

    fn deliver_to(&self, vector: u8, level_triggered: bool, destination: Destination) -> bool {
        // One vCPU: every message reaches it, whatever its destination
        // (as before there were several: a guest that rewrites an entry's
        // destination, as the hostile guest does, keeps its interrupts).
        if self.0.lapics.len() == 1 {
            return self.0.accept(0, vector, level_triggered);
        }
        let x2apic = self
            .0
            .lapics
            .first()
            .and_then(|l| l.try_borrow().ok())
            .is_some_and(|l| l.is_x2apic());
        // An 8-bit physical broadcast reaches x2APICs too.
        let id = if x2apic && !destination.logical && destination.id == 0xff {
            u32::MAX
        } else {
            destination.id
        };
        let ipi = Ipi {
            vector,
            mode: if destination.lowest_priority {
                Delivery::LowestPriority
            } else {
                Delivery::Fixed
            },
            shorthand: Shorthand::None,
            destination: id,
            logical: destination.logical,
        };
        let Some(targets) = self.0.route(&ipi, usize::MAX) else {
            return false;
        };
        let mut accepted = false;
        for vcpu in (0..self.0.lapics.len()).filter(|i| targets & (1 << i) != 0) {
            accepted |= self.0.accept(vcpu, vector, level_triggered);
        }
        accepted
    }
}

type GuestIoApic = IoApic<LapicTarget>;

/// A device's interrupt line into an IOAPIC pin.
#[derive(Clone)]
pub struct IoApicPin {
    ioapic: Shared<GuestIoApic>,
    pin: usize,
}

impl IrqLine for IoApicPin {
    fn set_level(&self, high: bool) {
        if let Ok(mut ioapic) = self.ioapic.try_borrow_mut() {
            ioapic.set_irq(self.pin, high);
        }
    }
}

/// QEMU's pvpanic interface: reading shows the events it supports, the
/// guest writes bit 0 when it panics.
#[derive(Default)]
pub struct PvPanic {
    pub panicked: bool,
}

const PVPANIC_PANICKED: u8 = 1;

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_PANICKED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|b| b & PVPANIC_PANICKED != 0) {
            self.panicked = true;
        }
    }
}

/// Something the VMM met and answered with #UD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// An instruction behind an MMIO exit the emulator does not handle.
    Mmio(iced_x86::Code),
    /// INS/OUTS to this port.
    StringIo(u16),
    /// An exit reason the VMM has no use for.
    Exit(u32),
    /// An instruction whose memory operand kept missing the exit's
    /// address ([`MISMATCH_LIMIT`] times at one RIP): not a page-table
    /// race but an access the emulator cannot see (the exit's address).
    Mismatch(u64),
}

/// Refusals kept for the log between two calls of
/// [`Machine::take_refusals`].
const MAX_REFUSALS: usize = 16;

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    PowerOff,
    Reset,
    /// The guest said so through pvpanic.
    Panic,
    /// A triple fault (`SHUTDOWN` exit).
    TripleFault,
    /// HLT with interrupts disabled: nothing can wake it.
    HaltedForever,
    /// The guest wrote this value to the isa-debug-exit port
    /// ([`Machine::add_debug_exit`]).
    DebugExit(u32),
    /// The kernel refused the vCPU state, or an exit the VMM cannot
    /// continue from.
    Failed(Failure),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    InvalidState {
        raw: u64,
        qualification: u64,
    },
    /// An exit handed to the machine for a vCPU it does not have.
    NoSuchVcpu(usize),
    /// Instruction or page table outside RAM during emulation.
    NotRam(u64),
    /// An exception exit (exceptions are the guest's own).
    Exception(u8),
    /// The emulator saw the guest race its page tables too often at one
    /// RIP.
    Mismatch(u64),
}

/// What the binary does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Resume,
    /// Wait until an interrupt is due ([`Machine::next_deadline_ns`]) or
    /// input arrives, then resume.
    Halt,
    Stop(Stop),
}

/// Exits by `exit_reason`, for the boot report.
#[derive(Clone, Debug, Default)]
pub struct ExitStats {
    pub by_reason: [u64; 16],
    /// Port I/O exits to a port no device claims.
    pub unclaimed_ports: u64,
    /// Instructions the emulator refused (#UD injected).
    pub unsupported: u64,
    /// MSR accesses answered with #GP.
    pub msr_faults: u64,
    /// The last of them: the MSR and whether it was a write.
    pub last_msr_fault: Option<(u32, bool)>,
    /// The last exit: its reason and the guest's RIP.
    pub last_exit: Option<(u32, u64)>,
    /// INIT IPIs to vCPU 0, the bootstrap processor, which are ignored.
    pub ignored_inits: u64,
}

impl ExitStats {
    pub fn total(&self) -> u64 {
        self.by_reason.iter().sum()
    }
}

/// An exit reason's name in the state dump.
pub fn exit_name(reason: u32) -> &'static str {
    match reason {
        exit_reason::POKED => "poked",
        exit_reason::IO => "io",
        exit_reason::MEMORY => "mmio",
        exit_reason::CPUID => "cpuid",
        exit_reason::MSR_READ => "rdmsr",
        exit_reason::MSR_WRITE => "wrmsr",
        exit_reason::HLT => "hlt",
        exit_reason::HYPERCALL => "hypercall",
        exit_reason::INTERRUPT_WINDOW => "window",
        exit_reason::NMI_WINDOW => "nmi-window",
        exit_reason::EXCEPTION => "exception",
        exit_reason::SHUTDOWN => "shutdown",
        exit_reason::INVALID_STATE => "invalid-state",
        exit_reason::XSETBV => "xsetbv",
        _ => "other",
    }
}

/// What the machine is made from.
pub struct Config {
    pub ram_size: u64,
    /// vCPUs, 1 to [`MAX_VCPUS`]; vCPU i has APIC ID i, vCPU 0 is the
    /// bootstrap processor, the others wait for INIT and STARTUP.
    pub vcpus: usize,
    pub tsc_hz: u64,
    /// Unix time at guest time 0 (the RTC and kvm-clock's wall clock).
    pub boot_unix_secs: u64,
}

/// The most vCPUs a machine has (a bit each in [`Machine::take_kicks`]).
pub const MAX_VCPUS: usize = 64;

/// Where a vCPU is in the start-up protocol (SDM Vol. 3A 9.4, 10.6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// After power-up (application processors) or an INIT: runs only
    /// after a STARTUP IPI.
    WaitForSipi,
}

/// What the machine keeps per vCPU besides its LAPIC.
#[derive(Clone, Debug)]
struct VcpuSlot {
    run: RunState,
    /// A STARTUP's vector, received while waiting for it.
    sipi: Option<u8>,
    /// An NMI to inject.
    nmi: bool,
    /// HLT: the vCPU waits until an interrupt is deliverable to it.
    halted: bool,
    /// HLT with interrupts disabled: only an NMI or INIT ends it.
    halted_if_off: bool,
    /// The guest's CR8 as of the last exit.
    cr8_seen: u64,
    msrs: MsrState,
    mismatch: (u64, u32),
}

impl VcpuSlot {
    fn new(run: RunState) -> Self {
        Self {
            run,
            sipi: None,
            nmi: false,
            halted: false,
            halted_if_off: false,
            cr8_seen: 0,
            msrs: MsrState::default(),
            mismatch: (0, 0),
        }
    }
}

/// What a vCPU's thread does next ([`Machine::prepare_entry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Enter the guest.
    Run,
    /// Sleep until kicked ([`Machine::take_kicks`]): halted, or waiting
    /// for a STARTUP IPI.
    Wait,
}

/// Emulation gives up after this many page-table races at one RIP and
/// answers the instruction with #UD.
pub const MISMATCH_LIMIT: u32 = 1000;
/// Fixed lengths of the instructions whose exits may lack one (SVM
/// without NRIP): CPUID, RDMSR, WRMSR (0F xx), HLT (F4), XSETBV and
/// VMCALL/VMMCALL (0F 01 xx).
const TWO_BYTES: u64 = 2;
const HLT_LEN: u64 = 1;
const THREE_BYTES: u64 = 3;
const CR4_OSXSAVE: u64 = 1 << 18;
/// KVM's answer to an unknown hypercall.
const KVM_ENOSYS: u64 = (-1000i64) as u64;

pub struct Machine {
    mem: Rc<dyn GuestMemory>,
    ram_size: u64,
    pio: Bus,
    mmio: Bus,
    apics: Apics,
    vcpus: Vec<VcpuSlot>,
    ioapic: Shared<GuestIoApic>,
    uart: Shared<Uart<IoApicPin, ConsoleOutput>>,
    pm: Shared<AcpiPm>,
    pvpanic: Shared<PvPanic>,
    pit: Shared<Pit<GuestClock, IoApicPin>>,
    rtc: Shared<Rtc<GuestClock, IoApicPin>>,
    console: ConsoleOutput,
    clock: GuestClock,
    boot_unix_secs: u64,
    host_cpuid: Box<dyn Fn(u32, u32) -> [u32; 4]>,
    /// Console input the UART's FIFO had no room for yet.
    pending_input: Vec<u8>,
    virtio: Option<Virtio>,
    debug_exit: Option<Shared<DebugExit>>,
    refusals: Vec<(u64, Refused)>,
    pub stats: ExitStats,
}

fn shared<D>(device: D) -> Shared<D> {
    Rc::new(RefCell::new(device))
}

impl Machine {
    /// A PC with the standard devices; the binary loads the guest into RAM
    /// with `firmware` before the first run.
    pub fn new(
        config: &Config,
        mem: Rc<dyn GuestMemory>,
        time: Rc<dyn TimeSource>,
        host_cpuid: Box<dyn Fn(u32, u32) -> [u32; 4]>,
    ) -> Option<Self> {
        let scale = Scale::for_frequency(config.tsc_hz)?;
        if !(1..=MAX_VCPUS).contains(&config.vcpus) {
            return None;
        }
        let clock = GuestClock::new(time, scale);
        let lapics: Vec<_> = (0..config.vcpus)
            .map(|id| {
                let lapic = shared(Lapic::new(
                    clock.clone(),
                    LapicConfig {
                        apic_id: id as u32,
                        bsp: id == 0,
                        timer_hz: config.tsc_hz,
                        tsc_hz: config.tsc_hz,
                    },
                ));
                lapic.borrow_mut().set_guest_tsc(clock.tsc());
                lapic
            })
            .collect();
        let apics = Apics {
            lapics: Rc::new(lapics),
            kicks: Rc::new(Cell::new(0)),
        };
        let vcpus = (0..config.vcpus)
            .map(|i| {
                VcpuSlot::new(if i == 0 {
                    RunState::Running
                } else {
                    RunState::WaitForSipi
                })
            })
            .collect();
        let ioapic = shared(IoApic::new(LapicTarget(apics.clone())));
        let pin = |pin| IoApicPin {
            ioapic: ioapic.clone(),
            pin,
        };
        let console = ConsoleOutput::default();
        let uart = shared(Uart::new(pin(pins::COM1), console.clone()));
        let pm = shared(AcpiPm::new());
        let pvpanic = shared(PvPanic::default());
        let pit = shared(Pit::new(clock.clone(), pin(pins::PIT)));
        let rtc = shared(Rtc::new(
            clock.clone(),
            pin(pins::RTC),
            config.boot_unix_secs,
        ));
        let pic = shared(Pic::new());

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let pic_ports = |chip| {
            shared(PicPorts {
                pic: pic.clone(),
                chip,
            })
        };
        let placed = [
            pio.insert(ports::PIC_MASTER, 2, pic_ports(PicChip::Master)),
            pio.insert(ports::PIC_SLAVE, 2, pic_ports(PicChip::Slave)),
            pio.insert(ports::PIT, 4, pit.clone()),
            pio.insert(
                ports::SYSTEM_CONTROL,
                1,
                shared(SystemControlPort(pit.clone())),
            ),
            pio.insert(ports::RTC, 2, rtc.clone()),
            pio.insert(ports::COM1, uart::WINDOW_LEN, uart.clone()),
            pio.insert(ports::PVPANIC, 1, pvpanic.clone()),
            pio.insert(ports::ACPI_PM, acpi_pm::WINDOW_LEN, pm.clone()),
            mmio.insert(0xfec0_0000, ioapic::WINDOW_LEN, ioapic.clone()),
        ];
        if placed.iter().any(Result::is_err) {
            return None;
        }
        Some(Self {
            mem,
            ram_size: config.ram_size,
            pio,
            mmio,
            apics,
            vcpus,
            ioapic,
            uart,
            pm,
            pvpanic,
            pit,
            rtc,
            console,
            clock,
            boot_unix_secs: config.boot_unix_secs,
            host_cpuid,
            pending_input: Vec::new(),
            virtio: None,
            debug_exit: None,
            refusals: Vec::new(),
            stats: ExitStats::default(),
        })
    }

    /// Adds QEMU's isa-debug-exit device at its default port (0xf4, 4
    /// ports): a guest write there stops the guest with
    /// [`Stop::DebugExit`].
    pub fn add_debug_exit(&mut self) -> Result<(), vdev::BusError> {
        let device = shared(DebugExit::new());
        self.pio.insert(
            debug_exit::DEFAULT_PORT,
            debug_exit::WINDOW_LEN,
            device.clone(),
        )?;
        self.debug_exit = Some(device);
        Ok(())
    }

    /// Adds the PCI host bridge with the virtio devices: console (hvc0 as
    /// `hvc0` says, and the `named` port), block on the storage `disk` (if
    /// any), net to an echo peer, entropy from `entropy`.
    pub fn add_pci_devices(
        &mut self,
        disk: Option<Box<dyn BlockBackend>>,
        entropy: Box<dyn EntropySource>,
        named: NamedPort,
        hvc0: Hvc0,
    ) -> Result<(), vdev::pci::PciError> {
        let root = shared(PciRoot::new(pci::MMIO_BASE, pci::MMIO_LEN));
        let wiring = |slot: u8| {
            let pin = pci::INTX_GSI_BASE + usize::from(slot) % 4;
            VirtioPciWiring {
                mem: self.mem.clone(),
                msi: Rc::new(MsiToLapic(self.lapic_target())),
                intx: Rc::new(self.irq_line(pin)),
                intx_irq: pin as u8,
            }
        };
        let echo = [EchoPort::default(), EchoPort::default()];
        let name = match named {
            NamedPort::Echo => ECHO_PORT,
            NamedPort::Relay(name) => name,
        };
        let ports: Vec<(&str, Box<dyn PortBackend>)> =
            Vec::from([(name, Box::new(echo[1].clone()) as Box<dyn PortBackend>)]);
        let hvc0_backend: Box<dyn PortBackend> = match hvc0 {
            Hvc0::Echo => Box::new(echo[0].clone()),
            Hvc0::Console { .. } => Box::new(self.console.clone()),
        };
        let console = Console::new(hvc0_backend, ports);
        // Slots are handed out 1, 2, ... in the order of `add`.
        let console = shared(VirtioPci::new(console, wiring(1))?);
        root.borrow_mut().add(console.clone())?;
        let mut next = 2;
        let block = match disk {
            Some(storage) => {
                let block = Block::new(storage, b"moat-disk");
                let block = shared(VirtioPci::new(block, wiring(next))?);
                root.borrow_mut().add(block.clone())?;
                next += 1;
                Some(block)
            }
            None => None,
        };
        let net = Net::new(GUEST_MAC, echo_peer());
        let net = shared(VirtioPci::new(net, wiring(next))?);
        root.borrow_mut().add(net.clone())?;
        let rng = shared(VirtioPci::new(Rng::new(entropy), wiring(next + 1))?);
        root.borrow_mut().add(rng.clone())?;
        root.borrow_mut().assign_bars()?;

        let placed = [
            self.pio
                .insert(pci::CONFIG_PORT, 8, shared(PciConfigIo::new(root.clone()))),
            self.mmio.insert(
                pci::ECAM_BASE,
                pci::ECAM_LEN,
                shared(PciEcam::new(root.clone())),
            ),
            self.mmio
                .insert(pci::MMIO_BASE, pci::MMIO_LEN, shared(PciMmio::new(root))),
        ];
        if placed.iter().any(Result::is_err) {
            return Err(vdev::pci::PciError::Layout);
        }
        self.virtio = Some(Virtio {
            console,
            echo,
            hvc0,
            named,
            block,
            net,
            rng,
        });
        Ok(())
    }

    /// The VMM's state dump, one line each (without a prefix): exits by
    /// reason and the last one, the interrupt controllers' pending and
    /// in-service vectors, and every virtqueue's indices as the guest and
    /// the device see them. docs/architecture.md, "A stalled run explains
    /// itself".
    pub fn dump(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let s = &self.stats;
        let mut exits = format!("exits {}:", s.total());
        for (reason, &count) in s.by_reason.iter().enumerate() {
            if count > 0 {
                exits.push_str(&format!(" {} {count}", exit_name(reason as u32)));
            }
        }
        lines.push(exits);
        lines.push(match s.last_exit {
            Some((reason, rip)) => format!("last exit {} at rip {rip:#x}", exit_name(reason)),
            None => "last exit none".into(),
        });
        let vector = |v: Option<u8>| v.map_or("none".into(), |v| format!("{v:#x}"));
        for (i, lapic) in self.apics.lapics.iter().enumerate() {
            let Ok(lapic) = lapic.try_borrow() else {
                lines.push(format!("interrupts: vcpu{i} lapic busy, not shown"));
                continue;
            };
            let (requested, in_service) = lapic.highest_requested_and_in_service();
            let slot = &self.vcpus[i];
            // vCPU 0 keeps the line's old form.
            let who = if i == 0 {
                String::new()
            } else {
                format!("vcpu{i} ")
            };
            lines.push(format!(
                "interrupts: {who}lapic highest requested {} in service {}, deliverable {}, tpr {:#x}{}{}",
                vector(requested),
                vector(in_service),
                vector(lapic.pending_interrupt()),
                lapic.tpr(),
                if slot.run == RunState::WaitForSipi { ", waits for SIPI" } else { "" },
                if slot.halted { ", halted" } else { "" },
            ));
        }
        if let Some(v) = &self.virtio {
            let mut device =
                |name: &str, status: u8, views: Vec<vdev::virtio::queue::QueueView>| {
                    for (index, view) in views.iter().enumerate() {
                        lines.push(format!(
                            "virtio-{name} (status {status:#x}) queue {index}: {view}"
                        ));
                    }
                };
            // A device held elsewhere (the dump was asked for in the middle
            // of its work) is said to be busy: a dump never panics the VMM.
            let mut busy = Vec::new();
            match v.console.try_borrow() {
                Ok(c) => device("console", c.status(), c.queue_views()),
                Err(_) => busy.push("console"),
            }
            if let Some(b) = &v.block {
                match b.try_borrow() {
                    Ok(b) => device("block", b.status(), b.queue_views()),
                    Err(_) => busy.push("block"),
                }
            }
            match v.net.try_borrow() {
                Ok(n) => device("net", n.status(), n.queue_views()),
                Err(_) => busy.push("net"),
            }
            match v.rng.try_borrow() {
                Ok(r) => device("rng", r.status(), r.queue_views()),
                Err(_) => busy.push("rng"),
            }
            for name in busy {
                lines.push(format!("virtio-{name}: busy, not shown"));
            }
        }
        lines
    }

    /// Connects the guest's network to `backend` (a switch port) with the
    /// MAC address `mac`, instead of the echo peer; before the guest runs.
    pub fn connect_net(&mut self, backend: Box<dyn NetBackend>, mac: [u8; 6]) {
        if let Some(virtio) = &self.virtio {
            virtio.net.borrow_mut().update(|net| {
                net.set_mac(mac);
                *net.backend_mut() = backend;
            });
        }
    }

    /// The network's back end, to keep across a guest reset; the machine
    /// is left with the echo peer.
    pub fn take_net(&self) -> Option<Box<dyn NetBackend>> {
        let virtio = self.virtio.as_ref()?;
        let backend = virtio
            .net
            .borrow_mut()
            .update(|net| core::mem::replace(net.backend_mut(), echo_peer()));
        Some(backend)
    }

    /// Hands the guest the frames its network back end has (a switch port
    /// whose frames arrive by themselves), as far as the device's backlog
    /// has room, and the back end the guest's frames that waited for room;
    /// called before each entry.
    pub fn poll_net(&mut self) {
        let Some(virtio) = &self.virtio else { return };
        let Ok(mut net) = virtio.net.try_borrow_mut() else {
            return;
        };
        if net.device().wants_pull() || net.device().tx_waiting() {
            net.update(|net| net.pull());
        }
    }

    /// The virtio disk's storage, to keep across a guest reset; the
    /// machine is left with an empty disk.
    pub fn take_disk(&self) -> Option<Box<dyn BlockBackend>> {
        let block = self.virtio.as_ref()?.block.as_ref()?;
        let empty: Box<dyn BlockBackend> = Box::new(MemDisk::new(Vec::new()));
        let storage = block
            .borrow_mut()
            .update(|device| core::mem::replace(device.backend_mut(), empty));
        Some(storage)
    }

    /// What the guest wrote to a relayed named port since the last call.
    pub fn take_port_output(&self) -> Vec<u8> {
        let Some(virtio) = self.virtio.as_ref().filter(|v| v.named != NamedPort::Echo) else {
            return Vec::new();
        };
        virtio.echo[NAMED_PORT_INDEX]
            .0
            .try_borrow_mut()
            .map(|mut b| core::mem::take(&mut *b))
            .unwrap_or_default()
    }

    /// Bytes for the guest on the relayed named port; returns how many fit.
    pub fn port_input(&mut self, bytes: &[u8]) -> usize {
        let Some(virtio) = &self.virtio else { return 0 };
        let Ok(mut console) = virtio.console.try_borrow_mut() else {
            return 0;
        };
        console.update(|c| c.port_input(NAMED_PORT_INDEX as u32, bytes))
    }

    /// Opens or closes the host end of the relayed named port (the guest
    /// sees a port reset: end-of-file, then the port open again).
    pub fn set_port_open(&mut self, open: bool) {
        let Some(virtio) = &self.virtio else { return };
        if let Ok(mut console) = virtio.console.try_borrow_mut() {
            console.update(|c| c.set_host_open(NAMED_PORT_INDEX as u32, open));
        }
    }

    /// Lets the console deliver input it holds into receive buffers the
    /// guest may have posted without a notification acted on; called when
    /// the guest waits (HLT) or was poked.
    pub fn kick_devices(&mut self) {
        self.feed_input();
        if let Some(virtio) = &self.virtio {
            if let Ok(mut console) = virtio.console.try_borrow_mut() {
                console.update(|_| ());
            }
        }
    }

    /// Echoes what the guest wrote to its console ports (not to a relayed
    /// one: the binary takes that; not to hvc0 as a console).
    fn echo_ports(&mut self) {
        let Some(virtio) = &self.virtio else { return };
        let echoed = [virtio.hvc0 == Hvc0::Echo, virtio.named == NamedPort::Echo];
        for (port, echo) in virtio.echo.iter().enumerate() {
            if !echoed[port] {
                continue;
            }
            let data = echo
                .0
                .try_borrow_mut()
                .map(|mut b| core::mem::take(&mut *b));
            let Ok(data) = data else { continue };
            if data.is_empty() {
                continue;
            }
            if let Ok(mut console) = virtio.console.try_borrow_mut() {
                let taken = console.update(|c| c.port_input(port as u32, &data));
                // What did not fit is dropped: an echo may lose bytes under
                // a flood, like a real line.
                let _ = taken;
            }
        }
    }

    /// An interrupt line into IOAPIC pin `pin`.
    pub fn irq_line(&self, pin: usize) -> IoApicPin {
        IoApicPin {
            ioapic: self.ioapic.clone(),
            pin,
        }
    }

    /// Where MSIs go.
    pub fn lapic_target(&self) -> LapicTarget {
        LapicTarget(self.apics.clone())
    }

    /// How many vCPUs the machine has.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Where vCPU `vcpu` is in the start-up protocol.
    pub fn run_state(&self, vcpu: usize) -> Option<RunState> {
        self.vcpus.get(vcpu).map(|v| v.run)
    }

    /// The vCPUs (bit i: vCPU i) that were sent an interrupt, an IPI, INIT
    /// or STARTUP since the last call: the binary wakes each (it may be
    /// halted) and pokes it (it may be in the guest), but for the one
    /// whose exit it is handling.
    pub fn take_kicks(&mut self) -> u64 {
        self.apics.kicks.replace(0)
    }

    fn lapic(&self, vcpu: usize) -> &Shared<GuestLapic> {
        &self.apics.lapics[vcpu]
    }

    pub fn clock(&self) -> &GuestClock {
        &self.clock
    }

    /// What the guest wrote to its serial console since the last call.
    pub fn take_console_output(&self) -> Vec<u8> {
        self.console.take()
    }

    /// Bytes typed at the console, for the guest's serial port.
    pub fn console_input(&mut self, bytes: &[u8]) {
        self.pending_input.extend_from_slice(bytes);
        self.feed_input();
    }

    fn feed_input(&mut self) {
        if self.pending_input.is_empty() {
            return;
        }
        let hvc0 = self
            .virtio
            .as_ref()
            .filter(|v| v.hvc0 == Hvc0::Console { input: true });
        if let Some(virtio) = hvc0 {
            if let Ok(mut console) = virtio.console.try_borrow_mut() {
                let pending = &self.pending_input;
                let taken = console.update(|c| c.port_input(0, pending));
                self.pending_input.drain(..taken);
            }
            return;
        }
        if let Ok(mut uart) = self.uart.try_borrow_mut() {
            let taken = uart.enqueue_input(&self.pending_input);
            self.pending_input.drain(..taken);
        }
    }

    /// When the next device timer fires, in guest nanoseconds.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let lapics = self.apics.lapics.iter();
        let lapic = lapics.filter_map(|l| l.borrow().timer_deadline_ns()).min();
        let pit = self.pit.borrow().deadline_ns();
        let rtc = self.rtc.borrow().deadline_ns();
        [lapic, pit, rtc].into_iter().flatten().min()
    }

    /// Brings the timers up to date and forwards interrupts; called before
    /// each entry and after each wait.
    pub fn poll(&mut self) {
        self.pit.borrow_mut().poll();
        self.rtc.borrow_mut().poll();
        for (vcpu, lapic) in self.apics.lapics.iter().enumerate() {
            let mut lapic = lapic.borrow_mut();
            let before = lapic.pending_interrupt();
            lapic.poll_timer();
            let after = lapic.pending_interrupt();
            if after.is_some() && after != before {
                self.apics.kick(vcpu);
            }
        }
        self.forward_eois();
        self.feed_input();
    }

    fn forward_eois(&mut self) {
        for vcpu in 0..self.vcpus.len() {
            loop {
                let eoi = self.lapic(vcpu).borrow_mut().take_level_eoi();
                let Some(vector) = eoi else { break };
                self.ioapic.borrow_mut().end_of_interrupt(vector);
            }
        }
    }

    /// Delivers the IPIs vCPU `from` sent through its ICR.
    fn send_ipis(&mut self, from: usize) {
        loop {
            let ipi = self.lapic(from).borrow_mut().take_ipi();
            let Some(ipi) = ipi else { break };
            let Some(targets) = self.apics.route(&ipi, from) else {
                continue;
            };
            for to in (0..self.vcpus.len()).filter(|i| targets & (1 << i) != 0) {
                self.deliver_ipi(from, to, &ipi);
            }
        }
    }

    fn deliver_ipi(&mut self, from: usize, to: usize, ipi: &Ipi) {
        let slot = &mut self.vcpus[to];
        match ipi.mode {
            Delivery::Fixed | Delivery::LowestPriority => {
                self.apics.accept(to, ipi.vector, false);
                return;
            }
            // An NMI to the sender itself is dropped, as before there
            // were APs (Linux sends NMIs only to other CPUs; a hostile
            // guest's self-NMIs stopped hostile_linux's guest).
            Delivery::Nmi if to == from => return,
            Delivery::Nmi => slot.nmi = true,
            // INIT to the bootstrap processor restarts it at the reset
            // vector on a PC; Linux never sends it, and a hostile guest's
            // random ICR write must not stop the guest for good: ignored,
            // as this VMM did before it had APs.
            Delivery::Init if to == 0 => {
                self.stats.ignored_inits += 1;
                return;
            }
            Delivery::Init => {
                slot.run = RunState::WaitForSipi;
                slot.sipi = None;
                slot.nmi = false;
                slot.halted = false;
                slot.halted_if_off = false;
                self.apics.lapics[to].borrow_mut().init();
            }
            // Only a vCPU that waits takes it (a second STARTUP, as
            // Linux sends, finds it started).
            Delivery::Startup if slot.run == RunState::WaitForSipi && slot.sipi.is_none() => {
                slot.sipi = Some(ipi.vector);
            }
            Delivery::Startup => return,
        }
        self.apics.kick(to);
    }

    /// Whether an interrupt waits for vCPU `vcpu` (to end a halt).
    pub fn interrupt_pending(&self, vcpu: usize) -> bool {
        self.lapic(vcpu).borrow().pending_interrupt().is_some()
            || self.vcpus[vcpu].nmi
            || self.vcpus[vcpu].sipi.is_some()
    }

    /// Sets up vCPU `vcpu`'s next entry: starts it if it waited for a
    /// STARTUP that came (its state becomes real mode at the vector's
    /// page), else says to wait; re-injects an event the last exit
    /// interrupted, else injects an NMI or the highest pending interrupt
    /// if the guest can take it, else asks for a window exit.
    pub fn prepare_entry(&mut self, vcpu: usize, state: &mut VcpuState) -> Entry {
        self.poll();
        // The caller is about to run it: nothing need wake it.
        self.apics.kicks.set(self.apics.kicks.get() & !(1 << vcpu));
        let slot = &mut self.vcpus[vcpu];
        if let Some(vector) = slot.sipi.take() {
            *state = state::startup(vector, state);
            slot.run = RunState::Running;
        }
        if slot.run == RunState::WaitForSipi {
            return Entry::Wait;
        }
        if slot.halted {
            let wakes = if slot.halted_if_off {
                slot.nmi
            } else {
                self.interrupt_pending(vcpu)
            };
            if !wakes {
                return Entry::Wait;
            }
            self.vcpus[vcpu].halted = false;
            self.vcpus[vcpu].halted_if_off = false;
        }
        let reinject = state.exit.pending_valid != 0 && state.dirty & group::INJECT == 0;
        if reinject {
            state.inject = state.exit.pending;
            state.dirty |= group::INJECT;
            state.exit.pending_valid = 0;
        }
        let nmi_window = moat_abi::vcpu::exit_on::NMI_WINDOW;
        let mut want_nmi_window = false;
        if self.vcpus[vcpu].nmi {
            if state.dirty & group::INJECT == 0 && state.interruptibility & state::NMI_BLOCKED == 0
            {
                self.vcpus[vcpu].nmi = false;
                state::inject(state, state::NMI, moat_abi::vcpu::event_kind::NMI, None);
            } else {
                want_nmi_window = true;
            }
        }
        if want_nmi_window != (state.exit_on & nmi_window != 0) {
            state.exit_on ^= nmi_window;
            state.dirty |= group::EXIT_ON;
        }
        let pending = self.lapic(vcpu).borrow().pending_interrupt();
        let busy = state.dirty & group::INJECT != 0;
        let want_window = match pending {
            Some(vector) if !busy && state::interruptible(state) => {
                self.lapic(vcpu).borrow_mut().acknowledge(vector);
                state::inject(
                    state,
                    vector,
                    moat_abi::vcpu::event_kind::EXTERNAL_INTERRUPT,
                    None,
                );
                false
            }
            Some(_) => true,
            None => false,
        };
        let window = moat_abi::vcpu::exit_on::INTERRUPT_WINDOW;
        if want_window != (state.exit_on & window != 0) {
            state.exit_on ^= window;
            state.dirty |= group::EXIT_ON;
        }
        Entry::Run
    }

    /// Handles vCPU `vcpu`'s exit in `state` and says what comes next.
    /// A vCPU number past the machine's is a bug of the caller: the
    /// guest is stopped rather than the VMM panicking.
    pub fn handle_exit(&mut self, vcpu: usize, state: &mut VcpuState) -> Action {
        if vcpu >= self.vcpus.len() {
            return Action::Stop(Stop::Failed(Failure::NoSuchVcpu(vcpu)));
        }
        // CR8 and the APIC's TPR are one register: the guest may have
        // changed either.
        if state.cr8 != self.vcpus[vcpu].cr8_seen {
            self.lapic(vcpu)
                .borrow_mut()
                .set_tpr(((state.cr8 & 0xf) as u8) << 4);
        }
        let action = self.dispatch(vcpu, state);
        let cr8 = u64::from(self.lapic(vcpu).borrow().tpr() >> 4);
        if cr8 != state.cr8 {
            state.cr8 = cr8;
            state.dirty |= group::CONTROL_REGISTERS;
        }
        self.vcpus[vcpu].cr8_seen = state.cr8;
        if action == Action::Halt {
            self.vcpus[vcpu].halted = true;
        }
        action
    }

    fn dispatch(&mut self, vcpu: usize, state: &mut VcpuState) -> Action {
        let reason = state.exit.reason;
        if let Some(count) = self.stats.by_reason.get_mut(reason as usize) {
            *count += 1;
        }
        self.stats.last_exit = Some((reason, state.rip));
        let action = match reason {
            exit_reason::POKED => {
                self.kick_devices();
                Action::Resume
            }
            exit_reason::INTERRUPT_WINDOW | exit_reason::NMI_WINDOW => Action::Resume,
            exit_reason::IO => self.port_io(state),
            exit_reason::MEMORY => self.mmio(vcpu, state),
            exit_reason::CPUID => {
                let leaf = state.rax as u32;
                let subleaf = state.rcx as u32;
                let view = cpuid::GuestView {
                    osxsave: state.cr4 & CR4_OSXSAVE != 0,
                    xcr0: state.xcr0,
                    apic_id: vcpu as u32,
                    vcpus: self.vcpus.len() as u32,
                };
                let [a, b, c, d] = cpuid::guest_cpuid(&*self.host_cpuid, leaf, subleaf, view);
                state.rax = a.into();
                state.rbx = b.into();
                state.rcx = c.into();
                state.rdx = d.into();
                state.dirty |= group::GPRS;
                self.skip(state, TWO_BYTES);
                Action::Resume
            }
            exit_reason::MSR_READ => self.rdmsr(vcpu, state),
            exit_reason::MSR_WRITE => self.wrmsr(vcpu, state),
            exit_reason::HLT => {
                self.skip(state, HLT_LEN);
                self.kick_devices();
                self.poll();
                if state.rflags & state::RFLAGS_IF == 0 {
                    // Only an NMI or INIT from another vCPU can end it
                    // (Linux stops its other CPUs so); with every vCPU so
                    // halted or stopped, the guest is dead.
                    self.vcpus[vcpu].halted_if_off = true;
                    let others_dead = self.vcpus.iter().enumerate().all(|(i, v)| {
                        i == vcpu || v.run == RunState::WaitForSipi || (v.halted && v.halted_if_off)
                    });
                    if others_dead && !self.vcpus[vcpu].nmi {
                        Action::Stop(Stop::HaltedForever)
                    } else {
                        Action::Halt
                    }
                } else if self.interrupt_pending(vcpu) {
                    Action::Resume
                } else {
                    Action::Halt
                }
            }
            exit_reason::XSETBV => self.xsetbv(state),
            exit_reason::HYPERCALL => {
                // Not the Moat IPC hypercall (the kernel handles that):
                // what KVM answers for a hypercall it does not know.
                state.rax = KVM_ENOSYS;
                state.dirty |= group::GPRS;
                self.skip(state, THREE_BYTES);
                Action::Resume
            }
            exit_reason::SHUTDOWN => Action::Stop(Stop::TripleFault),
            exit_reason::INVALID_STATE => Action::Stop(Stop::Failed(Failure::InvalidState {
                raw: state.exit.raw,
                qualification: state.exit.qualification,
            })),
            exit_reason::EXCEPTION => {
                Action::Stop(Stop::Failed(Failure::Exception(state.exit.vector)))
            }
            reason => {
                self.refuse(state, Refused::Exit(reason));
                Action::Resume
            }
        };
        self.after_access(vcpu, action)
    }

    /// Device side effects of the access just done.
    fn after_access(&mut self, vcpu: usize, action: Action) -> Action {
        self.send_ipis(vcpu);
        self.echo_ports();
        self.forward_eois();
        if self.pvpanic.borrow().panicked {
            return Action::Stop(Stop::Panic);
        }
        if let Some(value) = self.debug_exit.as_ref().and_then(|d| d.borrow().value()) {
            return Action::Stop(Stop::DebugExit(value));
        }
        match self.pm.borrow().request() {
            Some(PowerRequest::PowerOff) => Action::Stop(Stop::PowerOff),
            Some(PowerRequest::Reset) => Action::Stop(Stop::Reset),
            None => action,
        }
    }

    /// Skips the exiting instruction: its reported length, else `fixed`.
    fn skip(&self, state: &mut VcpuState, fixed: u64) {
        let len = match state.exit.instruction_length {
            0 => fixed,
            len => len,
        };
        state::advance(state, len);
    }

    fn port_io(&mut self, state: &mut VcpuState) -> Action {
        let exit = state.exit;
        if exit.flags & exit_flags::IO_STRING != 0 {
            // No device here needs INS/OUTS; refuse rather than guess.
            self.refuse(state, Refused::StringIo(exit.port));
            return Action::Resume;
        }
        let size = usize::from(exit.size).clamp(1, 4);
        let port = u64::from(exit.port);
        let claimed = if exit.flags & exit_flags::IO_IN != 0 {
            let mut data = [0u8; 4];
            let claimed = self.pio.read(port, &mut data[..size]);
            let value = u64::from(u32::from_le_bytes(data));
            state.rax = match size {
                1 => (state.rax & !0xff) | (value & 0xff),
                2 => (state.rax & !0xffff) | (value & 0xffff),
                // A 32-bit destination zero-extends.
                _ => value,
            };
            state.dirty |= group::GPRS;
            claimed
        } else {
            let value = (state.rax as u32).to_le_bytes();
            self.pio.write(port, &value[..size])
        };
        if !claimed {
            self.stats.unclaimed_ports += 1;
        }
        // IN and OUT are 1 or 2 bytes; the kernel reports the length on
        // both vendors (SVM from EXITINFO2 when there is no NRIP).
        self.skip(state, 1);
        Action::Resume
    }

    fn mmio(&mut self, vcpu: usize, state: &mut VcpuState) -> Action {
        let gpa = state.exit.gpa;
        let mut cpu = cpu_state(state);
        let outcome = {
            let mut platform = MachinePlatform {
                mem: &*self.mem,
                ram_size: self.ram_size,
                mmio: &self.mmio,
                lapic: &self.apics.lapics[vcpu],
                phys_bits: phys_bits(&*self.host_cpuid),
            };
            emulate(&mut platform, &mut cpu, gpa)
        };
        match outcome {
            Outcome::Done => {
                store_cpu_state(state, &cpu);
                state::end_shadow(state);
            }
            Outcome::Repeat => store_cpu_state(state, &cpu),
            Outcome::Fault(exception) => state::inject_exception(state, exception),
            Outcome::Unsupported(code) => self.refuse(state, Refused::Mmio(code)),
            Outcome::Mismatch => {
                let (rip, count) = self.vcpus[vcpu].mismatch;
                let count = if rip == state.rip { count + 1 } else { 1 };
                self.vcpus[vcpu].mismatch = (state.rip, count);
                if count >= MISMATCH_LIMIT {
                    // Hostile guest (issue 11): user-mode junk made this
                    // repeat for ever; stopping the VM for it would let
                    // any process with an MMIO mapping end the guest.
                    self.vcpus[vcpu].mismatch = (0, 0);
                    self.refuse(state, Refused::Mismatch(gpa));
                }
            }
            Outcome::NotRam(gpa) => return Action::Stop(Stop::Failed(Failure::NotRam(gpa))),
        }
        Action::Resume
    }

    /// Injects #UD for something the VMM does not emulate, and notes it.
    fn refuse(&mut self, state: &mut VcpuState, what: Refused) {
        self.stats.unsupported += 1;
        if self.refusals.len() < MAX_REFUSALS {
            self.refusals.push((state.rip, what));
        }
        state::inject_ud(state);
    }

    /// What was refused with #UD since the last call (the first
    /// [`MAX_REFUSALS`] only), with the guest's RIP, for the log.
    pub fn take_refusals(&mut self) -> Vec<(u64, Refused)> {
        core::mem::take(&mut self.refusals)
    }

    fn rdmsr(&mut self, vcpu: usize, state: &mut VcpuState) -> Action {
        let index = state.rcx as u32;
        let value = if is_lapic_msr(index) {
            self.lapic(vcpu).borrow_mut().read_msr(index)
        } else {
            self.vcpus[vcpu].msrs.read(state, index, self.clock.tsc())
        };
        match value {
            Some(value) => {
                state.rax = value & 0xffff_ffff;
                state.rdx = value >> 32;
                state.dirty |= group::GPRS;
                self.skip(state, TWO_BYTES);
            }
            None => {
                self.stats.msr_faults += 1;
                self.stats.last_msr_fault = Some((index, false));
                state::inject_gp(state);
            }
        }
        Action::Resume
    }

    fn wrmsr(&mut self, vcpu: usize, state: &mut VcpuState) -> Action {
        let index = state.rcx as u32;
        let value = (state.rdx << 32) | (state.rax & 0xffff_ffff);
        let effect = if is_lapic_msr(index) {
            let ok = self.lapic(vcpu).borrow_mut().write_msr(index, value);
            ok.then_some(Effect::None)
        } else {
            self.vcpus[vcpu].msrs.write(state, index, value)
        };
        match effect {
            Some(effect) => {
                self.msr_effect(vcpu, effect);
                self.skip(state, TWO_BYTES);
            }
            None => {
                self.stats.msr_faults += 1;
                self.stats.last_msr_fault = Some((index, true));
                state::inject_gp(state);
            }
        }
        Action::Resume
    }

    fn msr_effect(&mut self, vcpu: usize, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::SystemTime => {
                // Each vCPU has its own time info (Linux's per-CPU
                // pvclock page), written when that vCPU asks.
                if let Some(gpa) = self.vcpus[vcpu].msrs.system_time {
                    // Written once: the TSC here never changes rate. A bad
                    // address is the guest's problem, like on KVM.
                    let tsc = self.clock.tsc();
                    let info = pvclock::time_info(2, tsc, self.clock.now_ns(), self.clock.scale);
                    let _ignored = self.mem.write(gpa, &info);
                }
            }
            Effect::WallClock(gpa) => {
                let secs = u32::try_from(self.boot_unix_secs).unwrap_or(u32::MAX);
                let _ignored = self.mem.write(gpa, &pvclock::wall_clock(2, secs));
            }
        }
    }

    fn xsetbv(&mut self, state: &mut VcpuState) -> Action {
        const X87: u64 = 1;
        const SSE: u64 = 2;
        const AVX: u64 = 4;
        let value = (state.rdx << 32) | (state.rax & 0xffff_ffff);
        let [low, _, _, high] = (self.host_cpuid)(0xd, 0);
        let supported = (u64::from(high) << 32) | u64::from(low);
        let valid = state.rcx as u32 == 0
            && value & X87 != 0
            && value & !supported == 0
            && (value & AVX == 0 || value & SSE != 0);
        if valid {
            state.xcr0 = value;
            state.dirty |= group::CONTROL_REGISTERS;
            self.skip(state, THREE_BYTES);
        } else {
            state::inject_gp(state);
        }
        Action::Resume
    }
}

fn is_lapic_msr(index: u32) -> bool {
    index == lapic::APIC_BASE_MSR
        || index == lapic::TSC_DEADLINE_MSR
        || lapic::X2APIC_MSRS.contains(&index)
}

/// The guest's MAXPHYADDR (CPUID 0x8000_0008 eax 7:0), 36 if not told.
fn phys_bits(host_cpuid: &dyn Fn(u32, u32) -> [u32; 4]) -> u32 {
    if host_cpuid(0x8000_0000, 0)[0] >= 0x8000_0008 {
        host_cpuid(0x8000_0008, 0)[0] & 0xff
    } else {
        36
    }
}

/// The emulator's view of the machine: RAM through guest memory, the rest
/// through the MMIO bus.
struct MachinePlatform<'a> {
    mem: &'a dyn GuestMemory,
    ram_size: u64,
    mmio: &'a Bus,
    /// The exiting vCPU's local APIC, at its page while the xAPIC
    /// interface is on.
    lapic: &'a Shared<GuestLapic>,
    phys_bits: u32,
}

impl MachinePlatform<'_> {
    fn is_ram(&self, gpa: u64, len: usize) -> bool {
        gpa.checked_add(len as u64)
            .is_some_and(|end| end <= self.ram_size)
    }

    /// The offset in the LAPIC's page, if `gpa` falls there.
    fn lapic_offset(&self, gpa: u64) -> Option<u64> {
        let base = self.lapic.try_borrow().ok()?.base_address()?;
        gpa.checked_sub(base)
            .filter(|&offset| offset < lapic::WINDOW_LEN)
    }
}

impl Platform for MachinePlatform<'_> {
    fn read_ram(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        if !self.is_ram(gpa, buf.len()) {
            return Err(NotRam(gpa));
        }
        self.mem
            .read(gpa, buf)
            .map_err(|BadGuestAddress(a)| NotRam(a))
    }

    fn write_ram(&mut self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        if !self.is_ram(gpa, data.len()) {
            return Err(NotRam(gpa));
        }
        self.mem
            .write(gpa, data)
            .map_err(|BadGuestAddress(a)| NotRam(a))
    }

    fn cmpxchg_ram_u32(&mut self, gpa: u64, current: u32, new: u32) -> Result<bool, NotRam> {
        // Other vCPUs may run while this one's exit is handled: the
        // guest memory makes it atomic (the binary's does).
        if !self.is_ram(gpa, 4) {
            return Err(NotRam(gpa));
        }
        self.mem
            .compare_exchange_u32(gpa, current, new)
            .map_err(|BadGuestAddress(a)| NotRam(a))
    }

    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        match self.lapic_offset(gpa) {
            Some(offset) => match self.lapic.try_borrow_mut() {
                Ok(mut lapic) => lapic.read(offset, data),
                Err(_) => data.fill(0xff),
            },
            None => {
                self.mmio.read(gpa, data);
            }
        }
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        match self.lapic_offset(gpa) {
            Some(offset) => {
                if let Ok(mut lapic) = self.lapic.try_borrow_mut() {
                    lapic.write(offset, data);
                }
            }
            None => {
                self.mmio.write(gpa, data);
            }
        }
    }

    fn phys_addr_bits(&self) -> u32 {
        self.phys_bits
    }
}

#[cfg(test)]
mod tests;

//! The device models one at a time: guest accesses through a [`Bus`], as
//! the VMM dispatches them, interleaved with the host-side events each
//! model takes (time passing, interrupt lines, input, acknowledgements).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use arbitrary::{Arbitrary, Unstructured};
use vdev::acpi_pm::{self, AcpiPm};
use vdev::ioapic::{self, InterruptTarget, IoApic};
use vdev::lapic::{self, Lapic, LapicConfig};
use vdev::pci::{PciConfigIo, PciEcam, PciMmio, PciRoot, CONFIG_IO_LEN, ECAM_BUS_SIZE};
use vdev::pic::{self, Pic, PicChip, PicPorts};
use vdev::pit::{self, Pit, SystemControlPort};
use vdev::rtc::{self, Rtc};
use vdev::uart::{self, SerialOut, Uart};
use vdev::virtio::mock::MsiLog;
use vdev::virtio::pci::{VirtioPci, VirtioPciWiring};
use vdev::virtio::rng::{Rng, SplitMix64};
use vdev::{Bus, BusDevice};

use crate::{for_each_op, Access, Ram};

pub use vdev::testutil::{FakeClock, Line};

fn shared<D>(device: D) -> Rc<RefCell<D>> {
    Rc::new(RefCell::new(device))
}

/// One bus holding `device` at `base`.
fn bus_with(base: u64, len: u64, device: Rc<RefCell<dyn BusDevice>>) -> Bus {
    let mut bus = Bus::new();
    bus.insert(base, len, device).expect("one device fits");
    bus
}

#[derive(Default)]
struct Sink(Vec<u8>);

impl SerialOut for Sink {
    fn write_byte(&mut self, byte: u8) {
        if self.0.len() < 1 << 16 {
            self.0.push(byte);
        }
    }
}

#[derive(Arbitrary, Debug)]
enum UartOp {
    Access(Access),
    Input(Vec<u8>),
    Drain,
}

/// The 16550 UART: register accesses and console input.
pub fn uart(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let uart = shared(Uart::new(Line::default(), Sink::default()));
    let bus = bus_with(0x3f8, uart::WINDOW_LEN, uart.clone());
    for_each_op(&mut u, |op| match op {
        UartOp::Access(a) => {
            a.apply(&bus, 0x3f8, uart::WINDOW_LEN, true);
        }
        UartOp::Input(bytes) => {
            let mut uart = uart.borrow_mut();
            let space = uart.input_space();
            let taken = uart.enqueue_input(&bytes);
            assert!(taken <= space && taken <= bytes.len());
        }
        UartOp::Drain => uart.borrow_mut().output().0.clear(),
    });
}

/// An x2APIC MSR, the APIC base, the TSC deadline, or any index.
#[derive(Arbitrary, Debug)]
enum LapicMsr {
    X2apic(u8),
    Base,
    TscDeadline,
    Any(u32),
}

impl LapicMsr {
    fn index(&self) -> u32 {
        match *self {
            LapicMsr::X2apic(r) => *lapic::X2APIC_MSRS.start() + u32::from(r),
            LapicMsr::Base => lapic::APIC_BASE_MSR,
            LapicMsr::TscDeadline => lapic::TSC_DEADLINE_MSR,
            LapicMsr::Any(i) => i,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum LapicOp {
    Access(Access),
    ReadMsr(LapicMsr),
    WriteMsr(LapicMsr, u64),
    Accept { vector: u8, level: bool },
    Acknowledge,
    Eoi,
    TakeLevelEoi,
    Advance(u32),
    PollTimer,
    SetGuestTsc(u64),
    SetTpr(u8),
}

/// The local APIC: MMIO (at its default base, where the VMM maps it) and
/// MSR accesses, interrupts accepted and acknowledged, its timer.
pub fn lapic(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((apic_id, bsp, timer_hz, tsc_hz)) = <(u32, bool, u32, u32)>::arbitrary(&mut u) else {
        return;
    };
    let clock = FakeClock::default();
    let config = LapicConfig {
        apic_id,
        bsp,
        timer_hz: u64::from(timer_hz),
        tsc_hz: u64::from(tsc_hz),
    };
    let apic = shared(Lapic::new(clock.clone(), config));
    let bus = bus_with(lapic::DEFAULT_BASE, lapic::WINDOW_LEN, apic.clone());
    for_each_op(&mut u, |op| {
        match op {
            LapicOp::Access(a) => {
                a.apply(&bus, lapic::DEFAULT_BASE, lapic::WINDOW_LEN, false);
            }
            LapicOp::ReadMsr(msr) => {
                apic.borrow_mut().read_msr(msr.index());
            }
            LapicOp::WriteMsr(msr, value) => {
                apic.borrow_mut().write_msr(msr.index(), value);
            }
            LapicOp::Accept { vector, level } => {
                apic.borrow_mut().accept(vector, level);
            }
            LapicOp::Acknowledge => {
                let mut apic = apic.borrow_mut();
                if let Some(vector) = apic.pending_interrupt() {
                    apic.acknowledge(vector);
                }
            }
            LapicOp::Eoi => {
                apic.borrow_mut().eoi();
            }
            LapicOp::TakeLevelEoi => {
                apic.borrow_mut().take_level_eoi();
            }
            LapicOp::Advance(ns) => clock.advance(u64::from(ns)),
            LapicOp::PollTimer => apic.borrow_mut().poll_timer(),
            LapicOp::SetGuestTsc(tsc) => apic.borrow_mut().set_guest_tsc(tsc),
            LapicOp::SetTpr(tpr) => apic.borrow_mut().set_tpr(tpr),
        }
        // What the VMM asks after every exit.
        let apic = apic.borrow();
        apic.timer_deadline_ns();
        apic.base_address();
    });
}

/// Records deliveries; accepts them while `accept` is set.
#[derive(Clone, Default)]
struct Cpu {
    accept: Rc<Cell<bool>>,
    delivered: Rc<Cell<u64>>,
}

impl InterruptTarget for Cpu {
    fn deliver(&self, _vector: u8, _level_triggered: bool) -> bool {
        self.delivered.set(self.delivered.get() + 1);
        self.accept.get()
    }
}

#[derive(Arbitrary, Debug)]
enum IoApicOp {
    Access(Access),
    SetIrq { pin: u8, asserted: bool },
    EndOfInterrupt(u8),
    Accepting(bool),
}

/// The IOAPIC: MMIO through IOREGSEL/IOWIN, pins raised and lowered, EOIs.
pub fn ioapic(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let cpu = Cpu::default();
    let apic = shared(IoApic::new(cpu.clone()));
    let base = 0xfec0_0000;
    let bus = bus_with(base, ioapic::WINDOW_LEN, apic.clone());
    for_each_op(&mut u, |op| match op {
        IoApicOp::Access(a) => {
            a.apply(&bus, base, ioapic::WINDOW_LEN, false);
        }
        IoApicOp::SetIrq { pin, asserted } => apic
            .borrow_mut()
            .set_irq(usize::from(pin) % ioapic::NUM_PINS, asserted),
        IoApicOp::EndOfInterrupt(vector) => apic.borrow_mut().end_of_interrupt(vector),
        IoApicOp::Accepting(accept) => cpu.accept.set(accept),
    });
}

#[derive(Arbitrary, Debug)]
enum PicOp {
    Master(Access),
    Slave(Access),
    SetIrq { irq: u8, high: bool },
    Acknowledge,
}

/// The two 8259A PICs at 0x20 and 0xa0: ICW/OCW sequences, IRQs, INTA.
pub fn pic(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let pic = shared(Pic::new());
    let mut bus = Bus::new();
    for (base, chip) in [(0x20, PicChip::Master), (0xa0, PicChip::Slave)] {
        let ports = shared(PicPorts {
            pic: pic.clone(),
            chip,
        });
        bus.insert(base, pic::WINDOW_LEN, ports)
            .expect("PIC ports fit");
    }
    for_each_op(&mut u, |op| {
        match op {
            PicOp::Master(a) => {
                a.apply(&bus, 0x20, pic::WINDOW_LEN, true);
            }
            PicOp::Slave(a) => {
                a.apply(&bus, 0xa0, pic::WINDOW_LEN, true);
            }
            PicOp::SetIrq { irq, high } => pic.borrow_mut().set_irq(irq % 16, high),
            PicOp::Acknowledge => {
                pic.borrow_mut().acknowledge();
            }
        }
        pic.borrow().pending_vector();
    });
}

#[derive(Arbitrary, Debug)]
enum PitOp {
    Access(Access),
    Port61(Access),
    Advance(u32),
    Poll,
}

/// The 8254 PIT at 0x40 and port 0x61: modes, latches, gate, speaker.
pub fn pit(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let clock = FakeClock::default();
    let pit = shared(Pit::new(clock.clone(), Line::default()));
    let mut bus = Bus::new();
    bus.insert(0x40, pit::WINDOW_LEN, pit.clone())
        .expect("PIT fits");
    bus.insert(0x61, 1, shared(SystemControlPort(pit.clone())))
        .expect("port 0x61 fits");
    for_each_op(&mut u, |op| {
        match op {
            PitOp::Access(a) => {
                a.apply(&bus, 0x40, pit::WINDOW_LEN, true);
            }
            PitOp::Port61(a) => {
                a.apply(&bus, 0x61, 1, true);
            }
            PitOp::Advance(ns) => clock.advance(u64::from(ns)),
            PitOp::Poll => pit.borrow_mut().poll(),
        }
        pit.borrow().deadline_ns();
    });
}

#[derive(Arbitrary, Debug)]
enum RtcOp {
    Access(Access),
    /// Up to about 18 minutes at once.
    Advance(u32, u8),
    Poll,
}

/// Latest start date tried: the end of year 9999.
const LAST_EPOCH: u64 = 253_402_300_799;

/// The CMOS RTC at 0x70: index/data, BCD and binary, 12/24 hours, update
/// and periodic interrupts, NVRAM.
pub fn rtc(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(epoch) = u.int_in_range(0..=LAST_EPOCH) else {
        return;
    };
    let clock = FakeClock::default();
    let rtc = shared(Rtc::new(clock.clone(), Line::default(), epoch));
    let bus = bus_with(0x70, rtc::WINDOW_LEN, rtc.clone());
    for_each_op(&mut u, |op| {
        match op {
            RtcOp::Access(a) => {
                a.apply(&bus, 0x70, rtc::WINDOW_LEN, true);
            }
            RtcOp::Advance(ns, scale) => clock.advance(u64::from(ns) << (scale % 9)),
            RtcOp::Poll => rtc.borrow_mut().poll(),
        }
        rtc.borrow().deadline_ns();
    });
}

/// The ACPI PM registers (sleep control/status, reset).
pub fn acpi_pm(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let pm = shared(AcpiPm::new());
    let bus = bus_with(0x600, acpi_pm::WINDOW_LEN, pm.clone());
    for_each_op(&mut u, |a: Access| {
        a.apply(&bus, 0x600, acpi_pm::WINDOW_LEN, true);
        pm.borrow().request();
    });
}

#[derive(Arbitrary, Debug)]
enum PciOp {
    /// CF8/CFC.
    ConfigIo(Access),
    /// ECAM, bus 0 (and a little past it).
    Ecam {
        device: u8,
        register: u16,
        access: Access,
    },
    /// The MMIO window, where BARs decode.
    Mmio {
        page: u8,
        access: Access,
    },
    AssignBars,
}

const MMIO_BASE: u64 = 0xc000_0000;
const MMIO_LEN: u64 = 0x2000_0000;
const ECAM_BASE: u64 = 0xe000_0000;

/// The PCI host bridge and root: both configuration mechanisms and the
/// MMIO window, with one virtio device plugged in (its BAR moved, resized
/// and enabled by the guest).
pub fn pci(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let root = shared(PciRoot::new(MMIO_BASE, MMIO_LEN));
    let wiring = VirtioPciWiring {
        mem: Rc::new(Ram::new(0x1000)),
        msi: Rc::new(MsiLog::default()),
        intx: Rc::new(Line::default()),
        intx_irq: 16,
    };
    let rng = VirtioPci::new(Rng::new(Box::new(SplitMix64(1))), wiring).expect("rng device");
    root.borrow_mut().add(shared(rng)).expect("a free slot");
    let mut bus = Bus::new();
    bus.insert(0xcf8, CONFIG_IO_LEN, shared(PciConfigIo::new(root.clone())))
        .expect("CF8 fits");
    bus.insert(ECAM_BASE, ECAM_BUS_SIZE, shared(PciEcam::new(root.clone())))
        .expect("ECAM fits");
    bus.insert(MMIO_BASE, MMIO_LEN, shared(PciMmio::new(root.clone())))
        .expect("MMIO fits");
    for_each_op(&mut u, |op| match op {
        PciOp::ConfigIo(a) => {
            a.apply(&bus, 0xcf8, CONFIG_IO_LEN, true);
        }
        PciOp::Ecam {
            device,
            register,
            access,
        } => {
            let function = u64::from(device) << 12;
            let at = ECAM_BASE + function + u64::from(register % 0x1000);
            let a = Access {
                offset: 0,
                ..access
            };
            a.apply(&bus, at, 0, false);
        }
        PciOp::Mmio { page, access } => {
            a_mmio(&bus, page, access);
        }
        PciOp::AssignBars => {
            let _ = root.borrow_mut().assign_bars();
        }
    });
}

fn a_mmio(bus: &Bus, page: u8, access: Access) {
    let base = MMIO_BASE + (u64::from(page) << 12);
    access.apply(bus, base, 0x1000, false);
}

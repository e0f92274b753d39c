//! I/O APIC, version 0x20 (with the EOI register): 24 redirection entries
//! behind IOREGSEL (0x00) and IOWIN (0x10), EOI at 0x40.
//!
//! Inputs arrive as [`IoApic::set_irq`] with the line's *asserted* state:
//! the polarity bit is stored but not applied (the VMM's MADT and the
//! devices agree on it). Edge entries deliver on a rising edge while
//! unmasked; edges on a masked pin are lost, as on the 82093AA. Level
//! entries deliver while asserted, unmasked and Remote IRR clear, set
//! Remote IRR, and deliver again after the EOI if still asserted. Fixed
//! and lowest-priority entries go to the CPUs their destination names
//! (bits 63:56, physical or logical by bit 11; [`Destination`]), which
//! the VMM resolves against its local APICs; other delivery modes (SMI, NMI, INIT, ExtINT) are counted
//! in [`IoApic::unsupported_deliveries`] and dropped. Registers are 32-bit;
//! accesses of 1, 2 or 4 bytes inside one register work (writes merge into
//! it), anything else reads all ones and writes nothing. Undefined indirect
//! registers read 0.

use crate::BusDevice;

/// Where delivered interrupts go: the VMM forwards to the local APIC's
/// `accept`. `false` if the CPU did not take it (APIC disabled): a level
/// entry then keeps Remote IRR clear, as no EOI will come.
pub trait InterruptTarget {
    fn deliver(&self, vector: u8, level_triggered: bool) -> bool;

    /// As [`deliver`](Self::deliver), to the CPUs `destination` names;
    /// a target with one CPU may ignore it.
    fn deliver_to(&self, vector: u8, level_triggered: bool, destination: Destination) -> bool {
        let _ = destination;
        self.deliver(vector, level_triggered)
    }
}

/// Whom a redirection entry (or an MSI) addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    /// An APIC ID (physical) or a logical destination (8 bits here).
    pub id: u32,
    pub logical: bool,
    /// Lowest-priority delivery: one of the addressed CPUs.
    pub lowest_priority: bool,
}

pub const NUM_PINS: usize = 24;
pub const VERSION: u8 = 0x20;
pub const WINDOW_LEN: u64 = 0x100;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI: u64 = 0x40;
const REGISTER_BYTES: u64 = 4;

const ID_REGISTER: u8 = 0x00;
const VERSION_REGISTER: u8 = 0x01;
const ARBITRATION_REGISTER: u8 = 0x02;
const REDIRECTION_BASE: u8 = 0x10;
const ID_SHIFT: u32 = 24;
const ID_MASK: u32 = 0x0f;
const MAX_REDIRECTION_SHIFT: u32 = 16;

const VECTOR_MASK: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_MODE_MASK: u64 = 0b111;
const DELIVERY_FIXED: u64 = 0;
const DELIVERY_LOWEST_PRIORITY: u64 = 1;
const DESTINATION_LOGICAL: u64 = 1 << 11;
const DESTINATION_SHIFT: u32 = 56;
const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL_TRIGGERED: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const READ_ONLY: u64 = DELIVERY_STATUS | REMOTE_IRR;

pub struct IoApic<T: InterruptTarget> {
    target: T,
    id: u8,
    select: u8,
    redirection: [u64; NUM_PINS],
    /// Asserted inputs, one bit per pin.
    asserted: u32,
    unsupported: u64,
}

impl<T: InterruptTarget> IoApic<T> {
    pub fn new(target: T) -> Self {
        Self {
            target,
            id: 0,
            select: 0,
            redirection: [MASKED; NUM_PINS],
            asserted: 0,
            unsupported: 0,
        }
    }

    pub fn unsupported_deliveries(&self) -> u64 {
        self.unsupported
    }

    /// Input `pin` is now asserted (`true`) or not; pins past 23 are ignored.
    pub fn set_irq(&mut self, pin: usize, asserted: bool) {
        let Some(&entry) = self.redirection.get(pin) else {
            return;
        };
        let bit = 1u32 << pin;
        let rising = asserted && self.asserted & bit == 0;
        if asserted {
            self.asserted |= bit;
        } else {
            self.asserted &= !bit;
        }
        if entry & LEVEL_TRIGGERED != 0 {
            self.service_level(pin);
        } else if rising && entry & MASKED == 0 {
            self.deliver(entry);
        }
    }

    /// The local APIC's EOI of a level-triggered `vector` (also reached by
    /// writing the EOI register): clear Remote IRR of the entries carrying
    /// it, and deliver again those still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..NUM_PINS {
            let entry = &mut self.redirection[pin];
            if *entry & REMOTE_IRR != 0 && *entry & VECTOR_MASK == u64::from(vector) {
                *entry &= !REMOTE_IRR;
                self.service_level(pin);
            }
        }
    }

    fn service_level(&mut self, pin: usize) {
        let Some(&entry) = self.redirection.get(pin) else {
            return;
        };
        let ready = entry & (LEVEL_TRIGGERED | MASKED | REMOTE_IRR) == LEVEL_TRIGGERED;
        if ready && self.asserted & (1 << pin) != 0 && self.deliver(entry) {
            self.redirection[pin] |= REMOTE_IRR;
        }
    }

    fn deliver(&mut self, entry: u64) -> bool {
        match (entry >> DELIVERY_MODE_SHIFT) & DELIVERY_MODE_MASK {
            mode @ (DELIVERY_FIXED | DELIVERY_LOWEST_PRIORITY) => self.target.deliver_to(
                (entry & VECTOR_MASK) as u8,
                entry & LEVEL_TRIGGERED != 0,
                Destination {
                    id: (entry >> DESTINATION_SHIFT) as u32,
                    logical: entry & DESTINATION_LOGICAL != 0,
                    lowest_priority: mode == DELIVERY_LOWEST_PRIORITY,
                },
            ),
            _ => {
                self.unsupported = self.unsupported.wrapping_add(1);
                false
            }
        }
    }

    /// Redirection entry and which half of it an indirect index names.
    fn redirection_index(&self) -> Option<(usize, bool)> {
        let offset = usize::from(self.select.checked_sub(REDIRECTION_BASE)?);
        (offset / 2 < NUM_PINS).then_some((offset / 2, offset % 2 == 1))
    }

    fn read_indirect(&self) -> u32 {
        match self.select {
            ID_REGISTER | ARBITRATION_REGISTER => u32::from(self.id) << ID_SHIFT,
            VERSION_REGISTER => {
                u32::from(VERSION) | ((NUM_PINS as u32 - 1) << MAX_REDIRECTION_SHIFT)
            }
            _ => match self.redirection_index() {
                Some((pin, high)) => {
                    let entry = self.redirection[pin];
                    if high {
                        (entry >> 32) as u32
                    } else {
                        entry as u32
                    }
                }
                None => 0,
            },
        }
    }

    fn write_indirect(&mut self, value: u32) {
        if self.select == ID_REGISTER {
            self.id = ((value >> ID_SHIFT) & ID_MASK) as u8;
            return;
        }
        let Some((pin, high)) = self.redirection_index() else {
            return;
        };
        let old = self.redirection[pin];
        let new = if high {
            (old & 0xffff_ffff) | u64::from(value) << 32
        } else {
            let mut new = (old & !0xffff_ffff) | u64::from(value);
            new = (new & !READ_ONLY) | (old & READ_ONLY);
            // Remote IRR only has meaning for level entries.
            if new & LEVEL_TRIGGERED == 0 {
                new &= !REMOTE_IRR;
            }
            new
        };
        self.redirection[pin] = new;
        // Unmasking an asserted level input delivers it.
        self.service_level(pin);
    }

    fn read_register(&self, register: u64) -> u32 {
        match register {
            IOREGSEL => u32::from(self.select),
            IOWIN => self.read_indirect(),
            _ => 0,
        }
    }

    fn write_register(&mut self, register: u64, value: u32) {
        match register {
            IOREGSEL => self.select = value as u8,
            IOWIN => self.write_indirect(value),
            EOI => self.end_of_interrupt(value as u8),
            _ => {}
        }
    }
}

/// The 32-bit register an access falls in and its byte offset there, if
/// the access is 1, 2 or 4 bytes and stays inside the register.
fn register_of(offset: u64, len: usize) -> Option<(u64, usize)> {
    let within = offset % REGISTER_BYTES;
    let fits = matches!(len, 1 | 2 | 4) && within + len as u64 <= REGISTER_BYTES;
    fits.then_some((offset - within, within as usize))
}

impl<T: InterruptTarget> BusDevice for IoApic<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match register_of(offset, data.len()) {
            Some((register, at)) => {
                let bytes = self.read_register(register).to_le_bytes();
                data.copy_from_slice(&bytes[at..at + data.len()]);
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some((register, at)) = register_of(offset, data.len()) else {
            return;
        };
        let mut bytes = self.read_register(register).to_le_bytes();
        bytes[at..at + data.len()].copy_from_slice(data);
        self.write_register(register, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::rc::Rc;
    use alloc::vec::Vec;
    use core::cell::RefCell;

    #[derive(Clone, Default)]
    struct Cpu(Rc<RefCell<Vec<(u8, bool)>>>);
    impl InterruptTarget for Cpu {
        /// Vector 0xff stands for a CPU that does not take interrupts.
        fn deliver(&self, vector: u8, level_triggered: bool) -> bool {
            self.0.borrow_mut().push((vector, level_triggered));
            vector != 0xff
        }
    }
    impl Cpu {
        fn take(&self) -> Vec<(u8, bool)> {
            core::mem::take(&mut *self.0.borrow_mut())
        }
    }

    fn ioapic() -> (IoApic<Cpu>, Cpu) {
        let cpu = Cpu::default();
        (IoApic::new(cpu.clone()), cpu)
    }

    fn write32<T: InterruptTarget>(io: &mut IoApic<T>, offset: u64, value: u32) {
        io.write(offset, &value.to_le_bytes());
    }

    fn read32(io: &mut IoApic<Cpu>, offset: u64) -> u32 {
        let mut b = [0; 4];
        io.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn set_entry<T: InterruptTarget>(io: &mut IoApic<T>, pin: u32, low: u32) {
        for (select, value) in [(2 * pin + 1, 0), (2 * pin, low)] {
            io.write(
                IOREGSEL,
                &(u32::from(REDIRECTION_BASE) + select).to_le_bytes(),
            );
            io.write(IOWIN, &value.to_le_bytes());
        }
    }

    fn entry_low(io: &mut IoApic<Cpu>, pin: u32) -> u32 {
        write32(io, IOREGSEL, u32::from(REDIRECTION_BASE) + 2 * pin);
        read32(io, IOWIN)
    }

    #[test]
    fn identification_registers() {
        let (mut io, _) = ioapic();
        write32(&mut io, IOREGSEL, u32::from(VERSION_REGISTER));
        assert_eq!(read32(&mut io, IOWIN), 0x0017_0020);
        write32(&mut io, IOREGSEL, u32::from(ID_REGISTER));
        write32(&mut io, IOWIN, 0xff00_0000);
        assert_eq!(read32(&mut io, IOWIN), 0x0f00_0000);
        write32(&mut io, IOREGSEL, u32::from(ARBITRATION_REGISTER));
        assert_eq!(read32(&mut io, IOWIN), 0x0f00_0000);
        assert_eq!(entry_low(&mut io, 23), MASKED as u32, "reset: masked");
        write32(&mut io, IOREGSEL, 0x10 + 48);
        assert_eq!(read32(&mut io, IOWIN), 0, "past the last entry");
        // Byte write to IOREGSEL, byte read back.
        io.write(IOREGSEL, &[0x12]);
        let mut b = [0];
        io.read(IOREGSEL, &mut b);
        assert_eq!(b, [0x12]);
        let mut q = [0; 8];
        io.read(IOWIN, &mut q);
        assert_eq!(q, [0xff; 8]);
    }

    #[test]
    fn edge_entries_deliver_on_rising_edges_only_when_unmasked() {
        let (mut io, cpu) = ioapic();
        io.set_irq(4, true);
        io.set_irq(4, false);
        set_entry(&mut io, 4, 0x34);
        assert!(cpu.take().is_empty(), "edge while masked is lost");
        io.set_irq(4, true);
        io.set_irq(4, true);
        assert_eq!(cpu.take(), [(0x34, false)]);
        io.set_irq(4, false);
        io.set_irq(4, true);
        assert_eq!(cpu.take(), [(0x34, false)]);
        io.set_irq(99, true);
        assert!(cpu.take().is_empty());
    }

    #[test]
    fn level_entries_hold_remote_irr_until_eoi() {
        let (mut io, cpu) = ioapic();
        let level = (LEVEL_TRIGGERED | MASKED) as u32 | 0x51;
        set_entry(&mut io, 11, level);
        io.set_irq(11, true);
        assert!(cpu.take().is_empty(), "masked");
        set_entry(&mut io, 11, level & !(MASKED as u32));
        assert_eq!(cpu.take(), [(0x51, true)], "unmasking delivers");
        assert_ne!(entry_low(&mut io, 11) & REMOTE_IRR as u32, 0);
        io.set_irq(11, true);
        assert!(cpu.take().is_empty(), "Remote IRR blocks");
        // A guest write cannot clear Remote IRR.
        set_entry(&mut io, 11, level & !(MASKED as u32));
        assert_ne!(entry_low(&mut io, 11) & REMOTE_IRR as u32, 0);
        io.end_of_interrupt(0x51);
        assert_eq!(cpu.take(), [(0x51, true)], "still asserted: again");
        io.set_irq(11, false);
        write32(&mut io, EOI, 0x51);
        assert!(cpu.take().is_empty());
        assert_eq!(entry_low(&mut io, 11) & REMOTE_IRR as u32, 0);
        io.end_of_interrupt(0x52);
        io.set_irq(11, true);
        assert_eq!(cpu.take(), [(0x51, true)]);
        // Switching to edge drops Remote IRR.
        set_entry(&mut io, 11, 0x51);
        assert_eq!(entry_low(&mut io, 11) & REMOTE_IRR as u32, 0);
    }

    #[test]
    fn refused_level_delivery_leaves_remote_irr_clear() {
        let (mut io, cpu) = ioapic();
        set_entry(&mut io, 9, LEVEL_TRIGGERED as u32 | 0xff);
        io.set_irq(9, true);
        assert_eq!(cpu.take(), [(0xff, true)]);
        assert_eq!(entry_low(&mut io, 9) & REMOTE_IRR as u32, 0);
        // Still asserted: every entry write tries again; once the CPU
        // takes it, Remote IRR holds further deliveries.
        set_entry(&mut io, 9, LEVEL_TRIGGERED as u32 | 0x29);
        assert_eq!(cpu.take().last(), Some(&(0x29, true)));
        assert_ne!(entry_low(&mut io, 9) & REMOTE_IRR as u32, 0);
        io.set_irq(9, true);
        assert!(cpu.take().is_empty());
    }

    #[test]
    fn unsupported_delivery_modes_are_counted() {
        let (mut io, cpu) = ioapic();
        set_entry(&mut io, 2, 0x400 | 0x20); // NMI
        io.set_irq(2, true);
        assert!(cpu.take().is_empty());
        assert_eq!(io.unsupported_deliveries(), 1);
        set_entry(&mut io, 3, 0x100 | 0x23); // lowest priority
        io.set_irq(3, true);
        assert_eq!(cpu.take(), [(0x23, false)]);
    }

    #[test]
    fn entries_carry_their_destination() {
        #[derive(Default)]
        struct Addressed(RefCell<Vec<(u8, Destination)>>);
        impl InterruptTarget for Addressed {
            fn deliver(&self, _: u8, _: bool) -> bool {
                unreachable!("the IOAPIC names the destination")
            }
            fn deliver_to(&self, vector: u8, _: bool, destination: Destination) -> bool {
                self.0.borrow_mut().push((vector, destination));
                true
            }
        }
        let mut io = IoApic::new(Addressed::default());
        set_entry(&mut io, 4, 0x31);
        write32(&mut io, IOREGSEL, u32::from(REDIRECTION_BASE) + 9);
        write32(&mut io, IOWIN, 3 << 24);
        io.set_irq(4, true);
        set_entry(&mut io, 5, 0x900 | 0x32); // logical, lowest priority
        write32(&mut io, IOREGSEL, u32::from(REDIRECTION_BASE) + 11);
        write32(&mut io, IOWIN, 0x0c << 24);
        io.set_irq(5, true);
        let physical = Destination {
            id: 3,
            logical: false,
            lowest_priority: false,
        };
        let logical = Destination {
            id: 0x0c,
            logical: true,
            lowest_priority: true,
        };
        assert_eq!(*io.target.0.borrow(), [(0x31, physical), (0x32, logical)]);
    }

    /// The VMM's wiring: entries go to the LAPIC, the LAPIC's level EOIs
    /// come back; shared cells are never borrowed twice.
    #[test]
    fn round_trip_through_the_local_apic() {
        use crate::lapic::{Lapic, LapicConfig};
        use crate::Clock;

        struct NoTime;
        impl Clock for NoTime {
            fn now_ns(&self) -> u64 {
                0
            }
        }
        struct ToLapic(Rc<RefCell<Lapic<NoTime>>>);
        impl InterruptTarget for ToLapic {
            fn deliver(&self, vector: u8, level_triggered: bool) -> bool {
                self.0.borrow_mut().accept(vector, level_triggered)
            }
        }

        let config = LapicConfig {
            apic_id: 0,
            bsp: true,
            timer_hz: 1_000_000_000,
            tsc_hz: 1_000_000_000,
        };
        let lapic = Rc::new(RefCell::new(Lapic::new(NoTime, config)));
        let mut io = IoApic::new(ToLapic(lapic.clone()));
        let svr_offset = 0xf0;
        lapic
            .borrow_mut()
            .write(svr_offset, &0x1ffu32.to_le_bytes());
        let inject = |lapic: &RefCell<Lapic<NoTime>>| {
            let mut lapic = lapic.borrow_mut();
            let vector = lapic.pending_interrupt()?;
            lapic.acknowledge(vector);
            Some(vector)
        };

        set_entry(&mut io, 10, LEVEL_TRIGGERED as u32 | 0x3a);
        io.set_irq(10, true);
        assert_eq!(inject(&lapic), Some(0x3a));
        // The guest writes EOI with the line still high: delivered again.
        let eoi_offset = 0xb0;
        lapic.borrow_mut().write(eoi_offset, &[0; 4]);
        // The LAPIC borrow must end before the I/O APIC may deliver again
        // (`while let` on `borrow_mut()` would hold it through the body).
        loop {
            let eoi = lapic.borrow_mut().take_level_eoi();
            let Some(vector) = eoi else { break };
            io.end_of_interrupt(vector);
        }
        assert_eq!(inject(&lapic), Some(0x3a));
        io.set_irq(10, false);
        lapic.borrow_mut().write(eoi_offset, &[0; 4]);
        let eoi = lapic.borrow_mut().take_level_eoi();
        io.end_of_interrupt(eoi.unwrap());
        assert_eq!(inject(&lapic), None);
    }

    #[test]
    fn fuzz_random_accesses() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut io, cpu) = ioapic();
        for _ in 0..20_000 {
            let r = next();
            let offset = [IOREGSEL, IOWIN, EOI, (r >> 40) % 0x120][(r % 4) as usize];
            let offset = offset + (r >> 20) % 4;
            let len = [1, 2, 4, 8][((r >> 4) % 4) as usize];
            let mut buf = ((r >> 8) & 0x1f_ffff).to_le_bytes();
            if r & (1 << 12) != 0 {
                buf[0] = 0x10 + (r >> 50) as u8 % 50;
            }
            match (r >> 28) % 6 {
                0 => io.set_irq((r >> 32) as usize % 30, r & (1 << 13) != 0),
                1 => io.end_of_interrupt((r >> 32) as u8),
                2 => io.read(offset, &mut buf[..len]),
                _ => io.write(offset, &buf[..len]),
            }
            for (pin, entry) in io.redirection.iter().enumerate() {
                if entry & REMOTE_IRR != 0 {
                    assert_ne!(entry & LEVEL_TRIGGERED, 0, "pin {pin}");
                }
            }
            cpu.take();
        }
    }
}

//! The cascaded 8259A pair: master at 0x20/0x21, slave at 0xa0/0xa1 on IR2.
//!
//! [`Pic`] holds both chips; each chip's two ports are a [`PicPorts`]
//! window on the bus. Implemented: ICW1-4, OCW1 masking, OCW2 EOI
//! (specific, non-specific, rotation, set priority), OCW3 IRR/ISR read,
//! poll and special mask mode, auto-EOI, edge or level (ICW1.LTIM) inputs.
//! Not implemented: ELCR (0x4d0/0x4d1), special fully nested mode, buffered
//! mode. Byte accesses only: wider reads return all ones, wider writes are
//! ignored. The VMM samples the INTR output with
//! [`Pic::pending_vector`] and runs the INTA cycle with [`Pic::acknowledge`].

use crate::{BusDevice, Shared};

pub const WINDOW_LEN: u64 = 2;

const COMMAND: u64 = 0;
const DATA: u64 = 1;
const CASCADE_IRQ: u8 = 2;
const SPURIOUS_IRQ: u8 = 7;

const ICW1_IC4: u8 = 1 << 0;
const ICW1_SINGLE: u8 = 1 << 1;
const ICW1_LEVEL: u8 = 1 << 3;
const ICW1_INIT: u8 = 1 << 4;
const ICW4_AUTO_EOI: u8 = 1 << 1;
const OCW3_SELECT: u8 = 1 << 3;
const OCW3_POLL: u8 = 1 << 2;
const OCW3_READ_REGISTER: u8 = 1 << 1;
const OCW3_READ_ISR: u8 = 1 << 0;
const OCW3_SET_SPECIAL_MASK: u8 = 1 << 6;
const OCW3_SPECIAL_MASK: u8 = 1 << 5;
const OCW2_ROTATE: u8 = 1 << 7;
const OCW2_SPECIFIC: u8 = 1 << 6;
const OCW2_EOI: u8 = 1 << 5;
const OCW2_LEVEL: u8 = 0b111;
const POLL_INTERRUPT: u8 = 1 << 7;
const VECTOR_BASE_MASK: u8 = 0xf8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Init {
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

#[derive(Debug)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input levels as last seen, for edge detection.
    lines: u8,
    vector_base: u8,
    init: Init,
    needs_icw4: bool,
    single: bool,
    level_triggered: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_mask: bool,
    read_isr: bool,
    poll: bool,
    /// The IR level with the lowest priority; the next one up has the highest.
    lowest_priority: u8,
}

impl Chip {
    fn new() -> Self {
        Self {
            irr: 0,
            isr: 0,
            imr: 0,
            lines: 0,
            vector_base: 0,
            init: Init::Ready,
            needs_icw4: false,
            single: false,
            level_triggered: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_mask: false,
            read_isr: false,
            poll: false,
            lowest_priority: SPURIOUS_IRQ,
        }
    }

    fn set_line(&mut self, irq: u8, high: bool) {
        let bit = 1u8 << (irq & 7);
        if self.level_triggered {
            if high {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if high && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if high {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// 0 is the highest priority.
    fn priority(&self, irq: u8) -> u8 {
        irq.wrapping_sub(self.lowest_priority).wrapping_sub(1) & 7
    }

    fn highest(&self, bits: u8) -> Option<u8> {
        (0..8u8)
            .filter(|&irq| bits & (1 << irq) != 0)
            .min_by_key(|&irq| self.priority(irq))
    }

    /// The request INTA would pick: unmasked, above everything in service
    /// (special mask mode ignores in-service levels that are masked).
    fn pending(&self) -> Option<u8> {
        let irq = self.highest(self.irr & !self.imr)?;
        let blocking = if self.special_mask {
            self.isr & !self.imr
        } else {
            self.isr
        };
        match self.highest(blocking) {
            Some(busy) if self.priority(busy) <= self.priority(irq) => None,
            _ => Some(irq),
        }
    }

    fn acknowledge(&mut self, irq: u8) {
        let bit = 1 << irq;
        if !self.level_triggered {
            self.irr &= !bit;
        }
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.lowest_priority = irq;
            }
        } else {
            self.isr |= bit;
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & ICW1_INIT != 0 {
            self.irr = 0;
            self.isr = 0;
            self.imr = 0;
            self.lowest_priority = SPURIOUS_IRQ;
            self.special_mask = false;
            self.read_isr = false;
            self.poll = false;
            self.auto_eoi = false;
            self.rotate_on_auto_eoi = false;
            self.needs_icw4 = value & ICW1_IC4 != 0;
            self.single = value & ICW1_SINGLE != 0;
            self.level_triggered = value & ICW1_LEVEL != 0;
            self.init = Init::Icw2;
        } else if value & OCW3_SELECT != 0 {
            self.poll = value & OCW3_POLL != 0;
            if value & OCW3_READ_REGISTER != 0 {
                self.read_isr = value & OCW3_READ_ISR != 0;
            }
            if value & OCW3_SET_SPECIAL_MASK != 0 {
                self.special_mask = value & OCW3_SPECIAL_MASK != 0;
            }
        } else {
            self.write_ocw2(value);
        }
    }

    fn write_ocw2(&mut self, value: u8) {
        let rotate = value & OCW2_ROTATE != 0;
        let specific = value & OCW2_SPECIFIC != 0;
        let level = value & OCW2_LEVEL;
        if value & OCW2_EOI != 0 {
            let target = if specific {
                Some(level)
            } else {
                self.highest(self.isr)
            };
            if let Some(irq) = target {
                self.isr &= !(1 << irq);
                if rotate {
                    self.lowest_priority = irq;
                }
            }
        } else if specific {
            if rotate {
                self.lowest_priority = level;
            }
        } else {
            self.rotate_on_auto_eoi = rotate;
        }
    }

    fn write_data(&mut self, value: u8) {
        self.init = match self.init {
            Init::Ready => {
                self.imr = value;
                Init::Ready
            }
            Init::Icw2 => {
                self.vector_base = value & VECTOR_BASE_MASK;
                match (self.single, self.needs_icw4) {
                    (false, _) => Init::Icw3,
                    (true, true) => Init::Icw4,
                    (true, false) => Init::Ready,
                }
            }
            // Cascade wiring is fixed: master IR2 <- slave.
            Init::Icw3 if self.needs_icw4 => Init::Icw4,
            Init::Icw3 => Init::Ready,
            Init::Icw4 => {
                self.auto_eoi = value & ICW4_AUTO_EOI != 0;
                Init::Ready
            }
        };
    }

    fn read_command(&mut self) -> u8 {
        if self.poll {
            self.poll = false;
            return match self.pending() {
                Some(irq) => {
                    self.acknowledge(irq);
                    POLL_INTERRUPT | irq
                }
                None => 0,
            };
        }
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// Which chip of the pair a [`PicPorts`] window reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PicChip {
    Master,
    Slave,
}

#[derive(Debug)]
pub struct Pic {
    master: Chip,
    slave: Chip,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    pub fn new() -> Self {
        Self {
            master: Chip::new(),
            slave: Chip::new(),
        }
    }

    /// ISA IRQ 0-15 input; 2 is the cascade and others are ignored.
    pub fn set_irq(&mut self, irq: u8, high: bool) {
        match irq {
            0..=7 if irq != CASCADE_IRQ => self.master.set_line(irq, high),
            8..=15 => self.slave.set_line(irq - 8, high),
            _ => {}
        }
        self.update_cascade();
    }

    /// The vector INTA would return now, if the INTR output is asserted.
    pub fn pending_vector(&self) -> Option<u8> {
        let irq = self.master.pending()?;
        if irq != CASCADE_IRQ {
            return Some(self.master.vector_base | irq);
        }
        let slave_irq = self.slave.pending().unwrap_or(SPURIOUS_IRQ);
        Some(self.slave.vector_base | slave_irq)
    }

    /// The INTA cycle: moves the request to in-service and returns its
    /// vector; `None` if INTR is not asserted.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let irq = self.master.pending()?;
        self.master.acknowledge(irq);
        let vector = if irq == CASCADE_IRQ {
            // A request that went away before INTA reads as IR7, spurious.
            match self.slave.pending() {
                Some(slave_irq) => {
                    self.slave.acknowledge(slave_irq);
                    self.slave.vector_base | slave_irq
                }
                None => self.slave.vector_base | SPURIOUS_IRQ,
            }
        } else {
            self.master.vector_base | irq
        };
        if irq == CASCADE_IRQ {
            // The slave drops INT for the INTA cycle: a request still
            // pending there raises a fresh edge on IR2.
            self.master.set_line(CASCADE_IRQ, false);
        }
        self.update_cascade();
        Some(vector)
    }

    fn update_cascade(&mut self) {
        let slave_output = self.slave.pending().is_some();
        self.master.set_line(CASCADE_IRQ, slave_output);
    }

    fn chip(&mut self, which: PicChip) -> &mut Chip {
        match which {
            PicChip::Master => &mut self.master,
            PicChip::Slave => &mut self.slave,
        }
    }

    pub fn read_port(&mut self, which: PicChip, offset: u64) -> u8 {
        let value = match offset {
            COMMAND => self.chip(which).read_command(),
            DATA => self.chip(which).imr,
            _ => 0xff,
        };
        self.update_cascade();
        value
    }

    pub fn write_port(&mut self, which: PicChip, offset: u64, value: u8) {
        match offset {
            COMMAND => self.chip(which).write_command(value),
            DATA => self.chip(which).write_data(value),
            _ => {}
        }
        self.update_cascade();
    }
}

/// One chip's two ports, for the bus.
pub struct PicPorts {
    pub pic: Shared<Pic>,
    pub chip: PicChip,
}

impl BusDevice for PicPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] => *byte = self.pic.borrow_mut().read_port(self.chip, offset),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let &[value] = data {
            self.pic.borrow_mut().write_port(self.chip, offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::rc::Rc;
    use core::cell::RefCell;

    use PicChip::{Master, Slave};

    /// Linux's init_8259A(): vectors 0x30/0x38, cascade on IR2, normal EOI.
    fn linux_init(pic: &mut Pic) {
        for (chip, base, icw3) in [(Master, 0x30, 1 << 2), (Slave, 0x38, 2)] {
            pic.write_port(chip, DATA, 0xff);
            pic.write_port(chip, COMMAND, 0x11);
            pic.write_port(chip, DATA, base);
            pic.write_port(chip, DATA, icw3);
            pic.write_port(chip, DATA, 0x01);
        }
        pic.write_port(Master, DATA, 0);
        pic.write_port(Slave, DATA, 0);
    }

    #[test]
    fn linux_probe_reads_back_the_mask() {
        let pic = Rc::new(RefCell::new(Pic::new()));
        let mut master = PicPorts {
            pic: pic.clone(),
            chip: Master,
        };
        let mut slave = PicPorts { pic, chip: Slave };
        master.write(DATA, &[0xff]);
        slave.write(DATA, &[0xff]);
        master.write(DATA, &[0xfb]);
        let mut b = [0];
        master.read(DATA, &mut b);
        assert_eq!(b, [0xfb]);
        slave.read(DATA, &mut b);
        assert_eq!(b, [0xff]);
        let mut word = [0; 2];
        master.read(COMMAND, &mut word);
        assert_eq!(word, [0xff; 2]);
    }

    #[test]
    fn priority_masking_and_eoi() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pic.set_irq(4, true);
        pic.set_irq(1, true);
        assert_eq!(pic.acknowledge(), Some(0x31));
        // IRQ4 is lower priority than IRQ1 in service.
        assert_eq!(pic.pending_vector(), None);
        pic.write_port(Master, COMMAND, 0x0b); // OCW3: read ISR
        assert_eq!(pic.read_port(Master, COMMAND), 1 << 1);
        pic.write_port(Master, COMMAND, 0x20); // non-specific EOI
        assert_eq!(pic.read_port(Master, COMMAND), 0);
        pic.write_port(Master, COMMAND, 0x0a); // OCW3: read IRR
        assert_eq!(pic.read_port(Master, COMMAND), 1 << 4);
        pic.write_port(Master, DATA, 1 << 4);
        assert_eq!(pic.pending_vector(), None, "masked");
        pic.write_port(Master, DATA, 0);
        assert_eq!(pic.acknowledge(), Some(0x34));
        pic.write_port(Master, COMMAND, 0x64); // specific EOI, level 4
        pic.write_port(Master, COMMAND, 0x0b);
        assert_eq!(pic.read_port(Master, COMMAND), 0);
        // Edge input: no new request until the line falls and rises.
        assert_eq!(pic.acknowledge(), None);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), None);
        pic.set_irq(4, false);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn slave_cascades_through_ir2() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pic.set_irq(12, true);
        assert_eq!(pic.pending_vector(), Some(0x3c));
        assert_eq!(pic.acknowledge(), Some(0x3c));
        pic.write_port(Slave, COMMAND, 0x0b);
        pic.write_port(Master, COMMAND, 0x0b);
        assert_eq!(pic.read_port(Slave, COMMAND), 1 << 4);
        assert_eq!(pic.read_port(Master, COMMAND), 1 << CASCADE_IRQ);
        pic.write_port(Slave, COMMAND, 0x20);
        pic.write_port(Master, COMMAND, 0x20);
        assert_eq!(pic.read_port(Master, COMMAND), 0);
        // Masking the cascade hides the slave entirely.
        pic.set_irq(12, false);
        pic.set_irq(12, true);
        pic.write_port(Master, DATA, 1 << CASCADE_IRQ);
        assert_eq!(pic.pending_vector(), None);
    }

    #[test]
    fn auto_eoi_rotation_and_poll() {
        let mut pic = Pic::new();
        pic.write_port(Master, COMMAND, ICW1_INIT | ICW1_IC4 | ICW1_SINGLE);
        pic.write_port(Master, DATA, 0x20);
        pic.write_port(Master, DATA, 0x01 | ICW4_AUTO_EOI);
        pic.write_port(Master, COMMAND, 0x80); // rotate in auto-EOI
        pic.set_irq(0, true);
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), Some(0x20));
        // IR0 became lowest priority; nothing in service.
        pic.set_irq(0, false);
        pic.set_irq(0, true);
        assert_eq!(pic.acknowledge(), Some(0x23));
        pic.write_port(Master, COMMAND, 0x0c); // poll
        assert_eq!(pic.read_port(Master, COMMAND), POLL_INTERRUPT);
        pic.write_port(Master, COMMAND, 0x0c);
        assert_eq!(pic.read_port(Master, COMMAND), 0);
    }

    #[test]
    fn auto_eoi_slave_delivers_back_to_back_requests() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pic.write_port(Slave, COMMAND, ICW1_INIT | ICW1_IC4);
        pic.write_port(Slave, DATA, 0x38);
        pic.write_port(Slave, DATA, 2);
        pic.write_port(Slave, DATA, 0x01 | ICW4_AUTO_EOI);
        pic.set_irq(9, true);
        pic.set_irq(14, true);
        assert_eq!(pic.acknowledge(), Some(0x39));
        pic.write_port(Master, COMMAND, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x3e), "IR2 saw a fresh edge");
    }

    #[test]
    fn level_mode_follows_the_line() {
        let mut pic = Pic::new();
        pic.write_port(Master, COMMAND, ICW1_INIT | ICW1_LEVEL | ICW1_SINGLE);
        pic.write_port(Master, DATA, 0x40);
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), Some(0x45));
        pic.write_port(Master, COMMAND, 0x20);
        assert_eq!(pic.pending_vector(), Some(0x45), "still high");
        pic.set_irq(5, false);
        assert_eq!(pic.pending_vector(), None);
    }

    #[test]
    fn fuzz_random_accesses() {
        let mut seed = 0xdead_beef_cafe_f00du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut pic = Pic::new();
        for _ in 0..20_000 {
            let r = next();
            let chip = if r & 1 == 0 { Master } else { Slave };
            let value = (r >> 8) as u8;
            let offset = (r >> 16) % 3;
            match (r >> 24) % 6 {
                0 => pic.set_irq((r >> 32) as u8 % 20, r & 2 != 0),
                1 => {
                    let before = pic.pending_vector();
                    assert_eq!(pic.acknowledge(), before);
                }
                2 => {
                    pic.read_port(chip, offset);
                }
                _ => pic.write_port(chip, offset, value),
            }
            if let Some(v) = pic.pending_vector() {
                assert!(v & 7 == 7 || pic.master.irr != 0);
            }
        }
    }
}

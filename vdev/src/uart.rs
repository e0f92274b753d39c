//! 16550A UART: eight byte registers, 16-byte receive FIFO.
//!
//! Transmission is instantaneous: a THR write goes straight to the
//! [`SerialOut`] and the transmitter is empty again at once, so LSR always
//! shows THRE|TEMT and the THR-empty interrupt re-arms after every write.
//! Received-data interrupts fire whenever the FIFO holds a byte (trigger
//! level 1; the character-timeout interrupt never happens). The interrupt
//! output is level, recomputed after every access; it is not gated by
//! MCR.OUT2. Byte accesses only: wider reads return all ones, wider writes
//! are ignored.
//!
//! Linux's 8250 driver detects it as a 16550A: IER keeps its low four bits,
//! loopback (MCR.LOOP) wires MCR to MSR and THR to RBR, and enabling the
//! FIFO sets IIR bits 7:6.

use alloc::collections::VecDeque;

use crate::{BusDevice, IrqLine};

/// Where transmitted bytes go (the console).
pub trait SerialOut {
    fn write_byte(&mut self, byte: u8);
}

pub const WINDOW_LEN: u64 = 8;
pub const RX_FIFO_LEN: usize = 16;

const DATA: u64 = 0; // RBR / THR, DLL when DLAB
const IER: u64 = 1; // DLM when DLAB
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

const IER_RX_DATA: u8 = 1 << 0;
const IER_THR_EMPTY: u8 = 1 << 1;
const IER_LINE_STATUS: u8 = 1 << 2;
const IER_MODEM_STATUS: u8 = 1 << 3;
const IER_MASK: u8 = 0x0f;

const IIR_NO_INT: u8 = 0x01;
const IIR_MODEM_STATUS: u8 = 0x00;
const IIR_THR_EMPTY: u8 = 0x02;
const IIR_RX_DATA: u8 = 0x04;
const IIR_LINE_STATUS: u8 = 0x06;
const IIR_FIFO_ENABLED: u8 = 0xc0;

const FCR_FIFO_ENABLE: u8 = 1 << 0;
const FCR_CLEAR_RX: u8 = 1 << 1;

const LCR_DLAB: u8 = 1 << 7;

const MCR_DTR: u8 = 1 << 0;
const MCR_RTS: u8 = 1 << 1;
const MCR_OUT1: u8 = 1 << 2;
const MCR_OUT2: u8 = 1 << 3;
const MCR_LOOP: u8 = 1 << 4;
const MCR_MASK: u8 = 0x1f;

const LSR_DATA_READY: u8 = 1 << 0;
const LSR_OVERRUN: u8 = 1 << 1;
const LSR_THR_EMPTY: u8 = 1 << 5;
const LSR_TX_EMPTY: u8 = 1 << 6;

const MSR_DELTA_CTS: u8 = 1 << 0;
const MSR_DELTA_DSR: u8 = 1 << 1;
const MSR_TRAILING_RI: u8 = 1 << 2;
const MSR_DELTA_DCD: u8 = 1 << 3;
const MSR_CTS: u8 = 1 << 4;
const MSR_DSR: u8 = 1 << 5;
const MSR_RI: u8 = 1 << 6;
const MSR_DCD: u8 = 1 << 7;

pub struct Uart<I: IrqLine, O: SerialOut> {
    irq: I,
    out: O,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    divisor: [u8; 2],
    fifo_enabled: bool,
    overrun: bool,
    thr_empty_pending: bool,
    msr_delta: u8,
    rx: VecDeque<u8>,
    irq_high: bool,
}

impl<I: IrqLine, O: SerialOut> Uart<I, O> {
    pub fn new(irq: I, out: O) -> Self {
        Self {
            irq,
            out,
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            // 115200 baud from the 1.8432 MHz crystal.
            divisor: [1, 0],
            fifo_enabled: false,
            overrun: false,
            thr_empty_pending: false,
            msr_delta: 0,
            rx: VecDeque::with_capacity(RX_FIFO_LEN),
            irq_high: false,
        }
    }

    /// Queue bytes from the console; returns how many fit (the rest must be
    /// offered again once the guest has read some). Nothing is taken in
    /// loopback mode, where the receiver is disconnected from the line.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let taken = if self.loopback() {
            0
        } else {
            let n = self.input_space().min(bytes.len());
            self.rx.extend(&bytes[..n]);
            n
        };
        self.update_irq();
        taken
    }

    /// How many bytes [`Self::enqueue_input`] would take now.
    pub fn input_space(&self) -> usize {
        if self.loopback() {
            0
        } else {
            self.rx_capacity().saturating_sub(self.rx.len())
        }
    }

    pub fn output(&mut self) -> &mut O {
        &mut self.out
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled {
            RX_FIFO_LEN
        } else {
            1
        }
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    /// Modem status lines: in loopback they follow MCR; otherwise a modem
    /// is always ready (carrier, DSR, CTS).
    fn modem_lines(&self) -> u8 {
        if !self.loopback() {
            return MSR_DCD | MSR_DSR | MSR_CTS;
        }
        let wire = |mcr_bit, msr_bit| if self.mcr & mcr_bit != 0 { msr_bit } else { 0 };
        wire(MCR_DTR, MSR_DSR)
            | wire(MCR_RTS, MSR_CTS)
            | wire(MCR_OUT1, MSR_RI)
            | wire(MCR_OUT2, MSR_DCD)
    }

    fn set_mcr(&mut self, value: u8) {
        let before = self.modem_lines();
        self.mcr = value & MCR_MASK;
        let after = self.modem_lines();
        let changed = before ^ after;
        let delta = |line, delta_bit| if changed & line != 0 { delta_bit } else { 0 };
        self.msr_delta |= delta(MSR_CTS, MSR_DELTA_CTS)
            | delta(MSR_DSR, MSR_DELTA_DSR)
            | delta(MSR_DCD, MSR_DELTA_DCD);
        if before & MSR_RI != 0 && after & MSR_RI == 0 {
            self.msr_delta |= MSR_TRAILING_RI;
        }
    }

    /// The highest-priority pending interrupt, as its IIR code.
    fn interrupt_id(&self) -> Option<u8> {
        let enabled = |bit| self.ier & bit != 0;
        if enabled(IER_LINE_STATUS) && self.overrun {
            Some(IIR_LINE_STATUS)
        } else if enabled(IER_RX_DATA) && !self.rx.is_empty() {
            Some(IIR_RX_DATA)
        } else if enabled(IER_THR_EMPTY) && self.thr_empty_pending {
            Some(IIR_THR_EMPTY)
        } else if enabled(IER_MODEM_STATUS) && self.msr_delta != 0 {
            Some(IIR_MODEM_STATUS)
        } else {
            None
        }
    }

    fn update_irq(&mut self) {
        let high = self.interrupt_id().is_some();
        if high != self.irq_high {
            self.irq_high = high;
            self.irq.set_level(high);
        }
    }

    fn read_register(&mut self, offset: u64) -> u8 {
        match offset {
            DATA if self.dlab() => self.divisor[0],
            DATA => self.rx.pop_front().unwrap_or(0),
            IER if self.dlab() => self.divisor[1],
            IER => self.ier,
            IIR_FCR => {
                let id = self.interrupt_id();
                // Reading the THR-empty identification acknowledges it.
                if id == Some(IIR_THR_EMPTY) {
                    self.thr_empty_pending = false;
                }
                let fifo = if self.fifo_enabled {
                    IIR_FIFO_ENABLED
                } else {
                    0
                };
                id.unwrap_or(IIR_NO_INT) | fifo
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let ready = if self.rx.is_empty() {
                    0
                } else {
                    LSR_DATA_READY
                };
                let overrun = if self.overrun { LSR_OVERRUN } else { 0 };
                self.overrun = false;
                ready | overrun | LSR_THR_EMPTY | LSR_TX_EMPTY
            }
            MSR => {
                let value = self.modem_lines() | self.msr_delta;
                self.msr_delta = 0;
                value
            }
            SCR => self.scr,
            _ => 0xff,
        }
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        match offset {
            DATA if self.dlab() => self.divisor[0] = value,
            DATA => {
                if self.loopback() {
                    if self.rx.len() < self.rx_capacity() {
                        self.rx.push_back(value);
                    } else {
                        self.overrun = true;
                    }
                } else {
                    self.out.write_byte(value);
                }
                // Sent at once: THR is empty again.
                self.thr_empty_pending = true;
            }
            IER if self.dlab() => self.divisor[1] = value,
            IER => {
                let newly_enabled = value & !self.ier & IER_THR_EMPTY != 0;
                self.ier = value & IER_MASK;
                if newly_enabled {
                    self.thr_empty_pending = true;
                }
            }
            IIR_FCR => {
                let enable = value & FCR_FIFO_ENABLE != 0;
                if enable != self.fifo_enabled || (enable && value & FCR_CLEAR_RX != 0) {
                    self.rx.clear();
                }
                self.fifo_enabled = enable;
            }
            LCR => self.lcr = value,
            MCR => self.set_mcr(value),
            SCR => self.scr = value,
            _ => {}
        }
    }
}

impl<I: IrqLine, O: SerialOut> BusDevice for Uart<I, O> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else {
            data.fill(0xff);
            return;
        };
        *byte = self.read_register(offset);
        self.update_irq();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else { return };
        self.write_register(offset, value);
        self.update_irq();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::rc::Rc;
    use alloc::vec::Vec;
    use core::cell::{Cell, RefCell};

    #[derive(Clone, Default)]
    struct Line(Rc<Cell<bool>>);
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            assert_ne!(self.0.get(), high, "level set without a change");
            self.0.set(high);
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Rc<RefCell<Vec<u8>>>);
    impl SerialOut for Sink {
        fn write_byte(&mut self, byte: u8) {
            self.0.borrow_mut().push(byte);
        }
    }

    fn uart() -> (Uart<Line, Sink>, Line, Sink) {
        let (line, sink) = (Line::default(), Sink::default());
        (Uart::new(line.clone(), sink.clone()), line, sink)
    }

    fn rd(u: &mut Uart<Line, Sink>, offset: u64) -> u8 {
        let mut b = [0];
        u.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn transmits_and_keeps_the_divisor_apart() {
        let (mut u, _, sink) = uart();
        u.write(LCR, &[LCR_DLAB | 0x03]);
        u.write(DATA, &[0x0c]);
        u.write(IER, &[0x00]);
        assert_eq!((rd(&mut u, DATA), rd(&mut u, IER)), (0x0c, 0));
        u.write(LCR, &[0x03]);
        u.write(DATA, b"h");
        u.write(DATA, b"i");
        assert_eq!(*sink.0.borrow(), b"hi");
        assert_eq!(rd(&mut u, LSR), LSR_THR_EMPTY | LSR_TX_EMPTY);
        u.write(SCR, &[0x5a]);
        assert_eq!(rd(&mut u, SCR), 0x5a);
    }

    /// The steps of Linux's autoconfig(): IER probe, loopback test, FIFO
    /// detection, and the XScale UUE bit probe that must fail.
    #[test]
    fn linux_probe_finds_a_16550a() {
        let (mut u, _, sink) = uart();
        u.write(IER, &[0]);
        assert_eq!(rd(&mut u, IER) & 0x0f, 0);
        u.write(IER, &[0x0f]);
        assert_eq!(rd(&mut u, IER) & 0x0f, 0x0f);
        u.write(IER, &[0]);

        u.write(MCR, &[MCR_LOOP | MCR_OUT2 | MCR_RTS]);
        assert_eq!(rd(&mut u, MSR) & 0xf0, MSR_DCD | MSR_CTS);
        u.write(MCR, &[0]);

        u.write(IIR_FCR, &[FCR_FIFO_ENABLE]);
        assert_eq!(rd(&mut u, IIR_FCR) >> 6, 3);
        // 16750 probe: IIR bit 5 never set.
        assert_eq!(rd(&mut u, IIR_FCR) >> 5, 6);
        u.write(IER, &[1 << 6]);
        assert_eq!(rd(&mut u, IER) & (1 << 6), 0);

        // Loopback echoes THR into RBR without transmitting.
        u.write(MCR, &[MCR_LOOP]);
        u.write(DATA, &[0x42]);
        assert_eq!(rd(&mut u, LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(rd(&mut u, DATA), 0x42);
        assert!(sink.0.borrow().is_empty());
    }

    #[test]
    fn thre_interrupt_is_reasserted_like_a_real_16550() {
        let (mut u, line, _) = uart();
        u.write(IER, &[IER_THR_EMPTY]);
        assert!(line.0.get());
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THR_EMPTY);
        assert!(!line.0.get(), "IIR read acknowledged THRE");
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NO_INT);
        u.write(IER, &[0]);
        u.write(IER, &[IER_THR_EMPTY]);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THR_EMPTY, "re-enabling re-arms");
        u.write(DATA, b"x");
        assert!(line.0.get(), "transmitter empty again after a write");
    }

    #[test]
    fn interrupt_identification_order() {
        let (mut u, line, _) = uart();
        u.write(IIR_FCR, &[FCR_FIFO_ENABLE]);
        u.write(IER, &[IER_MASK]);
        // Modem status: leaving loopback changes the lines.
        u.write(MCR, &[MCR_LOOP]);
        u.write(MCR, &[0]);
        // Fill the FIFO past capacity in loopback for an overrun.
        u.write(MCR, &[MCR_LOOP]);
        for b in 0..=RX_FIFO_LEN as u8 {
            u.write(DATA, &[b]);
        }
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_LINE_STATUS);
        assert_eq!(rd(&mut u, LSR) & LSR_OVERRUN, LSR_OVERRUN);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_RX_DATA);
        for b in 0..RX_FIFO_LEN as u8 {
            assert_eq!(rd(&mut u, DATA), b);
        }
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_THR_EMPTY);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_MODEM_STATUS);
        assert!(line.0.get());
        let msr = rd(&mut u, MSR);
        assert_ne!(msr & 0x0f, 0, "deltas reported");
        assert_eq!(rd(&mut u, MSR) & 0x0f, 0, "and cleared by the read");
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_NO_INT);
        assert!(!line.0.get());
    }

    #[test]
    fn input_is_bounded_and_raises_rx_interrupt() {
        let (mut u, line, _) = uart();
        assert_eq!(u.enqueue_input(b"ab"), 1, "no FIFO: one holding byte");
        u.write(IIR_FCR, &[FCR_FIFO_ENABLE]);
        assert_eq!(rd(&mut u, LSR) & LSR_DATA_READY, 0, "FIFO enable clears it");
        let long = [7u8; 40];
        assert_eq!(u.enqueue_input(&long), RX_FIFO_LEN);
        assert_eq!(u.input_space(), 0);
        assert!(!line.0.get(), "RX interrupt disabled");
        u.write(IER, &[IER_RX_DATA]);
        assert!(line.0.get());
        u.write(IIR_FCR, &[FCR_FIFO_ENABLE | FCR_CLEAR_RX]);
        assert!(!line.0.get());
        assert_eq!(u.input_space(), RX_FIFO_LEN);
        u.write(MCR, &[MCR_LOOP]);
        assert_eq!(
            u.enqueue_input(b"x"),
            0,
            "receiver disconnected in loopback"
        );
    }

    #[test]
    fn wide_accesses_are_rejected() {
        let (mut u, _, sink) = uart();
        u.write(DATA, b"ab");
        assert!(sink.0.borrow().is_empty());
        let mut word = [0; 4];
        u.read(LSR, &mut word);
        assert_eq!(word, [0xff; 4]);
        assert_eq!(rd(&mut u, 8), 0xff);
    }

    #[test]
    fn fuzz_random_accesses() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut u, line, _) = uart();
        for _ in 0..20_000 {
            let r = next();
            let offset = (r >> 8) % 10;
            let len = [1, 1, 1, 2, 4][(r % 5) as usize];
            let mut buf = [(r >> 16) as u8; 4];
            match (r >> 24) % 8 {
                0 => {
                    u.enqueue_input(&buf[..len]);
                }
                1..=4 => u.read(offset, &mut buf[..len]),
                _ => u.write(offset, &buf[..len]),
            }
            assert!(u.rx.len() <= u.rx_capacity());
            assert_eq!(u.ier & !IER_MASK, 0);
            assert_eq!(line.0.get(), u.interrupt_id().is_some());
        }
    }
}

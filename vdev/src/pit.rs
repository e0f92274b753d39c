//! 8254 programmable interval timer (ports 0x40-0x43) and the timer bits of
//! system control port B (0x61, [`SystemControlPort`]).
//!
//! Counters are computed from the [`Clock`], never ticked: a counter holds
//! the time it was (re)started and the ticks it had counted by then. Modes
//! 0-5 count, 1 and 5 wait for a gate edge (only channel 2's gate moves),
//! modes 2 and 3 restart at once when a new count is written (a real 8254
//! waits for the period's end). BCD counting is recorded but counts in
//! binary. Channel 0 pulses IRQ0 on each rising edge of its output, once
//! [`Pit::poll`] sees it due; periods missed between polls coalesce into
//! one pulse. Byte accesses only: wider reads return all ones, wider writes
//! are ignored.

use crate::{BusDevice, Clock, IrqLine, Shared};

pub const PIT_HZ: u64 = 1_193_182;
pub const WINDOW_LEN: u64 = 4;

const NS_PER_SEC: u64 = 1_000_000_000;
const CONTROL: u64 = 3;
const MAX_COUNT: u32 = 0x1_0000;

const CW_CHANNEL_SHIFT: u8 = 6;
const CW_READ_BACK: u8 = 3;
const CW_ACCESS_SHIFT: u8 = 4;
const CW_MODE_SHIFT: u8 = 1;
const CW_BCD: u8 = 1 << 0;
const READ_BACK_NO_COUNT: u8 = 1 << 5;
const READ_BACK_NO_STATUS: u8 = 1 << 4;
const STATUS_OUT: u8 = 1 << 7;
const STATUS_NULL_COUNT: u8 = 1 << 6;

const PORT61_GATE2: u8 = 1 << 0;
const PORT61_SPEAKER: u8 = 1 << 1;
const PORT61_REFRESH: u8 = 1 << 4;
const PORT61_OUT2: u8 = 1 << 5;
/// DRAM refresh requests toggle bit 4 of port 0x61 about every 15 µs.
const REFRESH_HALF_PERIOD_NS: u64 = 15_085;

fn ticks_in(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / u128::from(NS_PER_SEC)) as u64
}

/// Nanoseconds until `ticks` have elapsed, rounded up.
fn ns_for(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * u128::from(NS_PER_SEC)).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Lsb = 1,
    Msb = 2,
    Word = 3,
}

#[derive(Debug)]
struct Channel {
    mode: u8,
    access: Access,
    bcd: bool,
    /// 1..=0x10000 (a written 0 means 0x10000).
    reload: u32,
    pending_lsb: Option<u8>,
    read_msb_next: bool,
    latched_count: Option<u16>,
    latched_status: Option<u8>,
    gate: bool,
    loaded: bool,
    counting: bool,
    /// Counting and not held by a low gate.
    running: bool,
    origin_ns: u64,
    ticks_at_origin: u64,
    /// Output rising edges already reported.
    events: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Self {
            mode: 0,
            access: Access::Word,
            bcd: false,
            reload: MAX_COUNT,
            pending_lsb: None,
            read_msb_next: false,
            latched_count: None,
            latched_status: None,
            gate,
            loaded: false,
            counting: false,
            running: false,
            origin_ns: 0,
            ticks_at_origin: 0,
            events: 0,
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode, 2 | 3)
    }

    fn gate_triggered(&self) -> bool {
        matches!(self.mode, 1 | 5)
    }

    fn elapsed(&self, now: u64) -> u64 {
        let since = if self.running {
            ticks_in(now.saturating_sub(self.origin_ns))
        } else {
            0
        };
        self.ticks_at_origin.saturating_add(since)
    }

    fn restart(&mut self, now: u64) {
        self.counting = true;
        self.running = self.gate || self.gate_triggered();
        self.origin_ns = now;
        self.ticks_at_origin = 0;
        self.events = 0;
    }

    fn hold(&mut self, now: u64) {
        self.ticks_at_origin = self.elapsed(now);
        self.running = false;
    }

    fn resume(&mut self, now: u64) {
        self.origin_ns = now;
        self.running = true;
    }

    fn count(&self, now: u64) -> u16 {
        if !self.counting {
            return self.reload as u16;
        }
        let reload = u64::from(self.reload);
        let e = self.elapsed(now);
        let count = match self.mode {
            2 => reload - e % reload,
            // Decrements by two, twice per period.
            3 => reload - (e % reload) * 2 % reload,
            _ => reload.wrapping_sub(e),
        };
        count as u16
    }

    fn out(&self, now: u64) -> bool {
        let reload = u64::from(self.reload);
        let e = self.elapsed(now);
        match self.mode {
            0 => self.counting && e >= reload,
            1 => !self.counting || e >= reload,
            2 => !self.running || e % reload != reload - 1,
            3 => !self.running || e % reload < reload.div_ceil(2),
            _ => !self.counting || e != reload,
        }
    }

    /// Output rising edges (terminal counts) due by `elapsed` ticks.
    fn events_due(&self, elapsed: u64) -> u64 {
        let reload = u64::from(self.reload);
        if self.periodic() {
            elapsed / reload
        } else {
            u64::from(elapsed >= reload)
        }
    }

    fn next_event_tick(&self) -> Option<u64> {
        let k = self.events.checked_add(1)?;
        if !self.periodic() && k > 1 {
            return None;
        }
        k.checked_mul(u64::from(self.reload))
    }

    fn status(&self, now: u64) -> u8 {
        let out = if self.out(now) { STATUS_OUT } else { 0 };
        let null = if self.loaded { 0 } else { STATUS_NULL_COUNT };
        out | null
            | (self.access as u8) << CW_ACCESS_SHIFT
            | self.mode << CW_MODE_SHIFT
            | u8::from(self.bcd)
    }

    fn program(&mut self, control: u8) {
        let access = match (control >> CW_ACCESS_SHIFT) & 3 {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::Word,
        };
        let mode = (control >> CW_MODE_SHIFT) & 7;
        *self = Self {
            mode: if mode >= 6 { mode - 4 } else { mode },
            access,
            bcd: control & CW_BCD != 0,
            ..Self::new(self.gate)
        };
    }

    fn latch_count(&mut self, now: u64) {
        if self.latched_count.is_none() {
            self.latched_count = Some(self.count(now));
        }
    }

    fn latch_status(&mut self, now: u64) {
        if self.latched_status.is_none() {
            self.latched_status = Some(self.status(now));
        }
    }

    fn load(&mut self, now: u64, count: u32) {
        self.reload = if count == 0 { MAX_COUNT } else { count };
        self.loaded = true;
        // Gate-triggered modes start on the gate's next rising edge.
        if !self.gate_triggered() {
            self.restart(now);
        }
    }

    fn write(&mut self, now: u64, value: u8) {
        match (self.access, self.pending_lsb.take()) {
            (Access::Lsb, _) => self.load(now, u32::from(value)),
            (Access::Msb, _) => self.load(now, u32::from(value) << 8),
            (Access::Word, None) => {
                self.pending_lsb = Some(value);
                // Mode 0 stops counting on the first byte.
                if self.mode == 0 {
                    self.counting = false;
                    self.running = false;
                }
            }
            (Access::Word, Some(lsb)) => self.load(now, u32::from(lsb) | u32::from(value) << 8),
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(status) = self.latched_status.take() {
            return status;
        }
        let value = self.latched_count.unwrap_or_else(|| self.count(now));
        let [lsb, msb] = value.to_le_bytes();
        let (byte, last) = match self.access {
            Access::Lsb => (lsb, true),
            Access::Msb => (msb, true),
            Access::Word if self.read_msb_next => (msb, true),
            Access::Word => (lsb, false),
        };
        if self.access == Access::Word {
            self.read_msb_next = !last;
        }
        if last {
            self.latched_count = None;
        }
        byte
    }

    fn set_gate(&mut self, now: u64, high: bool) {
        if high == self.gate {
            return;
        }
        self.gate = high;
        match self.mode {
            0 | 4 if self.counting => {
                if high {
                    self.resume(now);
                } else {
                    self.hold(now);
                }
            }
            2 | 3 if self.counting => {
                if high {
                    self.restart(now);
                } else {
                    self.hold(now);
                }
            }
            1 | 5 if high && self.loaded => self.restart(now),
            _ => {}
        }
    }
}

pub struct Pit<C: Clock, I: IrqLine> {
    clock: C,
    irq0: I,
    channels: [Channel; 3],
    speaker_data: bool,
}

impl<C: Clock, I: IrqLine> Pit<C, I> {
    pub fn new(clock: C, irq0: I) -> Self {
        Self {
            clock,
            irq0,
            // Channels 0 and 1 have their gates tied high.
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            speaker_data: false,
        }
    }

    /// When channel 0's output next rises (IRQ0), if it will.
    pub fn deadline_ns(&self) -> Option<u64> {
        let ch = &self.channels[0];
        if !(ch.counting && ch.running) {
            return None;
        }
        let ticks = ch.next_event_tick()?.saturating_sub(ch.ticks_at_origin);
        Some(ch.origin_ns.saturating_add(ns_for(ticks)))
    }

    /// Pulse IRQ0 if channel 0's output rose since the last poll.
    pub fn poll(&mut self) {
        let now = self.clock.now_ns();
        let ch = &mut self.channels[0];
        if !ch.counting {
            return;
        }
        let due = ch.events_due(ch.elapsed(now));
        if due > ch.events {
            ch.events = due;
            self.irq0.pulse();
        }
    }

    pub fn read_port61(&self) -> u8 {
        let now = self.clock.now_ns();
        let ch2 = &self.channels[2];
        let bit = |on, mask| if on { mask } else { 0 };
        bit(ch2.gate, PORT61_GATE2)
            | bit(self.speaker_data, PORT61_SPEAKER)
            | bit((now / REFRESH_HALF_PERIOD_NS) & 1 != 0, PORT61_REFRESH)
            | bit(ch2.out(now), PORT61_OUT2)
    }

    pub fn write_port61(&mut self, value: u8) {
        let now = self.clock.now_ns();
        self.speaker_data = value & PORT61_SPEAKER != 0;
        self.channels[2].set_gate(now, value & PORT61_GATE2 != 0);
    }

    fn write_control(&mut self, now: u64, value: u8) {
        let channel = value >> CW_CHANNEL_SHIFT;
        if channel == CW_READ_BACK {
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if value & (1 << (i + 1)) == 0 {
                    continue;
                }
                if value & READ_BACK_NO_STATUS == 0 {
                    ch.latch_status(now);
                }
                if value & READ_BACK_NO_COUNT == 0 {
                    ch.latch_count(now);
                }
            }
            return;
        }
        let Some(ch) = self.channels.get_mut(usize::from(channel)) else {
            return;
        };
        if (value >> CW_ACCESS_SHIFT) & 3 == 0 {
            ch.latch_count(now);
        } else {
            ch.program(value);
        }
    }
}

impl<C: Clock, I: IrqLine> BusDevice for Pit<C, I> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        match (
            data,
            usize::try_from(offset)
                .ok()
                .and_then(|i| self.channels.get_mut(i)),
        ) {
            ([byte], Some(ch)) => *byte = ch.read(now),
            // The control word register is write-only.
            (data, _) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else { return };
        let now = self.clock.now_ns();
        if offset == CONTROL {
            self.write_control(now, value);
        } else if let Some(ch) = usize::try_from(offset)
            .ok()
            .and_then(|i| self.channels.get_mut(i))
        {
            ch.write(now, value);
        }
    }
}

/// Port 0x61's timer bits: channel 2 gate (bit 0), speaker data (bit 1),
/// refresh toggle (bit 4) and OUT2 (bit 5); one-byte window.
pub struct SystemControlPort<C: Clock, I: IrqLine>(pub Shared<Pit<C, I>>);

impl<C: Clock, I: IrqLine> BusDevice for SystemControlPort<C, I> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] if offset == 0 => *byte = self.0.borrow().read_port61(),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, &[value]) = (offset, data) {
            self.0.borrow_mut().write_port61(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::rc::Rc;
    use core::cell::{Cell, RefCell};

    use crate::testutil::FakeClock;

    #[derive(Clone, Default)]
    struct Pulses(Rc<Cell<u32>>);
    impl IrqLine for Pulses {
        fn set_level(&self, _high: bool) {
            unreachable!("the PIT only pulses");
        }
        fn pulse(&self) {
            self.0.set(self.0.get() + 1);
        }
    }

    fn pit() -> (Pit<FakeClock, Pulses>, FakeClock, Pulses) {
        let (clock, irq) = (FakeClock::default(), Pulses::default());
        (Pit::new(clock.clone(), irq.clone()), clock, irq)
    }

    fn rd(pit: &mut Pit<FakeClock, Pulses>, offset: u64) -> u8 {
        let mut b = [0];
        pit.read(offset, &mut b);
        b[0]
    }

    fn read_word(pit: &mut Pit<FakeClock, Pulses>, channel: u64) -> u16 {
        u16::from_le_bytes([rd(pit, channel), rd(pit, channel)])
    }

    #[test]
    fn mode2_ticks_periodically() {
        let (mut pit, clock, irq) = pit();
        // Linux's HZ=1000 periodic setup: channel 0, lo/hi, mode 2.
        let latch: u16 = 1193;
        pit.write(CONTROL, &[0x34]);
        pit.write(0, &[latch as u8]);
        pit.write(0, &[(latch >> 8) as u8]);
        let period = ns_for(u64::from(latch));
        assert_eq!(pit.deadline_ns(), Some(period));
        clock.0.set(period - 1);
        pit.poll();
        assert_eq!(irq.0.get(), 0);
        clock.0.set(period);
        pit.poll();
        assert_eq!(irq.0.get(), 1);
        pit.poll();
        assert_eq!(irq.0.get(), 1, "one pulse per period");
        let second = pit.deadline_ns().unwrap();
        assert!(second > period && second - period <= period + 1);
        // Late poll: three periods missed coalesce into one pulse.
        clock.0.set(period * 4 + 10);
        pit.poll();
        assert_eq!(irq.0.get(), 2);
        assert!(pit.deadline_ns().unwrap() > clock.0.get());
    }

    #[test]
    fn counter_latch_and_read_back() {
        let (mut pit, clock, _) = pit();
        pit.write(CONTROL, &[0x34]);
        pit.write(0, &[0x00]);
        pit.write(0, &[0x10]); // 0x1000
        clock.0.set(ns_for(0x100));
        pit.write(CONTROL, &[0x00]); // latch channel 0
        clock.0.set(ns_for(0x800));
        assert_eq!(read_word(&mut pit, 0), 0x0f00, "latched value");
        assert_eq!(read_word(&mut pit, 0), 0x0800, "live again");
        // Read-back: status then count of channel 0.
        pit.write(CONTROL, &[0xc2]);
        let status = rd(&mut pit, 0);
        assert_eq!(status & 0x3f, 0x34);
        assert_eq!(status & STATUS_OUT, STATUS_OUT);
        assert_eq!(read_word(&mut pit, 0), 0x0800);
        // LSB-only access.
        pit.write(CONTROL, &[0x10]);
        pit.write(0, &[50]);
        clock.0.set(clock.0.get() + ns_for(20));
        assert_eq!(rd(&mut pit, 0), 30);
        assert_eq!(rd(&mut pit, 0), 30);
    }

    #[test]
    fn mode0_one_shot_and_mode3_square_wave() {
        let (mut pit, clock, irq) = pit();
        pit.write(CONTROL, &[0x30]);
        pit.write(0, &[100]);
        pit.write(0, &[0]);
        let fire = ns_for(100);
        assert_eq!(pit.deadline_ns(), Some(fire));
        clock.0.set(fire * 5);
        pit.poll();
        pit.poll();
        assert_eq!(irq.0.get(), 1);
        assert_eq!(pit.deadline_ns(), None, "mode 0 fires once");

        pit.write(CONTROL, &[0x36]);
        pit.write(0, &[10]);
        pit.write(0, &[0]);
        let start = clock.0.get();
        assert_eq!(read_word(&mut pit, 0), 10);
        clock.0.set(start + ns_for(2));
        assert_eq!(read_word(&mut pit, 0), 6, "mode 3 counts by two");
    }

    /// Linux's PIT TSC calibration: channel 2 mode 0, gate via port 0x61,
    /// poll OUT2 (bit 5).
    #[test]
    fn channel2_gate_and_out2() {
        let (pit, clock, irq) = pit();
        let pit = Rc::new(RefCell::new(pit));
        let mut port61 = SystemControlPort(pit.clone());
        let mut b = [0];
        port61.read(0, &mut b);
        port61.write(0, &[(b[0] & !PORT61_SPEAKER) | PORT61_GATE2]);
        pit.borrow_mut().write(CONTROL, &[0xb0]);
        pit.borrow_mut().write(2, &[0xff]);
        pit.borrow_mut().write(2, &[0xff]);
        clock.0.set(ns_for(0xfffe));
        port61.read(0, &mut b);
        assert_eq!(b[0] & (PORT61_OUT2 | PORT61_GATE2), PORT61_GATE2);
        clock.0.set(ns_for(0xffff));
        port61.read(0, &mut b);
        assert_eq!(b[0] & PORT61_OUT2, PORT61_OUT2);
        assert_eq!(irq.0.get(), 0, "channel 2 raises no IRQ");

        // Gate low holds a mode 0 count.
        pit.borrow_mut().write(CONTROL, &[0xb0]);
        pit.borrow_mut().write(2, &[0x00]);
        pit.borrow_mut().write(2, &[0x01]);
        port61.write(0, &[0]);
        clock.0.set(clock.0.get() + ns_for(1000));
        assert_eq!(read_word(&mut pit.borrow_mut(), 2), 0x100);
        port61.write(0, &[PORT61_GATE2]);
        clock.0.set(clock.0.get() + ns_for(0x10));
        assert_eq!(read_word(&mut pit.borrow_mut(), 2), 0xf0);
        let mut word = [0; 2];
        port61.read(0, &mut word);
        assert_eq!(word, [0xff; 2]);
    }

    #[test]
    fn fuzz_random_accesses() {
        let mut seed = 0x0123_4567_89ab_cdefu64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut pit, clock, _) = pit();
        for _ in 0..20_000 {
            let r = next();
            let offset = (r >> 8) % 6;
            let len = [1, 1, 1, 2, 4][(r % 5) as usize];
            let mut buf = [(r >> 16) as u8; 4];
            match (r >> 24) % 8 {
                0 => clock.0.set(clock.0.get().saturating_add(r >> 40)),
                1 => pit.poll(),
                2 => pit.write_port61((r >> 32) as u8),
                3 | 4 => pit.read(offset, &mut buf[..len]),
                _ => pit.write(offset, &buf[..len]),
            }
            if r & (1 << 60) != 0 {
                // After a poll everything due is reported: the next edge
                // lies in the future.
                pit.poll();
                assert!(pit.deadline_ns().is_none_or(|d| d > clock.0.get()));
            }
            for ch in &pit.channels {
                assert!((1..=MAX_COUNT).contains(&ch.reload));
                assert!(ch.mode <= 5);
            }
        }
    }
}

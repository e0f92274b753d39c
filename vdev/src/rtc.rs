//! MC146818 RTC and CMOS RAM behind ports 0x70 (index, bit 7 masks NMI)
//! and 0x71 (data).
//!
//! The time is `start_epoch` (Unix seconds at guest time 0) plus the
//! [`Clock`] plus whatever the guest set; seconds turn over on whole guest
//! seconds. Update-in-progress (register A bit 7) is set in the last
//! 244 µs before each turn-over, so a guest waiting for it to clear never
//! waits longer. BCD or binary and 12 or 24 hour formats follow register B
//! at every read (the time itself is kept in binary); the weekday is
//! derived, writes to it are ignored; the divider bits of register A are
//! stored but the clock always runs. The century lives at
//! [`CENTURY_REGISTER`] (for the FADT's CENTURY field); the other bytes
//! from 0x0e to 0x7f are plain RAM. Periodic, alarm and update-ended
//! flags (register C) are kept and raise IRQ8 through an [`IrqLine`] as
//! register B enables them; [`Rtc::deadline_ns`] and [`Rtc::poll`] drive
//! it. Byte accesses only: wider reads return all ones, wider writes are
//! ignored.

use crate::{BusDevice, Clock, IrqLine};

pub const WINDOW_LEN: u64 = 2;
pub const CENTURY_REGISTER: u8 = 0x32;

const INDEX_PORT: u64 = 0;
const DATA_PORT: u64 = 1;
const INDEX_MASK: u8 = 0x7f;
const NMI_DISABLE: u8 = 1 << 7;

const SECONDS: u8 = 0x00;
const SECONDS_ALARM: u8 = 0x01;
const MINUTES: u8 = 0x02;
const MINUTES_ALARM: u8 = 0x03;
const HOURS: u8 = 0x04;
const HOURS_ALARM: u8 = 0x05;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

const A_UPDATE_IN_PROGRESS: u8 = 1 << 7;
const A_RATE_MASK: u8 = 0x0f;
/// 32.768 kHz time base, 1024 Hz periodic rate: what firmware leaves.
const A_DEFAULT: u8 = 0x26;
const B_SET: u8 = 1 << 7;
const B_PERIODIC_INT: u8 = 1 << 6;
const B_ALARM_INT: u8 = 1 << 5;
const B_UPDATE_INT: u8 = 1 << 4;
const B_BINARY: u8 = 1 << 2;
const B_24_HOUR: u8 = 1 << 1;
const C_IRQ: u8 = 1 << 7;
const C_PERIODIC: u8 = 1 << 6;
const C_ALARM: u8 = 1 << 5;
const C_UPDATE: u8 = 1 << 4;
const D_VALID_RAM_AND_TIME: u8 = 1 << 7;
const HOUR_PM: u8 = 1 << 7;
const ALARM_DONT_CARE: u8 = 0xc0;

const NS_PER_SEC: u64 = 1_000_000_000;
const UPDATE_IN_PROGRESS_NS: u64 = 244_000;
const SECS_PER_DAY: i64 = 86_400;

/// Calendar time, binary, 24 hour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (eras of 400 years
/// from 0000-03-01, so February ends each year).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let march_based_month = (i64::from(month) + 9) % 12;
    let day_of_year = (153 * march_based_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_based_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * march_based_month + 2) / 5 + 1) as u8;
    let month = if march_based_month < 10 {
        march_based_month + 3
    } else {
        march_based_month - 9
    } as u8;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let (year, month, day) = civil_from_days(secs.div_euclid(SECS_PER_DAY));
        let tod = secs.rem_euclid(SECS_PER_DAY);
        Self {
            year,
            month,
            day,
            hour: (tod / 3600) as u8,
            minute: (tod / 60 % 60) as u8,
            second: (tod % 60) as u8,
        }
    }

    /// `None` for a date the guest wrote that does not exist.
    fn to_unix(self) -> Option<i64> {
        let valid = (1..=12).contains(&self.month)
            && (1..=days_in_month(self.year, self.month)).contains(&self.day)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60;
        if !valid {
            return None;
        }
        days_from_civil(self.year, self.month, self.day)
            .checked_mul(SECS_PER_DAY)?
            .checked_add(i64::from(self.seconds_of_day()))
    }

    /// 1 = Sunday.
    fn weekday(&self) -> u8 {
        // 1970-01-01 was a Thursday.
        ((days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) + 1) as u8
    }

    fn seconds_of_day(&self) -> u32 {
        u32::from(self.hour) * 3600 + u32::from(self.minute) * 60 + u32::from(self.second)
    }
}

/// Seconds after `now` (seconds of day) until the alarm next matches;
/// `None` fields match anything.
fn seconds_to_alarm(now: u32, hour: Option<u8>, minute: Option<u8>, second: Option<u8>) -> u32 {
    let span = |field: Option<u8>, n: u32| match field {
        Some(v) => u32::from(v)..u32::from(v) + 1,
        None => 0..n,
    };
    for day in 0..2 {
        for h in span(hour, 24) {
            let hour_start = day * 86_400 + h * 3600;
            if hour_start + 3599 <= now {
                continue;
            }
            for m in span(minute, 60) {
                let minute_start = hour_start + m * 60;
                if minute_start + 59 <= now {
                    continue;
                }
                if let Some(t) = span(second, 60)
                    .map(|s| minute_start + s)
                    .find(|&t| t > now)
                {
                    return t - now;
                }
            }
        }
    }
    86_400
}

pub struct Rtc<C: Clock, I: IrqLine> {
    clock: C,
    irq: I,
    start_epoch: i64,
    /// Seconds the guest moved the clock by.
    adjust: i64,
    index: u8,
    nmi_disabled: bool,
    reg_a: u8,
    reg_b: u8,
    flags: u8,
    alarm: [u8; 3],
    /// The time being edited while register B's SET bit holds updates.
    held: Option<DateTime>,
    ram: [u8; 128],
    next_update_ns: u64,
    next_alarm_ns: Option<u64>,
    next_periodic_ns: Option<u64>,
    irq_high: bool,
}

impl<C: Clock, I: IrqLine> Rtc<C, I> {
    /// `start_epoch`: Unix time at guest time 0.
    pub fn new(clock: C, irq: I, start_epoch: u64) -> Self {
        let mut rtc = Self {
            clock,
            irq,
            start_epoch: i64::try_from(start_epoch).unwrap_or(i64::MAX / 2),
            adjust: 0,
            index: 0,
            nmi_disabled: false,
            reg_a: A_DEFAULT,
            reg_b: B_24_HOUR,
            flags: 0,
            alarm: [0; 3],
            held: None,
            ram: [0; 128],
            next_update_ns: 0,
            next_alarm_ns: None,
            next_periodic_ns: None,
            irq_high: false,
        };
        rtc.reschedule(rtc.clock.now_ns());
        rtc
    }

    /// Whether the guest masked NMIs (port 0x70 bit 7).
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    /// When IRQ8 may next rise; `None` while it is high or nothing is
    /// enabled.
    pub fn deadline_ns(&self) -> Option<u64> {
        if self.irq_high {
            return None;
        }
        let enabled = |bit: u8, at: Option<u64>| at.filter(|_| self.reg_b & bit != 0);
        let updating = self.held.is_none();
        [
            enabled(B_PERIODIC_INT, self.next_periodic_ns),
            enabled(B_ALARM_INT, self.next_alarm_ns.filter(|_| updating)),
            enabled(B_UPDATE_INT, Some(self.next_update_ns).filter(|_| updating)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll(&mut self) {
        self.advance(self.clock.now_ns());
        self.update_irq();
    }

    fn unix_time(&self, now: u64) -> i64 {
        let secs = i64::try_from(now / NS_PER_SEC).unwrap_or(i64::MAX);
        self.start_epoch
            .saturating_add(self.adjust)
            .saturating_add(secs)
    }

    fn now_datetime(&self, now: u64) -> DateTime {
        self.held
            .unwrap_or_else(|| DateTime::from_unix(self.unix_time(now)))
    }

    fn periodic_ns(&self) -> Option<u64> {
        // Rates 1 and 2 are 256 and 128 Hz; 3-15 are 32768 >> (rate - 1).
        let hz: u64 = match self.reg_a & A_RATE_MASK {
            0 => return None,
            1 => 256,
            2 => 128,
            rate => 32_768 >> (rate - 1),
        };
        Some(NS_PER_SEC / hz)
    }

    fn decode(&self, value: u8) -> u8 {
        if self.reg_b & B_BINARY != 0 {
            value
        } else {
            (value >> 4) * 10 + (value & 0x0f)
        }
    }

    fn encode(&self, value: u8) -> u8 {
        if self.reg_b & B_BINARY != 0 {
            value
        } else {
            ((value / 10 % 10) << 4) | (value % 10)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.reg_b & B_24_HOUR != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let twelve = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | pm
    }

    /// 24-hour binary hour, or an out-of-range value for garbage.
    fn decode_hour(&self, value: u8) -> u8 {
        if self.reg_b & B_24_HOUR != 0 {
            return self.decode(value);
        }
        let twelve = self.decode(value & !HOUR_PM);
        let pm = if value & HOUR_PM != 0 { 12 } else { 0 };
        match twelve {
            1..=12 => twelve % 12 + pm,
            _ => u8::MAX,
        }
    }

    fn alarm_field(&self, value: u8, decode: impl Fn(&Self, u8) -> u8) -> Option<u8> {
        (value & ALARM_DONT_CARE != ALARM_DONT_CARE).then(|| decode(self, value))
    }

    /// Recompute when each flag is next set, after the time, the alarm,
    /// the rate or the format changed.
    fn reschedule(&mut self, now: u64) {
        let second_start = now - now % NS_PER_SEC;
        self.next_update_ns = second_start.saturating_add(NS_PER_SEC);
        self.next_periodic_ns = self
            .periodic_ns()
            .map(|period| (now - now % period).saturating_add(period));
        let [second, minute, hour] = self.alarm;
        let second = self.alarm_field(second, Self::decode);
        let minute = self.alarm_field(minute, Self::decode);
        let hour = self.alarm_field(hour, Self::decode_hour);
        let in_range = |f: Option<u8>, n: u8| f.is_none_or(|v| v < n);
        self.next_alarm_ns = (in_range(second, 60) && in_range(minute, 60) && in_range(hour, 24))
            .then(|| {
                let tod = self.now_datetime(now).seconds_of_day();
                let wait = seconds_to_alarm(tod, hour, minute, second);
                second_start.saturating_add(u64::from(wait) * NS_PER_SEC)
            });
    }

    /// Set the flags of every event due by `now`.
    fn advance(&mut self, now: u64) {
        let updating = self.held.is_none();
        let mut due = false;
        if updating && now >= self.next_update_ns {
            self.flags |= C_UPDATE;
            due = true;
        }
        if updating && self.next_alarm_ns.is_some_and(|at| now >= at) {
            self.flags |= C_ALARM;
            due = true;
        }
        if self.next_periodic_ns.is_some_and(|at| now >= at) {
            self.flags |= C_PERIODIC;
            due = true;
        }
        if due {
            self.reschedule(now);
        }
    }

    fn irq_flag(&self) -> bool {
        let raised = |flag: u8, enable: u8| self.flags & flag != 0 && self.reg_b & enable != 0;
        raised(C_PERIODIC, B_PERIODIC_INT)
            || raised(C_ALARM, B_ALARM_INT)
            || raised(C_UPDATE, B_UPDATE_INT)
    }

    fn update_irq(&mut self) {
        let high = self.irq_flag();
        if high != self.irq_high {
            self.irq_high = high;
            self.irq.set_level(high);
        }
    }

    fn read_data(&mut self, now: u64) -> u8 {
        let time = self.now_datetime(now);
        match self.index {
            SECONDS => self.encode(time.second),
            MINUTES => self.encode(time.minute),
            HOURS => self.encode_hour(time.hour),
            WEEKDAY => time.weekday(),
            DAY => self.encode(time.day),
            MONTH => self.encode(time.month),
            YEAR => self.encode(time.year.rem_euclid(100) as u8),
            CENTURY_REGISTER => self.encode(time.year.div_euclid(100).clamp(0, 99) as u8),
            SECONDS_ALARM => self.alarm[0],
            MINUTES_ALARM => self.alarm[1],
            HOURS_ALARM => self.alarm[2],
            REG_A => {
                let updating =
                    self.held.is_none() && now % NS_PER_SEC >= NS_PER_SEC - UPDATE_IN_PROGRESS_NS;
                self.reg_a | if updating { A_UPDATE_IN_PROGRESS } else { 0 }
            }
            REG_B => self.reg_b,
            REG_C => {
                let value = self.flags | if self.irq_flag() { C_IRQ } else { 0 };
                self.flags = 0;
                value
            }
            REG_D => D_VALID_RAM_AND_TIME,
            index => self.ram[usize::from(index & INDEX_MASK)],
        }
    }

    fn write_time(&mut self, now: u64, edit: impl FnOnce(&Self, &mut DateTime)) {
        let mut time = self.now_datetime(now);
        edit(self, &mut time);
        if self.held.is_some() {
            self.held = Some(time);
        } else {
            self.commit(now, time);
        }
    }

    fn commit(&mut self, now: u64, time: DateTime) {
        // A date that does not exist leaves the clock as it was.
        if let Some(secs) = time.to_unix() {
            let running = self.unix_time(now);
            self.adjust = self.adjust.saturating_add(secs.saturating_sub(running));
        }
    }

    fn write_data(&mut self, now: u64, value: u8) {
        match self.index {
            SECONDS => self.write_time(now, |rtc, t| t.second = rtc.decode(value)),
            MINUTES => self.write_time(now, |rtc, t| t.minute = rtc.decode(value)),
            HOURS => self.write_time(now, |rtc, t| t.hour = rtc.decode_hour(value)),
            DAY => self.write_time(now, |rtc, t| t.day = rtc.decode(value)),
            MONTH => self.write_time(now, |rtc, t| t.month = rtc.decode(value)),
            YEAR => self.write_time(now, |rtc, t| {
                t.year = t.year.div_euclid(100) * 100 + i64::from(rtc.decode(value) % 100);
            }),
            CENTURY_REGISTER => self.write_time(now, |rtc, t| {
                t.year = i64::from(rtc.decode(value)) * 100 + t.year.rem_euclid(100);
            }),
            SECONDS_ALARM => self.alarm[0] = value,
            MINUTES_ALARM => self.alarm[1] = value,
            HOURS_ALARM => self.alarm[2] = value,
            REG_A => self.reg_a = value & !A_UPDATE_IN_PROGRESS,
            REG_B => {
                let mut value = value;
                if value & B_SET != 0 {
                    // SET stops updates and clears the update interrupt.
                    value &= !B_UPDATE_INT;
                    self.held.get_or_insert(self.now_datetime(now));
                } else if let Some(time) = self.held.take() {
                    self.commit(now, time);
                }
                self.reg_b = value;
            }
            WEEKDAY | REG_C | REG_D => {}
            index => self.ram[usize::from(index & INDEX_MASK)] = value,
        }
        self.reschedule(now);
    }
}

impl<C: Clock, I: IrqLine> BusDevice for Rtc<C, I> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else {
            data.fill(0xff);
            return;
        };
        let now = self.clock.now_ns();
        self.advance(now);
        *byte = match offset {
            DATA_PORT => self.read_data(now),
            // The index register is write-only.
            _ => 0xff,
        };
        self.update_irq();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else { return };
        let now = self.clock.now_ns();
        self.advance(now);
        match offset {
            INDEX_PORT => {
                self.index = value & INDEX_MASK;
                self.nmi_disabled = value & NMI_DISABLE != 0;
            }
            DATA_PORT => self.write_data(now, value),
            _ => {}
        }
        self.update_irq();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::FakeClock;

    use crate::testutil::Line;

    /// 2024-02-29 23:59:58 UTC, a Thursday.
    const START: u64 = 1_709_251_198;

    fn rtc() -> (Rtc<FakeClock, Line>, FakeClock, Line) {
        let (clock, line) = (FakeClock::default(), Line::default());
        (Rtc::new(clock.clone(), line.clone(), START), clock, line)
    }

    fn get(rtc: &mut Rtc<FakeClock, Line>, index: u8) -> u8 {
        rtc.write(INDEX_PORT, &[index]);
        let mut b = [0];
        rtc.read(DATA_PORT, &mut b);
        b[0]
    }

    fn set(rtc: &mut Rtc<FakeClock, Line>, index: u8, value: u8) {
        rtc.write(INDEX_PORT, &[index]);
        rtc.write(DATA_PORT, &[value]);
    }

    fn time_regs(rtc: &mut Rtc<FakeClock, Line>) -> [u8; 8] {
        [
            SECONDS,
            MINUTES,
            HOURS,
            WEEKDAY,
            DAY,
            MONTH,
            YEAR,
            CENTURY_REGISTER,
        ]
        .map(|i| get(rtc, i))
    }

    #[test]
    fn calendar_round_trips() {
        for secs in [
            0i64,
            951_782_400,
            1_709_251_198,
            4_102_444_800,
            -86_400,
            253_402_300_799,
        ] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), Some(secs));
        }
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
        assert_eq!(DateTime::from_unix(0).weekday(), 5, "Thursday");
        let bad = DateTime { day: 30, ..leap };
        assert_eq!(bad.to_unix(), None);
    }

    #[test]
    fn bcd_time_advances_across_midnight_of_a_leap_day() {
        let (mut rtc, clock, _) = rtc();
        assert_eq!(
            time_regs(&mut rtc),
            [0x58, 0x59, 0x23, 5, 0x29, 0x02, 0x24, 0x20]
        );
        clock.0.set(2 * NS_PER_SEC);
        assert_eq!(
            time_regs(&mut rtc),
            [0x00, 0x00, 0x00, 6, 0x01, 0x03, 0x24, 0x20]
        );
        set(&mut rtc, REG_B, B_BINARY);
        assert_eq!(get(&mut rtc, HOURS), 12, "12-hour binary midnight");
        clock.0.set((13 * 3600 + 2) * NS_PER_SEC);
        assert_eq!(get(&mut rtc, HOURS), HOUR_PM | 1);
        assert_eq!(get(&mut rtc, REG_D), D_VALID_RAM_AND_TIME);
    }

    #[test]
    fn update_in_progress_clears() {
        let (mut rtc, clock, _) = rtc();
        clock.0.set(NS_PER_SEC - 100_000);
        assert_ne!(get(&mut rtc, REG_A) & A_UPDATE_IN_PROGRESS, 0);
        assert_eq!(get(&mut rtc, SECONDS), 0x58, "not yet turned over");
        clock.0.set(NS_PER_SEC);
        assert_eq!(get(&mut rtc, REG_A), A_DEFAULT);
        assert_eq!(get(&mut rtc, SECONDS), 0x59);
    }

    /// Linux's mc146818_set_time: SET, write the fields, clear SET.
    #[test]
    fn guest_sets_the_time() {
        let (mut rtc, clock, _) = rtc();
        set(&mut rtc, REG_B, B_SET | B_24_HOUR);
        for (index, value) in [
            (SECONDS, 0x30),
            (MINUTES, 0x15),
            (HOURS, 0x08),
            (DAY, 0x31),
            (MONTH, 0x12),
            (YEAR, 0x99),
            (CENTURY_REGISTER, 0x19),
        ] {
            set(&mut rtc, index, value);
        }
        clock.0.set(5 * NS_PER_SEC);
        assert_eq!(get(&mut rtc, SECONDS), 0x30, "held while SET");
        set(&mut rtc, REG_B, B_24_HOUR);
        clock.0.set(6 * NS_PER_SEC);
        assert_eq!(
            time_regs(&mut rtc),
            [0x31, 0x15, 0x08, 6, 0x31, 0x12, 0x99, 0x19]
        );
        // An impossible date is refused.
        set(&mut rtc, MONTH, 0x02);
        assert_eq!(get(&mut rtc, MONTH), 0x12);
    }

    #[test]
    fn cmos_ram_and_index() {
        let (mut rtc, _, _) = rtc();
        for index in (0x0e..0x80u8).filter(|&i| i != CENTURY_REGISTER) {
            set(&mut rtc, index | NMI_DISABLE, index ^ 0xa5);
        }
        assert!(rtc.nmi_disabled());
        for index in (0x0e..0x80u8).filter(|&i| i != CENTURY_REGISTER) {
            assert_eq!(get(&mut rtc, index), index ^ 0xa5);
        }
        assert!(!rtc.nmi_disabled());
        let mut b = [0; 2];
        rtc.read(DATA_PORT, &mut b);
        assert_eq!(b, [0xff; 2]);
    }

    #[test]
    fn update_and_alarm_interrupts() {
        let (mut rtc, clock, line) = rtc();
        set(&mut rtc, REG_B, B_24_HOUR | B_UPDATE_INT);
        assert_eq!(rtc.deadline_ns(), Some(NS_PER_SEC));
        clock.0.set(NS_PER_SEC);
        rtc.poll();
        assert!(line.0.get());
        assert_eq!(rtc.deadline_ns(), None, "line already high");
        // The 1024 Hz periodic flag is up too, without its interrupt.
        assert_eq!(get(&mut rtc, REG_C), C_IRQ | C_UPDATE | C_PERIODIC);
        assert!(!line.0.get());

        // Alarm at 00:00:05 (BCD, seconds given, rest don't care).
        set(&mut rtc, REG_B, B_24_HOUR | B_ALARM_INT);
        set(&mut rtc, SECONDS_ALARM, 0x05);
        set(&mut rtc, MINUTES_ALARM, ALARM_DONT_CARE);
        set(&mut rtc, HOURS_ALARM, ALARM_DONT_CARE);
        // Now 23:59:59 at t=1 s; 00:00:05 is 6 s later.
        assert_eq!(rtc.deadline_ns(), Some(7 * NS_PER_SEC));
        clock.0.set(7 * NS_PER_SEC - 1);
        rtc.poll();
        assert!(!line.0.get());
        clock.0.set(7 * NS_PER_SEC);
        rtc.poll();
        assert!(line.0.get());
        assert_eq!(get(&mut rtc, REG_C) & (C_IRQ | C_ALARM), C_IRQ | C_ALARM);
        assert_eq!(rtc.deadline_ns(), Some(67 * NS_PER_SEC), "next minute");
    }

    #[test]
    fn periodic_flag_without_interrupt() {
        let (mut rtc, clock, line) = rtc();
        set(&mut rtc, REG_A, 0x2f); // 2 Hz
        assert_eq!(rtc.deadline_ns(), None, "PIE off");
        clock.0.set(NS_PER_SEC / 2);
        assert_eq!(get(&mut rtc, REG_C), C_PERIODIC);
        assert!(!line.0.get());
        set(&mut rtc, REG_B, B_24_HOUR | B_PERIODIC_INT);
        assert_eq!(rtc.deadline_ns(), Some(NS_PER_SEC));
    }

    #[test]
    fn alarm_search_is_exact() {
        assert_eq!(seconds_to_alarm(0, None, None, None), 1);
        assert_eq!(seconds_to_alarm(86_399, None, None, None), 1);
        assert_eq!(seconds_to_alarm(3600, Some(1), Some(0), Some(0)), 86_400);
        assert_eq!(seconds_to_alarm(3599, Some(1), None, Some(0)), 1);
        assert_eq!(seconds_to_alarm(7200, Some(1), None, None), 86_400 - 3600);
        assert_eq!(seconds_to_alarm(50, None, Some(0), Some(59)), 9);
    }

    #[test]
    fn fuzz_random_accesses() {
        let mut seed = 0x5851_f42d_4c95_7f2du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut rtc, clock, line) = rtc();
        for _ in 0..20_000 {
            let r = next();
            let len = [1, 1, 1, 2, 4][(r % 5) as usize];
            let offset = (r >> 8) % 3;
            let mut buf = [(r >> 16) as u8; 4];
            match (r >> 24) % 8 {
                0 => clock.0.set(clock.0.get().saturating_add(r >> 34)),
                1 => rtc.poll(),
                2 | 3 => rtc.read(offset, &mut buf[..len]),
                _ => rtc.write(offset, &buf[..len]),
            }
            assert_eq!(line.0.get(), rtc.irq_flag());
            if r & (1 << 62) != 0 {
                rtc.poll();
                assert!(rtc.deadline_ns().is_none_or(|d| d > clock.0.get()));
            }
        }
    }
}

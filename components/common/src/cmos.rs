//! The CMOS real-time clock's date and time registers, read as Unix time.
//!
//! The clock counts in BCD or binary (register B bit 2) and in 24- or
//! 12-hour form (bit 1; in 12-hour form bit 7 of the hours means PM). Its
//! year has two digits; the century comes from the register the ACPI FADT
//! names (0x32 on PCs, QEMU and Bochs), and a century outside 19-20 is
//! taken as not kept, the year then being 2000-2099. The clock holds UTC
//! (Linux's and QEMU's default, `-rtc base=utc`; Bochs' `time0=utc`).

/// The `clock` service of the `rtc` driver (its `serve` mode): a call
/// (any words) is answered with [`service::OK`] or [`service::UNREADABLE`]
/// in word 0, the Unix time in word 1 and the TSC when it was read in
/// word 2 (the clock counts whole seconds).
pub mod service {
    pub const NAME: &str = "clock";
    pub const OK: u64 = 0;
    pub const UNREADABLE: u64 = 1;
}

/// Register indexes (port 0x70) of what [`Registers`] holds.
pub mod index {
    pub const SECONDS: u8 = 0x00;
    pub const MINUTES: u8 = 0x02;
    pub const HOURS: u8 = 0x04;
    pub const DAY: u8 = 0x07;
    pub const MONTH: u8 = 0x08;
    pub const YEAR: u8 = 0x09;
    pub const A: u8 = 0x0a;
    pub const B: u8 = 0x0b;
    pub const CENTURY: u8 = 0x32;
}

/// Register A bit 7: an update is under way; the time registers are not
/// to be read until it clears.
pub const UPDATE_IN_PROGRESS: u8 = 1 << 7;
const B_24_HOUR: u8 = 1 << 1;
const B_BINARY: u8 = 1 << 2;
const HOURS_PM: u8 = 1 << 7;

/// The raw time registers and register B, as read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registers {
    pub seconds: u8,
    pub minutes: u8,
    pub hours: u8,
    pub day: u8,
    pub month: u8,
    pub year: u8,
    pub century: u8,
    pub b: u8,
}

impl Registers {
    /// Reads them through `read(index)`.
    pub fn read(mut read: impl FnMut(u8) -> u8) -> Self {
        Self {
            seconds: read(index::SECONDS),
            minutes: read(index::MINUTES),
            hours: read(index::HOURS),
            day: read(index::DAY),
            month: read(index::MONTH),
            year: read(index::YEAR),
            century: read(index::CENTURY),
            b: read(index::B),
        }
    }

    /// Unix seconds, or `None` if a field is out of its range (a clock
    /// that was never set, or read during an update).
    pub fn unix_seconds(&self) -> Option<u64> {
        let binary = self.b & B_BINARY != 0;
        let value = |raw: u8| -> Option<u64> {
            if binary {
                return Some(u64::from(raw));
            }
            let (tens, ones) = (raw >> 4, raw & 0xf);
            (tens < 10 && ones < 10).then(|| u64::from(tens * 10 + ones))
        };
        let hours = if self.b & B_24_HOUR != 0 {
            value(self.hours)?
        } else {
            // 12 AM is 0 h, 12 PM is 12 h.
            let twelve = value(self.hours & !HOURS_PM)?;
            if !(1..=12).contains(&twelve) {
                return None;
            }
            twelve % 12 + if self.hours & HOURS_PM != 0 { 12 } else { 0 }
        };
        let (seconds, minutes) = (value(self.seconds)?, value(self.minutes)?);
        let (day, month, year) = (value(self.day)?, value(self.month)?, value(self.year)?);
        let century = value(self.century)
            .filter(|c| (19..=20).contains(c))
            .unwrap_or(20);
        if seconds > 59 || minutes > 59 || hours > 23 || year > 99 {
            return None;
        }
        let year = century * 100 + year;
        if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
            return None;
        }
        let days = days_since_epoch(year, month, day)?;
        Some(days * 86_400 + hours * 3_600 + minutes * 60 + seconds)
    }
}

fn leap(year: u64) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the date (Gregorian), `None` before 1970.
fn days_since_epoch(year: u64, month: u64, day: u64) -> Option<u64> {
    if year < 1970 {
        return None;
    }
    let whole_years: u64 = (1970..year).map(|y| if leap(y) { 366 } else { 365 }).sum();
    let whole_months: u64 = (1..month).map(|m| days_in_month(year, m)).sum();
    Some(whole_years + whole_months + day - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bcd(value: u8) -> u8 {
        (value / 10) << 4 | (value % 10)
    }

    /// 24-hour BCD, as PCs and QEMU keep it.
    fn regs(year: u16, month: u8, day: u8, h: u8, m: u8, s: u8) -> Registers {
        Registers {
            seconds: bcd(s),
            minutes: bcd(m),
            hours: bcd(h),
            day: bcd(day),
            month: bcd(month),
            year: bcd((year % 100) as u8),
            century: bcd((year / 100) as u8),
            b: B_24_HOUR,
        }
    }

    #[test]
    fn known_dates() {
        // `date -u -d @N`, for each.
        for (r, unix) in [
            (regs(1970, 1, 1, 0, 0, 0), 0),
            (regs(2000, 2, 29, 12, 0, 0), 951_825_600),
            (regs(2025, 11, 24, 16, 0, 0), 1_764_000_000),
            (regs(2038, 1, 19, 3, 14, 8), 2_147_483_648),
            (regs(2099, 12, 31, 23, 59, 59), 4_102_444_799),
        ] {
            assert_eq!(r.unix_seconds(), Some(unix), "{r:?}");
        }
    }

    #[test]
    fn binary_and_twelve_hour_forms() {
        let bcd_form = regs(2025, 11, 24, 16, 0, 0);
        let binary = Registers {
            seconds: 0,
            minutes: 0,
            hours: 16,
            day: 24,
            month: 11,
            year: 25,
            century: 20,
            b: B_24_HOUR | B_BINARY,
        };
        assert_eq!(binary.unix_seconds(), bcd_form.unix_seconds());
        let pm = Registers {
            hours: bcd(4) | HOURS_PM,
            b: 0,
            ..bcd_form
        };
        assert_eq!(pm.unix_seconds(), bcd_form.unix_seconds());
        let midnight = Registers {
            hours: bcd(12),
            b: 0,
            ..regs(2025, 11, 24, 0, 0, 0)
        };
        assert_eq!(midnight.unix_seconds(), Some(1_763_942_400));
        let noon = Registers {
            hours: bcd(12) | HOURS_PM,
            b: 0,
            ..regs(2025, 11, 24, 0, 0, 0)
        };
        assert_eq!(noon.unix_seconds(), Some(1_763_942_400 + 12 * 3600));
    }

    #[test]
    fn no_century_register_means_this_century() {
        let mut r = regs(2025, 11, 24, 16, 0, 0);
        for century in [0, 0xff, bcd(21)] {
            r.century = century;
            assert_eq!(r.unix_seconds(), Some(1_764_000_000));
        }
    }

    #[test]
    fn nonsense_is_none_not_a_panic() {
        assert_eq!(regs(2025, 2, 29, 0, 0, 0).unix_seconds(), None, "not leap");
        assert_eq!(regs(2025, 13, 1, 0, 0, 0).unix_seconds(), None);
        assert_eq!(regs(2025, 1, 0, 0, 0, 0).unix_seconds(), None);
        assert_eq!(regs(2025, 1, 1, 24, 0, 0).unix_seconds(), None);
        assert_eq!(regs(1969, 12, 31, 0, 0, 0).unix_seconds(), None);
        let bad_bcd = Registers {
            seconds: 0x5a,
            ..regs(2025, 1, 1, 0, 0, 0)
        };
        assert_eq!(bad_bcd.unix_seconds(), None);
        for byte in 0..=255u8 {
            let r = Registers {
                seconds: byte,
                minutes: byte,
                hours: byte,
                day: byte,
                month: byte,
                year: byte,
                century: byte,
                b: byte,
            };
            let _ = r.unix_seconds();
        }
        let read = Registers::read(|i| i);
        assert_eq!(read.century, index::CENTURY);
        assert_eq!(read.b, index::B);
    }
}

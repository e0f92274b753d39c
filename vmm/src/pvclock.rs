//! KVM's paravirtual clock as Linux reads it (`arch/x86/include/asm/pvclock-abi.h`
//! is the layout; the arithmetic is the guest's `pvclock_scale_delta`).
//!
//! The guest registers a 32-byte `pvclock_vcpu_time_info` with MSR
//! [`MSR_KVM_SYSTEM_TIME_NEW`] and reads time as
//! `system_time + scale(tsc - tsc_timestamp)`; the VMM fills it once, since
//! the TSC here is constant and never stops ([`FLAG_TSC_STABLE`]).
#![forbid(unsafe_code)]

/// Guest-physical address of a `pvclock_wall_clock` (bit 0 unused).
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// Guest-physical address of the `pvclock_vcpu_time_info`, bit 0 enables.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// The pre-2010 numbers of the same MSRs; Linux uses them without
/// `KVM_FEATURE_CLOCKSOURCE2`.
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
pub const SYSTEM_TIME_ENABLE: u64 = 1;

/// `flags`: the TSC is synchronised and constant, so readings never go
/// backwards and Linux may skip its monotonicity fix-up.
pub const FLAG_TSC_STABLE: u8 = 1 << 0;

pub const TIME_INFO_SIZE: usize = 32;
pub const WALL_CLOCK_SIZE: usize = 12;

const NSEC_PER_SEC: u64 = 1_000_000_000;

/// TSC ticks to nanoseconds: `ns = ((ticks << shift or >> -shift) * mul) >> 32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    pub mul: u32,
    pub shift: i8,
}

impl Scale {
    /// The scale for a TSC of `tsc_hz` (> 0): `mul` in [2^31, 2^32) for the
    /// most precision the format allows.
    pub fn for_frequency(tsc_hz: u64) -> Option<Self> {
        if tsc_hz == 0 {
            return None;
        }
        // mul = 1e9 * 2^32 / (tsc_hz * 2^shift)
        let target = u128::from(NSEC_PER_SEC) << 32;
        let mut shift: i32 = 0;
        loop {
            let divisor = if shift >= 0 {
                u128::from(tsc_hz) << shift
            } else {
                u128::from(tsc_hz) >> -shift
            };
            if divisor == 0 {
                return None;
            }
            let mul = target / divisor;
            if mul >= 1 << 32 {
                shift += 1;
            } else if mul < 1 << 31 && shift > -31 {
                shift -= 1;
            } else {
                return Some(Self {
                    mul: mul as u32,
                    shift: i8::try_from(shift).ok()?,
                });
            }
            if !(-31..=31).contains(&shift) {
                return None;
            }
        }
    }

    /// Nanoseconds for `ticks`, as the guest computes them.
    pub fn ns(&self, ticks: u64) -> u64 {
        let ticks = u128::from(ticks);
        let shifted = if self.shift >= 0 {
            ticks << self.shift
        } else {
            ticks >> -self.shift
        };
        ((shifted * u128::from(self.mul)) >> 32) as u64
    }
}

/// The `pvclock_vcpu_time_info` bytes: at guest TSC `tsc`, guest time is
/// `system_ns`. `version` must be even (odd means "being updated").
pub fn time_info(version: u32, tsc: u64, system_ns: u64, scale: Scale) -> [u8; TIME_INFO_SIZE] {
    let mut info = [0; TIME_INFO_SIZE];
    info[0..4].copy_from_slice(&version.to_le_bytes());
    info[8..16].copy_from_slice(&tsc.to_le_bytes());
    info[16..24].copy_from_slice(&system_ns.to_le_bytes());
    info[24..28].copy_from_slice(&scale.mul.to_le_bytes());
    info[28] = scale.shift as u8;
    info[29] = FLAG_TSC_STABLE;
    info
}

/// The `pvclock_wall_clock` bytes: the wall-clock time at which guest time
/// was 0.
pub fn wall_clock(version: u32, boot_unix_secs: u32) -> [u8; WALL_CLOCK_SIZE] {
    let mut clock = [0; WALL_CLOCK_SIZE];
    clock[0..4].copy_from_slice(&version.to_le_bytes());
    clock[4..8].copy_from_slice(&boot_unix_secs.to_le_bytes());
    clock
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_second_of_ticks_is_one_second() {
        // Real CPUs, QEMU's TSC, and Bochs counting instructions.
        for hz in [
            1_000_000_000,
            2_500_000_000,
            3_123_456_789,
            5_000_000_000,
            100_000_000,
            50_000_000,
            1_193_182,
        ] {
            let scale = Scale::for_frequency(hz).unwrap();
            assert!(scale.mul >= 1 << 31, "{hz}: {scale:?} wastes precision");
            let ns = scale.ns(hz);
            assert!(ns.abs_diff(NSEC_PER_SEC) <= 1, "{hz} Hz: {ns} ns");
            // An hour stays within a microsecond per second of error.
            let hour = scale.ns(hz * 3600);
            assert!(hour.abs_diff(3600 * NSEC_PER_SEC) < 3600 * 1000, "{hz}");
        }
        assert_eq!(Scale::for_frequency(0), None);
    }

    #[test]
    fn layouts_match_the_guest_structs() {
        let scale = Scale {
            mul: 0x8000_0001,
            shift: -2,
        };
        let info = time_info(4, 0x1122_3344_5566_7788, 99, scale);
        assert_eq!(&info[0..4], &4u32.to_le_bytes());
        assert_eq!(&info[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&info[16..24], &99u64.to_le_bytes());
        assert_eq!(&info[24..28], &0x8000_0001u32.to_le_bytes());
        assert_eq!(info[28], 0xfe);
        assert_eq!(info[29], FLAG_TSC_STABLE);
        let clock = wall_clock(2, 1_700_000_000);
        assert_eq!(&clock[4..8], &1_700_000_000u32.to_le_bytes());
        assert_eq!(&clock[8..12], &[0; 4]);
    }
}

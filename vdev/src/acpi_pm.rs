//! Sleep and reset registers of a hardware-reduced ACPI platform.
//!
//! Hardware-reduced ACPI has no PM1 blocks: the FADT's SLEEP_CONTROL_REG,
//! SLEEP_STATUS_REG and RESET_REG point into this 3-byte I/O window (8-bit
//! registers, byte accesses only: wider reads return all ones, wider writes
//! are ignored). The guest powers off by writing `(S5_SLP_TYP << 2) | SLP_EN`
//! to the control register; the VMM learns it from [`AcpiPm::request`].

use crate::BusDevice;

pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
pub const RESET_OFFSET: u64 = 2;
pub const WINDOW_LEN: u64 = 3;
/// The FADT's RESET_VALUE for [`RESET_OFFSET`].
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP of S5 (soft off); the firmware's `_S5` package holds this number.
pub const S5_SLP_TYP: u8 = 5;

const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
const SLP_EN: u8 = 1 << 5;
const WAK_STS: u8 = 1 << 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerRequest {
    PowerOff,
    Reset,
}

#[derive(Debug, Default)]
pub struct AcpiPm {
    wake_status: bool,
    request: Option<PowerRequest>,
}

impl AcpiPm {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the guest asked for, if anything; the first request sticks
    /// (the VMM acts on it before the guest runs again).
    pub fn request(&self) -> Option<PowerRequest> {
        self.request
    }

    fn write_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLP_TYP {
            self.request.get_or_insert(PowerRequest::PowerOff);
        } else {
            // No other sleep state is offered (no `_Sx` package), but a
            // guest trying one anyway polls WAK_STS: wake it at once.
            self.wake_status = true;
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else {
            data.fill(0xff);
            return;
        };
        *byte = match offset {
            SLEEP_STATUS_OFFSET if self.wake_status => WAK_STS,
            SLEEP_CONTROL_OFFSET | SLEEP_STATUS_OFFSET | RESET_OFFSET => 0,
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else { return };
        match offset {
            SLEEP_CONTROL_OFFSET => self.write_control(value),
            // Write-one-to-clear.
            SLEEP_STATUS_OFFSET if value & WAK_STS != 0 => self.wake_status = false,
            RESET_OFFSET if value == RESET_VALUE => {
                self.request.get_or_insert(PowerRequest::Reset);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pm: &mut AcpiPm, offset: u64) -> u8 {
        let mut b = [0];
        pm.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn s5_with_slp_en_requests_power_off() {
        let mut pm = AcpiPm::new();
        // SLP_TYP 5 without SLP_EN only prepares the type.
        pm.write(SLEEP_CONTROL_OFFSET, &[S5_SLP_TYP << SLP_TYP_SHIFT]);
        assert_eq!(pm.request(), None);
        pm.write(SLEEP_CONTROL_OFFSET, &[(S5_SLP_TYP << 2) | SLP_EN]);
        assert_eq!(pm.request(), Some(PowerRequest::PowerOff));
        // A later reset does not override the pending power-off.
        pm.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(pm.request(), Some(PowerRequest::PowerOff));
    }

    #[test]
    fn reset_register_needs_the_reset_value() {
        let mut pm = AcpiPm::new();
        pm.write(RESET_OFFSET, &[0x06]);
        assert_eq!(pm.request(), None);
        pm.write(RESET_OFFSET, &[RESET_VALUE, 0]);
        assert_eq!(pm.request(), None, "word write is ignored");
        pm.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(pm.request(), Some(PowerRequest::Reset));
    }

    #[test]
    fn other_sleep_states_wake_at_once() {
        let mut pm = AcpiPm::new();
        assert_eq!(read(&mut pm, SLEEP_STATUS_OFFSET), 0);
        pm.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]);
        assert_eq!(pm.request(), None);
        assert_eq!(read(&mut pm, SLEEP_STATUS_OFFSET), WAK_STS);
        pm.write(SLEEP_STATUS_OFFSET, &[WAK_STS]);
        assert_eq!(read(&mut pm, SLEEP_STATUS_OFFSET), 0);
    }

    #[test]
    fn odd_widths_and_offsets() {
        let mut pm = AcpiPm::new();
        let mut word = [0; 2];
        pm.read(0, &mut word);
        assert_eq!(word, [0xff; 2]);
        assert_eq!(read(&mut pm, WINDOW_LEN), 0xff);
        pm.write(SLEEP_CONTROL_OFFSET, &[(5 << 2) | SLP_EN, 0]);
        pm.write(u64::MAX, &[0xff]);
        pm.write(0, &[]);
        assert_eq!(pm.request(), None);
    }

    #[test]
    fn fuzz_random_accesses() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut pm = AcpiPm::new();
            for _ in 0..50 {
                let r = next();
                let offset = (r >> 8) % 5;
                let mut buf = [0u8; 8];
                let len = [1, 1, 1, 2, 4, 8][(r % 6) as usize];
                buf[0] = (r >> 16) as u8;
                if r & 0x100 == 0 {
                    pm.read(offset, &mut buf[..len]);
                } else {
                    let had = pm.request();
                    pm.write(offset, &buf[..len]);
                    let wrote_off = len == 1
                        && offset == SLEEP_CONTROL_OFFSET
                        && buf[0] & SLP_EN != 0
                        && (buf[0] >> 2) & 7 == S5_SLP_TYP;
                    let wrote_reset = len == 1 && offset == RESET_OFFSET && buf[0] == RESET_VALUE;
                    match had {
                        Some(h) => assert_eq!(pm.request(), Some(h)),
                        None if wrote_off => assert_eq!(pm.request(), Some(PowerRequest::PowerOff)),
                        None if wrote_reset => assert_eq!(pm.request(), Some(PowerRequest::Reset)),
                        None => assert_eq!(pm.request(), None),
                    }
                }
            }
        }
    }
}

//! The 8254 PIT, used only as a known clock to calibrate the LAPIC timer and
//! the TSC: channel 2 counts down once with its gate driven through port 0x61
//! and its output read back there, so no interrupt is needed.

use super::cpu::{inb, outb};

pub const FREQUENCY_HZ: u64 = 1_193_182;
const CHANNEL2_DATA: u16 = 0x42;
const COMMAND: u16 = 0x43;
const SPEAKER_PORT: u16 = 0x61;
const GATE2: u8 = 1 << 0;
const SPEAKER: u8 = 1 << 1;
const OUT2: u8 = 1 << 5;
/// Channel 2, low then high byte, mode 0 (interrupt on terminal count), binary.
const CHANNEL2_ONESHOT: u8 = 0b1011_0000;

/// Runs `start` when a `ticks`-long countdown starts and `end` when it ends.
pub fn measure<S, E>(ticks: u16, start: S, end: E)
where
    S: FnOnce(),
    E: FnOnce(),
{
    let control = inb(SPEAKER_PORT) & !(SPEAKER | GATE2);
    outb(SPEAKER_PORT, control);
    outb(COMMAND, CHANNEL2_ONESHOT);
    let [low, high] = ticks.to_le_bytes();
    outb(CHANNEL2_DATA, low);
    outb(CHANNEL2_DATA, high);
    start();
    outb(SPEAKER_PORT, control | GATE2);
    while inb(SPEAKER_PORT) & OUT2 == 0 {
        core::hint::spin_loop();
    }
    end();
    outb(SPEAKER_PORT, control);
}

/// Masks every line of both legacy PICs: the kernel uses the (IO)APICs.
pub fn mask_legacy_pic() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

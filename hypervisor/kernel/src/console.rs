//! The kernel console (COM1) and the `log` backend: every line carries its
//! level and the CPU number.
//!
//! Once the timers run, output is queued and fed to the UART as its FIFO
//! empties, from the timer interrupt: a 115200-baud line takes ~87 µs a
//! byte, and waiting for it inside the kernel (which is not preemptible)
//! would hold off every component, real-time ones included, for ~7 ms per
//! line of a guest's boot log. Output is never dropped: a writer that
//! finds the queue full waits for the UART, as before. `drain` (power-off)
//! and the crash paths empty the queue first.

use crate::arch::x86_64::serial::{Serial, BYTES_PER_SECOND, FIFO_DEPTH};
use crate::arch::x86_64::{cpu, lapic, percpu};
use core::fmt::Write;
use moat_kernel::ring::ByteRing;
use spin::Mutex;

/// Bytes of queued output: about 5.7 s of the line, more than a guest's
/// boot log writes between two points where the kernel can feed the UART.
const QUEUE_BYTES: usize = 64 * 1024;

static CONSOLE: Mutex<Console> = Mutex::new(Console::new());
static LOGGER: Logger = Logger;

struct Console {
    serial: Serial,
    queue: ByteRing<QUEUE_BYTES>,
    /// TSC cycles the line takes for one byte; 0 while output is written
    /// straight through (before the timers are calibrated).
    byte_cycles: u64,
    /// TSC value at which the FIFO should have room again; u64::MAX when
    /// nothing is queued.
    next_feed: u64,
}

impl Console {
    const fn new() -> Self {
        Self {
            serial: Serial::com1(),
            queue: ByteRing::new(),
            byte_cycles: 0,
            next_feed: u64::MAX,
        }
    }

    /// Text: every `\n` becomes `\r\n`, as a terminal wants it.
    fn write_bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if byte == b'\n' {
                self.push(b'\r');
            }
            self.push(byte);
        }
        self.feed();
    }

    /// Bytes as they are: whoever wrote them ends lines as they mean to.
    fn write_unchanged(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.push(byte);
        }
        self.feed();
    }

    fn push(&mut self, byte: u8) {
        if self.byte_cycles == 0 {
            self.flush();
            self.serial.write_byte(byte);
            return;
        }
        while !self.queue.push(byte) {
            self.serial.wait_ready();
            self.feed();
        }
    }

    /// Moves queued bytes into the FIFO if it is empty, and notes when to
    /// look again.
    fn feed(&mut self) {
        if self.queue.is_empty() {
            self.next_feed = u64::MAX;
            return;
        }
        let now = cpu::rdtsc();
        if !self.serial.ready() {
            // Filled by someone else (or the line is slow): check again
            // once a byte has had time to go.
            self.next_feed = now + self.byte_cycles;
            return;
        }
        // On an unpaced UART (QEMU's) the FIFO is empty again at once, so
        // this empties the queue; a paced one takes FIFO_DEPTH bytes.
        while !self.queue.is_empty() && self.serial.ready() {
            for _ in 0..FIFO_DEPTH {
                match self.queue.pop() {
                    Some(byte) => self.serial.put(byte),
                    None => break,
                }
            }
        }
        self.next_feed = if self.queue.is_empty() {
            u64::MAX
        } else {
            now + FIFO_DEPTH as u64 * self.byte_cycles
        };
    }

    /// Writes everything queued, waiting for the UART.
    fn flush(&mut self) {
        while let Some(byte) = self.queue.pop() {
            self.serial.write_byte(byte);
        }
        self.next_feed = u64::MAX;
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut console = CONSOLE.lock();
        let _ = writeln!(
            console,
            "[{:<5} cpu{}] {}",
            record.level(),
            percpu::current_id(),
            record.args()
        );
        let next = console.next_feed;
        drop(console);
        wake_at(next);
    }

    fn flush(&self) {
        drain();
    }
}

pub fn init() {
    CONSOLE.lock().serial.init();
    // Only fails if a logger is already set, which would be ours.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// Starts queueing output, now that the timer can wake the kernel to feed
/// the UART; `tsc_hz` gives the line's speed in TSC cycles.
pub fn start_queueing(tsc_hz: u64) {
    CONSOLE.lock().byte_cycles = (tsc_hz / BYTES_PER_SECOND).max(1);
}

/// Writes text from user tasks (already sanitised), `\n` as `\r\n`.
pub fn write_text(bytes: &[u8]) {
    let mut console = CONSOLE.lock();
    console.write_bytes(bytes);
    let next = console.next_feed;
    drop(console);
    wake_at(next);
}

/// Writes bytes exactly as they are (a guest's console, `flags::RAW`).
pub fn write_raw(bytes: &[u8]) {
    let mut console = CONSOLE.lock();
    console.write_unchanged(bytes);
    let next = console.next_feed;
    drop(console);
    wake_at(next);
}

/// Feeds the UART (from the timer interrupt); returns the TSC value at
/// which it wants to be called again, u64::MAX if nothing is queued.
pub fn feed() -> u64 {
    let mut console = CONSOLE.lock();
    console.feed();
    console.next_feed
}

fn wake_at(deadline: u64) {
    if deadline != u64::MAX {
        lapic::arm_if_earlier(deadline);
    }
}

/// Writes out everything queued and waits until it has left the UART
/// (emulators drop what is still queued when they power off).
pub fn drain() {
    let mut console = CONSOLE.lock();
    console.flush();
    console.serial.drain();
}

/// Waited for the console lock before writing past it (NMI): long enough
/// for another CPU to finish a line, short enough not to matter when the
/// lock holder is the interrupted code on this CPU.
const BOUNDED_WAIT_SPINS: u32 = 1_000_000;

/// Writes at once, from any context (the NMI handler, the state dump):
/// waits a bounded time for the console lock, so that lines of CPUs
/// writing together stay whole, then writes past it.
pub fn write_bounded(args: core::fmt::Arguments) {
    for _ in 0..BOUNDED_WAIT_SPINS {
        if let Some(mut console) = CONSOLE.try_lock() {
            console.flush();
            let _ = console.serial.write_fmt(args);
            return;
        }
        core::hint::spin_loop();
    }
    let _ = Serial::com1().write_fmt(args);
}

/// For the last words of a crashing kernel: writes even if the console lock
/// is held by the code that crashed.
pub fn write_emergency(args: core::fmt::Arguments) {
    match CONSOLE.try_lock() {
        Some(mut console) => {
            console.flush();
            let _ = console.serial.write_fmt(args);
        }
        None => {
            let _ = Serial::com1().write_fmt(args);
        }
    }
}

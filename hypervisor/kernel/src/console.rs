//! The kernel console (COM1) and the `log` backend: every line carries its
//! level and the CPU number.

use crate::arch::x86_64::{cpu, serial::Serial};
use core::fmt::Write;
use spin::Mutex;

static CONSOLE: Mutex<Serial> = Mutex::new(Serial::com1());
static LOGGER: Logger = Logger;

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
            cpu::current_id(),
            record.args()
        );
    }

    fn flush(&self) {
        CONSOLE.lock().drain();
    }
}

pub fn init() {
    CONSOLE.lock().init();
    // Only fails if a logger is already set, which would be ours.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// Writes bytes as they are (output of user tasks).
pub fn write_raw(bytes: &[u8]) {
    CONSOLE.lock().write_bytes(bytes);
}

pub fn drain() {
    CONSOLE.lock().drain();
}

/// For the last words of a crashing kernel: writes even if the console lock
/// is held by the code that crashed.
pub fn write_emergency(args: core::fmt::Arguments) {
    match CONSOLE.try_lock() {
        Some(mut console) => {
            let _ = console.write_fmt(args);
        }
        None => {
            let _ = Serial::com1().write_fmt(args);
        }
    }
}

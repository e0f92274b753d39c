//! Console output through the kernel's `console_write` call.

use core::fmt;

use moat_abi::{Status, CONSOLE_WRITE_MAX};

use crate::sys;

/// Writes `bytes` to the kernel console, in pieces the kernel accepts.
pub fn write(bytes: &[u8]) -> Result<(), Status> {
    for chunk in bytes.chunks(CONSOLE_WRITE_MAX) {
        sys::console_write(chunk)?;
    }
    Ok(())
}

/// Writes `bytes` to the console unchanged (see [`sys::console_write_raw`]).
pub fn write_raw(bytes: &[u8]) -> Result<(), Status> {
    for chunk in bytes.chunks(CONSOLE_WRITE_MAX) {
        sys::console_write_raw(chunk)?;
    }
    Ok(())
}

pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write(s.as_bytes()).map_err(|_| fmt::Error)
    }
}

/// Formats into a line buffer first so one `print!` of up to a line is one
/// kernel call (lines of concurrent ECs do not interleave).
pub fn print(args: fmt::Arguments) {
    let mut line = LineBuffer::new();
    if fmt::write(&mut line, args).is_err() {
        // The buffer filled up: print what is there, then the rest directly.
        let _ = write(line.as_bytes());
        let _ = fmt::write(&mut Console, args);
        return;
    }
    let _ = write(line.as_bytes());
}

struct LineBuffer {
    bytes: [u8; 256],
    len: usize,
}

impl LineBuffer {
    const fn new() -> Self {
        Self {
            bytes: [0; 256],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Write for LineBuffer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        let slot = self.bytes.get_mut(self.len..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

//! The kernel ABI, shared by the kernel and the user runtime.
//!
//! A call is a `syscall` instruction with the call number in `rax` and up to
//! six arguments in `rdi`, `rsi`, `rdx`, `r10`, `r8`, `r9`. The kernel returns
//! a [`Status`] in `rax`; `rcx` and `r11` are clobbered by the instruction
//! itself, every other register is preserved. See README.md for each call.
#![no_std]
#![forbid(unsafe_code)]

use core::fmt;

/// Largest number of bytes one `console_write` call takes.
pub const CONSOLE_WRITE_MAX: usize = 4096;

/// Call numbers (`rax` on entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Call {
    /// Write bytes to the kernel console.
    ConsoleWrite = 0,
    /// End the calling task.
    Exit = 1,
}

impl Call {
    pub const ALL: [Call; 2] = [Call::ConsoleWrite, Call::Exit];

    pub const fn number(self) -> usize {
        self as usize
    }
}

impl TryFrom<usize> for Call {
    type Error = Status;

    fn try_from(number: usize) -> Result<Self, Status> {
        Call::ALL
            .into_iter()
            .find(|call| call.number() == number)
            .ok_or(Status::BadCall)
    }
}

/// The one status enum of the ABI (`rax` on return).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Status {
    Success = 0,
    /// The call number is not a call.
    BadCall = 1,
    /// A pointer argument names memory the caller cannot access.
    BadAddress = 2,
    /// An argument is out of its range.
    BadParameter = 3,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Success,
        Status::BadCall,
        Status::BadAddress,
        Status::BadParameter,
    ];

    pub const fn code(self) -> usize {
        self as usize
    }

    /// Decodes `rax` after a call; an unknown code is reported as-is.
    pub fn from_code(code: usize) -> Result<Status, usize> {
        Status::ALL
            .into_iter()
            .find(|status| status.code() == code)
            .ok_or(code)
    }

    pub fn into_result(self) -> Result<(), Status> {
        match self {
            Status::Success => Ok(()),
            error => Err(error),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Success => "success",
            Status::BadCall => "no such call",
            Status::BadAddress => "bad address",
            Status::BadParameter => "bad parameter",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_numbers_round_trip() {
        for call in Call::ALL {
            assert_eq!(Call::try_from(call.number()), Ok(call));
        }
        assert_eq!(Call::try_from(Call::ALL.len()), Err(Status::BadCall));
        assert_eq!(Call::try_from(usize::MAX), Err(Status::BadCall));
    }

    #[test]
    fn status_codes_round_trip() {
        for status in Status::ALL {
            assert_eq!(Status::from_code(status.code()), Ok(status));
        }
        assert_eq!(Status::from_code(9999), Err(9999));
    }

    #[test]
    fn only_success_is_ok() {
        assert_eq!(Status::Success.into_result(), Ok(()));
        for status in &Status::ALL[1..] {
            assert_eq!(status.into_result(), Err(*status));
        }
    }
}

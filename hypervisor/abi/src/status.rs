//! The one status enum of the ABI (`rax` on return).

use core::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Status {
    Success = 0,
    /// No call has this number.
    BadCall = 1,
    /// A pointer names memory the caller cannot access.
    BadAddress = 2,
    /// An argument is out of its range.
    BadParameter = 3,
    /// The selector names no capability, or one of the wrong kind.
    BadCapability = 4,
    /// The capability lacks a right the call needs.
    InsufficientRights = 5,
    /// The destination selector, page or port is in use.
    Occupied = 6,
    /// The PD's kernel-memory quota (or its capability limit) is used up.
    QuotaExceeded = 7,
    /// `NONBLOCK` was given and the call would have waited.
    WouldBlock = 8,
    /// The deadline passed.
    Timeout = 9,
    /// `reply`: the caller is gone; the reply was dropped.
    Aborted = 10,
    /// `call`: the server died (or its PD was destroyed) before replying.
    Dead = 11,
    /// The CPU named is not one that schedules, or the object is bound to
    /// another CPU than the caller's.
    BadCpu = 12,
}

impl Status {
    pub const ALL: [Status; 13] = [
        Status::Success,
        Status::BadCall,
        Status::BadAddress,
        Status::BadParameter,
        Status::BadCapability,
        Status::InsufficientRights,
        Status::Occupied,
        Status::QuotaExceeded,
        Status::WouldBlock,
        Status::Timeout,
        Status::Aborted,
        Status::Dead,
        Status::BadCpu,
    ];

    pub const fn code(self) -> u64 {
        self as u64
    }

    /// Decodes `rax` after a call; an unknown code is returned as-is.
    pub fn from_code(code: u64) -> Result<Status, u64> {
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
            Status::BadCapability => "bad capability",
            Status::InsufficientRights => "insufficient rights",
            Status::Occupied => "destination occupied",
            Status::QuotaExceeded => "quota exceeded",
            Status::WouldBlock => "would block",
            Status::Timeout => "timed out",
            Status::Aborted => "aborted: the caller is gone",
            Status::Dead => "the partner died",
            Status::BadCpu => "bad cpu",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
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

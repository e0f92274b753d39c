//! System calls: decode the call, check its arguments, act.

use crate::arch::x86_64::entry::TrapFrame;
use crate::{console, task};
use moat_abi::{Call, Status, CONSOLE_WRITE_MAX};

pub fn dispatch(frame: &mut TrapFrame) {
    let status = match Call::try_from(frame.rax as usize) {
        Ok(Call::ConsoleWrite) => console_write(frame.rdi, frame.rsi),
        Ok(Call::Exit) => task::exit_current(frame.rdi as i64),
        Err(status) => status,
    };
    frame.rax = status.code() as u64;
}

fn console_write(address: u64, len: u64) -> Status {
    let Ok(len) = usize::try_from(len) else {
        return Status::BadParameter;
    };
    if len > CONSOLE_WRITE_MAX {
        return Status::BadParameter;
    }
    let mut buffer = [0u8; CONSOLE_WRITE_MAX];
    let buffer = &mut buffer[..len];
    if !task::copy_from_user(address, buffer) {
        return Status::BadAddress;
    }
    console::write_raw(buffer);
    Status::Success
}

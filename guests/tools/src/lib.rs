//! The logic of the guest tools in `src/bin/`, kept apart from their system
//! calls and instructions so that it runs in host tests: command lines, the
//! AT conversation, the IPC benchmark's payloads and statistics, the
//! stress load's patterns and self-checks.
#![forbid(unsafe_code)]

pub mod args;
pub mod at;
pub mod ipc;
pub mod stats;
pub mod stress;

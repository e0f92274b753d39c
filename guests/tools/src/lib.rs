//! The logic of the guest tools in `src/bin/`, kept apart from their system
//! calls and instructions so that it runs in host tests: command lines, the
//! AT conversation, the IPC benchmark's payloads and statistics, the
//! stress load's patterns and self-checks, the hostile tool's view of
//! the bare-metal hostile guest's plan, the I/O benchmark's offsets,
//! stamps and lines.
// `deny`, not `forbid`: one module, `hypercall`, allows unsafe code for
// the instruction the tools share.
#![deny(unsafe_code)]

pub mod args;
pub mod at;
pub mod hostile;
#[allow(unsafe_code)]
pub mod hypercall;
pub mod iobench;
pub mod ipc;
pub mod pingpong;
pub mod portbench;
pub mod probe;
pub mod stats;
pub mod stress;

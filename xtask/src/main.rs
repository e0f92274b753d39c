//! `cargo xtask`: host setup, build, boot images, run and test Moat.
//!
//! Every path below is relative to the workspace root, which becomes the
//! current directory at start-up; child processes inherit it, so the paths
//! written into `qemu.args`, `grub.cfg` and `bochsrc` files work as printed.

#![forbid(unsafe_code)]

mod bench;
mod build;
mod cli;
mod config;
mod debian;
mod demo;
mod emu;
mod fuzz;
mod harness;
mod image;
mod iobench;
mod kvm;
mod linux;
mod manifests;
mod mbcheck;
mod net;
mod run;
mod setup;
mod soak;
mod systest;
mod util;

use std::fmt;
use std::io;
use std::process::{ExitCode, ExitStatus};

use cli::Cmd;

/// Everything that can stop an xtask command.
#[derive(Debug)]
pub enum Error {
    /// The command line could not be understood.
    Usage(String),
    /// A file system or process operation failed.
    Io { context: String, source: io::Error },
    /// A child process ran and failed.
    Command { command: String, status: ExitStatus },
    /// Anything else, already phrased for the user.
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(msg) => write!(f, "{msg}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Command { command, status } => write!(f, "`{command}` failed ({status})"),
            Error::Other(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for Error {}

/// Attaches a description of what was being done to an `io::Error`.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match cli::parse(&args) {
        Ok(Cmd::Run(mut opts)) => {
            if let Ok(cwd) = std::env::current_dir() {
                opts.absolutize(&cwd);
            }
            Cmd::Run(opts)
        }
        Ok(cmd) => cmd,
        Err(e) => {
            eprintln!("xtask: {e}");
            return ExitCode::from(2);
        }
    };
    if let Cmd::Help(text) = &cmd {
        println!("{}", text.trim_end());
        return ExitCode::SUCCESS;
    }
    let root = util::workspace_root();
    if let Err(e) = std::env::set_current_dir(root) {
        eprintln!("xtask: cannot enter {}: {e}", root.display());
        return ExitCode::FAILURE;
    }
    match dispatch(cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Help(_) => unreachable!("handled before entering the workspace"),
        Cmd::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Cmd::Build => {
            let artifacts = build::build_all()?;
            let image = image::assemble(&artifacts)?;
            println!("build: image ready in {}", image.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(opts) => run::run(&opts),
        Cmd::Test(opts) => harness::run(&opts),
        Cmd::Bench(opts) => bench::run(&opts),
        Cmd::Demo(opts) => demo::run(&opts),
        Cmd::Fuzz(opts) => fuzz::run(&opts),
        Cmd::Soak(opts) => soak::run(&opts),
        Cmd::Linux(cli::LinuxOpts::Build) => linux::build_command(),
        Cmd::Debian(cli::DebianOpts::Build) => debian::build_command(),
        Cmd::Debian(cli::DebianOpts::Direct { memory_mib }) => debian::direct(memory_mib),
        Cmd::Debian(cli::DebianOpts::Time {
            kernel_args,
            icount,
        }) => debian::time(&kernel_args, icount),
        Cmd::Linux(cli::LinuxOpts::Direct {
            emu,
            virtio,
            kernel_args,
        }) => linux::direct(emu, virtio, &kernel_args),
    }
}

//! Cross builds of the kernel and the user tasks for `x86_64-unknown-none`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, describe};
use crate::{Context, Error, Result};

pub const TARGET: &str = "x86_64-unknown-none";

const KERNEL_PACKAGE: &str = "moat-kernel";
const KERNEL_BINARY: &str = "moat-kernel";
const KERNEL_TARGET_DIR: &str = "target/kernel";
/// The kernel runs in the top 2 GiB and is linked at fixed addresses.
const KERNEL_RUSTFLAGS: &[&str] = &["-Ccode-model=kernel", "-Crelocation-model=static"];

const USER_TARGET_DIR: &str = "target/user";
/// User tasks are loaded at their link addresses.
const USER_RUSTFLAGS: &[&str] = &["-Crelocation-model=static"];

/// A user task: the package that builds it and the binary it produces, which
/// is also its boot-module name.
pub struct UserTask {
    pub package: &'static str,
    pub binary: &'static str,
}

const fn task(package: &'static str, binary: &'static str) -> UserTask {
    UserTask { package, binary }
}

/// Every user task that goes into a boot image: the root task, then the
/// native components (`components/`), each package `moat-NAME` building
/// the binary `NAME`.
pub const USER_TASKS: &[UserTask] = &[
    task("moat-roottask", "roottask"),
    task("moat-echo", "echo"),
    task("moat-ping", "ping"),
    task("moat-ticker", "ticker"),
    task("moat-faulty", "faulty"),
    task("moat-fuzzer", "fuzzer"),
    task("moat-notifier", "notifier"),
    task("moat-waiter", "waiter"),
    task("moat-lender", "lender"),
    task("moat-borrower", "borrower"),
    task("moat-quota", "quota"),
    task("moat-rtc", "rtc"),
    task("moat-spinner", "spinner"),
    task("moat-testvmm", "testvmm"),
    task("moat-vmm", "vmm"),
    task("moat-modem", "modem"),
    task("moat-modemclient", "modemclient"),
    task("moat-blk", "blk"),
    task("moat-blktest", "blktest"),
    task("moat-net", "net"),
    task("moat-netpeer", "netpeer"),
    // Not a task: the Multiboot test kernel a VMM boots (guests/mbtest).
    task("moat-mbtest", "mbtest"),
];

/// Bare-metal guests built beside the user tasks, for a VMM to load (boot
/// modules, not components): `guests/hostile` links itself as a bzImage.
pub const GUEST_IMAGES: &[UserTask] = &[task("moat-hostile", "hostile")];

/// What a build leaves behind.
pub struct Artifacts {
    pub kernel: PathBuf,
    /// `(binary name, path)` for each entry of [`USER_TASKS`] and
    /// [`GUEST_IMAGES`].
    pub tasks: Vec<(&'static str, PathBuf)>,
}

impl Artifacts {
    pub fn task(&self, binary: &str) -> Option<&Path> {
        self.tasks
            .iter()
            .find(|(name, _)| *name == binary)
            .map(|(_, path)| path.as_path())
    }
}

/// `cargo` as the one running us (`$CARGO`), else from `PATH`.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
}

/// `cargo` for host builds: no flags inherited from the caller's environment.
pub fn host_cargo() -> Command {
    let mut cmd = cargo();
    cmd.env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

/// `CARGO_ENCODED_RUSTFLAGS` joins flags with the unit separator.
fn encoded_rustflags(flags: &[&str]) -> String {
    flags.join("\x1f")
}

fn cross_cargo(target_dir: &str, rustflags: &[&str]) -> Command {
    let mut cmd = cargo();
    cmd.env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", encoded_rustflags(rustflags))
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(target_dir);
    cmd
}

fn artifact(target_dir: &str, binary: &str) -> PathBuf {
    Path::new(target_dir)
        .join(TARGET)
        .join("release")
        .join(binary)
}

pub fn build_all() -> Result<Artifacts> {
    let kernel = build_kernel()?;
    let tasks = build_user_tasks()?;
    Ok(Artifacts { kernel, tasks })
}

fn build_kernel() -> Result<PathBuf> {
    let mut cmd = cross_cargo(KERNEL_TARGET_DIR, KERNEL_RUSTFLAGS);
    cmd.args(["-p", KERNEL_PACKAGE, "--bin", KERNEL_BINARY]);
    run_build("kernel", &mut cmd)?;
    let kernel = existing(artifact(KERNEL_TARGET_DIR, KERNEL_BINARY))?;
    let bytes = std::fs::read(&kernel).context(|| format!("reading {}", kernel.display()))?;
    crate::mbcheck::check(&bytes)
        .map_err(|e| Error::Other(format!("{}: Multiboot layout: {e}", kernel.display())))?;
    Ok(kernel)
}

fn build_user_tasks() -> Result<Vec<(&'static str, PathBuf)>> {
    let mut cmd = cross_cargo(USER_TARGET_DIR, USER_RUSTFLAGS);
    for task in USER_TASKS {
        cmd.args(["-p", task.package]);
    }
    run_build("user tasks", &mut cmd)?;
    // Apart: built with the tasks, cargo would unify features and link
    // the user runtime (its panic handler) into the guests.
    let mut guests = cross_cargo(USER_TARGET_DIR, USER_RUSTFLAGS);
    for guest in GUEST_IMAGES {
        guests.args(["-p", guest.package]);
    }
    run_build("bare-metal guests", &mut guests)?;
    USER_TASKS
        .iter()
        .chain(GUEST_IMAGES)
        .map(|t| Ok((t.binary, existing(artifact(USER_TARGET_DIR, t.binary))?)))
        .collect()
}

pub(crate) fn run_build(what: &str, cmd: &mut Command) -> Result<()> {
    println!("build: {what}: {}", describe(cmd));
    util::run(cmd).map_err(|e| match e {
        Error::Command { command, status } => {
            Error::Other(format!("{what} build failed ({status}): {command}"))
        }
        other => other,
    })
}

fn existing(path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Other(format!(
            "build succeeded but {} is missing",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustflags_are_unit_separated() {
        assert_eq!(
            encoded_rustflags(KERNEL_RUSTFLAGS),
            "-Ccode-model=kernel\u{1f}-Crelocation-model=static"
        );
    }

    #[test]
    fn user_tasks_are_distinct_and_named_after_their_packages() {
        for (i, t) in USER_TASKS.iter().enumerate() {
            assert!(USER_TASKS[..i].iter().all(|u| u.binary != t.binary));
            assert!(t.package.ends_with(t.binary), "{}", t.package);
        }
        assert_eq!(USER_TASKS[0].binary, "roottask");
    }

    #[test]
    fn artifact_paths() {
        assert_eq!(
            artifact(KERNEL_TARGET_DIR, KERNEL_BINARY),
            Path::new("target/kernel/x86_64-unknown-none/release/moat-kernel")
        );
        assert_eq!(
            artifact(USER_TARGET_DIR, "roottask"),
            Path::new("target/user/x86_64-unknown-none/release/roottask")
        );
    }

    #[test]
    fn kernel_build_command() {
        let cmd = cross_cargo(KERNEL_TARGET_DIR, KERNEL_RUSTFLAGS);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "build",
                "--release",
                "--target",
                TARGET,
                "--target-dir",
                KERNEL_TARGET_DIR
            ]
        );
        let flags = cmd
            .get_envs()
            .find(|(k, _)| *k == "CARGO_ENCODED_RUSTFLAGS")
            .and_then(|(_, v)| v);
        assert_eq!(
            flags.and_then(|v| v.to_str()),
            Some("-Ccode-model=kernel\u{1f}-Crelocation-model=static")
        );
    }
}

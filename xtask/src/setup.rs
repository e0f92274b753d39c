//! `cargo xtask setup`: install the host tools that are missing, once.

use std::io;
use std::process::Command;

use crate::fuzz::CARGO_FUZZ;
use crate::util::{self, describe};
use crate::{Error, Result};

/// Debian packages: both emulators, their firmware, and what `grub-mkrescue`
/// needs to build a bootable ISO.
pub const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "bochs",
    "bochsbios",
    "vgabios",
    "grub-pc-bin",
    "grub-common",
    "xorriso",
    "mtools",
    // `cargo xtask debian build`: the Debian root file system image.
    "mmdebstrap",
    "e2fsprogs",
];

/// Cross targets: the kernel and user tasks, and static host-side tools.
pub const RUST_TARGETS: &[&str] = &["x86_64-unknown-none", "x86_64-unknown-linux-musl"];

/// `cargo xtask fuzz` runs cargo-fuzz (on stable, see `fuzz.rs`).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

const INSTALLED: &str = "install ok installed";

pub fn run() -> Result<()> {
    let mut changed = false;

    let missing = missing_packages()?;
    if !missing.is_empty() {
        install_packages(&missing)?;
        let still = missing_packages()?;
        if !still.is_empty() {
            return Err(Error::Other(format!(
                "setup: still missing after apt-get install: {}",
                still.join(" ")
            )));
        }
        changed = true;
    }

    match missing_targets()? {
        None => println!(
            "setup: rustup not found; make sure the targets {} are installed",
            RUST_TARGETS.join(" ")
        ),
        Some(targets) if !targets.is_empty() => {
            println!("setup: adding rust targets {}", targets.join(" "));
            util::run(
                Command::new("rustup")
                    .args(["target", "add"])
                    .args(&targets),
            )?;
            changed = true;
        }
        Some(_) => {}
    }

    if util::which("cargo-fuzz").is_none() {
        let mut install = crate::build::host_cargo();
        install.args([
            "install",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
            CARGO_FUZZ,
        ]);
        println!("setup: {}", describe(&install));
        util::run(&mut install)?;
        changed = true;
    }

    if !changed {
        println!(
            "setup: all host tools present ({} packages, {} rust targets, {CARGO_FUZZ})",
            APT_PACKAGES.len(),
            RUST_TARGETS.len()
        );
    }
    Ok(())
}

fn missing_packages() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for &pkg in APT_PACKAGES {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output();
        match out {
            Ok(out) => {
                if !is_installed(&String::from_utf8_lossy(&out.stdout)) {
                    missing.push(pkg);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Other(format!(
                    "setup: dpkg-query not found; this setup knows Debian/Ubuntu only. \
                     Install the equivalents of: {}",
                    APT_PACKAGES.join(" ")
                )));
            }
            Err(e) => {
                return Err(Error::Io {
                    context: "cannot run dpkg-query".into(),
                    source: e,
                })
            }
        }
    }
    Ok(missing)
}

fn is_installed(status: &str) -> bool {
    status.trim() == INSTALLED
}

fn install_packages(missing: &[&str]) -> Result<()> {
    // `sudo` may drop the environment, so pass DEBIAN_FRONTEND through `env`.
    let prefix: &[&str] = if is_root() {
        &["env", "DEBIAN_FRONTEND=noninteractive"]
    } else if util::which("sudo").is_some() {
        &["sudo", "env", "DEBIAN_FRONTEND=noninteractive"]
    } else {
        return Err(Error::Other(format!(
            "setup: missing packages: {}; not root and no sudo, so install them yourself \
             (apt-get install {})",
            missing.join(" "),
            missing.join(" ")
        )));
    };
    println!("setup: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new(prefix[0]);
        cmd.args(&prefix[1..]).arg("apt-get").args(args);
        cmd
    };
    util::run(&mut apt(&["update"]))?;
    let mut install = apt(&["install", "-y"]);
    install.args(missing);
    println!("setup: {}", describe(&install));
    util::run(&mut install)
}

/// The effective user id from /proc; not root if it cannot be read.
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_uid(&s))
        == Some(0)
}

fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `None` when rustup is not available.
fn missing_targets() -> Result<Option<Vec<&'static str>>> {
    let out = match Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
    {
        Ok(out) if out.status.success() => out,
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Io {
                context: "cannot run rustup".into(),
                source: e,
            })
        }
    };
    let installed = String::from_utf8_lossy(&out.stdout);
    Ok(Some(absent_targets(&installed)))
}

fn absent_targets(installed: &str) -> Vec<&'static str> {
    let have: Vec<&str> = installed.lines().map(str::trim).collect();
    RUST_TARGETS
        .iter()
        .copied()
        .filter(|t| !have.contains(t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status() {
        assert!(is_installed("install ok installed"));
        assert!(!is_installed("deinstall ok config-files"));
        assert!(!is_installed(""));
    }

    #[test]
    fn uid_from_proc_status() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\t1\t1\t1\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn targets_to_add() {
        assert_eq!(
            absent_targets("x86_64-unknown-linux-gnu\nx86_64-unknown-none\n"),
            ["x86_64-unknown-linux-musl"]
        );
        assert!(absent_targets("x86_64-unknown-none\nx86_64-unknown-linux-musl\n").is_empty());
    }
}

//! Small helpers for running commands and formatting their results.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::{Context, Error, Result};

/// Quotes one word for a POSIX shell, only when it needs it.
pub fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The command as a user could paste it into a shell.
pub fn describe(cmd: &Command) -> String {
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .map(|w| shell_quote(&w));
    words.collect::<Vec<_>>().join(" ")
}

/// Runs a command with inherited stdio and fails unless it exits with 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .context(|| format!("cannot start `{}`", describe(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: describe(cmd),
            status,
        })
    }
}

/// Runs a command, capturing stdout and stderr, whatever its exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Finds a program on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The workspace root (xtask's parent), where every command runs.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(
            shell_quote("target/image/roottask"),
            "target/image/roottask"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn describes_commands() {
        let mut cmd = Command::new("qemu");
        cmd.args(["-append", "debug-exit x"]);
        assert_eq!(describe(&cmd), "qemu -append 'debug-exit x'");
    }

    #[test]
    fn tails_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), ["b", "c"]);
        assert_eq!(tail("a", 5), ["a"]);
        assert!(tail("", 3).is_empty());
    }
}

//! `pingpong`: round trips of one byte between two processes over pipes.
#![forbid(unsafe_code)]

use std::env;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::process::{Command, ExitCode, Stdio};

use moat_guest_tools::args::run_or_exit;
use moat_guest_tools::hypercall::rdtsc;
use moat_guest_tools::pingpong::{self, Role, CHILD_FLAG, WARMUP};
use moat_guest_tools::stats::Summary;

const USAGE: &str = "\
usage: pingpong [--calls N]

Starts a second copy of itself (`pingpong --child`) with pipes on its stdin
and stdout, then sends it one byte N times (default 1000) after 100 untimed
rounds; the child answers each byte plus one. Times each round trip (write,
the child's read and write, read) with the TSC and prints
  pingpong: N round trips, median X cycles, min Y cycles
A wrong answer, a closed pipe or a child that fails prints
`pingpong: FAIL ...` and exits 1 (2: usage).
";

fn main() -> ExitCode {
    match run_or_exit("pingpong", USAGE, Role::parse) {
        Ok(Role::Parent { calls }) => parent(calls),
        Ok(Role::Child) => child(),
        Err(code) => code,
    }
}

fn parent(calls: usize) -> ExitCode {
    let mut samples = Vec::new();
    if samples.try_reserve_exact(calls).is_err() {
        return fail(&format!("cannot keep {calls} samples"));
    }
    let exe = match env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return fail(&format!("cannot find my own program: {e}")),
    };
    let mut child = match Command::new(&exe)
        .arg(CHILD_FLAG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return fail(&format!("cannot start {}: {e}", exe.display())),
    };
    let (Some(mut to), Some(mut from)) = (child.stdin.take(), child.stdout.take()) else {
        return fail("the child has no pipes");
    };
    let mut played = Ok(());
    for round in 0..WARMUP + calls as u64 {
        let start = rdtsc();
        played = pingpong::volley(&mut to, &mut from, round);
        let end = rdtsc();
        if played.is_err() {
            break;
        }
        if round >= WARMUP {
            samples.push(end.wrapping_sub(start));
        }
    }
    // End of input ends the child.
    drop(to);
    let status = child.wait();
    if let Err(e) = played {
        return fail(&e);
    }
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => return fail(&format!("the child ended with {status}")),
        Err(e) => return fail(&format!("cannot wait for the child: {e}")),
    }
    match Summary::of(&mut samples) {
        Some(summary) => {
            println!("{}", pingpong::report(&summary));
            ExitCode::SUCCESS
        }
        None => fail("no samples"),
    }
}

/// Answers on copies of stdin and stdout: `File`s, which do not buffer,
/// where `io::stdout()` would hold a byte back until a line ends.
fn child() -> ExitCode {
    let files = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|input| Ok((input, io::stdout().as_fd().try_clone_to_owned()?)));
    let (input, output) = match files {
        Ok(files) => files,
        Err(e) => {
            eprintln!("pingpong: child: cannot duplicate stdin or stdout: {e}");
            return ExitCode::FAILURE;
        }
    };
    match pingpong::serve(&mut File::from(input), &mut File::from(output)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pingpong: child: {e}");
            ExitCode::FAILURE
        }
    }
}

fn fail(why: &str) -> ExitCode {
    println!("pingpong: FAIL {why}");
    ExitCode::FAILURE
}

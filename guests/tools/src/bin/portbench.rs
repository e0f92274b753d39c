//! `portbench`: round trips of an AT command over the modem's
//! virtio-console port.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use moat_guest_tools::args::run_or_exit;
use moat_guest_tools::at::open_port;
use moat_guest_tools::hypercall::rdtsc;
use moat_guest_tools::portbench::{self, Options, WARMUP};
use moat_guest_tools::stats::Summary;

const USAGE: &str = "\
usage: portbench [--calls N] [--port NAME]

Sends `AT` with a CR to the virtio-console port called NAME (default modem)
N times (default 100) after 10 untimed rounds, each time reading until the
final result, which must be OK; times each round trip with the TSC and
prints
  portbench: N round trips, median X cycles, min Y cycles
The port is read blocking, as an ordinary client would: a modem that never
answers makes it wait for ever. Any other result, end of input or an I/O
error prints `portbench: FAIL ...` and exits 1 (2: usage).
";

fn main() -> ExitCode {
    let opts = match run_or_exit("portbench", USAGE, Options::parse) {
        Ok(opts) => opts,
        Err(code) => return code,
    };
    let (device, mut port) = match open_port(&opts.port, false) {
        Ok(opened) => opened,
        Err(why) => return fail(&why),
    };
    let mut samples = Vec::new();
    if samples.try_reserve_exact(opts.calls).is_err() {
        return fail(&format!("cannot keep {} samples", opts.calls));
    }
    let request = portbench::request();
    for round in 0..WARMUP + opts.calls as u64 {
        let start = rdtsc();
        let result = portbench::round_trip(&mut port, &request);
        let end = rdtsc();
        if let Err(e) = result {
            return fail(&format!("round {round} on {}: {e}", device.display()));
        }
        if round >= WARMUP {
            samples.push(end.wrapping_sub(start));
        }
    }
    match Summary::of(&mut samples) {
        Some(summary) => {
            println!("{}", portbench::report(&summary));
            ExitCode::SUCCESS
        }
        None => fail("no samples"),
    }
}

fn fail(why: &str) -> ExitCode {
    println!("portbench: FAIL {why}");
    ExitCode::FAILURE
}

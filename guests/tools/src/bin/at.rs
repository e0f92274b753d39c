//! `at`: sends one AT command, or one SMS, to the modem over its
//! virtio-console port and prints the answer.
#![forbid(unsafe_code)]

use std::io;
use std::process::ExitCode;

use moat_guest_tools::args::run_or_exit;
use moat_guest_tools::at::{await_reset, converse, open_port, Exchange, Failure, Job, Options};

const USAGE: &str = "\
usage: at [--port NAME] [--timeout SECS] COMMAND
       at [--port NAME] [--timeout SECS] --sms NUMBER TEXT
       at [--port NAME] [--timeout SECS] --await-reset [COMMAND]

Sends COMMAND (e.g. 'AT+CSQ') with a CR to the virtio-console port called
NAME (default modem), or sends TEXT as an SMS to NUMBER (AT+CMGS, the text at
the modem's `> ` prompt, then Ctrl-Z), and prints the response lines up to
the final result code. With --await-reset, sends COMMAND if given (without
waiting for an answer), then waits until the host closes the port and opens
it again (the modem restarted) and prints when. Waits at
most SECS seconds (default 5).
Exit code: 0 on OK, CONNECT or a reset seen, 1 on ERROR (also +CME/+CMS
ERROR, NO CARRIER, BUSY, ...), timeout or I/O error, 2 on a usage error.
";

fn main() -> ExitCode {
    let opts = match run_or_exit("at", USAGE, Options::parse) {
        Ok(opts) => opts,
        Err(code) => return code,
    };
    let (device, mut port) = match open_port(&opts.port, true) {
        Ok(opened) => opened,
        Err(why) => return fail(&why),
    };
    let request = match opts.job {
        Job::Request(request) => request,
        Job::AwaitReset(send) => {
            let bytes = send.map(|r| Exchange::start(&r).1).unwrap_or_default();
            return match await_reset(&mut port, &bytes, opts.timeout) {
                Ok(reset) => {
                    println!(
                        "at: port reset: closed by the host after {} ms, open again after {} ms",
                        reset.closed_after.as_millis(),
                        reset.open_after.as_millis()
                    );
                    ExitCode::SUCCESS
                }
                Err(Failure::Timeout) => fail(&format!(
                    "{} was not closed and opened again within {} s",
                    device.display(),
                    opts.timeout.as_secs()
                )),
                Err(Failure::Io(e)) => fail(&format!("{}: {e}", device.display())),
            };
        }
    };
    match converse(&mut port, &request, opts.timeout, &mut io::stdout()) {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(Failure::Timeout) => fail(&format!(
            "no final result from {} within {} s",
            device.display(),
            opts.timeout.as_secs()
        )),
        Err(Failure::Io(e)) => fail(&format!("{}: {e}", device.display())),
    }
}

fn fail(why: &str) -> ExitCode {
    eprintln!("at: {why}");
    ExitCode::FAILURE
}

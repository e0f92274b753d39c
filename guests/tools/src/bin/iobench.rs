//! `iobench`: sequential and random O_DIRECT disk I/O, and TCP both ways
//! with a host peer, timed with the guest's monotonic clock.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::time::Instant;

use moat_guest_tools::args::run_or_exit;
use moat_guest_tools::iobench::{
    self as io, aligned, random_offsets, stamp_block, stamped, DiskOptions, Mode, TcpOptions, ACK,
    GO, PAGE,
};
use moat_guest_tools::stats::Summary;

const USAGE: &str = "\
usage: iobench disk [--dev PATH] [--mib N] [--block-kib N] [--rounds N]
                    [--random N] [--seed N]
       iobench tcp --port P [--mib N] [--rounds N]

disk: opens PATH (default /dev/vda) with O_DIRECT and, each round (default
3), writes its first N MiB (default 64) in blocks of --block-kib (default
1024) and fsyncs, then reads them back; then reads 4 KiB pages at --random
(default 1000) seeded offsets in that area, one at a time, after 10 untimed
ones. THE DEVICE'S DATA IS OVERWRITTEN. Prints
  iobench: seq-write round=R bytes=B block=K ns=T
  iobench: seq-read round=R bytes=B block=K ns=T
  iobench: rand-read count=N bytes=4096 median_ns=X min_ns=Y
tcp: listens on port P, says `iobench: tcp-listen port=P rounds=R bytes=B`,
takes one connection and, each round, sends B bytes (N MiB, default 8) and
waits for the peer's `A`, then sends `G` and reads B bytes from the peer,
answering `A`. Prints
  iobench: tcp-send round=R bytes=B ns=T
  iobench: tcp-recv round=R bytes=B ns=T
Times are nanoseconds of CLOCK_MONOTONIC. Any failure prints
`iobench: FAIL ...` and exits 1 (2: usage).
";

fn main() -> ExitCode {
    let mode = match run_or_exit("iobench", USAGE, Mode::parse) {
        Ok(mode) => mode,
        Err(code) => return code,
    };
    let lines = match &mode {
        Mode::Disk(opts) => disk(opts),
        Mode::Tcp(opts) => tcp(opts),
    };
    match lines {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("iobench: FAIL {why}");
            ExitCode::FAILURE
        }
    }
}

fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn disk(opts: &DiskOptions) -> Result<Vec<String>, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&opts.device)
        .map_err(|e| format!("cannot open {} with O_DIRECT: {e}", opts.device))?;
    let block_len = opts.block as usize;
    let mut buffer = vec![0u8; block_len + PAGE as usize];
    let block = aligned(&mut buffer, block_len).ok_or("no aligned buffer")?;
    let mut lines = Vec::new();
    let mut last_round = 0;
    for round in 1..=opts.rounds {
        let start = Instant::now();
        for offset in (0..opts.bytes).step_by(block_len) {
            stamp_block(block, round, offset);
            file.write_all_at(block, offset)
                .map_err(|e| format!("round {round}: write at {offset}: {e}"))?;
        }
        file.sync_all()
            .map_err(|e| format!("round {round}: fsync: {e}"))?;
        lines.push(io::seq_line(
            "write",
            round,
            opts.bytes,
            opts.block,
            nanos(start),
        ));
        last_round = round;

        let start = Instant::now();
        for offset in (0..opts.bytes).step_by(block_len) {
            file.read_exact_at(block, offset)
                .map_err(|e| format!("round {round}: read at {offset}: {e}"))?;
            if !stamped(block, round, offset) {
                return Err(format!(
                    "round {round}: read at {offset}: not what was written"
                ));
            }
        }
        lines.push(io::seq_line(
            "read",
            round,
            opts.bytes,
            opts.block,
            nanos(start),
        ));
    }
    let page = &mut block[..PAGE as usize];
    const WARMUP: usize = 10;
    let offsets = random_offsets(opts.seed, WARMUP + opts.random, opts.bytes);
    let mut samples = Vec::with_capacity(opts.random);
    for (i, &offset) in offsets.iter().enumerate() {
        let start = Instant::now();
        file.read_exact_at(page, offset)
            .map_err(|e| format!("random read at {offset}: {e}"))?;
        let ns = nanos(start);
        if !stamped(page, last_round, offset) {
            return Err(format!("random read at {offset}: not what was written"));
        }
        if i >= WARMUP {
            samples.push(ns);
        }
    }
    if let Some(summary) = Summary::of(&mut samples) {
        lines.push(io::random_line(&summary));
    }
    drop(file);
    Ok(lines)
}

fn tcp(opts: &TcpOptions) -> Result<Vec<String>, String> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, opts.port))
        .map_err(|e| format!("cannot listen on port {}: {e}", opts.port))?;
    println!("{}", io::listen_line(opts));
    let (mut stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut into = vec![0u8; 64 * 1024];
    let mut lines = Vec::new();
    for round in 1..=opts.rounds {
        let start = Instant::now();
        send(&mut stream, &chunk, opts.bytes).map_err(|e| format!("round {round}: send: {e}"))?;
        expect(&mut stream, ACK).map_err(|e| format!("round {round}: send: {e}"))?;
        lines.push(io::tcp_line("send", round, opts.bytes, nanos(start)));

        let start = Instant::now();
        stream
            .write_all(&[GO])
            .map_err(|e| format!("round {round}: receive: {e}"))?;
        receive(&mut stream, &mut into, opts.bytes)
            .map_err(|e| format!("round {round}: receive: {e}"))?;
        lines.push(io::tcp_line("recv", round, opts.bytes, nanos(start)));
        stream
            .write_all(&[ACK])
            .map_err(|e| format!("round {round}: receive: {e}"))?;
    }
    Ok(lines)
}

fn send(stream: &mut TcpStream, chunk: &[u8], bytes: u64) -> std::io::Result<()> {
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn receive(stream: &mut TcpStream, into: &mut [u8], bytes: u64) -> Result<(), String> {
    let mut left = bytes;
    while left > 0 {
        let want = left.min(into.len() as u64) as usize;
        match stream.read(&mut into[..want]) {
            Ok(0) => return Err(format!("the peer closed with {left} bytes to come")),
            Ok(n) => left -= n as u64,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

fn expect(stream: &mut TcpStream, byte: u8) -> Result<(), String> {
    let mut got = [0u8];
    stream.read_exact(&mut got).map_err(|e| e.to_string())?;
    if got[0] == byte {
        Ok(())
    } else {
        Err(format!("the peer sent {:#04x}, not {byte:#04x}", got[0]))
    }
}

//! `stress`: CPU and memory load that checks its own results.
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use moat_guest_tools::args::run_or_exit;
use moat_guest_tools::stress::{cpu_round, fill, heartbeat_line, verify, Options, WORDS_PER_MIB};

const USAGE: &str = "\
usage: stress [--cpu N] [--mem MIB] [--seconds S] [--heartbeat S]

Runs N threads (default 1) spinning on arithmetic and one thread writing a
pattern over MIB MiB (default 16; 0: no memory thread) and reading it back,
for S seconds (default 10). Every result is checked. With --heartbeat, prints
`stress: heartbeat T s, R cpu rounds, P memory passes` every S seconds.
Prints `stress: done, ...` and exits 0, or `stress: FAIL ...` and exits 1
(wrong arithmetic, memory that does not hold what was written).
";

/// How often the main thread looks whether a worker failed.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);

fn main() -> ExitCode {
    let opts = match run_or_exit("stress", USAGE, Options::parse) {
        Ok(opts) => opts,
        Err(code) => return code,
    };
    println!(
        "stress: {} cpu threads, {} MiB, {} s",
        opts.cpus, opts.mem_mib, opts.seconds
    );
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let cpus: Vec<_> = (0..opts.cpus)
        .map(|_| {
            let progress = Arc::clone(&progress);
            worker(&stop, move |stop| cpu_load(stop, &progress.cpu_rounds))
        })
        .collect();
    let words = opts.mem_words();
    let memory = (words > 0).then(|| {
        let progress = Arc::clone(&progress);
        worker(&stop, move |stop| {
            memory_load(words, stop, &progress.memory_passes)
        })
    });

    let start = Instant::now();
    let deadline = start + Duration::from_secs(opts.seconds);
    let beat = Duration::from_secs(opts.heartbeat);
    let mut next_beat = start + beat;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            break;
        }
        if !beat.is_zero() && now >= next_beat {
            println!(
                "{}",
                heartbeat_line(
                    now.duration_since(start).as_secs(),
                    progress.cpu_rounds.load(Ordering::Relaxed),
                    progress.memory_passes.load(Ordering::Relaxed)
                )
            );
            next_beat += beat;
        }
        thread::sleep(left.min(WATCH_INTERVAL));
    }
    stop.store(true, Ordering::Relaxed);

    let mut cpu_rounds = 0u64;
    for result in cpus.into_iter().map(join) {
        match result {
            Ok(rounds) => cpu_rounds = cpu_rounds.saturating_add(rounds),
            Err(e) => return fail(&e),
        }
    }
    let passes = match memory.map(join) {
        Some(Err(e)) => return fail(&e),
        Some(Ok(passes)) => passes,
        None => 0,
    };
    println!(
        "stress: done, {cpu_rounds} cpu rounds, {passes} memory passes of {} MiB",
        opts.mem_mib
    );
    ExitCode::SUCCESS
}

type Outcome = Result<u64, String>;

/// What the workers have done so far, for the heartbeat.
#[derive(Default)]
struct Progress {
    cpu_rounds: AtomicU64,
    memory_passes: AtomicU64,
}

/// Runs `work` on a thread; its failure stops the others.
fn worker<F>(stop: &Arc<AtomicBool>, work: F) -> thread::JoinHandle<Outcome>
where
    F: FnOnce(&AtomicBool) -> Outcome + Send + 'static,
{
    let stop = Arc::clone(stop);
    thread::spawn(move || {
        let outcome = work(&stop);
        if outcome.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        outcome
    })
}

fn join(handle: thread::JoinHandle<Outcome>) -> Outcome {
    handle
        .join()
        .unwrap_or_else(|_| Err("a worker thread panicked".into()))
}

fn fail(why: &str) -> ExitCode {
    println!("stress: FAIL {why}");
    ExitCode::FAILURE
}

/// Rounds of checked arithmetic until told to stop.
fn cpu_load(stop: &AtomicBool, done: &AtomicU64) -> Outcome {
    let mut rounds = 0u64;
    while !stop.load(Ordering::Relaxed) {
        cpu_round(rounds)?;
        rounds += 1;
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(rounds)
}

/// Passes of fill-then-verify over `words` words until told to stop; every
/// word written is verified, also in a pass cut short.
fn memory_load(words: usize, stop: &AtomicBool, done: &AtomicU64) -> Outcome {
    let mut buf: Vec<u64> = Vec::new();
    buf.try_reserve_exact(words)
        .map_err(|_| format!("cannot allocate {} MiB", words / WORDS_PER_MIB))?;
    buf.resize(words, 0);
    let mut passes = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut filled = 0;
        for chunk in buf.chunks_mut(WORDS_PER_MIB) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            fill(chunk, filled as u64, passes);
            filled += chunk.len();
        }
        // The writes must reach memory, and the reads come from it.
        let written = black_box(&buf[..filled]);
        for (i, chunk) in written.chunks(WORDS_PER_MIB).enumerate() {
            verify(chunk, (i * WORDS_PER_MIB) as u64, passes).map_err(|c| c.to_string())?;
        }
        if filled == buf.len() {
            passes += 1;
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(passes)
}

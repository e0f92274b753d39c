//! The main EC's loop: start components in manifest order once the portals
//! they use are published, restart failed ones with back-off, and end when
//! every component is done.
//!
//! A client of a server that restarts keeps running: the server's portal
//! (and every copy of it) goes when the server is destroyed, so the client's
//! calls fail with `Dead` or `BadCapability` until the new instance
//! publishes, and then the root delegates the new portal to the same
//! selector. A server whose every client is done is stopped.

use alloc::vec::Vec;

use moat_abi::{rights, Space, Status};
use moat_roottask::exception::Outcome;
use moat_roottask::manifest::{Component, Manifest};
use moat_roottask::registry::{self, Instance};
use moat_roottask::restart::{self, Decision};
use moat_user::{println, rdtsc, sys};

use crate::handlers::{BOARD, MAILBOX, SUPERVISOR_SM};
use crate::loader::{Loaded, Loader};

/// How long a component waits for the portals it uses to be published.
const USES_WAIT_MS: u64 = 2000;

enum State {
    /// To be started at TSC `due`; `give_up`: when waiting for the portals
    /// it uses ends.
    Waiting {
        due: u64,
        give_up: Option<u64>,
    },
    Running(Loaded),
    Finished,
    Failed,
}

struct Slot {
    state: State,
    /// Restarts so far.
    restarts: u32,
    /// Instances started so far (the current one's generation).
    generation: u64,
}

impl Slot {
    fn done(&self) -> bool {
        matches!(self.state, State::Finished | State::Failed)
    }
}

pub struct Supervisor {
    loader: Loader,
    manifest: Manifest,
    slots: Vec<Slot>,
    tsc_hz: u64,
    /// The debug-exit value the last component to ask for one asked for
    /// (exit code `moat_abi::EXIT_WITH_VALUE + v`).
    exit_value: Option<u8>,
}

impl Supervisor {
    pub fn new(loader: Loader, manifest: Manifest) -> Self {
        let now = rdtsc();
        let slots = manifest
            .components
            .iter()
            .map(|_| Slot {
                state: State::Waiting {
                    due: now,
                    give_up: None,
                },
                restarts: 0,
                generation: 0,
            })
            .collect();
        let tsc_hz = loader.info.tsc_hz;
        Self {
            loader,
            manifest,
            slots,
            tsc_hz,
            exit_value: None,
        }
    }

    fn ticks(&self, ms: u64) -> u64 {
        restart::ms_to_ticks(self.tsc_hz, ms)
    }

    /// Runs until every component finished or failed for good; gives the
    /// debug-exit value a component asked for, if one did.
    pub fn run(mut self) -> Option<u8> {
        loop {
            self.collect_reports();
            self.stop_idle_servers();
            self.start_due();
            self.hand_out_publications();
            if self.slots.iter().all(Slot::done) {
                println!("roottask: all components done");
                return self.exit_value;
            }
            let deadline = self.next_deadline();
            match sys::sm_down(SUPERVISOR_SM, deadline, false) {
                Ok(()) | Err(Status::Timeout) => {}
                Err(status) => {
                    println!("roottask: waiting for events failed: {status}");
                    return self.exit_value;
                }
            }
        }
    }

    fn name(&self, index: usize) -> &str {
        &self.manifest.components[index].name
    }

    fn component(&self, index: usize) -> &Component {
        &self.manifest.components[index]
    }

    /// The earliest start or give-up time of a waiting component (0: none).
    fn next_deadline(&self) -> u64 {
        self.slots
            .iter()
            .filter_map(|slot| match slot.state {
                State::Waiting { due, give_up } => Some(give_up.unwrap_or(due).max(due)),
                _ => None,
            })
            .min()
            // 0 means no deadline: make sure a due time never reads as that.
            .map_or(0, |t| t.max(1))
    }

    fn destroy(&mut self, index: usize) {
        let state = core::mem::replace(&mut self.slots[index].state, State::Failed);
        if let State::Running(loaded) = state {
            if let Err(status) = self.loader.destroy(loaded, index) {
                println!(
                    "roottask: tearing down '{}' left something behind: {status}",
                    self.name(index)
                );
            }
        }
    }

    fn collect_reports(&mut self) {
        for index in 0..self.slots.len() {
            let Some((generation, message)) = MAILBOX.take(index) else {
                continue;
            };
            let slot = &self.slots[index];
            if generation != slot.generation || !matches!(slot.state, State::Running(_)) {
                continue;
            }
            self.destroy(index);
            let outcome = Outcome::of(&message);
            let name = self.name(index);
            if let Outcome::Exited(code) = outcome {
                if let Some(value) = moat_abi::exit_value(code as u64) {
                    println!("roottask: component '{name}' finished, asking for debug-exit value {value:#x}");
                    self.exit_value = Some(value);
                    self.slots[index].state = State::Finished;
                    continue;
                }
            }
            if outcome == Outcome::Finished {
                println!("roottask: component '{name}' finished");
                self.slots[index].state = State::Finished;
                continue;
            }
            let policy = self.component(index).restart;
            match restart::decide(&policy, self.slots[index].restarts) {
                Decision::Restart { number, delay_ms } => {
                    println!(
                        "roottask: component '{name}' {outcome} (restart {number} of {} in {delay_ms} ms)",
                        policy.max_restarts
                    );
                    let due = rdtsc().saturating_add(self.ticks(delay_ms));
                    self.slots[index].restarts = number;
                    self.slots[index].state = State::Waiting { due, give_up: None };
                }
                Decision::GiveUp => {
                    println!("roottask: component '{name}' {outcome} (no restarts left)");
                    println!("roottask: component '{name}' failed for good");
                    self.slots[index].state = State::Failed;
                }
            }
        }
    }

    /// Stops servers whose every client is done.
    fn stop_idle_servers(&mut self) {
        for index in 0..self.slots.len() {
            if self.slots[index].done() {
                continue;
            }
            let mut clients = self
                .manifest
                .components
                .iter()
                .enumerate()
                .map(|(client, _)| client)
                .filter(|&client| self.manifest.serves(index, client))
                .peekable();
            if clients.peek().is_none() || !clients.all(|c| self.slots[c].done()) {
                continue;
            }
            self.destroy(index);
            println!(
                "roottask: component '{}' stopped: its clients are done",
                self.name(index)
            );
            self.slots[index].state = State::Finished;
        }
    }

    fn start_due(&mut self) {
        for index in 0..self.slots.len() {
            let now = rdtsc();
            let State::Waiting { due, give_up } = self.slots[index].state else {
                continue;
            };
            if now < due {
                continue;
            }
            if let Some(gone) = self.gone_provider(index) {
                println!(
                    "roottask: component '{}' not started: '{}' it uses is gone",
                    self.name(index),
                    self.component(gone).provides.as_deref().unwrap_or("")
                );
                self.slots[index].state = State::Failed;
                continue;
            }
            if let Some(missing) = self.unpublished_use(index) {
                match give_up {
                    None => {
                        let give_up = Some(now.saturating_add(self.ticks(USES_WAIT_MS)));
                        self.slots[index].state = State::Waiting { due, give_up };
                    }
                    Some(t) if now >= t => {
                        println!(
                            "roottask: component '{}' not started: '{missing}' was not published within {USES_WAIT_MS} ms",
                            self.name(index)
                        );
                        self.slots[index].state = State::Failed;
                    }
                    Some(_) => {}
                }
                continue;
            }
            self.start(index);
        }
    }

    /// A provider of a portal `index` uses that will not come back.
    fn gone_provider(&self, index: usize) -> Option<usize> {
        self.component(index)
            .uses
            .iter()
            .map(|u| u.provider)
            .find(|&p| self.slots[p].done())
    }

    fn unpublished_use(&self, index: usize) -> Option<&str> {
        self.component(index)
            .uses
            .iter()
            .find(|u| BOARD.publication(u.provider) == 0)
            .map(|u| u.name.as_str())
    }

    fn start(&mut self, index: usize) {
        let instance = Instance {
            index,
            generation: self.slots[index].generation + 1,
        };
        let publications: Vec<u64> = (0..self.slots.len())
            .map(|i| BOARD.publication(i))
            .collect();
        match self.loader.load(&self.manifest, instance, &publications) {
            Ok(loaded) => {
                let c = self.component(index);
                let restarts = self.slots[index].restarts;
                if restarts == 0 {
                    println!(
                        "roottask: started '{}' (pd sel {}, prio {}, cpu {}, {} KiB RAM, {} KiB quota)",
                        c.name,
                        loaded.pd(),
                        c.priority,
                        loaded.cpu,
                        c.memory / 1024,
                        c.quota / 1024
                    );
                } else {
                    println!(
                        "roottask: component '{}' restarted (restart {restarts})",
                        c.name
                    );
                }
                let slot = &mut self.slots[index];
                slot.generation = instance.generation;
                slot.state = State::Running(loaded);
            }
            Err(e) => {
                println!(
                    "roottask: component '{}' not started: {e}",
                    self.name(index)
                );
                self.slots[index].state = State::Failed;
            }
        }
    }

    /// Gives running clients the portals published since they got theirs.
    fn hand_out_publications(&mut self) {
        for index in 0..self.slots.len() {
            let State::Running(loaded) = &mut self.slots[index].state else {
                continue;
            };
            let component = &self.manifest.components[index];
            let pd = loaded.pd();
            for (u, held) in component.uses.iter().zip(loaded.delegated.iter_mut()) {
                let current = BOARD.publication(u.provider);
                if current == 0 || current == *held {
                    continue;
                }
                *held = current;
                let from = registry::slot(u.provider);
                match sys::delegate(pd, Space::Object, from, u.selector, 1, rights::PT_CALL) {
                    Ok(()) => println!(
                        "roottask: gave '{}' the new '{}' portal",
                        component.name, u.name
                    ),
                    Err(status) => println!(
                        "roottask: could not give '{}' the new '{}' portal: {status}",
                        component.name, u.name
                    ),
                }
            }
        }
    }
}

//! The command line: a small hand-written parser, no dependencies.

use std::path::{Path, PathBuf};

use crate::config::{GuestOverride, Size};
use crate::emu::Emulator;
use crate::{Error, Result};

/// The most CPUs `run --cpus` gives a machine (the kernel keeps per-CPU
/// data for 64).
const MAX_CPUS: u32 = 64;

pub const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  setup                 install missing host tools (apt packages, rustup targets)
  build [--release]     build the kernel and user tasks (always release) and
                        assemble target/image/ (kernel, modules, qemu.args, moat.iso)
  run [options] [-- KERNEL ARGS...]
                        setup, build, then boot a system with the serial
                        console here: examples/default.toml (the pinned Linux
                        guest beside the native modem and echo) unless told
      --config FILE     boot the system FILE describes (docs/configuration.md;
                        examples/: default.toml, two-guests.toml)
      --kernel PATH     the quick form, for one guest: these replace the
      --initrd PATH     values of the guest that owns the console in the
      --append TEXT     configuration (default.toml's unless --config):
      --memory SIZE     its kernel (bzImage), initramfs, command line,
      --vcpus N         RAM (e.g. 512M, 1G) and vCPUs (1 for now)
      --emu qemu|bochs  emulator (default: qemu)
      --kvm             QEMU with KVM and -cpu host (default: only if the host
                        can nest virtualization; otherwise TCG with -cpu max)
      --cpus N          give the machine N CPUs (default 1); the kernel starts
                        them all (the kernel argument cpus=N limits that)
  test [options]        setup, host unit tests, build, system tests on QEMU and Bochs
      --emu qemu|bochs  run the system tests on this emulator only
      --filter NAME     only system tests whose name contains NAME
      --no-host         skip the host unit tests
  bench [all] [--emu qemu|bochs]
                        SLOW (about 5 minutes, most of it Linux on Bochs): every
                        round trip in one table: native<->native IPC, the guest
                        hypercall to a native server, AT over the virtio-console
                        port through the VMM to the native modem, and a pipe
                        ping-pong between two Linux processes; median and min in
                        cycles (QEMU TCG) and instructions (QEMU -icount, Bochs);
                        target/bench/all.json (and ipc.json), target/bench/bench.svg
  bench ipc [--emu qemu|bochs]
                        setup, build, then measure IPC round trips (null, 6 and
                        64 words) in instructions on QEMU (-icount) and Bochs;
                        prints a table and writes target/bench/ipc.json
  bench exits [--emu qemu|bochs]
                        the same for a CPUID exit handled by the VMM, the guest
                        IPC hypercall and a native call; target/bench/exits.json
  bench linux [--emu qemu|bochs] [--runs N]
                        SLOW (about 5 minutes, most of it Bochs): the Linux guest
                        booted by the emulator itself and under Moat; wall time
                        and guest uptime to /init, their ratio, the VMM's exits;
                        N runs of each boot (default 1); target/bench/linux.json
  linux build           fetch the pinned Debian kernel and busybox (guests/linux/)
                        and build target/linux/{bzImage,initramfs.cpio} (cached)
  linux direct [--emu qemu|bochs] [--virtio] [-- KERNEL ARGS...]
                        boot that guest in the emulator itself, without Moat,
                        and time it from the emulator's start to /init;
                        --virtio (QEMU): with QEMU's virtio devices
  demo modem [--emu qemu|bochs]
                        setup, build, then the modem / application-processor
                        demo (QEMU by default; Bochs takes ~5 minutes): Linux
                        beside the native modem, steps a-e with a verdict each
                        (AT + SMS; no missed deadline under load, worst jitter;
                        Linux panics and is restarted; the modem crashes and is
                        restarted; root in Linux cannot reach the modem)
  fuzz [TARGET] [--seconds N]
                        coverage-guided fuzzing (cargo-fuzz, libFuzzer) of the
                        device models, virtio, the VMM's emulator and exit
                        handler, firmware loaders, manifest parser and ABI:
                        TARGET (a file of fuzz/fuzz_targets/) or all in turn,
                        N seconds each (default 60); see docs/fuzzing.md
  help                  this text";

#[derive(Debug, PartialEq, Eq)]
pub enum Cmd {
    Help,
    Setup,
    Build,
    Run(RunOpts),
    Test(TestOpts),
    Bench(BenchOpts),
    Linux(LinuxOpts),
    Demo(DemoOpts),
    Fuzz(FuzzOpts),
}

/// `cargo xtask fuzz`.
#[derive(Debug, PartialEq, Eq)]
pub struct FuzzOpts {
    /// One target; all of them if `None`.
    pub target: Option<String>,
    pub seconds: u64,
}

/// `cargo xtask demo modem`.
#[derive(Debug, PartialEq, Eq)]
pub struct DemoOpts {
    pub emu: Option<Emulator>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum LinuxOpts {
    Build,
    Direct {
        emu: Emulator,
        virtio: bool,
        kernel_args: Vec<String>,
    },
}

/// What `cargo xtask bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Benchmark {
    /// Every round trip, native and from the Linux guest, in one table
    /// (`bench` alone or `bench all`).
    All,
    Ipc,
    Exits,
    /// Slow: boots Linux twice per emulator and run.
    Linux,
}

#[derive(Debug, PartialEq, Eq)]
pub struct BenchOpts {
    pub benchmark: Benchmark,
    pub emu: Option<Emulator>,
    /// Boots of each kind (`bench linux` only; the others measure many
    /// iterations in one boot).
    pub runs: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub struct RunOpts {
    pub emu: Emulator,
    /// `--kvm` given: use KVM even if detection says no.
    pub force_kvm: bool,
    /// The machine's CPUs (`--cpus`).
    pub cpus: u32,
    /// Extra kernel command-line words (after `--`).
    pub kernel_args: Vec<String>,
    /// `--config FILE`; the default example without.
    pub config: Option<PathBuf>,
    /// The quick form's options for the console guest.
    pub guest: GuestOverride,
}

impl RunOpts {
    /// Makes the paths given on the command line absolute, from `cwd`
    /// (xtask works from the workspace root).
    pub fn absolutize(&mut self, cwd: &Path) {
        if let Some(config) = &mut self.config {
            *config = cwd.join(&*config);
        }
        for path in [&mut self.guest.kernel, &mut self.guest.initrd]
            .into_iter()
            .flatten()
        {
            if !path.starts_with(crate::config::PINNED_PREFIX) {
                *path = cwd.join(&*path).to_string_lossy().into_owned();
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct TestOpts {
    pub emu: Option<Emulator>,
    pub filter: Option<String>,
    pub host: bool,
}

pub fn parse(args: &[String]) -> Result<Cmd> {
    let Some((cmd, rest)) = args.split_first() else {
        return Ok(Cmd::Help);
    };
    let mut opts = Options::new(rest);
    if opts.flag("--help") || opts.flag("-h") {
        return Ok(Cmd::Help);
    }
    let cmd = match cmd.as_str() {
        "help" | "-h" | "--help" => Cmd::Help,
        "setup" => Cmd::Setup,
        "build" => {
            // Release is the only profile the image is built from.
            opts.flag("--release");
            Cmd::Build
        }
        "run" => Cmd::Run(RunOpts {
            emu: opts.emulator()?.unwrap_or(Emulator::Qemu),
            force_kvm: opts.flag("--kvm"),
            cpus: match opts.value("--cpus")? {
                None => 1,
                Some(n) => n
                    .parse()
                    .ok()
                    .filter(|&n| (1..=MAX_CPUS).contains(&n))
                    .ok_or_else(|| {
                        Error::Usage(format!(
                            "--cpus needs a number from 1 to {MAX_CPUS}, not `{n}`"
                        ))
                    })?,
            },
            config: opts.value("--config")?.map(PathBuf::from),
            guest: GuestOverride {
                kernel: opts.value("--kernel")?,
                initrd: opts.value("--initrd")?,
                append: opts.value("--append")?,
                memory: match opts.value("--memory")? {
                    None => None,
                    Some(text) => Some(
                        Size::parse(&text).map_err(|e| Error::Usage(format!("--memory: {e}")))?,
                    ),
                },
                vcpus: match opts.value("--vcpus")? {
                    None => None,
                    Some(n) => {
                        Some(n.parse().map_err(|_| {
                            Error::Usage(format!("--vcpus needs a number, not `{n}`"))
                        })?)
                    }
                },
            },
            kernel_args: opts.trailing(),
        }),
        "test" => Cmd::Test(TestOpts {
            emu: opts.emulator()?,
            filter: opts.value("--filter")?,
            host: !opts.flag("--no-host"),
        }),
        "bench" => {
            let benchmark = match opts.positional().as_deref() {
                None | Some("all") => Benchmark::All,
                Some("ipc") => Benchmark::Ipc,
                Some("exits") => Benchmark::Exits,
                Some("linux") => Benchmark::Linux,
                Some(other) => {
                    return Err(Error::Usage(format!(
                        "unknown benchmark `{other}` (expected all, ipc, exits or linux)"
                    )))
                }
            };
            let runs = match opts.value("--runs")? {
                None => 1,
                Some(_) if benchmark != Benchmark::Linux => {
                    return Err(Error::Usage("--runs is for bench linux only".into()))
                }
                Some(n) => n.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                    Error::Usage(format!("--runs needs a positive number, not `{n}`"))
                })?,
            };
            Cmd::Bench(BenchOpts {
                benchmark,
                emu: opts.emulator()?,
                runs,
            })
        }
        "linux" => Cmd::Linux(match opts.positional().as_deref() {
            Some("build") => LinuxOpts::Build,
            Some("direct") => LinuxOpts::Direct {
                emu: opts.emulator()?.unwrap_or(Emulator::Qemu),
                virtio: opts.flag("--virtio"),
                kernel_args: opts.trailing(),
            },
            _ => return Err(Error::Usage("linux needs build or direct".into())),
        }),
        "demo" => match opts.positional().as_deref() {
            Some("modem") => Cmd::Demo(DemoOpts {
                emu: opts.emulator()?,
            }),
            _ => return Err(Error::Usage("demo needs modem".into())),
        },
        "fuzz" => {
            let seconds = match opts.value("--seconds")? {
                None => crate::fuzz::DEFAULT_SECONDS,
                Some(n) => n.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                    Error::Usage(format!("--seconds needs a positive number, not `{n}`"))
                })?,
            };
            Cmd::Fuzz(FuzzOpts {
                target: opts.positional(),
                seconds,
            })
        }
        other => return Err(Error::Usage(format!("unknown command `{other}`"))),
    };
    opts.finish()?;
    Ok(cmd)
}

/// The options after the command word; each accessor removes what it used,
/// and `finish` rejects whatever is left.
struct Options {
    args: Vec<String>,
    trailing: Option<Vec<String>>,
}

impl Options {
    fn new(args: &[String]) -> Self {
        match args.iter().position(|a| a == "--") {
            Some(i) => Options {
                args: args[..i].to_vec(),
                trailing: Some(args[i + 1..].to_vec()),
            },
            None => Options {
                args: args.to_vec(),
                trailing: None,
            },
        }
    }

    /// The first word that is not an option (nor an option's value, when it
    /// comes first).
    fn positional(&mut self) -> Option<String> {
        let first = self.args.first()?;
        (!first.starts_with("--")).then(|| self.args.remove(0))
    }

    fn flag(&mut self, name: &str) -> bool {
        let before = self.args.len();
        self.args.retain(|a| a != name);
        self.args.len() != before
    }

    /// `--name VALUE` or `--name=VALUE`; the last one wins.
    fn value(&mut self, name: &str) -> Result<Option<String>> {
        let mut found = None;
        let mut i = 0;
        while i < self.args.len() {
            let arg = &self.args[i];
            if arg == name {
                if i + 1 >= self.args.len() || self.args[i + 1].starts_with("--") {
                    return Err(Error::Usage(format!("{name} needs a value")));
                }
                found = Some(self.args.remove(i + 1));
                self.args.remove(i);
            } else if let Some(v) = arg.strip_prefix(name).and_then(|v| v.strip_prefix('=')) {
                found = Some(v.to_string());
                self.args.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    fn emulator(&mut self) -> Result<Option<Emulator>> {
        match self.value("--emu")? {
            None => Ok(None),
            Some(name) => Emulator::from_name(&name).map(Some).ok_or_else(|| {
                Error::Usage(format!(
                    "unknown emulator `{name}` (expected qemu or bochs)"
                ))
            }),
        }
    }

    fn trailing(&mut self) -> Vec<String> {
        self.trailing.take().unwrap_or_default()
    }

    fn finish(self) -> Result<()> {
        if let Some(arg) = self.args.first() {
            return Err(Error::Usage(format!("unexpected argument `{arg}`")));
        }
        if self.trailing.is_some() {
            return Err(Error::Usage("this command takes no `--` arguments".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Result<Cmd> {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse(&args)
    }

    #[test]
    fn no_arguments_is_help() {
        assert_eq!(p("").unwrap(), Cmd::Help);
        assert_eq!(p("--help").unwrap(), Cmd::Help);
    }

    #[test]
    fn build_accepts_release() {
        assert_eq!(p("build").unwrap(), Cmd::Build);
        assert_eq!(p("build --release").unwrap(), Cmd::Build);
        assert!(p("build --debug").is_err());
    }

    #[test]
    fn run_defaults_and_options() {
        assert_eq!(
            p("run").unwrap(),
            Cmd::Run(RunOpts {
                emu: Emulator::Qemu,
                force_kvm: false,
                cpus: 1,
                kernel_args: vec![],
                config: None,
                guest: GuestOverride::default(),
            })
        );
        assert_eq!(
            p("run --emu=bochs --kvm -- log=debug x").unwrap(),
            Cmd::Run(RunOpts {
                emu: Emulator::Bochs,
                force_kvm: true,
                cpus: 1,
                kernel_args: vec!["log=debug".into(), "x".into()],
                config: None,
                guest: GuestOverride::default(),
            })
        );
        assert_eq!(
            p("run --cpus 4 -- cpus=2").unwrap(),
            Cmd::Run(RunOpts {
                emu: Emulator::Qemu,
                force_kvm: false,
                cpus: 4,
                kernel_args: vec!["cpus=2".into()],
                config: None,
                guest: GuestOverride::default(),
            })
        );
        assert!(p("run --cpus 0").is_err());
        assert!(p("run --cpus 65").is_err());
        assert!(p("run --cpus two").is_err());
        assert!(p("run --cpus").is_err());
    }

    #[test]
    fn run_config_and_quick_form() {
        let Cmd::Run(opts) = p("run --config examples/two-guests.toml").unwrap() else {
            panic!("not run");
        };
        assert_eq!(opts.config, Some(PathBuf::from("examples/two-guests.toml")));
        assert!(opts.guest.is_empty());
        let args: Vec<String> = [
            "run",
            "--kernel",
            "k/bzImage",
            "--initrd=i.cpio",
            "--append",
            "console=ttyS0 quiet",
            "--memory",
            "512M",
            "--vcpus",
            "1",
        ]
        .map(String::from)
        .to_vec();
        let Cmd::Run(mut opts) = parse(&args).unwrap() else {
            panic!("not run");
        };
        assert_eq!(
            opts.guest,
            GuestOverride {
                kernel: Some("k/bzImage".into()),
                initrd: Some("i.cpio".into()),
                append: Some("console=ttyS0 quiet".into()),
                memory: Some(Size(512 << 20)),
                vcpus: Some(1),
            }
        );
        opts.absolutize(Path::new("/home/u"));
        assert_eq!(opts.guest.kernel.as_deref(), Some("/home/u/k/bzImage"));
        assert_eq!(opts.guest.initrd.as_deref(), Some("/home/u/i.cpio"));
        assert!(p("run --memory lots").is_err());
        assert!(p("run --memory 512").is_err());
        assert!(p("run --vcpus two").is_err());
        assert!(p("run --kernel").is_err());
        assert_eq!(p("run --help").unwrap(), Cmd::Help);
        assert_eq!(p("run --config x -h").unwrap(), Cmd::Help);
        assert!(USAGE.contains("--config FILE") && USAGE.contains("--kernel PATH"));
    }

    #[test]
    fn test_options() {
        assert_eq!(
            p("test").unwrap(),
            Cmd::Test(TestOpts {
                emu: None,
                filter: None,
                host: true,
            })
        );
        assert_eq!(
            p("test --emu qemu --filter boot --no-host").unwrap(),
            Cmd::Test(TestOpts {
                emu: Some(Emulator::Qemu),
                filter: Some("boot".into()),
                host: false,
            })
        );
    }

    #[test]
    fn bench_names_a_benchmark() {
        assert_eq!(
            p("bench ipc").unwrap(),
            Cmd::Bench(BenchOpts {
                benchmark: Benchmark::Ipc,
                emu: None,
                runs: 1,
            })
        );
        assert_eq!(
            p("bench ipc --emu bochs").unwrap(),
            Cmd::Bench(BenchOpts {
                benchmark: Benchmark::Ipc,
                emu: Some(Emulator::Bochs),
                runs: 1,
            })
        );
        assert_eq!(
            p("bench linux --runs 3 --emu qemu").unwrap(),
            Cmd::Bench(BenchOpts {
                benchmark: Benchmark::Linux,
                emu: Some(Emulator::Qemu),
                runs: 3,
            })
        );
        assert!(p("bench linux --runs 0").is_err());
        assert!(p("bench linux --runs x").is_err());
        assert!(p("bench ipc --runs 2").is_err());
        assert!(p("bench --runs 2").is_err());
        assert!(p("bench disk").is_err());
        assert!(p("bench ipc extra").is_err());
    }

    #[test]
    fn bench_alone_runs_everything() {
        let all = |emu| {
            Cmd::Bench(BenchOpts {
                benchmark: Benchmark::All,
                emu,
                runs: 1,
            })
        };
        assert_eq!(p("bench").unwrap(), all(None));
        assert_eq!(p("bench all").unwrap(), all(None));
        assert_eq!(p("bench --emu qemu").unwrap(), all(Some(Emulator::Qemu)));
        assert_eq!(
            p("bench all --emu=bochs").unwrap(),
            all(Some(Emulator::Bochs))
        );
        assert!(p("bench all ipc").is_err());
        assert!(p("bench all --emu").is_err());
    }

    #[test]
    fn linux_subcommands() {
        assert_eq!(p("linux build").unwrap(), Cmd::Linux(LinuxOpts::Build));
        assert_eq!(
            p("linux direct").unwrap(),
            Cmd::Linux(LinuxOpts::Direct {
                emu: Emulator::Qemu,
                virtio: false,
                kernel_args: vec![],
            })
        );
        assert_eq!(
            p("linux direct --emu bochs --virtio -- quiet").unwrap(),
            Cmd::Linux(LinuxOpts::Direct {
                emu: Emulator::Bochs,
                virtio: true,
                kernel_args: vec!["quiet".into()],
            })
        );
        assert!(p("linux").is_err());
        assert!(p("linux boot").is_err());
        assert!(p("linux build --emu qemu").is_err());
    }

    #[test]
    fn fuzz_options() {
        let fuzz = |target: Option<&str>, seconds| {
            Cmd::Fuzz(FuzzOpts {
                target: target.map(String::from),
                seconds,
            })
        };
        assert_eq!(p("fuzz").unwrap(), fuzz(None, 60));
        assert_eq!(p("fuzz uart").unwrap(), fuzz(Some("uart"), 60));
        assert_eq!(
            p("fuzz --seconds 300 lapic").unwrap(),
            fuzz(Some("lapic"), 300)
        );
        assert_eq!(p("fuzz --seconds=5").unwrap(), fuzz(None, 5));
        assert!(p("fuzz --seconds 0").is_err());
        assert!(p("fuzz --seconds x").is_err());
        assert!(p("fuzz uart pic").is_err());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(p("frobnicate").is_err());
        assert!(p("test --emu").is_err());
        assert!(p("test --emu vmware").is_err());
        assert!(p("test --filter --no-host").is_err());
        assert!(p("test extra").is_err());
        assert!(p("setup -- x").is_err());
    }
}

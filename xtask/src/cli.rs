//! The command line, read with clap (derive) into a [`Cmd`].

use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::config::{DiskOption, GuestOverride, Size};
use crate::emu::Emulator;
use crate::{Error, Result};

/// The most CPUs `run --cpus` gives a machine (the kernel keeps per-CPU
/// data for 64).
const MAX_CPUS: u32 = 64;

#[derive(Debug, PartialEq, Eq)]
pub enum Cmd {
    /// Print this help text.
    Help(String),
    Setup,
    Build,
    Run(RunOpts),
    Test(TestOpts),
    Bench(BenchOpts),
    Linux(LinuxOpts),
    Debian(DebianOpts),
    Demo(DemoOpts),
    Fuzz(FuzzOpts),
    Soak(SoakOpts),
}

/// `cargo xtask soak`.
#[derive(Debug, PartialEq, Eq)]
pub struct SoakOpts {
    pub emu: Emulator,
    /// Minutes of guest time under load.
    pub minutes: u64,
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

/// `cargo xtask debian`.
#[derive(Debug, PartialEq, Eq)]
pub enum DebianOpts {
    Build,
    Direct {
        memory_mib: u32,
    },
    Time {
        kernel_args: Vec<String>,
        icount: bool,
    },
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Benchmark {
    /// Every round trip, native and from the Linux guest, in one table
    /// (`bench` alone or `bench all`).
    All,
    Ipc,
    Exits,
    /// Slow: boots Linux twice per emulator and run.
    Linux,
    /// Many CPUs: IPC throughput with one pair per CPU on 1, 2 and 4 CPUs,
    /// and the cross-CPU wake-up (QEMU multi-threaded TCG, wall clock).
    Smp,
    /// Disk and TCP throughput and disk latency of the Linux guest under
    /// Moat against the same guest booted by QEMU itself (QEMU only).
    Io,
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
    /// `--kvm` given: KVM or nothing; if the host's KVM cannot run Moat,
    /// say what is missing and exit with `run::KVM_UNUSABLE`.
    pub require_kvm: bool,
    /// The machine's CPUs (`--cpus`), if not the configuration's.
    pub cpus: Option<u32>,
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
        let disk = self.guest.disk.as_mut().map(|d| &mut d.file);
        let files = [self.guest.kernel.as_mut(), self.guest.initrd.as_mut(), disk];
        for path in files.into_iter().flatten() {
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

/// The command line as clap reads it; [`parse`] turns it into a [`Cmd`].
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    about = "Set up, build, run, test and measure Moat",
    disable_help_subcommand = true,
    after_help = "`cargo xtask help` or `cargo xtask COMMAND --help` show this; \
                  docs/configuration.md describes the system configuration files."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install missing host tools (apt packages, rustup targets)
    Setup,
    /// Build the kernel and user tasks and assemble target/image/
    ///
    /// Always release; the image (kernel, modules, qemu.args, moat.iso)
    /// boots examples/default.toml.
    Build {
        /// Accepted for habit: the image is always built in release
        #[arg(long)]
        release: bool,
    },
    /// Setup, build, then boot a system with the serial console here
    ///
    /// The system is examples/default.toml (the pinned Linux guest beside the
    /// native modem and echo) unless --config names another.
    #[command(after_help = "\
The quick form, for one guest, as QEMU users type it:
  cargo xtask run --kernel PATH [--initrd PATH] [--append TEXT] [--memory SIZE] [--vcpus N]
                  [--disk FILE[:SIZE]] [--hostfwd HOST_PORT:GUEST_PORT]...
replaces the values of the guest that owns the console in the configuration
(examples/default.toml unless --config); options not given keep its values.
System configurations, field by field: docs/configuration.md.")]
    Run {
        /// Emulator
        #[arg(long, value_name = "qemu|bochs", value_parser = emulator, default_value = "qemu")]
        emu: Emulator,
        /// QEMU with KVM and -cpu host, or stop (exit 77) saying what the
        /// host lacks: /dev/kvm, vmx/svm, kvm_intel/kvm_amd with nested=1
        /// (default: KVM when the host has all that; otherwise TCG, -cpu max)
        #[arg(long)]
        kvm: bool,
        /// Give the machine N CPUs; the kernel starts them all (the kernel
        /// argument cpus=N limits that)
        /// (default: the configuration's `[machine] cpus`, 1 unless it says)
        #[arg(long, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CPUS)))]
        cpus: Option<u32>,
        /// Boot the system FILE describes (examples/: default.toml, two-guests.toml)
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Quick form: the console guest's kernel (a bzImage)
        #[arg(long, value_name = "PATH")]
        kernel: Option<String>,
        /// Quick form: its initramfs
        #[arg(long, value_name = "PATH")]
        initrd: Option<String>,
        /// Quick form: its kernel command line
        #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
        append: Option<String>,
        /// Quick form: its RAM, e.g. 512M or 1G
        #[arg(long, value_name = "SIZE", value_parser = size)]
        memory: Option<Size>,
        /// Quick form: its vCPUs (default: the file's, or --cpus N)
        #[arg(long, value_name = "N")]
        vcpus: Option<u32>,
        /// Quick form: a host file (raw) as its persistent virtio disk,
        /// through the blk driver and block service (QEMU only); created
        /// with SIZE (e.g. 64M) if missing
        #[arg(long, value_name = "FILE[:SIZE]", value_parser = DiskOption::parse)]
        disk: Option<DiskOption>,
        /// Quick form: forward TCP on the host's 127.0.0.1:HOST_PORT to the
        /// guest's GUEST_PORT (10.0.2.15), through the net driver and
        /// virtual switch on QEMU's user networking (QEMU only); may be
        /// given several times
        #[arg(long, value_name = "HOST_PORT:GUEST_PORT", value_parser = crate::net::parse_forward)]
        hostfwd: Vec<crate::net::Forward>,
        /// Words added to Moat's kernel command line
        #[arg(last = true, value_name = "KERNEL ARGS")]
        kernel_args: Vec<String>,
    },
    /// Setup, host unit tests, build, system tests on QEMU and Bochs
    Test {
        /// Run the system tests on this emulator only
        #[arg(long, value_name = "qemu|bochs", value_parser = emulator)]
        emu: Option<Emulator>,
        /// Only system tests whose name contains NAME (an opt-in test: its whole name)
        #[arg(long, value_name = "NAME")]
        filter: Option<String>,
        /// Skip the host unit tests
        #[arg(long)]
        no_host: bool,
    },
    /// Measure round trips (SLOW: about 5 minutes for all)
    ///
    /// In cycles (QEMU TCG) and instructions (QEMU -icount, Bochs): `all` (SLOW, ~5 minutes: every round trip in one
    /// table, target/bench/all.json and bench.svg), `ipc` (IPC round trips,
    /// ipc.json), `exits` (a CPUID exit, the guest IPC hypercall, a native
    /// call; exits.json), `linux` (SLOW: the Linux guest booted by the
    /// emulator itself and under Moat, wall time and uptime to /init;
    /// linux.json), `smp` (many CPUs; smp.json), `io` (SLOW, QEMU: disk
    /// and TCP of the Linux guest under Moat and booted directly; io.json)
    Bench {
        #[arg(value_enum, default_value = "all")]
        benchmark: Benchmark,
        #[arg(long, value_name = "qemu|bochs", value_parser = emulator)]
        emu: Option<Emulator>,
        /// Boots of each kind (bench linux only; default 1)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        runs: Option<u32>,
    },
    /// The Linux test guest
    Linux {
        #[command(subcommand)]
        command: LinuxCommand,
    },
    /// The Debian example's system (examples/debian.toml)
    Debian {
        #[command(subcommand)]
        command: DebianCommand,
    },
    /// Demonstrations
    Demo {
        #[command(subcommand)]
        command: DemoCommand,
    },
    /// Coverage-guided fuzzing (cargo-fuzz, libFuzzer)
    ///
    /// Of the device models, virtio, the VMM's emulator and exit handler,
    /// firmware loaders, manifest parser and ABI (docs/fuzzing.md).
    Fuzz {
        /// A file of fuzz/fuzz_targets/; all of them in turn if none
        target: Option<String>,
        /// Seconds per target
        #[arg(long, value_name = "N", default_value_t = crate::fuzz::DEFAULT_SECONDS,
              value_parser = clap::value_parser!(u64).range(1..))]
        seconds: u64,
    },
    /// The soak (SLOW, opt-in): Linux under load beside the modem for a while
    ///
    /// Linux under CPU, memory, disk, console and modem-port load beside the
    /// native 1 ms modem for N minutes of guest time (QEMU with -icount:
    /// deterministic guest time); reports missed frames, worst jitter,
    /// stalls, VM exits and the memory at the end; table and
    /// target/bench/soak.json (docs/benchmarks.md).
    Soak {
        #[arg(long, value_name = "qemu|bochs", value_parser = emulator, default_value = "qemu")]
        emu: Emulator,
        /// Minutes of guest time under load
        #[arg(long, value_name = "N", default_value_t = crate::soak::DEFAULT_MINUTES,
              value_parser = clap::value_parser!(u64).range(1..=crate::soak::MAX_MINUTES))]
        minutes: u64,
    },
    /// Print this help (`cargo xtask COMMAND --help`: a command's own)
    Help,
}

#[derive(Subcommand, Debug)]
enum LinuxCommand {
    /// Fetch and build the pinned guest (cached)
    ///
    /// The Debian kernel and busybox of guests/linux/, built into
    /// target/linux/{bzImage,initramfs.cpio}.
    Build,
    /// Boot that guest in the emulator itself, without Moat
    ///
    /// Timed from the emulator's start to /init.
    Direct {
        #[arg(long, value_name = "qemu|bochs", value_parser = emulator, default_value = "qemu")]
        emu: Emulator,
        /// QEMU: with QEMU's virtio devices
        #[arg(long)]
        virtio: bool,
        /// Words added to the guest kernel's command line
        #[arg(last = true, value_name = "KERNEL ARGS")]
        kernel_args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum DebianCommand {
    /// Build the Debian bookworm root disk and its initrd (cached)
    ///
    /// mmdebstrap (root) makes the root file system of guests/debian/recipe.toml,
    /// mke2fs -d the ext4 image target/debian/rootfs.ext4; the initrd
    /// target/debian/initrd.cpio loads the pinned kernel's virtio and ext4
    /// modules. docs/configuration.md, "The Debian example".
    Build,
    /// Boot it in QEMU itself (TCG), without Moat, timed to the login prompt
    ///
    /// The same kernel, initrd and command line as examples/debian.toml, on
    /// a fresh copy of the image as QEMU's virtio-blk disk.
    Direct {
        /// The guest's RAM in MiB (the example's: 512)
        #[arg(long, value_name = "MIB", default_value_t = 512,
              value_parser = clap::value_parser!(u32).range(64..=3072))]
        memory: u32,
    },
    /// Time both boots to the login prompt: under Moat and by QEMU alone
    ///
    /// One run, QEMU TCG each, the same kernel, initrd and image (fresh
    /// copies); prints both times and their ratio (docs/benchmarks.md).
    Time {
        /// Both boots with QEMU's -icount shift=0: guest time counts
        /// instructions, whatever else the host runs
        #[arg(long)]
        icount: bool,
        /// Words added to both boots' guest command line (e.g. `quiet`)
        #[arg(last = true, value_name = "GUEST ARGS")]
        kernel_args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum DemoCommand {
    /// The modem / application-processor demo
    ///
    /// QEMU by default; Bochs takes ~5 minutes. Linux beside the native
    /// modem, steps a-e with a verdict each.
    Modem {
        #[arg(long, value_name = "qemu|bochs", value_parser = emulator)]
        emu: Option<Emulator>,
    },
}

fn emulator(name: &str) -> Result<Emulator, String> {
    Emulator::from_name(name).ok_or_else(|| format!("expected qemu or bochs, not `{name}`"))
}

fn size(text: &str) -> Result<Size, String> {
    Size::parse(text)
}

/// The help text of the whole command line.
pub fn usage() -> String {
    Cli::command().render_help().to_string()
}

/// Reads the arguments after `cargo xtask`. `--help` anywhere is
/// [`Cmd::Help`] with the help of the command it follows.
pub fn parse(args: &[String]) -> Result<Cmd> {
    let argv = std::iter::once("cargo xtask").chain(args.iter().map(String::as_str));
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) if e.kind() == ErrorKind::DisplayHelp => {
            return Ok(Cmd::Help(e.render().to_string()))
        }
        Err(e) => return Err(Error::Usage(e.render().to_string().trim_end().to_string())),
    };
    Ok(match cli.command {
        None | Some(Command::Help) => Cmd::Help(usage()),
        Some(Command::Setup) => Cmd::Setup,
        Some(Command::Build { release: _ }) => Cmd::Build,
        Some(Command::Run {
            emu,
            kvm,
            cpus,
            config,
            kernel,
            initrd,
            append,
            memory,
            vcpus,
            disk,
            hostfwd,
            kernel_args,
        }) => Cmd::Run(RunOpts {
            emu,
            require_kvm: kvm,
            cpus,
            kernel_args,
            config,
            guest: GuestOverride {
                kernel,
                initrd,
                append,
                memory,
                vcpus,
                disk,
                cpus,
                hostfwd,
            },
        }),
        Some(Command::Test {
            emu,
            filter,
            no_host,
        }) => Cmd::Test(TestOpts {
            emu,
            filter,
            host: !no_host,
        }),
        Some(Command::Bench {
            benchmark,
            emu,
            runs,
        }) => {
            if runs.is_some() && benchmark != Benchmark::Linux {
                return Err(Error::Usage("--runs is for bench linux only".into()));
            }
            Cmd::Bench(BenchOpts {
                benchmark,
                emu,
                runs: runs.unwrap_or(1),
            })
        }
        Some(Command::Linux {
            command: LinuxCommand::Build,
        }) => Cmd::Linux(LinuxOpts::Build),
        Some(Command::Linux {
            command:
                LinuxCommand::Direct {
                    emu,
                    virtio,
                    kernel_args,
                },
        }) => Cmd::Linux(LinuxOpts::Direct {
            emu,
            virtio,
            kernel_args,
        }),
        Some(Command::Debian {
            command: DebianCommand::Build,
        }) => Cmd::Debian(DebianOpts::Build),
        Some(Command::Debian {
            command: DebianCommand::Direct { memory },
        }) => Cmd::Debian(DebianOpts::Direct { memory_mib: memory }),
        Some(Command::Debian {
            command:
                DebianCommand::Time {
                    kernel_args,
                    icount,
                },
        }) => Cmd::Debian(DebianOpts::Time {
            kernel_args,
            icount,
        }),
        Some(Command::Demo {
            command: DemoCommand::Modem { emu },
        }) => Cmd::Demo(DemoOpts { emu }),
        Some(Command::Fuzz { target, seconds }) => Cmd::Fuzz(FuzzOpts { target, seconds }),
        Some(Command::Soak { emu, minutes }) => Cmd::Soak(SoakOpts { emu, minutes }),
    })
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
        for line in ["", "--help", "help", "-h"] {
            let Cmd::Help(text) = p(line).unwrap() else {
                panic!("{line}: not help");
            };
            assert!(text.contains("Usage: cargo xtask [COMMAND]"), "{text}");
            for command in [
                "setup", "build", "run", "test", "bench", "linux", "demo", "fuzz",
            ] {
                assert!(
                    text.contains(&format!("  {command} ")),
                    "{command} in {text}"
                );
            }
        }
    }

    #[test]
    fn debian_commands() {
        assert_eq!(p("debian build").unwrap(), Cmd::Debian(DebianOpts::Build));
        assert_eq!(
            p("debian direct").unwrap(),
            Cmd::Debian(DebianOpts::Direct { memory_mib: 512 })
        );
        assert!(p("debian direct --memory 32").is_err());
        assert_eq!(
            p("debian time --icount -- quiet loglevel=3").unwrap(),
            Cmd::Debian(DebianOpts::Time {
                kernel_args: vec!["quiet".into(), "loglevel=3".into()],
                icount: true,
            })
        );
        assert!(p("debian").is_err());
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
                require_kvm: false,
                cpus: None,
                kernel_args: vec![],
                config: None,
                guest: GuestOverride::default(),
            })
        );
        assert_eq!(
            p("run --emu=bochs --kvm -- log=debug x").unwrap(),
            Cmd::Run(RunOpts {
                emu: Emulator::Bochs,
                require_kvm: true,
                cpus: None,
                kernel_args: vec!["log=debug".into(), "x".into()],
                config: None,
                guest: GuestOverride::default(),
            })
        );
        assert_eq!(
            p("run --cpus 4 -- cpus=2").unwrap(),
            Cmd::Run(RunOpts {
                emu: Emulator::Qemu,
                require_kvm: false,
                cpus: Some(4),
                kernel_args: vec!["cpus=2".into()],
                config: None,
                guest: GuestOverride {
                    cpus: Some(4),
                    ..GuestOverride::default()
                },
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
            "--disk",
            "d.img:64M",
            "--hostfwd",
            "8080:80",
            "--hostfwd=2222:22",
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
                disk: Some(DiskOption {
                    file: "d.img".into(),
                    size: Some(Size(64 << 20)),
                }),
                cpus: None,
                hostfwd: vec![
                    crate::net::Forward {
                        host: 8080,
                        guest: 80
                    },
                    crate::net::Forward {
                        host: 2222,
                        guest: 22
                    }
                ],
            }
        );
        let bad = p("run --hostfwd 8080").unwrap_err().to_string();
        assert!(bad.contains("expected HOST_PORT:GUEST_PORT"), "{bad}");
        opts.absolutize(Path::new("/home/u"));
        assert_eq!(opts.guest.kernel.as_deref(), Some("/home/u/k/bzImage"));
        assert_eq!(opts.guest.disk.unwrap().file, "/home/u/d.img");
        assert_eq!(opts.guest.initrd.as_deref(), Some("/home/u/i.cpio"));
        assert!(p("run --memory lots").is_err());
        assert!(p("run --memory 512").is_err());
        assert!(p("run --vcpus two").is_err());
        assert!(p("run --kernel").is_err());
        assert!(p("run --disk d.img:64").is_err());
        let Cmd::Help(help) = p("run --help").unwrap() else {
            panic!("run --help is help");
        };
        for option in [
            "--config <FILE>",
            "--kernel <PATH>",
            "--initrd <PATH>",
            "--append <TEXT>",
            "--memory <SIZE>",
            "--vcpus <N>",
            "--disk <FILE[:SIZE]>",
            "--cpus <N>",
            "--emu <qemu|bochs>",
            "--kvm",
            "The quick form",
            "docs/configuration.md",
        ] {
            assert!(help.contains(option), "{option} not in\n{help}");
        }
        assert!(matches!(p("run --config x -h").unwrap(), Cmd::Help(_)));
        let Err(Error::Usage(e)) = p("run --memory 512") else {
            panic!("a size without unit is refused");
        };
        assert!(e.contains("\"512\" has no unit"), "{e}");
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

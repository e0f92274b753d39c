//! `cargo xtask run`: setup, build, and boot a system configuration
//! (`examples/default.toml` unless `--config`; the quick form's options
//! change its console guest) with the serial console on this terminal.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::RunOpts;
use crate::emu::{self, Accel, BochsFiles, Emulator, Exit, Serial};
use crate::image::{self, DEBUG_EXIT_ARG, IMAGE_DIR};
use crate::util::{self, describe};
use crate::{build, config, kvm, setup, Context, Result};

/// `cargo xtask run --kvm`'s exit status when the host's KVM cannot run
/// Moat (the "skipped" status of automake's test harness; ci/ uses it).
pub const KVM_UNUSABLE: u8 = 77;

/// `cargo xtask run`: setup, build, and boot the configuration here.
pub fn run(opts: &RunOpts) -> Result<ExitCode> {
    let config = opts
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG));
    // A bad configuration, or a KVM that cannot run Moat when `--kvm`
    // asks for it, is reported before setup and the long build.
    let plan = config::load(&config, &opts.guest, &config::file_size)?;
    if let Some(disk) = &plan.disk {
        if opts.emu == Emulator::Bochs {
            return Err(crate::Error::Other(format!(
                "guest '{}': a persistent disk ({}) needs QEMU: Bochs has no virtio-blk \
                 device for the blk driver; run with --emu qemu, or give the guest \
                 `test-disk = true` (a RAM disk) instead",
                disk.guest,
                disk.path.display()
            )));
        }
        // The pinned Debian disk is copied from its image once that is built.
        if disk.template.is_none() {
            disk.prepare().map_err(crate::Error::Other)?;
        }
    }
    if let Some(net) = &plan.net {
        if opts.emu == Emulator::Bochs {
            return Err(crate::Error::Other(format!(
                "guest '{}': `hostfwd` needs QEMU: Bochs has no virtio-net device for the net \
                 driver (its NICs are the NE2000 and E1000); run with --emu qemu",
                net.ports[0].guest
            )));
        }
        net.prepare().map_err(crate::Error::Other)?;
    }
    let kvm_host = kvm::KvmHost::read();
    if opts.require_kvm {
        if let Err(why) = kvm::verdict(&kvm_host) {
            eprintln!("xtask: --kvm: {why}. Without --kvm, QEMU emulates AMD SVM (TCG).");
            return Ok(ExitCode::from(KVM_UNUSABLE));
        }
    }
    setup::run()?;
    let plan = if plan.uses_pinned_linux || plan.uses_pinned_debian {
        config::load_pinned_aware(&config, &opts.guest)?
    } else {
        plan
    };
    if let Some(disk) = plan.disk.as_ref().filter(|d| d.template.is_some()) {
        disk.prepare().map_err(crate::Error::Other)?;
    }
    println!(
        "run: {}: {} module(s), pool {} MiB, machine {} MiB",
        config.display(),
        plan.modules.len(),
        plan.pool_mib,
        plan.memory_mib
    );
    let artifacts = build::build_all()?;
    let image = image::assemble_plan(&artifacts, &plan)?;
    let mut boot = image.boot.clone();
    boot.kernel_args.extend(opts.kernel_args.iter().cloned());
    boot.cpus = opts.cpus.unwrap_or(plan.cpus);
    debug_assert!(boot.kernel_args.iter().any(|a| a == DEBUG_EXIT_ARG));

    let mut bochs_log = None;
    let outcome = match opts.emu {
        Emulator::Qemu => {
            let accel = match kvm::verdict(&kvm_host) {
                Ok(module) => {
                    println!("run: KVM with nesting ({module}): -accel kvm -cpu host");
                    Accel::Kvm
                }
                Err(why) => {
                    println!("run: QEMU TCG (-cpu max, AMD SVM): {why}");
                    Accel::Tcg
                }
            };
            if let Some(disk) = &plan.disk {
                println!(
                    "run: guest '{}': its virtio disk is {} ({} MiB) through the block service",
                    disk.guest,
                    disk.path.display(),
                    disk.size >> 20
                );
            }
            for port in plan.net.iter().flat_map(|n| &n.ports) {
                println!(
                    "run: guest '{}': switch port {} (MAC {}), expected at {}",
                    port.guest,
                    port.index + 1,
                    port.mac,
                    port.address
                );
                for f in &port.forwards {
                    println!(
                        "run: guest '{}': 127.0.0.1:{} on the host reaches its port {} \
                         ({}) through the virtual switch",
                        port.guest, f.host, f.guest, port.address
                    );
                }
            }
            let mut cmd = emu::qemu_command(&emu::qemu_args(&boot, accel, Serial::Stdio)?);
            println!("run: {}", describe(&cmd));
            let child = cmd
                .spawn()
                .context(|| format!("cannot start `{}`", describe(&cmd)))?;
            emu::supervise(child, None, None, None)?
        }
        Emulator::Bochs => {
            let dir = Path::new(IMAGE_DIR);
            let iso = if opts.kernel_args.is_empty() {
                image.iso.clone()
            } else {
                let iso = dir.join("run.iso");
                boot.make_iso(&dir.join("run-iso"), &iso)?;
                iso
            };
            let files = BochsFiles {
                iso,
                serial: dir.join("bochs-serial.log"),
                log: dir.join("bochs.log"),
                bochsrc: dir.join("bochsrc"),
                debugger_rc: dir.join("bochs.rc"),
                memory_mib: boot.memory_mib,
                cpus: boot.cpus,
            };
            emu::prepare_bochs(&files)?;
            let output = dir.join("bochs.out");
            println!(
                "run: {} (serial below; Bochs' output in {}, its log in {})",
                describe(&emu::bochs_command(&files)),
                output.display(),
                files.log.display()
            );
            let outcome = emu::run_bochs(&files, None, true, None, &output)?;
            bochs_log = Some(files.log);
            outcome
        }
    };
    let Exit::Status(status) = outcome.exit else {
        unreachable!("neither a timeout nor a decision was asked for");
    };
    let mut exit = opts.emu.describe_exit(status);
    if let Some(reason) = bochs_log.and_then(|log| emu::bochs_stop_reason(&log)) {
        exit = format!("{exit}: {reason}");
    }
    println!(
        "\nrun: {} exited ({exit}) after {}",
        opts.emu.name(),
        util::secs(outcome.elapsed)
    );
    Ok(ExitCode::from(opts.emu.run_exit_code(status)))
}

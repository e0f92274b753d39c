//! The Debian example (`examples/debian.toml`, `guests/debian/`): a small
//! Debian bookworm root file system with systemd, built from Debian's
//! packages by mmdebstrap into an ext4 image (`mke2fs -d`, no loop mount),
//! and an initrd that mounts it from the guest's virtio disk. The kernel
//! is the Linux test guest's (`linux.rs`).
//!
//! Everything lives under [`DEBIAN_DIR`]: the pristine image
//! `rootfs.ext4`, rebuilt only when its inputs change; `disk.img`, the
//! guest's persistent disk (`disk = "pinned:debian.img"`), a copy of it
//! made when missing and kept across runs; `initrd.cpio`; and
//! `packages.txt`, every package and version the image holds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use crate::config::Size;
use crate::emu::{self, Exit};
use crate::linux::{self, Cpio, SerialClock};
use crate::util::{self, describe};
use crate::{setup, Context, Error, Result};

pub const RECIPE: &str = "guests/debian/recipe.toml";
pub const INIT: &str = "guests/debian/init";
pub const CUSTOMIZE: &str = "guests/debian/customize.sh";
pub const DEBIAN_DIR: &str = "target/debian";
/// The pristine image, as built.
pub const ROOTFS: &str = "rootfs.ext4";
/// The guest's persistent disk, a copy of [`ROOTFS`] made when missing.
pub const DISK: &str = "disk.img";
pub const INITRD: &str = "initrd.cpio";
/// What the image holds: `dpkg-query -W` in it.
pub const PACKAGES: &str = "packages.txt";

/// What the guest prints once systemd has started the serial console's
/// getty: the login prompt (`HOSTNAME login: `).
pub const LOGIN_PROMPT: &str = " login: ";

/// Bump when the build changes without an input changing.
const LAYOUT: u32 = 1;
/// Where the initrd's /init finds the modules to load, in order.
const MODULE_LIST: &str = "etc/moat-modules";

/// `guests/debian/recipe.toml`: every key required, no other key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub suite: String,
    pub variant: String,
    /// `name=version`, each.
    pub packages: Vec<String>,
    pub image_size: String,
    pub user: String,
    pub password: String,
    pub hostname: String,
    /// Module names separated by spaces.
    pub initrd_modules: String,
}

impl Recipe {
    pub fn parse(text: &str) -> Result<Recipe, String> {
        let recipe: Recipe = toml::from_str(text).map_err(|e| e.to_string())?;
        for pkg in &recipe.packages {
            match pkg.split_once('=') {
                Some((name, version)) if !name.is_empty() && !version.is_empty() => {}
                _ => {
                    return Err(format!(
                        "packages: \"{pkg}\" is not pinned: write NAME=VERSION \
                         (`apt-cache policy NAME` shows the versions)"
                    ))
                }
            }
        }
        let size = recipe.size()?;
        if size < 256 << 20 {
            return Err(format!(
                "image_size: \"{}\" is too small for a Debian system with systemd \
                 (at least 256M)",
                recipe.image_size
            ));
        }
        let word =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !word(&recipe.user) || !word(&recipe.hostname) || recipe.password.contains(['\n', ':']) {
            return Err(
                "user and hostname are words of letters, digits and `-`; the password \
                 one line without `:`"
                    .into(),
            );
        }
        if recipe.initrd_modules.split_whitespace().next().is_none() {
            return Err("initrd_modules: at least the disk's and the file system's".into());
        }
        Ok(recipe)
    }

    pub fn size(&self) -> Result<u64, String> {
        Size::parse(&self.image_size)
            .map(|s| s.0)
            .map_err(|e| format!("image_size: {e}"))
    }

    fn modules(&self) -> Vec<String> {
        self.initrd_modules
            .split_whitespace()
            .map(String::from)
            .collect()
    }

    /// The inputs of the root file system image.
    fn rootfs_key(&self, customize: &[u8]) -> String {
        format!(
            "layout {LAYOUT}\nsuite {}\nvariant {}\npackages {}\nsize {}\nuser {}\npassword {}\n\
             hostname {}\ncustomize fnv1a64:{:016x}\n",
            self.suite,
            self.variant,
            self.packages.join(" "),
            self.image_size,
            self.user,
            self.password,
            self.hostname,
            linux::fnv1a64(customize)
        )
    }

    /// The inputs of the initrd (the kernel's recipe among them: its
    /// modules must match it).
    fn initrd_key(&self, init: &[u8], kernel_recipe: &[u8]) -> String {
        format!(
            "layout {LAYOUT}\nmodules {}\ninit fnv1a64:{:016x}\nkernel fnv1a64:{:016x}\n",
            self.modules().join(" "),
            linux::fnv1a64(init),
            linux::fnv1a64(kernel_recipe)
        )
    }

    /// The package names mmdebstrap includes, versions and all.
    fn include(&self) -> String {
        self.packages.join(",")
    }
}

fn load_recipe() -> Result<Recipe> {
    let text = fs::read_to_string(RECIPE).context(|| format!("cannot read {RECIPE}"))?;
    Recipe::parse(&text).map_err(|e| Error::Other(format!("{RECIPE}: {e}")))
}

/// The built Debian system.
#[derive(Clone, Debug)]
pub struct Built {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The pristine image.
    pub rootfs: PathBuf,
}

/// Builds what is not cached: the pinned kernel (`linux::build`), the
/// initrd and the root file system image.
pub fn build() -> Result<Built> {
    let recipe = load_recipe()?;
    let guest = linux::build()?;
    let root = Path::new(DEBIAN_DIR);
    fs::create_dir_all(root).context(|| format!("cannot create {}", root.display()))?;
    let built = Built {
        kernel: guest.kernel,
        initrd: root.join(INITRD),
        rootfs: root.join(ROOTFS),
    };
    build_initrd(&recipe, &built.initrd)?;
    build_rootfs(&recipe, &built.rootfs)?;
    Ok(built)
}

fn cached(key_file: &Path, key: &str, product: &Path) -> bool {
    fs::read_to_string(key_file).is_ok_and(|k| k == key) && product.is_file()
}

fn build_initrd(recipe: &Recipe, initrd: &Path) -> Result<()> {
    let init = fs::read(INIT).context(|| format!("cannot read {INIT}"))?;
    let kernel_recipe =
        fs::read(linux::RECIPE).context(|| format!("cannot read {}", linux::RECIPE))?;
    let key = recipe.initrd_key(&init, &kernel_recipe);
    let key_file = initrd.with_extension("key");
    if cached(&key_file, &key, initrd) {
        return Ok(());
    }
    emu::remove_stale(&key_file)?;
    let linux::InitrdParts {
        release,
        modules,
        busybox,
    } = linux::pinned_modules_and_busybox(&recipe.modules())?;
    println!(
        "debian: initrd for {release}, modules in load order: {}",
        modules
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let archive = initrd_archive(&busybox, &init, &modules)?;
    linux::write_atomically(initrd, &archive)?;
    fs::write(&key_file, key).context(|| format!("cannot write {}", key_file.display()))?;
    println!("debian: built {}", initrd.display());
    Ok(())
}

/// The initrd: busybox, /init, the modules and their load order.
fn initrd_archive(busybox: &[u8], init: &[u8], modules: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut cpio = Cpio::new();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "root",
        "etc",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir)?;
    }
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.char_dev("dev/null", 0o666, 1, 3)?;
    cpio.file("bin/busybox", 0o755, busybox)?;
    cpio.symlink("bin/sh", "busybox")?;
    cpio.file("init", 0o755, init)?;
    let mut list = String::new();
    for (name, ko) in modules {
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, ko)?;
        list.push_str(name);
        list.push('\n');
    }
    cpio.file(MODULE_LIST, 0o644, list.as_bytes())?;
    Ok(cpio.finish())
}

/// The mmdebstrap command that makes the root file system in `tree`.
fn mmdebstrap_command(recipe: &Recipe, tree: &Path, customize: &Path) -> Command {
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--mode=root")
        .arg(format!("--variant={}", recipe.variant))
        .arg(format!("--include={}", recipe.include()))
        .arg(format!(
            "--customize-hook=sh {} \"$1\"",
            util::shell_quote(&customize.display().to_string())
        ))
        .arg(&recipe.suite)
        .arg(tree)
        .env("MOAT_USER", &recipe.user)
        .env("MOAT_PASSWORD", &recipe.password)
        .env("MOAT_HOSTNAME", &recipe.hostname);
    cmd
}

fn mke2fs_command(recipe: &Recipe, tree: &Path, image: &Path) -> Result<Command> {
    let size = recipe.size().map_err(Error::Other)?;
    let mut cmd = Command::new("mke2fs");
    cmd.args(["-q", "-F", "-t", "ext4", "-L"])
        .arg(&recipe.hostname)
        .arg("-d")
        .arg(tree)
        .arg(image)
        .arg(format!("{}k", size >> 10));
    Ok(cmd)
}

fn build_rootfs(recipe: &Recipe, image: &Path) -> Result<()> {
    let customize = fs::read(CUSTOMIZE).context(|| format!("cannot read {CUSTOMIZE}"))?;
    let key = recipe.rootfs_key(&customize);
    let key_file = image.with_extension("key");
    if cached(&key_file, &key, image) {
        println!("debian: up to date ({})", image.display());
        return Ok(());
    }
    if !setup::is_root() {
        return Err(Error::Other(format!(
            "debian: building {} needs root: mmdebstrap's `root` mode writes a tree \
             with the files' owners, which `mke2fs -d` copies into the image. Run \
             `sudo cargo xtask debian build` once (docs/configuration.md, \"The Debian \
             example\")",
            image.display()
        )));
    }
    if util::which("mmdebstrap").is_none() {
        return Err(Error::Other(
            "debian: mmdebstrap is missing; `cargo xtask setup` installs it".into(),
        ));
    }
    emu::remove_stale(&key_file)?;
    let root = image.parent().unwrap_or(Path::new("."));
    let tree = root.join("rootfs.tree");
    if tree.exists() {
        fs::remove_dir_all(&tree).context(|| format!("cannot clear {}", tree.display()))?;
    }
    let customize_path = util::workspace_root().join(CUSTOMIZE);
    let mut mm = mmdebstrap_command(recipe, &tree, &customize_path);
    println!("debian: {}", describe(&mm));
    util::run(&mut mm).map_err(|e| {
        Error::Other(format!(
            "{e}: mmdebstrap could not build Debian {} (the lines above say why: a \
             mirror that cannot be reached, or a pinned version it no longer has — \
             see {RECIPE})",
            recipe.suite
        ))
    })?;
    let out = util::output(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                tree.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f=${Package} ${Version}\n"]),
    )?;
    let packages = root.join(PACKAGES);
    fs::write(&packages, &out.stdout).context(|| format!("cannot write {}", packages.display()))?;
    let part = image.with_extension("part");
    let mut mke2fs = mke2fs_command(recipe, &tree, &part)?;
    println!("debian: {}", describe(&mke2fs));
    util::run(&mut mke2fs)?;
    fs::remove_dir_all(&tree).context(|| format!("cannot remove {}", tree.display()))?;
    fs::rename(&part, image).context(|| format!("cannot rename {}", part.display()))?;
    fs::write(&key_file, key).context(|| format!("cannot write {}", key_file.display()))?;
    println!(
        "debian: built {} ({} packages, listed in {})",
        image.display(),
        String::from_utf8_lossy(&out.stdout).lines().count(),
        packages.display()
    );
    let disk = root.join(DISK);
    if disk.exists() {
        println!(
            "debian: {} is the guest's disk from an earlier build, kept; remove it to \
             start from the new image",
            disk.display()
        );
    }
    Ok(())
}

/// Copies the pristine image to `to` (sparse, as the image is).
pub fn copy_image(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
    }
    let part = to.with_extension("part");
    util::run(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(from)
            .arg(&part),
    )?;
    fs::rename(&part, to).context(|| format!("cannot rename {}", part.display()))
}

/// `cargo xtask debian build`.
pub fn build_command() -> Result<ExitCode> {
    setup::run()?;
    let built = build()?;
    println!("  {}", built.kernel.display());
    println!("  {}", built.initrd.display());
    println!("  {} (pristine)", built.rootfs.display());
    println!(
        "  {}: the guest's disk, copied from it by the first `cargo xtask run --config \
         examples/debian.toml`",
        Path::new(DEBIAN_DIR).join(DISK).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The kernel arguments of the example (and of the direct boot).
pub const CMDLINE: &str = "console=ttyS0 root=/dev/vda rw panic=-1";
const DIRECT_TIMEOUT: Duration = Duration::from_secs(600);

/// `cargo xtask debian direct`: the same kernel, initrd and (a fresh copy
/// of the) image booted by QEMU itself, TCG, without Moat, timed from
/// QEMU's start to the login prompt.
pub fn direct(memory_mib: u32) -> Result<ExitCode> {
    setup::run()?;
    let built = build()?;
    direct_boot(&built, memory_mib, CMDLINE, false).map(|boot| {
        println!(
            "debian: QEMU TCG, no Moat: start to the login prompt in {}; {}",
            util::secs(boot.prompt),
            boot.startup
        );
        ExitCode::SUCCESS
    })
}

/// `cargo xtask debian time`: one run, two boots of the same kernel,
/// initrd and image (each a fresh copy), to the login prompt: under Moat
/// (examples/debian.toml) and by QEMU itself; both QEMU TCG.
pub fn time(extra_args: &[String], icount: bool) -> Result<ExitCode> {
    setup::run()?;
    let built = build()?;
    let config = Path::new(EXAMPLE);
    let cmdline = std::iter::once(CMDLINE.to_string())
        .chain(extra_args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let overrides = crate::config::GuestOverride {
        append: Some(cmdline.clone()),
        ..Default::default()
    };
    let mut plan = crate::config::load_pinned_aware(config, &overrides)?;
    let memory_mib = plan
        .manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("ram guest "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|size| size.strip_suffix('M'))
        .and_then(|mib| mib.parse().ok())
        .ok_or_else(|| Error::Other(format!("{EXAMPLE}: no guest RAM in MiB")))?;
    let dir = Path::new(DEBIAN_DIR).join("time");
    let disk = plan
        .disk
        .as_mut()
        .ok_or_else(|| Error::Other(format!("{EXAMPLE}: no disk")))?;
    disk.path = util::workspace_root().join(&dir).join("moat-disk.img");
    emu::remove_stale(&disk.path)?;
    disk.create = true;
    disk.prepare().map_err(Error::Other)?;
    let artifacts = crate::build::build_all()?;
    let image = crate::image::assemble_plan(&artifacts, &plan)?;
    let serial = dir.join("moat-serial.log");
    emu::remove_stale(&serial)?;
    let mut args = emu::qemu_args(&image.boot, emu::Accel::Tcg, emu::Serial::File(&serial))?;
    if icount {
        args.extend(ICOUNT.map(String::from));
    }
    println!(
        "debian: under Moat: {}",
        describe(&emu::qemu_command(&args))
    );
    let moat = timed_boot(
        &args,
        &serial,
        &dir.join("moat-qemu.out"),
        &recipe_password()?,
    )?;
    let log = fs::read(&serial).context(|| format!("cannot read {}", serial.display()))?;
    let log = String::from_utf8_lossy(&log);
    let console_bytes = log.find(LOGIN_PROMPT).unwrap_or(log.len());
    println!(
        "debian: under Moat: login prompt after {}; {}",
        util::secs(moat.prompt),
        moat.startup
    );
    println!("debian: under Moat: {console_bytes} bytes on the console before the prompt");
    if let Some(exits) = &moat.exits {
        println!("debian: under Moat: VMM exits, boot to power-off: {exits}");
    }
    let direct = direct_boot(&built, memory_mib, &cmdline, icount)?;
    println!(
        "debian: directly: login prompt after {}; {}",
        util::secs(direct.prompt),
        direct.startup
    );
    println!(
        "debian: guest command line: {cmdline}{}",
        if icount {
            " (QEMU -icount shift=0)"
        } else {
            ""
        }
    );
    println!(
        "debian: QEMU TCG start to the login prompt: Moat {}, QEMU alone {}, ratio {:.2}",
        util::secs(moat.prompt),
        util::secs(direct.prompt),
        moat.prompt.as_secs_f64() / direct.prompt.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// The example this module builds for.
pub const EXAMPLE: &str = "examples/debian.toml";

/// Boots `built` in QEMU alone; when the login prompt appeared.
fn direct_boot(built: &Built, memory_mib: u32, cmdline: &str, icount: bool) -> Result<TimedBoot> {
    let dir = Path::new(DEBIAN_DIR).join("direct");
    let disk = dir.join("disk.img");
    copy_image(&built.rootfs, &disk)?;
    let serial = dir.join("serial.log");
    let guest = linux::Guest {
        kernel: built.kernel.clone(),
        initramfs: built.initrd.clone(),
    };
    let mut args = linux::direct_qemu_args(&guest, &[cmdline.to_string()], &serial, memory_mib);
    args.extend([
        "-no-reboot".to_string(),
        "-drive".to_string(),
        format!("if=virtio,format=raw,file={}", disk.display()),
    ]);
    if icount {
        args.extend(ICOUNT.map(String::from));
    }
    println!("debian: {}", describe(&emu::qemu_command(&args)));
    timed_boot(&args, &serial, &dir.join("qemu.out"), &recipe_password()?)
}

/// QEMU's instruction-counted guest time: one instruction a nanosecond
/// whatever else the host runs; idle time passes as the host's (with
/// `sleep=off` it would be skipped, and a disk request whose completion
/// comes in host time would seem to take until the next timer: the blk
/// driver's 5 s timeout fired so and the root file system failed).
const ICOUNT: [&str; 2] = ["-icount", "shift=0"];

/// What systemd prints for `systemd-analyze`.
const STARTUP: &str = "Startup finished in ";

/// One timed boot to the login prompt.
struct TimedBoot {
    /// From QEMU's start to the login prompt on the console.
    prompt: Duration,
    /// systemd-analyze's line, in guest time (or why there is none).
    startup: String,
    /// Under Moat: the VMM's exits by reason, boot to power-off.
    exits: Option<String>,
}

fn recipe_password() -> Result<String> {
    Ok(load_recipe()?.password)
}

/// Boots `args` (whose COM1 is `-serial file:SERIAL`) with the console on
/// a socket, times the login prompt, then logs in as root, asks
/// `systemd-analyze` for the boot's guest time (and `blame`, its slowest
/// units, left in the serial log), times 4000 uncached reads of the disk
/// with `dd` and powers off.
fn timed_boot(args: &[String], serial: &Path, output: &Path, password: &str) -> Result<TimedBoot> {
    use crate::systest::{console_socket, console_socket_args, type_on_console, typed};
    use std::sync::atomic::{AtomicBool, Ordering};
    emu::remove_stale(serial)?;
    let socket = console_socket(serial);
    emu::remove_stale(&socket)?;
    let args = console_socket_args(args, serial);
    let password: &'static str = Box::leak(format!("{password}\n").into_boxed_str());
    let steps = [
        typed(LOGIN_PROMPT, "root\n"),
        typed("Password: ", password),
        typed(
            ":~# ",
            "systemctl is-system-running --wait >/dev/null; systemd-analyze; \
             systemd-analyze blame --no-pager | head -15; \
             dd if=/dev/vda of=/dev/null bs=4k count=4000 iflag=direct 2>&1 | tail -1; \
             poweroff\n",
        ),
    ];
    let clock = SerialClock::start(serial, &[LOGIN_PROMPT, STARTUP]);
    let done = AtomicBool::new(false);
    let outcome = std::thread::scope(|scope| {
        let typist = scope.spawn(|| type_on_console(&socket, &steps, &done));
        // The guest powers off after systemd-analyze; QEMU ends then (and
        // the VMM prints its exits by reason first).
        let decided = || {
            clock.poll();
            false
        };
        let outcome = emu::run_qemu(&args, Some(DIRECT_TIMEOUT), Some(&decided), output);
        done.store(true, Ordering::Relaxed);
        if let Ok(Err(why)) = typist.join() {
            println!("debian: console input: {why}");
        }
        outcome
    })?;
    println!("debian: serial log {}", serial.display());
    let prompt = match (clock.seen(LOGIN_PROMPT), outcome.exit) {
        (Some(at), _) => at,
        (None, Exit::TimedOut) => {
            return Err(Error::Other(format!(
                "no login prompt after {} (see {})",
                util::secs(DIRECT_TIMEOUT),
                serial.display()
            )))
        }
        (None, _) => {
            return Err(Error::Other(format!(
                "QEMU ended before the login prompt (see {})",
                serial.display()
            )))
        }
    };
    let log = fs::read(serial).context(|| format!("cannot read {}", serial.display()))?;
    let log = String::from_utf8_lossy(&log);
    let startup = startup_line(&log).unwrap_or_else(|| "no systemd-analyze line".into());
    let exits = log
        .lines()
        .find_map(|l| l.split_once("vmm: exits "))
        .map(|(_, e)| e.trim_end().to_string());
    // dd's summary: 4000 uncached 4 KiB reads, one request each.
    if let Some(line) = log.lines().find(|l| l.contains(" copied, ")) {
        println!(
            "debian: 4000 direct 4 KiB reads of /dev/vda: {}",
            line.trim_end()
        );
    }
    Ok(TimedBoot {
        prompt,
        startup,
        exits,
    })
}

/// systemd-analyze's `Startup finished in …` line and its `… reached
/// after …` line, without their colours.
fn startup_line(log: &str) -> Option<String> {
    let rest = log.split(STARTUP).nth(1)?;
    let mut lines = rest.lines().map(without_colours);
    let mut text = format!("{STARTUP}{}", lines.next()?);
    if let Some(reached) = lines.next().filter(|l| l.contains(" reached after ")) {
        text = format!("{text}; {reached}");
    }
    Some(text)
}

/// A console line without its CSI sequences (`ESC [ … letter`), `\r` and
/// trailing blanks.
fn without_colours(line: &str) -> String {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if c != '\r' {
            plain.push(c);
        }
    }
    plain.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE_TEXT: &str = "suite = \"bookworm\"\nvariant = \"minbase\"\n\
        packages = [\"systemd-sysv=252\", \"udev=252\"]\nimage_size = \"1G\"\n\
        user = \"moat\"\npassword = \"moat\"\nhostname = \"moat-debian\"\n\
        initrd_modules = \"virtio_blk ext4\"\n";

    #[test]
    fn the_shipped_recipe_parses_and_pins_every_package() {
        let text = fs::read_to_string(util::workspace_root().join(RECIPE)).unwrap();
        let r = Recipe::parse(&text).unwrap();
        assert_eq!(r.suite, "bookworm");
        for want in ["systemd-sysv=", "udev=", "openssh-server="] {
            assert!(r.packages.iter().any(|p| p.starts_with(want)), "{want}");
        }
        for want in ["virtio_blk", "ext4", "crc32c_generic"] {
            assert!(r.modules().iter().any(|m| m == want), "{want}");
        }
    }

    #[test]
    fn recipe_rejects_unpinned_unknown_and_bad_values() {
        assert!(Recipe::parse(RECIPE_TEXT).is_ok());
        let unpinned = RECIPE_TEXT.replace("\"udev=252\"", "\"udev\"");
        assert!(Recipe::parse(&unpinned).unwrap_err().contains("not pinned"));
        let extra = format!("{RECIPE_TEXT}mirror = \"x\"\n");
        assert!(Recipe::parse(&extra).unwrap_err().contains("unknown field"));
        let small = RECIPE_TEXT.replace("\"1G\"", "\"64M\"");
        assert!(Recipe::parse(&small).unwrap_err().contains("too small"));
        let user = RECIPE_TEXT.replace("user = \"moat\"", "user = \"a b\"");
        assert!(Recipe::parse(&user).is_err());
        let missing = RECIPE_TEXT.replace("hostname = \"moat-debian\"\n", "");
        assert!(Recipe::parse(&missing).unwrap_err().contains("hostname"));
    }

    #[test]
    fn keys_follow_their_own_inputs() {
        let r = Recipe::parse(RECIPE_TEXT).unwrap();
        let mut other = r.clone();
        other.initrd_modules = "virtio_blk".into();
        // The initrd's modules do not rebuild the image, and back.
        assert_eq!(r.rootfs_key(b"c"), other.rootfs_key(b"c"));
        assert_ne!(r.initrd_key(b"i", b"k"), other.initrd_key(b"i", b"k"));
        assert_ne!(r.rootfs_key(b"c"), r.rootfs_key(b"d"));
        assert_ne!(r.initrd_key(b"i", b"k"), r.initrd_key(b"i", b"l"));
        other = r.clone();
        other.packages.push("vim=9".into());
        assert_ne!(r.rootfs_key(b"c"), other.rootfs_key(b"c"));
    }

    #[test]
    fn commands_pin_the_packages_and_build_without_a_loop_mount() {
        let r = Recipe::parse(RECIPE_TEXT).unwrap();
        let mm = describe(&mmdebstrap_command(
            &r,
            Path::new("t/tree"),
            Path::new("/w/guests/debian/customize.sh"),
        ));
        assert!(mm.contains("--mode=root --variant=minbase"), "{mm}");
        assert!(mm.contains("--include=systemd-sysv=252,udev=252"), "{mm}");
        assert!(mm.ends_with("bookworm t/tree"), "{mm}");
        let mk = describe(&mke2fs_command(&r, Path::new("t/tree"), Path::new("t/i")).unwrap());
        assert_eq!(
            mk,
            "mke2fs -q -F -t ext4 -L moat-debian -d t/tree t/i 1048576k"
        );
    }

    #[test]
    fn the_startup_line_loses_its_colours() {
        let log = "root@moat-debian:~# systemd-analyze\r\nStartup finished in 3.1s (kernel) + \
                   \x1b[1m20.2s\x1b[0m (userspace) = \x1b[1m23.3s\x1b[0m \r\n\
                   multi-user.target reached after 19.9s in userspace\r\n";
        assert_eq!(
            startup_line(log).unwrap(),
            "Startup finished in 3.1s (kernel) + 20.2s (userspace) = 23.3s; \
             multi-user.target reached after 19.9s in userspace"
        );
        assert_eq!(startup_line("no line"), None);
    }

    #[test]
    fn initrd_holds_init_busybox_and_the_modules_in_order() {
        let modules = [
            ("crc16".to_string(), b"a".to_vec()),
            ("ext4".to_string(), b"b".to_vec()),
        ];
        let archive = initrd_archive(b"bb", b"#!/bin/sh\n", &modules).unwrap();
        let text = String::from_utf8_lossy(&archive);
        for name in [
            "bin/busybox",
            "init",
            "lib/modules/ext4.ko",
            "etc/moat-modules",
            "root",
        ] {
            assert!(text.contains(name), "{name}");
        }
        assert!(text.contains("crc16\next4\n"));
    }
}

//! Building a component from its manifest entry, and tearing it down.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use moat_abi::{layout, rights, selectors, Space, Status, PAGE_SIZE};
use moat_kernel::elf::{ElfError, ElfImage};
use moat_roottask::image::{self, Region};
use moat_roottask::manifest::{
    Component, Manifest, Mapping, MappingSource, BAR_SLOT, MSIS_PER_DEVICE,
};
use moat_roottask::ranges::RangeAllocator;
use moat_roottask::registry::{self, Instance};
use moat_roottask::{EXCEPTION_PORTAL, REGISTRY_PORTAL};
use moat_user::abi::BootInfo;
use moat_user::{sys, Sel};

use crate::boot::{self, Pool};
use crate::devices::{self, Device};
use crate::handlers::{self, BOARD, EXCEPTION_EC, REGISTRY_EC};

/// Pages of a 2 MiB page.
const LARGE_PAGES: u64 = 512;
/// Largest count of one `delegate` or `revoke`: 2 MiB, so that no single
/// kernel call keeps components above the root task waiting for long (a
/// guest's RAM is hundreds of MiB).
const MAX_COUNT: u64 = 512;
/// Root-side selectors per component: PD, EC, SC, exception and registry portals.
const ROOT_SELECTORS: u64 = 5;

/// The root's means to build components.
pub struct Loader {
    pub info: &'static BootInfo,
    pub pool: Pool,
    /// Free pool pages, by index.
    pub pages: RangeAllocator,
    /// Free root selectors.
    pub selectors: RangeAllocator,
    /// The root's selector of each manifest semaphore.
    pub semaphores: Vec<Sel>,
    /// The pool pages of each `shared` region (made once, at start).
    pub shared: Vec<Vec<Range<u64>>>,
    /// The device found for each `pci` line.
    pub devices: Vec<Option<Device>>,
}

/// A running component as the root holds it.
pub struct Loaded {
    /// Root selectors: `base` PD, `+1` EC, `+2` SC, `+3` exception portal,
    /// `+4` registry portal.
    base: Sel,
    /// Pool page runs it got.
    pages: Vec<Range<u64>>,
    /// The publication of each of its `uses` it holds (0: none).
    pub delegated: Vec<u64>,
    /// Its `pci` devices (indices into `Loader::devices`).
    devices: Vec<usize>,
    /// The CPU its first EC runs on.
    pub cpu: u16,
}

impl Loaded {
    pub fn pd(&self) -> Sel {
        self.base
    }
    fn ec(&self) -> Sel {
        self.base + 1
    }
    fn sc(&self) -> Sel {
        self.base + 2
    }
    fn exception_portal(&self) -> Sel {
        self.base + 3
    }
    fn registry_portal(&self) -> Sel {
        self.base + 4
    }
}

pub enum LoadError {
    NoModule(String),
    /// A `pci` line's device is not there.
    NoDevice(String),
    Elf(String, ElfError),
    TooBig {
        needed: u64,
        memory: u64,
    },
    PoolExhausted {
        needed: u64,
        free: u64,
    },
    NoSelectors,
    Kernel {
        what: String,
        status: Status,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NoModule(module) => write!(f, "no boot module '{module}'"),
            LoadError::NoDevice(mapping) => write!(f, "no device for its pci mapping '{mapping}'"),
            LoadError::Elf(module, e) => write!(f, "module '{module}': {e}"),
            LoadError::TooBig { needed, memory } => write!(
                f,
                "needs {} KiB (ELF segments and stack), the manifest gives {} KiB",
                needed / 1024,
                memory / 1024
            ),
            LoadError::PoolExhausted { needed, free } => {
                write!(f, "needs {needed} pages, the root's pool has {free} free")
            }
            LoadError::NoSelectors => write!(f, "the root task is out of selectors"),
            LoadError::Kernel { what, status } => write!(f, "{what}: {status}"),
        }
    }
}

fn kernel(what: &str) -> impl FnOnce(Status) -> LoadError + '_ {
    move |status| LoadError::Kernel {
        what: what.into(),
        status,
    }
}

/// The component's argument string: the manifest's (else the module's),
/// then ` NAME=ADDR,SIZE` per mapping (and a `pci` mapping's BARs and
/// MSIs), then `index=N tsc_hz=H`.
fn arguments(
    component: &Component,
    module_args: &str,
    mappings: &[String],
    index: usize,
    tsc_hz: u64,
) -> String {
    let mut args = String::from(component.args.as_deref().unwrap_or(module_args).trim());
    for words in mappings {
        args += words;
    }
    let sep = if args.is_empty() { "" } else { " " };
    format!("{args}{sep}index={index} tsc_hz={tsc_hz}")
}

/// A mapping's argument words: where its bytes start in the component
/// and how many there are (` NAME=ADDR,SIZE`); for a device also its BARs
/// and MSIs.
fn placed(
    info: &BootInfo,
    devices: &[Option<Device>],
    mapping: &Mapping,
) -> Result<String, LoadError> {
    let name = &mapping.name;
    let (address, size) = match &mapping.source {
        MappingSource::Ram(bytes)
        | MappingSource::Dma(bytes)
        | MappingSource::Shared { bytes, .. } => (mapping.address, *bytes),
        MappingSource::Module(module) => {
            let module =
                boot::module(info, module).ok_or_else(|| LoadError::NoModule(module.clone()))?;
            (mapping.address + module.address % PAGE_SIZE, module.size)
        }
        MappingSource::Pci(d) => {
            let device = devices
                .get(*d)
                .and_then(Option::as_ref)
                .ok_or_else(|| LoadError::NoDevice(name.clone()))?;
            let mut words = format!(" {name}={:#x},{PAGE_SIZE:#x}", mapping.address);
            for (bar, _) in &device.bars {
                words += &format!(
                    " {name}.bar{}={:#x},{:#x}",
                    bar.index,
                    mapping.address + (u64::from(bar.index) + 1) * BAR_SLOT,
                    bar.size
                );
            }
            words += &format!(" {name}.msi={:#x},{MSIS_PER_DEVICE}", msi_first(*d));
            return Ok(words);
        }
    };
    Ok(format!(" {name}={address:#x},{size:#x}"))
}

/// The first IRQ-space key of `pci` line `d`'s MSIs.
fn msi_first(d: usize) -> u64 {
    moat_abi::MSI_FIRST + d as u64 * MSIS_PER_DEVICE
}

impl Loader {
    /// Builds and starts `instance` of component `index`. On failure,
    /// everything made for it is gone again.
    pub fn load(
        &mut self,
        manifest: &Manifest,
        instance: Instance,
        publications: &[u64],
    ) -> Result<Loaded, LoadError> {
        let component = &manifest.components[instance.index];
        let module = boot::module(self.info, &component.module)
            .ok_or_else(|| LoadError::NoModule(component.module.clone()))?;
        let elf = ElfImage::parse(boot::module_bytes(module), image::USER_RANGE)
            .map_err(|e| LoadError::Elf(component.module.clone(), e))?;
        let mappings = component
            .mappings
            .iter()
            .map(|m| placed(self.info, &self.devices, m))
            .collect::<Result<Vec<_>, _>>()?;
        let args = arguments(
            component,
            module.args(),
            &mappings,
            instance.index,
            self.info.tsc_hz,
        );
        let record = image::start_record(args.as_bytes());

        let stack = image::stack_region(component.stack);
        let regions = image::segment_regions(&elf);
        let needed = regions.iter().chain([&stack]).map(|r| r.pages).sum::<u64>();
        if needed * PAGE_SIZE > component.memory {
            return Err(LoadError::TooBig {
                needed: needed * PAGE_SIZE,
                memory: component.memory,
            });
        }
        let ram = component
            .mappings
            .iter()
            .map(|m| m.source.own_pages())
            .sum::<u64>();
        let needed = needed + ram;
        if needed > self.pages.available() {
            return Err(LoadError::PoolExhausted {
                needed,
                free: self.pages.available(),
            });
        }
        let base = self
            .selectors
            .alloc(ROOT_SELECTORS)
            .ok_or(LoadError::NoSelectors)?;
        let mut loaded = Loaded {
            base,
            pages: Vec::new(),
            delegated: Vec::new(),
            devices: Vec::new(),
            cpu: 0,
        };
        let plan = Plan {
            manifest,
            instance,
            elf: &elf,
            regions: &regions,
            stack,
            record: &record,
            publications,
        };
        match self.build(&plan, &mut loaded) {
            Ok(()) => Ok(loaded),
            Err(e) => {
                let _ = self.destroy(loaded, instance.index);
                Err(e)
            }
        }
    }

    fn build(&mut self, plan: &Plan, loaded: &mut Loaded) -> Result<(), LoadError> {
        let component = &plan.manifest.components[plan.instance.index];
        let own = selectors::SELF_PD;
        let pd = loaded.pd();
        sys::create_pd(
            pd,
            own,
            component.quota,
            component.capacity,
            component.ceiling,
        )
        .map_err(kernel("create_pd"))?;

        for (segment, region) in plan.elf.segments().zip(plan.regions) {
            self.map(pd, *region, loaded, |page, vaddr| {
                image::fill_page(page, vaddr, segment.vaddr, segment.data);
            })?;
        }
        let record_page = layout::STACK_TOP - PAGE_SIZE;
        self.map(pd, plan.stack, loaded, |page, vaddr| {
            page.fill(0);
            if vaddr == record_page {
                let at = page.len() - plan.record.len();
                page[at..].copy_from_slice(plan.record);
            }
        })?;

        for mapping in &component.mappings {
            self.map_extra(pd, mapping, loaded)?;
        }

        let id = plan.instance.portal_id();
        sys::create_pt(
            loaded.exception_portal(),
            own,
            EXCEPTION_EC,
            handlers::exception_entry(),
            id,
        )
        .map_err(kernel("create the exception portal"))?;
        sys::create_pt(
            loaded.registry_portal(),
            own,
            REGISTRY_EC,
            handlers::registry_entry(),
            id,
        )
        .map_err(kernel("create the registry portal"))?;
        let portals = [
            (loaded.exception_portal(), EXCEPTION_PORTAL),
            (loaded.registry_portal(), REGISTRY_PORTAL),
        ];
        for (from, to) in portals {
            sys::delegate(pd, Space::Object, from, to, 1, rights::PT_CALL)
                .map_err(kernel("delegate the root's portals"))?;
        }

        for u in &component.uses {
            let from = registry::slot(u.provider);
            sys::delegate(pd, Space::Object, from, u.selector, 1, rights::PT_CALL).map_err(
                |status| LoadError::Kernel {
                    what: format!("delegate the '{}' portal", u.name),
                    status,
                },
            )?;
            loaded.delegated.push(plan.publications[u.provider]);
        }
        for (semaphore, &sm) in plan.manifest.semaphores.iter().zip(&self.semaphores) {
            let grants = semaphore
                .grants
                .iter()
                .filter(|g| g.component == plan.instance.index);
            for grant in grants {
                let rights = handlers::semaphore_rights(grant.up, grant.down);
                sys::delegate(pd, Space::Object, sm, grant.selector, 1, rights).map_err(
                    |status| LoadError::Kernel {
                        what: format!("delegate semaphore '{}'", semaphore.name),
                        status,
                    },
                )?;
            }
        }
        for ports in &component.ioports {
            let first = u64::from(ports.first);
            sys::delegate(
                pd,
                Space::Io,
                first,
                first,
                ports.count(),
                rights::IO_ACCESS,
            )
            .map_err(kernel("delegate I/O ports"))?;
        }
        for &gsi in &component.irqs {
            sys::delegate(pd, Space::Irq, gsi, gsi, 1, rights::IRQ_CONTROL)
                .map_err(kernel("delegate an interrupt"))?;
        }

        // From here on its registry calls count.
        BOARD.start(plan.instance);
        let rsp = layout::STACK_TOP - plan.record.len() as u64;
        let ec = loaded.ec();
        let create = |cpu: u64| {
            sys::create_ec(
                ec,
                pd,
                false,
                cpu,
                plan.elf.entry,
                rsp,
                layout::MAIN_UTCB,
                EXCEPTION_PORTAL,
                plan.instance.index as u64,
            )
        };
        loaded.cpu = component.cpu;
        match create(component.cpu.into()) {
            Err(Status::BadCpu) => {
                loaded.cpu = 0;
                moat_user::println!(
                    "roottask: '{}' asked for cpu {}, which is not online: it runs on cpu 0",
                    component.name,
                    component.cpu
                );
                create(0)
            }
            other => other,
        }
        .map_err(kernel("create_ec"))?;
        sys::create_sc(
            loaded.sc(),
            pd,
            loaded.ec(),
            component.priority,
            component.budget_us,
        )
        .map_err(kernel("create_sc"))
    }

    /// Maps a `ram` (fresh zeroed pages) or `file` (a module's pages,
    /// read-only) mapping into `pd`.
    fn map_extra(
        &mut self,
        pd: Sel,
        mapping: &Mapping,
        loaded: &mut Loaded,
    ) -> Result<(), LoadError> {
        let first_page = mapping.address / PAGE_SIZE;
        match &mapping.source {
            MappingSource::Ram(bytes) => {
                let region = Region {
                    first_page,
                    pages: bytes / PAGE_SIZE,
                    rights: rights::MEM_READ | rights::MEM_WRITE | rights::MEM_EXECUTE,
                };
                self.map_aligned(pd, region, loaded)
                    .unwrap_or_else(|| self.map(pd, region, loaded, |page, _| page.fill(0)))
            }
            MappingSource::Dma(bytes) => {
                let region = Region {
                    first_page,
                    pages: bytes / PAGE_SIZE,
                    rights: rights::MEM_READ | rights::MEM_WRITE | rights::MEM_DMA,
                };
                self.map(pd, region, loaded, |page, _| page.fill(0))
            }
            MappingSource::Shared { index, .. } => {
                let mut page = first_page;
                for run in &self.shared[*index] {
                    for first in (run.start..run.end).step_by(MAX_COUNT as usize) {
                        let count = (run.end - first).min(MAX_COUNT);
                        sys::delegate(
                            pd,
                            Space::Memory,
                            self.pool.root_page(first),
                            page,
                            count,
                            rights::MEM_READ | rights::MEM_WRITE,
                        )
                        .map_err(|status| LoadError::Kernel {
                            what: format!("map shared memory '{}'", mapping.name),
                            status,
                        })?;
                        page += count;
                    }
                }
                Ok(())
            }
            MappingSource::Pci(d) => {
                let device = self.devices[*d]
                    .as_ref()
                    .ok_or_else(|| LoadError::NoDevice(mapping.name.clone()))?;
                let what = |status| LoadError::Kernel {
                    what: format!("hand over pci device '{}'", mapping.name),
                    status,
                };
                let rw = rights::MEM_READ | rights::MEM_WRITE;
                sys::delegate(pd, Space::Memory, device.config_page, first_page, 1, rw)
                    .map_err(what)?;
                for (bar, root_page) in &device.bars {
                    let at = (mapping.address + (u64::from(bar.index) + 1) * BAR_SLOT) / PAGE_SIZE;
                    sys::delegate(pd, Space::Memory, *root_page, at, bar.size / PAGE_SIZE, rw)
                        .map_err(what)?;
                }
                let msi = msi_first(*d);
                sys::delegate(
                    pd,
                    Space::Irq,
                    msi,
                    msi,
                    MSIS_PER_DEVICE,
                    rights::IRQ_CONTROL,
                )
                .map_err(what)?;
                loaded.devices.push(*d);
                moat_user::println!(
                    "roottask: pci {} ({}) given to its driver as '{}'",
                    device.location,
                    if device.bars.is_empty() {
                        "no BARs"
                    } else {
                        "BARs mapped uncached"
                    },
                    mapping.name
                );
                Ok(())
            }
            MappingSource::Module(name) => {
                let module = boot::module(self.info, name)
                    .ok_or_else(|| LoadError::NoModule(name.clone()))?;
                let start = module.address / PAGE_SIZE;
                let end = (module.address + module.size).div_ceil(PAGE_SIZE);
                let mut page = start;
                while page < end {
                    let count = (end - page).min(MAX_COUNT);
                    sys::delegate(
                        pd,
                        Space::Memory,
                        page,
                        first_page + (page - start),
                        count,
                        rights::MEM_READ,
                    )
                    .map_err(|status| LoadError::Kernel {
                        what: format!("map module '{name}'"),
                        status,
                    })?;
                    page += count;
                }
                Ok(())
            }
        }
    }

    /// Maps a whole 2 MiB-aligned `region` on one pool run that starts at a
    /// 2 MiB boundary of the pool, whose pages the kernel backs with
    /// aligned 2 MiB runs where it could: a VM given such memory gets 2 MiB
    /// pages. `None` (nothing done) if the region or the pool does not
    /// allow it.
    fn map_aligned(
        &mut self,
        pd: Sel,
        region: Region,
        loaded: &mut Loaded,
    ) -> Option<Result<(), LoadError>> {
        let aligned = region.first_page.is_multiple_of(LARGE_PAGES)
            && region.pages.is_multiple_of(LARGE_PAGES)
            && (self.pool.root_page(0)).is_multiple_of(LARGE_PAGES);
        if !aligned {
            return None;
        }
        let start = self.pages.alloc_aligned(region.pages, LARGE_PAGES)?;
        let run = start..start + region.pages;
        loaded.pages.push(run.clone());
        for index in run.clone() {
            self.pool.page_mut(index).fill(0);
        }
        let mut done = 0;
        while done < region.pages {
            let count = (region.pages - done).min(MAX_COUNT);
            let delegated = sys::delegate(
                pd,
                Space::Memory,
                self.pool.root_page(start + done),
                region.first_page + done,
                count,
                region.rights,
            );
            if let Err(status) = delegated {
                return Some(Err(kernel("delegate memory")(status)));
            }
            done += count;
        }
        Some(Ok(()))
    }

    /// Fills `region`'s pages from the pool with `fill(page, vaddr)` and
    /// delegates them into `pd`.
    fn map(
        &mut self,
        pd: Sel,
        region: Region,
        loaded: &mut Loaded,
        mut fill: impl FnMut(&mut [u8], u64),
    ) -> Result<(), LoadError> {
        let mut done = 0;
        while done < region.pages {
            let free = self.pages.available();
            let run = self
                .pages
                .alloc_upto((region.pages - done).min(MAX_COUNT))
                .ok_or(LoadError::PoolExhausted {
                    needed: region.pages - done,
                    free,
                })?;
            loaded.pages.push(run.clone());
            for (i, index) in run.clone().enumerate() {
                let vaddr = (region.first_page + done + i as u64) * PAGE_SIZE;
                fill(self.pool.page_mut(index), vaddr);
            }
            let count = run.end - run.start;
            sys::delegate(
                pd,
                Space::Memory,
                self.pool.root_page(run.start),
                region.first_page + done,
                count,
                region.rights,
            )
            .map_err(kernel("delegate memory"))?;
            done += count;
        }
        Ok(())
    }

    /// Destroys a component: its PD with everything in it, the root's
    /// objects made for it, its published portal (and every copy clients
    /// got), and takes its pages back. Returns the first revoke that failed.
    pub fn destroy(&mut self, loaded: Loaded, index: usize) -> Result<(), Status> {
        BOARD.stop(index);
        // Its DMA memory goes back to the pool: the device must stop using it.
        for &d in &loaded.devices {
            if let Some(device) = self.devices.get(d).and_then(Option::as_ref) {
                devices::stop_dma(device);
            }
        }
        let mut result = Ok(());
        let mut revoke = |space, base, count, include_self| {
            let r = sys::revoke(space, base, count, include_self);
            if result.is_ok() {
                result = r;
            }
        };
        for sel in [
            loaded.sc(),
            loaded.ec(),
            loaded.pd(),
            loaded.exception_portal(),
            loaded.registry_portal(),
            registry::slot(index),
        ] {
            revoke(Space::Object, sel, 1, true);
        }
        // Anything it passed on from its memory goes too; the root keeps
        // its own mapping of the pages.
        for run in &loaded.pages {
            for first in (run.start..run.end).step_by(MAX_COUNT as usize) {
                revoke(
                    Space::Memory,
                    self.pool.root_page(first),
                    (run.end - first).min(MAX_COUNT),
                    false,
                );
            }
        }
        for run in loaded.pages {
            let _ = self.pages.free(run);
        }
        let _ = self
            .selectors
            .free(loaded.base..loaded.base + ROOT_SELECTORS);
        BOARD.stop(index);
        result
    }
}

/// Everything `build` needs to know.
struct Plan<'a> {
    manifest: &'a Manifest,
    instance: Instance,
    elf: &'a ElfImage<'a>,
    regions: &'a [Region],
    stack: Region,
    record: &'a [u8],
    /// The registry's publication number per component, when loading.
    publications: &'a [u64],
}

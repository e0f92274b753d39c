//! `blk`: a user-level driver for the machine's virtio-blk PCI device
//! (virtio 1.x, modern interface) and the block service in front of it.
//!
//! From the manifest it gets the device (`pci dev 1af4:1042`: its
//! configuration page, BARs and MSIs), DMA memory (`dma dma SIZE`: four
//! pages for the queue and a request's header, the rest — up to 1 MiB —
//! the data bounce buffer; it learns every page's physical address with
//! `mem_phys`, and the pages need not be contiguous), and per client a
//! shared region `cN` (`shared`), the client's disk `cN.disk=START,SECTORS`
//! (sectors of the device), semaphores: selector 30 the clients up when
//! they queued requests, 31 + N it ups when client N has responses. The
//! protocol and the checks are `common::blk`; every request is copied out
//! of the ring before it is checked, data go through the driver's own DMA
//! pages (no client memory is ever given to the device), and a client's
//! requests reach only its own sectors.
//!
//! A client's request (up to `blk::MAX_SECTORS`) goes to the device as one
//! descriptor chain — header, the bounce pages (physically adjacent ones
//! merged into one descriptor), status — or, if it is larger than the
//! bounce buffer, as several in turn. One request is on the device at a
//! time; completion comes as an MSI-X message to the kernel's MSI, which
//! ups the driver's semaphore 40.
#![no_std]
#![no_main]

use common::args;
use common::blk::{self, op, status, Action, Disk, Request, Response};
use common::virtio_pci::{Transport, DESC_NEXT, DESC_WRITE};
use core::sync::atomic::{fence, Ordering};
use moat_user::mmio::{window_arg, Window};
use moat_user::{println, rdtsc, sys};

moat_user::entry!(main);

const REQUEST_SM: u64 = 30;
const REPLY_SM_BASE: u64 = 31;
const IRQ_SM: u64 = 40;
const MAX_CLIENTS: usize = 8;

const FEATURE_FLUSH: u32 = 1 << 9;
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_T_FLUSH: u32 = 4;
const QUEUE_ENTRIES: u16 = 256;

// The DMA memory: page 0 the descriptor table, page 1 the available ring,
// page 2 the used ring, page 3 request header and status, pages 4.. the
// data bounce buffer.
const DESC_AT: u64 = 0;
const AVAIL_AT: u64 = 0x1000;
const USED_AT: u64 = 0x2000;
const HEADER_PAGE: u64 = 3;
const STATUS_AT: u64 = 0x10;
const DATA_PAGE: u64 = 4;
const PAGE: u64 = blk::PAGE;
/// Most bounce pages used (1 MiB, `blk::MAX_SECTORS`).
const MAX_DATA_PAGES: usize = 256;
const MAX_PAGES: usize = DATA_PAGE as usize + MAX_DATA_PAGES;
/// How long one request may take on the device.
const REQUEST_TIMEOUT_MS: u64 = 5000;

struct Device {
    notify: Window,
    dma: Window,
    /// Physical addresses of the DMA pages (`pages` of them).
    phys: [u64; MAX_PAGES],
    pages: usize,
    size: u16,
    avail_idx: u16,
    used_idx: u16,
    flush: bool,
    capacity: u64,
    interrupts: u64,
    tsc_hz: u64,
    /// A request timed out and the device still holds it (its buffers
    /// are the driver's only ones): no new request until it completes.
    outstanding: bool,
}

fn fail(what: &str) -> i32 {
    println!("blk: FAIL {what}");
    1
}

fn main(args: &str) -> i32 {
    let tsc_hz = args::tsc_hz(args);
    // SAFETY: the root task maps what these arguments name (manifest
    // `pci`, `dma` and `shared` lines).
    let (config, dma) = unsafe { (window_arg(args, "dev"), window_arg(args, "dma")) };
    let (Some(config), Some(dma)) = (config, dma) else {
        return fail("no 'dev' or 'dma' mapping in the arguments");
    };
    let Some(msi) = args::value(args, "dev.msi").and_then(|v| v.split(',').next()) else {
        return fail("no MSIs");
    };
    let Some(msi) = args::parse_number(msi) else {
        return fail("bad MSI argument");
    };
    let crash_sector = match args::value(args, "crash-sector") {
        None => None,
        Some(text) => match args::parse_number(text) {
            Some(sector) => Some(sector),
            None => return fail("crash-sector= is not a number"),
        },
    };
    let mut device = match Device::start(args, config, dma, msi, tsc_hz) {
        Ok(device) => device,
        Err(what) => return fail(what),
    };
    println!(
        "blk: virtio-blk ready: {} sectors, flush {}, completion by MSI-X",
        device.capacity,
        if device.flush {
            "supported"
        } else {
            "not needed"
        }
    );

    let mut clients = [None; MAX_CLIENTS];
    for (i, client) in clients.iter_mut().enumerate() {
        let name = alloc_name(i);
        // SAFETY: as above.
        let Some(region) = (unsafe { window_arg(args, name.as_str()) }) else {
            continue;
        };
        let disk_key = name.with_suffix(".disk");
        let Some(disk) = args::value(args, disk_key.as_str()).and_then(blk::parse_disk) else {
            println!("blk: client {i} has no disk: left out");
            continue;
        };
        if disk.start + disk.sectors > device.capacity || region.len() <= blk::DATA {
            println!("blk: client {i}'s disk or region does not fit: left out");
            continue;
        }
        println!(
            "blk: client {i}: sectors {}..{} of the device",
            disk.start,
            disk.start + disk.sectors
        );
        *client = Some(Client {
            region,
            disk,
            tail: region.read::<u32>(blk::REQ_TAIL as u64),
            resp_head: region.read::<u32>(blk::RESP_HEAD as u64),
            broken: false,
        });
    }
    // Each region counts the service's starts; after a restart requests
    // may wait in the rings, announced by ups the dead instance consumed,
    // so the rings are served before the first wait.
    let mut starts = 0;
    for client in clients.iter_mut().flatten() {
        starts = client
            .region
            .read::<u32>(blk::SERVICE_STARTS as u64)
            .wrapping_add(1);
        client
            .region
            .write::<u32>(blk::SERVICE_STARTS as u64, starts);
    }
    if starts > 1 {
        println!("blk: restarted (start {starts}): serving the clients' rings where they stand");
    }
    // Only the first instance crashes on purpose.
    let crash_sector = crash_sector.filter(|_| starts <= 1);
    loop {
        for (i, client) in clients.iter_mut().enumerate() {
            if let Some(client) = client {
                if client.serve(&mut device, i, crash_sector) {
                    let _ = sys::sm_up(REPLY_SM_BASE + i as u64);
                }
            }
        }
        if let Err(status) = sys::sm_down(REQUEST_SM, 0, false) {
            return fail_status("sm_down", status);
        }
    }
}

/// Faults on purpose (`crash-sector=`), so that the root task restarts us.
fn crash(client: usize, sector: u64) -> ! {
    println!("blk: crashing on purpose: client {client} reads sector {sector} (crash-sector)");
    // SAFETY: not safe: the write faults on purpose (nothing is mapped at
    // the bottom of the address space), which is the point.
    unsafe { core::ptr::write_volatile(0x28 as *mut u64, 1) };
    sys::exit(3)
}

fn fail_status(what: &str, status: moat_user::abi::Status) -> i32 {
    println!("blk: FAIL {what}: {status}");
    1
}

/// `cN` and `cN.disk` without an allocator.
struct Name {
    bytes: [u8; 16],
    len: usize,
}

impl Name {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }

    fn with_suffix(&self, suffix: &str) -> Name {
        let mut name = Name {
            bytes: self.bytes,
            len: self.len,
        };
        for &b in suffix.as_bytes() {
            if name.len < name.bytes.len() {
                name.bytes[name.len] = b;
                name.len += 1;
            }
        }
        name
    }
}

fn alloc_name(i: usize) -> Name {
    let mut name = Name {
        bytes: [0; 16],
        len: 2,
    };
    name.bytes[0] = b'c';
    name.bytes[1] = b'0' + i as u8;
    name
}

#[derive(Clone, Copy)]
struct Client {
    region: Window,
    disk: Disk,
    /// The service's own copies of the indices it owns.
    tail: u32,
    resp_head: u32,
    broken: bool,
}

impl Client {
    /// Answers what the client queued; true if it answered anything. A
    /// read covering `crash_sector` of its disk crashes us instead.
    fn serve(&mut self, device: &mut Device, index: usize, crash_sector: Option<u64>) -> bool {
        if self.broken {
            return false;
        }
        let head = self.region.read::<u32>(blk::REQ_HEAD as u64);
        let Some(pending) = blk::pending(head, self.tail) else {
            println!("blk: a client's request ring is broken (head {head}, tail {}): ignored from now on", self.tail);
            self.broken = true;
            return false;
        };
        let mut answered = false;
        for _ in 0..pending {
            let resp_tail = self.region.read::<u32>(blk::RESP_TAIL as u64);
            if blk::pending(self.resp_head.wrapping_add(1), resp_tail).is_none() {
                break; // its response ring is full: it must read first
            }
            let mut bytes = [0u8; blk::REQUEST_SIZE];
            let at = blk::slot(blk::REQUESTS, blk::REQUEST_SIZE, self.tail) as u64;
            self.region.read_bytes(at, &mut bytes);
            let request = Request::decode(&bytes);
            let covers =
                |n: u64| n >= request.sector && n - request.sector < u64::from(request.count);
            if let Some(n) = crash_sector.filter(|&n| request.op == op::READ && covers(n)) {
                crash(index, n);
            }
            let response = self.execute(device, &request);
            let at = blk::slot(blk::RESPONSES, blk::RESPONSE_SIZE, self.resp_head) as u64;
            self.region.write_bytes(at, &response.encode());
            fence(Ordering::SeqCst);
            self.resp_head = self.resp_head.wrapping_add(1);
            self.tail = self.tail.wrapping_add(1);
            self.region
                .write::<u32>(blk::RESP_HEAD as u64, self.resp_head);
            self.region.write::<u32>(blk::REQ_TAIL as u64, self.tail);
            answered = true;
        }
        answered
    }

    fn execute(&self, device: &mut Device, request: &Request) -> Response {
        let mut response = Response {
            id: request.id,
            status: status::OK,
            value: 0,
        };
        let region_len = self.region.len();
        response.status = match blk::check(request, self.disk, region_len) {
            Err(status) => status,
            Ok(Action::Info) => {
                response.value = self.disk.sectors.min(u64::from(u32::MAX)) as u32;
                status::OK
            }
            Ok(Action::Flush) => device.flush_cache(),
            Ok(Action::Read {
                sector,
                count,
                buffer,
            }) => self.move_data(device, BLK_T_IN, sector, count, buffer),
            Ok(Action::Write {
                sector,
                count,
                buffer,
            }) => self.move_data(device, BLK_T_OUT, sector, count, buffer),
        };
        response
    }

    /// A checked read or write, in as many device requests as the bounce
    /// buffer needs; the first failure ends it with its status.
    fn move_data(
        &self,
        device: &mut Device,
        kind: u32,
        sector: u64,
        count: u32,
        buffer: u64,
    ) -> u32 {
        let total = u64::from(count) * blk::SECTOR;
        let piece = device.max_transfer();
        let mut done = 0;
        while done < total {
            let bytes = (total - done).min(piece);
            let at = sector + done / blk::SECTOR;
            if kind == BLK_T_OUT {
                device
                    .dma
                    .copy_from(DATA_PAGE * PAGE, &self.region, buffer + done, bytes);
            }
            let status = device.transfer(kind, at, bytes);
            if status != status::OK {
                return status;
            }
            if kind == BLK_T_IN {
                self.region
                    .copy_from(buffer + done, &device.dma, DATA_PAGE * PAGE, bytes);
            }
            done += bytes;
        }
        status::OK
    }
}

/// The BAR window an argument `dev.barN` names.
fn bar(args: &str, index: u8) -> Option<Window> {
    let key = [b'd', b'e', b'v', b'.', b'b', b'a', b'r', b'0' + index];
    let key = core::str::from_utf8(&key).ok()?;
    // SAFETY: the root task maps the BARs it names.
    unsafe { window_arg(args, key) }
}

impl Device {
    fn start(
        args: &str,
        config: Window,
        dma: Window,
        msi: u64,
        tsc_hz: u64,
    ) -> Result<Device, &'static str> {
        if dma.len() < (DATA_PAGE + 1) * PAGE {
            return Err("the dma mapping is smaller than 5 pages");
        }
        let pages = ((dma.len() / PAGE) as usize).min(MAX_PAGES);
        let mut phys = [0; MAX_PAGES];
        for (i, p) in phys.iter_mut().enumerate().take(pages) {
            *p = sys::mem_phys(dma.base() / PAGE + i as u64)
                .map_err(|_| "mem_phys refused the dma pages")?;
        }
        let bar = |index| bar(args, index);
        let transport = Transport::find(&config, &bar)?;
        // MSI-X entry 0 raises our first MSI.
        if sys::create_sm(IRQ_SM, 0, 0).is_err() {
            return Err("create_sm");
        }
        let (address, data) =
            sys::irq_assign_msi(IRQ_SM, msi).map_err(|_| "irq_assign of the MSI")?;
        transport.enable_msix(&config, &bar, address, data)?;
        let flush = transport.negotiate(FEATURE_FLUSH)? & FEATURE_FLUSH != 0;
        for page in 0..DATA_PAGE {
            for offset in (0..PAGE).step_by(8) {
                dma.write::<u64>(page * PAGE + offset, 0);
            }
        }
        let (size, notify) = transport.queue(
            0,
            QUEUE_ENTRIES,
            phys[0] + DESC_AT,
            phys[0] + AVAIL_AT,
            phys[0] + USED_AT,
        )?;
        transport.driver_ok();
        let device_cfg = transport.device;
        let capacity = device_cfg.read::<u32>(0) as u64 | (device_cfg.read::<u32>(4) as u64) << 32;
        if size < 3 {
            return Err("the device's queue holds fewer than 3 descriptors");
        }
        Ok(Device {
            notify,
            dma,
            phys,
            pages,
            size,
            avail_idx: 0,
            used_idx: 0,
            flush,
            capacity,
            interrupts: 0,
            tsc_hz,
            outstanding: false,
        })
    }

    /// The most bytes one device request moves: the bounce buffer, and
    /// as many pages as the queue has descriptors beside header and status.
    fn max_transfer(&self) -> u64 {
        let pages = (self.pages - DATA_PAGE as usize).min(usize::from(self.size) - 2);
        pages as u64 * PAGE
    }

    fn descriptor(&self, index: u64, address: u64, len: u32, flags: u16, next: u16) {
        let at = DESC_AT + index * 16;
        self.dma.write::<u64>(at, address);
        self.dma.write::<u32>(at + 8, len);
        self.dma.write::<u16>(at + 12, flags);
        self.dma.write::<u16>(at + 14, next);
    }

    /// Waits up to the request timeout for the device's next completion,
    /// counting its interrupt; whether it came.
    fn wait_completion(&mut self) -> bool {
        let deadline = rdtsc().saturating_add(self.tsc_hz / 1000 * REQUEST_TIMEOUT_MS);
        // Each completion raises one MSI (the device's used-buffer
        // notification), so each request consumes one up.
        loop {
            fence(Ordering::SeqCst);
            let done = self.dma.read::<u16>(USED_AT + 2) != self.used_idx;
            match sys::sm_down(IRQ_SM, deadline, false) {
                Ok(()) => {
                    self.interrupts += 1;
                    if self.interrupts == 1 {
                        println!("blk: first completion interrupt arrived");
                    }
                    fence(Ordering::SeqCst);
                    if self.dma.read::<u16>(USED_AT + 2) != self.used_idx {
                        return true;
                    }
                }
                Err(_) if done => {
                    println!("blk: a completion came without its interrupt");
                    return true;
                }
                Err(_) => {
                    fence(Ordering::SeqCst);
                    return self.dma.read::<u16>(USED_AT + 2) != self.used_idx;
                }
            }
        }
    }

    /// One request on the device, waited for: a blk status. A request the
    /// device does not complete in time is an I/O error; the device keeps
    /// it, and with it the driver's buffers, so the next request first
    /// waits for that completion (an error again while it does not come)
    /// instead of reusing buffers the device may still write, and of
    /// taking the old completion for its own.
    /// `bytes` (at most [`max_transfer`](Self::max_transfer)) come from or
    /// go to the bounce buffer's start.
    fn transfer(&mut self, kind: u32, sector: u64, bytes: u64) -> u32 {
        if self.outstanding {
            if !self.wait_completion() {
                println!("blk: the device still holds a timed-out request");
                return status::IO_ERROR;
            }
            println!("blk: the timed-out request completed; going on");
            self.used_idx = self.used_idx.wrapping_add(1);
            self.outstanding = false;
        }
        let header = HEADER_PAGE * PAGE;
        self.dma.write::<u32>(header, kind);
        self.dma.write::<u32>(header + 4, 0);
        self.dma.write::<u64>(header + 8, sector);
        self.dma.write::<u8>(header + STATUS_AT, 0xff);
        let status_phys = self.phys[HEADER_PAGE as usize] + STATUS_AT;
        self.descriptor(0, self.phys[HEADER_PAGE as usize], 16, DESC_NEXT, 1);
        let flags = if kind == BLK_T_IN {
            DESC_NEXT | DESC_WRITE
        } else {
            DESC_NEXT
        };
        // The data pages, physically adjacent ones in one descriptor: at
        // most `max_transfer` bytes, so at most `size - 2` descriptors.
        let mut index = 1u16;
        let pages = &self.phys[DATA_PAGE as usize..self.pages];
        blk::bounce_segments(pages, bytes.min(self.max_transfer()), |address, len| {
            self.descriptor(u64::from(index), address, len as u32, flags, index + 1);
            index += 1;
        });
        self.descriptor(u64::from(index), status_phys, 1, DESC_WRITE, 0);
        let slot = u64::from(self.avail_idx % self.size);
        self.dma.write::<u16>(AVAIL_AT + 4 + slot * 2, 0);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.dma.write::<u16>(AVAIL_AT + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        self.notify.write::<u16>(0, 0);
        if !self.wait_completion() {
            println!("blk: the device did not complete a request within {REQUEST_TIMEOUT_MS} ms");
            self.outstanding = true;
            return status::IO_ERROR;
        }
        self.used_idx = self.used_idx.wrapping_add(1);
        match self.dma.read::<u8>(header + STATUS_AT) {
            0 => status::OK,
            2 => status::UNSUPPORTED,
            _ => status::IO_ERROR,
        }
    }

    fn flush_cache(&mut self) -> u32 {
        if !self.flush {
            // Without VIRTIO_BLK_F_FLUSH the device writes through.
            return status::OK;
        }
        self.transfer(BLK_T_FLUSH, 0, 0)
    }
}

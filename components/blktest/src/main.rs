//! `blktest`: a client of the block service. Through its shared region
//! (`disk`) and semaphores (30: up the service, 31: its answers) it asks
//! for its disk's size, and then:
//! - if sector 0 holds no mark of its own: writes a pattern over sectors
//!   0..64 (in one 32 KiB request) and a mark in sector 0, flushes, reads everything back and
//!   compares (`NAME: wrote, flushed and read back 64 sectors`);
//! - if the mark is there (a second boot on the same image): checks the
//!   pattern (`NAME: second boot read back what the first wrote`);
//! - then sends what it must not: sectors past its disk, a sector count
//!   that wraps, zero and oversized counts, buffers outside its data area,
//!   an unknown operation — each must get its error status
//!   (`NAME: 7 bad requests refused`).
//!
//! Arguments: `name=NAME`, `region=MAPPING` and that mapping, `tsc_hz`.
#![no_std]
#![no_main]

use common::args;
use common::blk::{self, op, status, Response};
use common::blk_client;
use moat_user::mmio::{window_arg, Window};
use moat_user::println;

moat_user::entry!(main);

const SERVICE_SM: u64 = 30;
const REPLY_SM: u64 = 31;
const SECTORS: u32 = 64;
const MARK: &[u8; 8] = b"MOATBLK1";

/// The shared client, with this component's name on its failures.
struct Client<'a> {
    name: &'a str,
    inner: blk_client::Client,
}

impl Client<'_> {
    fn region(&self) -> &Window {
        self.inner.region()
    }

    fn request(&mut self, op: u32, sector: u64, count: u32, buffer: u64) -> Result<Response, ()> {
        self.inner
            .request(op, sector, count, buffer)
            .map_err(|error| println!("{}: FAIL op {op}: {error:?}", self.name))
    }

    fn ok(&mut self, op: u32, sector: u64, count: u32, buffer: u64) -> Result<Response, ()> {
        self.inner.ok(op, sector, count, buffer).map_err(|error| {
            println!(
                "{}: FAIL op {op} sector {sector} count {count}: {error:?}",
                self.name
            )
        })
    }
}

/// The byte the pattern has at `offset` of sector `sector` for client `name`.
fn pattern(name: &str, sector: u64, offset: u64) -> u8 {
    let seed = name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    (seed.wrapping_mul(7) ^ sector.wrapping_mul(131) ^ offset.wrapping_mul(17)) as u8
}

fn main(args: &str) -> i32 {
    let name = args::value(args, "name").unwrap_or("blktest");
    let key = args::value(args, "region").unwrap_or("disk");
    // SAFETY: the root task maps the `shared` line's region it names.
    let Some(region) = (unsafe { window_arg(args, key) }) else {
        println!("{name}: FAIL no disk region");
        return 1;
    };
    let timeout = args::tsc_hz(args).saturating_mul(10);
    let Ok(inner) = blk_client::Client::new(region, SERVICE_SM, REPLY_SM, timeout) else {
        println!("{name}: FAIL the region is too small");
        return 1;
    };
    let mut client = Client { name, inner };
    match run(&mut client) {
        Ok(()) => 0,
        Err(()) => 1,
    }
}

fn run(c: &mut Client) -> Result<(), ()> {
    let name = c.name;
    let sectors = u64::from(c.ok(op::INFO, 0, 0, 0)?.value);
    println!("{name}: its disk has {sectors} sectors");
    let data = blk::DATA;
    let span = u64::from(SECTORS) * blk::SECTOR;
    // Written in one request of 32 KiB, read back in two (multi-page
    // requests: the service's DMA pages need not be contiguous).
    let step = SECTORS;
    // Sector 0: is our mark there?
    c.ok(op::READ, 0, 1, data)?;
    let mut mark = [0u8; 8];
    c.region().read_bytes(data, &mut mark);
    let second_boot = &mark == MARK;
    if !second_boot {
        for i in 0..span {
            c.region()
                .write::<u8>(data + i, pattern(name, i / blk::SECTOR, i % blk::SECTOR));
        }
        c.region().write_bytes(data, MARK);
        for first in (0..SECTORS).step_by(step as usize) {
            let buffer = data + u64::from(first) * blk::SECTOR;
            c.ok(op::WRITE, u64::from(first), step, buffer)?;
        }
        c.ok(op::FLUSH, 0, 0, 0)?;
        // Wipe the buffer, read back.
        for i in 0..span {
            c.region().write::<u8>(data + i, 0);
        }
    }
    for first in (0..SECTORS).step_by(step as usize / 2) {
        let buffer = data + u64::from(first) * blk::SECTOR;
        c.ok(op::READ, u64::from(first), step / 2, buffer)?;
    }
    for i in 8..span {
        let want = pattern(name, i / blk::SECTOR, i % blk::SECTOR);
        let got = c.region().read::<u8>(data + i);
        if got != want {
            println!("{name}: FAIL byte {i} read back as {got:#x}, not {want:#x}");
            return Err(());
        }
    }
    if second_boot {
        println!("{name}: second boot read back what the first wrote");
    } else {
        println!("{name}: wrote, flushed and read back {SECTORS} sectors");
    }

    let region = c.region().len();
    let bad = [
        (op::READ, sectors, 1, data, status::OUT_OF_RANGE),
        (op::WRITE, sectors - 1, 2, data, status::OUT_OF_RANGE),
        (op::WRITE, u64::MAX - 3, 8, data, status::OUT_OF_RANGE),
        (op::READ, 0, 0, data, status::BAD_COUNT),
        (op::READ, 0, blk::MAX_SECTORS + 1, data, status::BAD_COUNT),
        (op::READ, 0, 1, 0, status::BAD_BUFFER),
        (op::READ, 0, 8, region - 512, status::BAD_BUFFER),
        // One sector more than the data area holds.
        (
            op::READ,
            0,
            ((region - data) / blk::SECTOR) as u32 + 1,
            data,
            status::BAD_BUFFER,
        ),
        (77, 0, 1, data, status::UNSUPPORTED),
    ];
    for &(op, sector, count, buffer, want) in &bad {
        let got = c.request(op, sector, count, buffer)?.status;
        if got != want {
            println!("{name}: FAIL op {op} sector {sector:#x} count {count} buffer {buffer:#x}: status {got}, not {want}");
            return Err(());
        }
    }
    println!("{name}: {} bad requests refused", bad.len());
    // The rings still work after the refusals.
    c.ok(op::READ, 0, 1, data)?;
    println!("{name}: done");
    Ok(())
}

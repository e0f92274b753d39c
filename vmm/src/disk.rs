//! The guest disk's storage: the block service when the arguments name a
//! region shared with it (`blk=MAPPING`, the service's semaphore at
//! selector [`SERVICE_SM`], the answers' at [`ANSWER_SM`]), else a RAM
//! copy of the `disk` boot module, else no disk.
//!
//! Through the service the guest's writes reach the machine's disk (the
//! host's image file under QEMU) and its flushes the device's flush; a
//! request the service fails or does not answer is an I/O error for the
//! guest (`VIRTIO_BLK_S_IOERR`), never the VMM's end. A restarted
//! service serves the request its dead instance left in the ring, so a
//! crash of the service costs the guest a slower answer, not an error
//! (unless the restart takes longer than the answer timeout); the VMM
//! logs that the service restarted.

use alloc::boxed::Box;
use alloc::vec::Vec;

use common::args;
use common::blk_client::{self, Client};
use moat_user::mmio::window_arg;
use moat_user::{println, Sel};
use vdev::virtio::block::{BlockBackend, IoError, MemDisk};

/// The block service's request semaphore (upped per request).
pub const SERVICE_SM: Sel = 30;
/// This client's answer semaphore (the service ups it).
pub const ANSWER_SM: Sel = 31;
/// Seconds to wait for one answer of the service.
const ANSWER_SECS: u64 = 10;
/// Failed requests the log shows, per disk.
const MAX_ERRORS_LOGGED: u32 = 8;

/// The guest's disk as the arguments describe it; `ram` is the copied
/// `disk` module, used when no block service is named.
pub fn storage(
    vmm_args: &str,
    tsc_hz: u64,
    ram: Option<Vec<u8>>,
) -> Result<Option<Box<dyn BlockBackend>>, &'static str> {
    let Some(mapping) = args::value(vmm_args, "blk") else {
        return Ok(ram.map(|bytes| Box::new(MemDisk::new(bytes)) as Box<dyn BlockBackend>));
    };
    // SAFETY: the root task maps every `shared` region it names in the
    // arguments, for this task's life; it is used only through volatile
    // accesses (`Window`).
    let region = unsafe { window_arg(vmm_args, mapping) }.ok_or("blk= names no region")?;
    let timeout = tsc_hz.saturating_mul(ANSWER_SECS);
    let client = Client::new(region, SERVICE_SM, ANSWER_SM, timeout);
    let disk = client.and_then(ServiceDisk::connect).map_err(|error| {
        println!("vmm: FAIL the block service does not give the disk: {error:?}");
        "block service"
    })?;
    println!("vmm: disk from the block service: {} sectors", disk.sectors);
    Ok(Some(Box::new(disk)))
}

/// A disk served by the block service.
pub struct ServiceDisk {
    client: Client,
    sectors: u64,
    errors: u32,
    flushes: u64,
    /// The service's starts last seen (its `service_starts`).
    starts: u32,
}

impl ServiceDisk {
    pub fn connect(mut client: Client) -> Result<Self, blk_client::Error> {
        let sectors = client.sectors()?;
        let starts = client.service_starts();
        Ok(Self {
            client,
            sectors,
            errors: 0,
            flushes: 0,
            starts,
        })
    }

    /// Logs a restart of the service seen since the last request.
    fn note_restart(&mut self) {
        let starts = self.client.service_starts();
        if starts != self.starts {
            self.starts = starts;
            println!("vmm: disk: the block service restarted (start {starts}); going on");
        }
    }

    fn failed(&mut self, what: &str, sector: u64, error: blk_client::Error) -> IoError {
        self.errors = self.errors.saturating_add(1);
        if self.errors <= MAX_ERRORS_LOGGED {
            println!("vmm: disk error: {what} at sector {sector}: {error:?}");
        }
        IoError
    }
}

impl BlockBackend for ServiceDisk {
    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let result = self.client.read(sector, buf);
        self.note_restart();
        result.map_err(|e| self.failed("read", sector, e))
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), IoError> {
        let result = self.client.write(sector, data);
        self.note_restart();
        result.map_err(|e| self.failed("write", sector, e))
    }

    fn flush(&mut self) -> Result<(), IoError> {
        let result = self.client.flush();
        self.note_restart();
        result.map_err(|e| self.failed("flush", 0, e))?;
        self.flushes += 1;
        if self.flushes == 1 {
            println!("vmm: disk: the guest's first flush reached the block service's device");
        }
        Ok(())
    }
}

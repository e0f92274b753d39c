//! The root's portal handler ECs: exception reports and the registry.
//!
//! Both run on the calling component's SC, so they only record what
//! happened and wake the main EC (`SUPERVISOR_SM`); all policy is the main
//! EC's (`supervisor.rs`).

use alloc::string::String;
use alloc::vec::Vec;

use moat_abi::{layout, rights, selectors, ExceptionMessage, Space, Status, TypedItem, UTCB_WORDS};
use moat_roottask::exception::Mailbox;
use moat_roottask::registry::{self, Board, Instance, Name};
use moat_user::{portal, portal_entry, sys, Sel, Stack};

/// The main EC's semaphore: upped for each exception report and publication.
pub const SUPERVISOR_SM: Sel = selectors::FIRST_FREE;
pub const EXCEPTION_EC: Sel = selectors::FIRST_FREE + 1;
pub const REGISTRY_EC: Sel = selectors::FIRST_FREE + 2;
/// The root's selectors from here up to the registry window are allocated.
pub const FIRST_ALLOCATED: Sel = selectors::FIRST_FREE + 16;

/// UTCBs of the handler ECs, after the main EC's.
const EXCEPTION_UTCB: u64 = layout::MAIN_UTCB + 0x1000;
const REGISTRY_UTCB: u64 = layout::MAIN_UTCB + 0x2000;

/// `moat_abi::exception_reply::KILL` (not exported by the ABI crate).
const KILL: u64 = 0;

static EXCEPTION_STACK: Stack<8192> = Stack::new();
static REGISTRY_STACK: Stack<8192> = Stack::new();

pub static BOARD: Board = Board::new();
pub static MAILBOX: Mailbox = Mailbox::new();
/// What each component provides, by manifest index (set before any
/// component starts).
static PROVIDES: spin::Once<Vec<Option<String>>> = spin::Once::new();

portal_entry!(moat_root_exception_entry, on_exception);
portal_entry!(moat_root_registry_entry, on_registry);

pub fn exception_entry() -> u64 {
    portal::entry_address(moat_root_exception_entry)
}

pub fn registry_entry() -> u64 {
    portal::entry_address(moat_root_registry_entry)
}

/// Creates the supervisor semaphore and both handler ECs.
pub fn install(provides: Vec<Option<String>>) -> Result<(), (&'static str, Status)> {
    PROVIDES.call_once(|| provides);
    let own = selectors::SELF_PD;
    sys::create_sm(SUPERVISOR_SM, own, 0).map_err(|s| ("create the supervisor semaphore", s))?;
    sys::create_ec(
        EXCEPTION_EC,
        own,
        true,
        moat_user::abi::CPU_OF_CALLER,
        0,
        EXCEPTION_STACK.top(),
        EXCEPTION_UTCB,
        u64::MAX,
        0,
    )
    .map_err(|s| ("create the exception handler EC", s))?;
    sys::create_ec(
        REGISTRY_EC,
        own,
        true,
        moat_user::abi::CPU_OF_CALLER,
        0,
        REGISTRY_STACK.top(),
        REGISTRY_UTCB,
        u64::MAX,
        0,
    )
    .map_err(|s| ("create the registry handler EC", s))?;
    // SAFETY: the kernel mapped the registry EC's UTCB at REGISTRY_UTCB just
    // now; no activation can run before the first portal to it is made, so
    // nothing else refers to it.
    let utcb = unsafe { moat_user::utcb_at(REGISTRY_UTCB) };
    (utcb.recv_obj_base, utcb.recv_obj_count) = registry::WINDOW;
    Ok(())
}

fn on_exception(id: u64, words: [u64; 6]) -> [u64; 6] {
    let instance = Instance::from_portal_id(id);
    if MAILBOX.post(instance, &ExceptionMessage::from_words(words)) {
        let _ = sys::sm_up(SUPERVISOR_SM);
    }
    [KILL, 0, 0, 0, 0, 0]
}

fn on_registry(id: u64, words: [u64; 6]) -> [u64; 6] {
    // SAFETY: REGISTRY_UTCB is this handler EC's UTCB (mapped by
    // `install`), and only this EC touches it after `install`; activations
    // run one at a time.
    let utcb = unsafe { moat_user::utcb_at(REGISTRY_UTCB) };
    let instance = Instance::from_portal_id(id);
    let verdict = check(instance, &words);
    let slot = registry::slot(instance.index);
    let mut arrived = false;
    let first = (utcb.untyped as usize).min(UTCB_WORDS);
    let typed = (utcb.typed as usize).min((UTCB_WORDS - first) / TypedItem::WORDS);
    for i in 0..typed {
        let at = first + i * TypedItem::WORDS;
        let item = [utcb.words[at], utcb.words[at + 1], utcb.words[at + 2]];
        let Some(item) = TypedItem::decode(item) else {
            continue;
        };
        let wanted = item.space == Space::Object && item.destination == slot && item.count == 1;
        if verdict.is_none() && wanted && !arrived {
            arrived = true;
        } else if item.space == Space::Object && in_window(&item) {
            // Whatever else landed in the window goes again at once, so no
            // one can fill another component's slot.
            let _ = sys::revoke(Space::Object, item.destination, item.count, true);
        }
    }
    // Send nothing back but the reply words.
    utcb.untyped = 0;
    utcb.typed = 0;
    let code = match verdict {
        Some(code) => code,
        None if !arrived => registry::REPLY_NO_PORTAL,
        None => match BOARD.publish(instance) {
            Some(_) => {
                let _ = sys::sm_up(SUPERVISOR_SM);
                registry::REPLY_OK
            }
            None => {
                let _ = sys::revoke(Space::Object, slot, 1, true);
                registry::REPLY_STALE
            }
        },
    };
    [code, 0, 0, 0, 0, 0]
}

fn in_window(item: &TypedItem) -> bool {
    let (base, count) = registry::WINDOW;
    item.destination >= base && item.count <= count && item.destination - base <= count - item.count
}

/// `None` if the call may publish; else the reply code.
fn check(instance: Instance, words: &[u64; 6]) -> Option<u64> {
    if !BOARD.is_current(instance) {
        return Some(registry::REPLY_STALE);
    }
    if words[0] != registry::OP_PUBLISH {
        return Some(registry::REPLY_BAD_REQUEST);
    }
    let Some(name) = Name::unpack(words) else {
        return Some(registry::REPLY_BAD_REQUEST);
    };
    let provides = PROVIDES
        .get()
        .and_then(|p| p.get(instance.index))
        .and_then(Option::as_deref);
    if provides != Some(name.as_str()) {
        return Some(registry::REPLY_NOT_PROVIDER);
    }
    if BOARD.publication(instance.index) != 0 {
        return Some(registry::REPLY_ALREADY_PUBLISHED);
    }
    None
}

/// Capability rights a component gets on a shared semaphore.
pub fn semaphore_rights(up: bool, down: bool) -> u8 {
    (if up { rights::SM_UP } else { 0 }) | (if down { rights::SM_DOWN } else { 0 })
}

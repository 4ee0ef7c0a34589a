//! The slot a session shares with its forks.
//!
//! A Lua state's pointers are absolute: a state lives at the address it was built at and
//! nowhere else, so a fork cannot get an arena of its own holding a copy of the state. A
//! session and its forks (a family) share one slot instead. At any time one member's state is
//! in the arena (the occupant); the others' wait as images, copies of the arena's used prefix
//! (`Slot::image`). A call by a member that is not the occupant saves the occupant's state as
//! an image and loads its own (`Slot::load`): a copy of each state. Members are independent
//! from the fork on — each has its own state, handles, counters and checkpoints — but their
//! calls take turns: while one member's call has the slot, the others' answer `:arena_busy`.
//!
//! The images live on the host's heap and grow with the scripts' data: each is reserved
//! fallibly (`slot::copy_of`), and a copy the allocator refuses refuses the fork or the call
//! that needed it ([`CopyRefused`]) with the family as it was — no member lost or half-copied.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::pool::Lease;
use crate::slot::{self, CopyRefused};

/// A session and its forks.
pub struct Family {
    inner: Mutex<Inner>,
}

struct Inner {
    /// `None` while a member's call has it.
    lease: Option<Lease>,
    /// The member whose state is in the arena (`None` once it has left).
    occupant: Option<u64>,
    /// The other members' states.
    images: HashMap<u64, Image>,
    next: u64,
}

struct Image {
    bytes: Vec<u8>,
    used: usize,
}

impl Family {
    /// A family of one, member 0, whose state is in `lease`'s slot.
    pub fn new(lease: Lease) -> (Arc<Family>, u64) {
        let family = Family {
            inner: Mutex::new(Inner {
                lease: Some(lease),
                occupant: Some(0),
                images: HashMap::new(),
                next: 1,
            }),
        };
        (Arc::new(family), 0)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change under the lock completes before it is released (a copy in progress
        // panicking would be a bug in the slot): the data stays consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot with member `id`'s state in it, lent until [`Family::give_back`]; `Ok(None)`
    /// while another member's call has it. `Err` when the occupant's state (another member's)
    /// could not be saved as an image: nothing changed, the occupant still in the arena.
    pub fn take(&self, id: u64) -> Result<Option<Lease>, CopyRefused> {
        let mut inner = self.lock();
        let Some(mut lease) = inner.lease.take() else {
            return Ok(None);
        };
        if inner.occupant != Some(id) {
            let slot = lease.slot_mut();
            if let Some(occupant) = inner.occupant {
                // The occupant's checkpoint dies with its stay in the arena (`Slot::load`
                // forgets it): forgotten first, its memory serves the image.
                slot.forget_checkpoint();
                match slot.image() {
                    Ok(bytes) => {
                        let used = slot.used();
                        inner.images.insert(occupant, Image { bytes, used });
                    }
                    Err(refused) => {
                        inner.lease = Some(lease);
                        return Err(refused);
                    }
                }
            }
            let mine = inner
                .images
                .remove(&id)
                .expect("a member not in the arena has an image");
            slot.load(&mine.bytes);
            inner.occupant = Some(id);
        }
        Ok(Some(lease))
    }

    /// Ends a loan of [`Family::take`].
    pub fn give_back(&self, lease: Lease) {
        self.lock().lease = Some(lease);
    }

    /// A new member holding a copy of member `id`'s state; `Ok(None)` while a call has the
    /// slot and `id`'s state is in it. `Err` when the copy could not get its memory: no new
    /// member, `id` untouched.
    pub fn fork(&self, id: u64) -> Result<Option<u64>, CopyRefused> {
        let mut inner = self.lock();
        let image = if inner.occupant == Some(id) {
            let Some(lease) = inner.lease.as_ref() else {
                return Ok(None);
            };
            let slot = lease.slot();
            Image {
                bytes: slot.image()?,
                used: slot.used(),
            }
        } else {
            let Some(mine) = inner.images.get(&id) else {
                return Ok(None);
            };
            Image {
                bytes: slot::copy_of(&mine.bytes, "an image of a state")?,
                used: mine.used,
            }
        };
        let new = inner.next;
        inner.next += 1;
        inner.images.insert(new, image);
        Ok(Some(new))
    }

    /// Bytes member `id`'s state holds; `None` while a call has the slot with it.
    pub fn used(&self, id: u64) -> Option<usize> {
        let inner = self.lock();
        if inner.occupant == Some(id) {
            inner.lease.as_ref().map(|l| l.slot().used())
        } else {
            inner.images.get(&id).map(|i| i.used)
        }
    }

    /// Member `id` is gone: its state is forgotten (the slot goes back to the pool with the
    /// last member).
    pub fn leave(&self, id: u64) {
        let mut inner = self.lock();
        inner.images.remove(&id);
        if inner.occupant == Some(id) {
            inner.occupant = None;
        }
    }
}

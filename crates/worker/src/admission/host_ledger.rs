//! The host-wide ledger: one file per GPU (under e.g. `/dev/shm`) that every worker process on
//! the machine books its reservations in, under an exclusive file lock. Each ledger has an owner
//! id and holds a lock on an "alive" file for as long as it exists; entries whose owner's lock
//! is free are reclaimed on every access, so a crashed worker's memory comes back. Owner ids,
//! not pids, so workers in different PID namespaces sharing `/dev/shm` never collide. Files are
//! named by the GPU's UUID, not an index: two workers with different `CUDA_VISIBLE_DEVICES`
//! still meet in the same file for the same card. Besides job reservations, each worker books
//! its standing `resident` memory (model weights, CUDA context) there.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct HostFile {
    entries: Vec<HostEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct HostEntry {
    owner: String,
    pid: u32,
    id: u64,
    bytes: u64,
    /// The owner's standing memory, not a job's.
    #[serde(default)]
    resident: bool,
}

/// What the file holds, summed over every live worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostTotals {
    /// Job reservations.
    pub jobs: u64,
    /// Resident memory.
    pub resident: u64,
}

/// One read of the file: the totals, and what each other worker has booked (by the pid it
/// saw as its own), for telling its memory from others' in NVML's figures.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostView {
    /// Every live worker's bookings.
    pub totals: HostTotals,
    /// Other workers: (pid, bytes booked: resident and jobs).
    pub peers: Vec<(u32, u64)>,
}

/// How long a worker waits for the file lock before giving up with an error: a peer stalled
/// while holding it must not stall admission here.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The shared ledger file of one device.
#[derive(Debug)]
pub struct HostLedger {
    dir: PathBuf,
    path: PathBuf,
    lock_path: PathBuf,
    owner: String,
    pid: u32,
    /// Locked for this ledger's lifetime: the proof, to other processes, that we are alive.
    _alive: File,
}

fn alive_path(dir: &Path, owner: &str) -> PathBuf {
    dir.join(format!("runpod-worker-owner-{owner}.alive"))
}

impl HostLedger {
    /// Opens (or creates) the ledger of the GPU `uuid` in `dir`.
    pub fn open(dir: &Path, uuid: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let alive = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(alive_path(dir, &owner))?;
        alive.lock()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            path: dir.join(format!("runpod-worker-{}.ledger.json", file_safe(uuid))),
            lock_path: dir.join(format!("runpod-worker-{}.ledger.lock", file_safe(uuid))),
            owner,
            pid: std::process::id(),
            _alive: alive,
        })
    }

    /// The file the reservations are kept in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Books `bytes` under `id` if the host-wide total stays within `budget`.
    pub fn try_reserve(&self, id: u64, bytes: u64, budget: u64) -> std::io::Result<bool> {
        self.with_locked(|file| {
            let total: u64 = file.entries.iter().map(|e| e.bytes).sum();
            let fits = total + bytes <= budget;
            if fits {
                file.entries.push(HostEntry {
                    owner: self.owner.clone(),
                    pid: self.pid,
                    id,
                    bytes,
                    resident: false,
                });
            }
            fits
        })
    }

    /// Removes our reservation `id`.
    pub fn release(&self, id: u64) -> std::io::Result<()> {
        self.with_locked(|file| {
            file.entries
                .retain(|e| !(e.owner == self.owner && e.id == id))
        })
    }

    /// Replaces our resident memory with `bytes` (booked whatever the budget: it is a fact).
    pub fn set_resident(&self, bytes: u64) -> std::io::Result<()> {
        self.with_locked(|file| {
            file.entries
                .retain(|e| !(e.owner == self.owner && e.resident));
            file.entries.push(HostEntry {
                owner: self.owner.clone(),
                pid: self.pid,
                id: 0,
                bytes,
                resident: true,
            });
        })
    }

    /// Job reservations and resident memory of every live process.
    pub fn totals(&self) -> std::io::Result<HostTotals> {
        self.with_locked(|file| {
            file.entries
                .iter()
                .fold(HostTotals::default(), |mut totals, e| {
                    if e.resident {
                        totals.resident += e.bytes;
                    } else {
                        totals.jobs += e.bytes;
                    }
                    totals
                })
        })
    }

    /// The totals and the other workers' bookings.
    pub fn view(&self) -> std::io::Result<HostView> {
        self.with_locked(|file| {
            let mut view = HostView::default();
            for e in &file.entries {
                if e.resident {
                    view.totals.resident += e.bytes;
                } else {
                    view.totals.jobs += e.bytes;
                }
                if e.owner != self.owner {
                    match view.peers.iter_mut().find(|(pid, _)| *pid == e.pid) {
                        Some((_, bytes)) => *bytes += e.bytes,
                        None => view.peers.push((e.pid, e.bytes)),
                    }
                }
            }
            view
        })
    }

    /// Process ids with reservations (as each saw its own pid).
    pub fn pids(&self) -> std::io::Result<Vec<u32>> {
        self.with_locked(|file| {
            let mut pids: Vec<u32> = file.entries.iter().map(|e| e.pid).collect();
            pids.sort_unstable();
            pids.dedup();
            pids
        })
    }

    /// Whether the ledger `owner` still exists: its alive file is locked by someone.
    fn owner_alive(&self, owner: &str) -> bool {
        if owner == self.owner {
            return true;
        }
        let path = alive_path(&self.dir, owner);
        let Ok(file) = OpenOptions::new().write(true).open(&path) else {
            return false;
        };
        match file.try_lock() {
            Ok(()) => {
                // Nobody holds it: its owner is gone.
                let _ = std::fs::remove_file(&path);
                false
            }
            Err(_) => true,
        }
    }

    fn with_locked<T>(&self, f: impl FnOnce(&mut HostFile) -> T) -> std::io::Result<T> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)?;
        lock_within(&lock, LOCK_WAIT)?;
        let mut file = read(&self.path)?;
        let original = file.clone();
        let before = file.entries.len();
        let mut alive = std::collections::HashMap::new();
        file.entries.retain(|e| {
            *alive
                .entry(e.owner.clone())
                .or_insert_with(|| self.owner_alive(&e.owner))
        });
        if file.entries.len() != before {
            tracing::info!(
                "host-wide GPU ledger: reclaimed {} reservation(s) of exited workers",
                before - file.entries.len()
            );
        }
        let value = f(&mut file);
        // Only a change is written (a read leaves the file alone); write then rename, so
        // readers never see half a file.
        if file != original {
            let temporary = self.path.with_extension(format!("tmp{}", self.owner));
            let mut out = File::create(&temporary)?;
            out.write_all(&serde_json::to_vec(&file)?)?;
            std::fs::rename(&temporary, &self.path)?;
        }
        lock.unlock()?;
        Ok(value)
    }
}

impl Drop for HostLedger {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(alive_path(&self.dir, &self.owner));
    }
}

/// Takes `file`'s exclusive lock, waiting at most `wait`.
fn lock_within(file: &File, wait: std::time::Duration) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + wait;
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the host-wide GPU ledger's lock is held by a peer that has not let go \
                         for {} s",
                        wait.as_secs()
                    ),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// A UUID as a file-name part: letters, digits and '-' only.
fn file_safe(uuid: &str) -> String {
    uuid.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn read(path: &Path) -> std::io::Result<HostFile> {
    let mut text = String::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_string(&mut text)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HostFile::default()),
        Err(e) => return Err(e),
    }
    // A corrupt file (a crash before this format existed, a hand edit) must not stop admission.
    Ok(serde_json::from_str(&text).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledgers_on_one_file_share_the_budget_and_a_dead_owners_reservations_are_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostLedger::open(dir.path(), "GPU-0").unwrap();
        let b = HostLedger::open(dir.path(), "GPU-0").unwrap();
        assert!(a.try_reserve(1, 60, 100).unwrap());
        assert!(
            b.try_reserve(1, 40, 100).unwrap(),
            "b's id 1 is its own, not a's"
        );
        assert!(
            !a.try_reserve(2, 1, 100).unwrap(),
            "the file is full for both"
        );
        assert_eq!(b.totals().unwrap().jobs, 100);
        // b's process dies: its alive lock goes with it, and its 40 come back.
        drop(b);
        assert_eq!(a.totals().unwrap().jobs, 60);
        a.release(1).unwrap();
        assert_eq!(a.totals().unwrap().jobs, 0);
    }

    #[test]
    fn resident_memory_counts_against_every_workers_budget_and_is_replaced_not_added() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostLedger::open(dir.path(), "GPU-0").unwrap();
        let b = HostLedger::open(dir.path(), "GPU-0").unwrap();
        a.set_resident(30).unwrap();
        a.set_resident(50).unwrap();
        assert_eq!(
            b.totals().unwrap(),
            HostTotals {
                jobs: 0,
                resident: 50
            }
        );
        assert!(
            !b.try_reserve(1, 60, 100).unwrap(),
            "a's weights are on the card"
        );
        assert!(b.try_reserve(1, 50, 100).unwrap());
        let other_card = HostLedger::open(dir.path(), "GPU-1").unwrap();
        assert_eq!(other_card.totals().unwrap(), HostTotals::default());
    }

    #[test]
    fn a_peer_that_holds_the_lock_gets_a_named_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostLedger::open(dir.path(), "GPU-0").unwrap();
        let stalled = File::create(&a.lock_path).unwrap();
        stalled.lock().unwrap();
        let started = std::time::Instant::now();
        let error = lock_within(
            &OpenOptions::new().write(true).open(&a.lock_path).unwrap(),
            std::time::Duration::from_millis(100),
        )
        .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("held by a peer"), "{error}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        stalled.unlock().unwrap();
        assert!(a.view().is_ok(), "free again once the peer lets go");
    }

    #[test]
    fn the_view_names_what_each_peer_booked() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostLedger::open(dir.path(), "GPU-0").unwrap();
        let b = HostLedger::open(dir.path(), "GPU-0").unwrap();
        a.set_resident(7).unwrap();
        assert!(b.try_reserve(1, 5, 100).unwrap());
        b.set_resident(3).unwrap();
        let view = a.view().unwrap();
        assert_eq!(
            view.totals,
            HostTotals {
                jobs: 5,
                resident: 10
            }
        );
        assert_eq!(
            view.peers,
            vec![(std::process::id(), 8)],
            "b's 5 + 3, not a's own"
        );
    }

    #[test]
    fn reading_the_ledger_does_not_rewrite_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostLedger::open(dir.path(), "GPU-0").unwrap();
        assert!(a.try_reserve(1, 10, 100).unwrap());
        // The same content, spelled differently: a rewrite would make it compact again.
        let compact = std::fs::read_to_string(a.path()).unwrap();
        let value: serde_json::Value = serde_json::from_str(&compact).unwrap();
        let pretty = serde_json::to_string_pretty(&value).unwrap();
        std::fs::write(a.path(), &pretty).unwrap();
        assert_eq!(a.totals().unwrap().jobs, 10);
        assert_eq!(a.pids().unwrap(), vec![std::process::id()]);
        assert_eq!(std::fs::read_to_string(a.path()).unwrap(), pretty);
        a.release(1).unwrap();
        assert_ne!(std::fs::read_to_string(a.path()).unwrap(), pretty);
    }
}

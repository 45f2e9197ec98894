//! The host-wide ledger: one file per GPU (under e.g. `/dev/shm`) that every worker process on
//! the machine books its reservations in, under an exclusive file lock. Entries of processes
//! that no longer exist are reclaimed on every access, so a crashed worker's memory comes back.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
struct HostFile {
    entries: Vec<HostEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostEntry {
    pid: u32,
    id: u64,
    bytes: u64,
}

/// The shared ledger file of one device.
#[derive(Debug)]
pub struct HostLedger {
    path: PathBuf,
    lock_path: PathBuf,
    pid: u32,
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl HostLedger {
    /// Opens (or creates) the ledger of `device` in `dir`, dropping entries a previous process
    /// with our pid may have left.
    pub fn open(dir: &Path, device: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ledger = Self {
            path: dir.join(format!("runpod-worker-gpu{device}.ledger.json")),
            lock_path: dir.join(format!("runpod-worker-gpu{device}.ledger.lock")),
            pid: std::process::id(),
        };
        let pid = ledger.pid;
        ledger.with_locked(|file| file.entries.retain(|e| e.pid != pid))?;
        Ok(ledger)
    }

    /// The file the reservations are kept in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Books `bytes` under `id` if the host-wide total stays within `budget`.
    pub fn try_reserve(&self, id: u64, bytes: u64, budget: u64) -> std::io::Result<bool> {
        let pid = self.pid;
        self.with_locked(|file| {
            let total: u64 = file.entries.iter().map(|e| e.bytes).sum();
            let fits = total + bytes <= budget;
            if fits {
                file.entries.push(HostEntry { pid, id, bytes });
            }
            fits
        })
    }

    /// Removes our reservation `id`.
    pub fn release(&self, id: u64) -> std::io::Result<()> {
        let pid = self.pid;
        self.with_locked(|file| file.entries.retain(|e| !(e.pid == pid && e.id == id)))
    }

    /// Bytes reserved by every live process.
    pub fn reserved(&self) -> std::io::Result<u64> {
        self.with_locked(|file| file.entries.iter().map(|e| e.bytes).sum())
    }

    /// Processes with reservations.
    pub fn pids(&self) -> std::io::Result<Vec<u32>> {
        self.with_locked(|file| {
            let mut pids: Vec<u32> = file.entries.iter().map(|e| e.pid).collect();
            pids.dedup();
            pids
        })
    }

    fn with_locked<T>(&self, f: impl FnOnce(&mut HostFile) -> T) -> std::io::Result<T> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)?;
        lock.lock()?;
        let mut file = read(&self.path)?;
        let before = file.entries.len();
        file.entries.retain(|e| alive(e.pid));
        if file.entries.len() != before {
            tracing::info!(
                "host-wide GPU ledger: reclaimed {} reservation(s) of exited workers",
                before - file.entries.len()
            );
        }
        let value = f(&mut file);
        // Write then rename: readers never see half a file.
        let temporary = self.path.with_extension(format!("tmp{}", self.pid));
        let mut out = File::create(&temporary)?;
        out.write_all(&serde_json::to_vec(&file)?)?;
        std::fs::rename(&temporary, &self.path)?;
        lock.unlock()?;
        Ok(value)
    }
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
    fn two_ledgers_on_one_file_share_the_budget_and_dead_pids_are_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostLedger::open(dir.path(), 0).unwrap();
        let mut b = HostLedger::open(dir.path(), 0).unwrap();
        b.pid = 4_000_000; // a second "process"; alive() says no such pid
        assert!(a.try_reserve(1, 60, 100).unwrap());
        assert!(!a.try_reserve(2, 50, 100).unwrap());
        // b's entry is reclaimed at the next access because its pid does not exist.
        assert!(b.try_reserve(1, 40, 100).unwrap());
        assert_eq!(
            a.reserved().unwrap(),
            60,
            "the dead process's 40 were reclaimed"
        );
        a.release(1).unwrap();
        assert_eq!(a.reserved().unwrap(), 0);
    }
}

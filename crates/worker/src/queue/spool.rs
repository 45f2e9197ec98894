//! The spool: results the queue would not take in time, kept on disk and re-sent at the next
//! start. One JSON file per result, written to a temporary name and renamed, so a crash never
//! leaves half a result behind.

use std::path::{Path, PathBuf};

use crate::outcome::DoneBody;
use serde::{Deserialize, Serialize};

/// A result waiting to be delivered.
#[derive(Debug, Serialize, Deserialize)]
pub struct SpooledResult {
    /// The job it answers.
    pub job_id: String,
    /// The job-done URL it was meant for.
    pub url: String,
    /// The job-done body, as it was to be posted.
    pub body: DoneBody,
}

/// A directory of spooled results.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// The spool in `dir` (created on first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Where it lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes one result; returns its file.
    pub fn save(&self, result: &SpooledResult) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let safe_id: String = result
            .job_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(100)
            .collect();
        let name = format!("{safe_id}-{}.json", uuid::Uuid::new_v4().simple());
        let path = self.dir.join(name);
        let temporary = self
            .dir
            .join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
        let written = serde_json::to_vec(result)
            .map_err(std::io::Error::from)
            .and_then(|bytes| std::fs::write(&temporary, bytes))
            .and_then(|()| std::fs::rename(&temporary, &path));
        if let Err(e) = written {
            // A full disk leaves a partial (often empty) temporary file behind: not kept.
            let _ = std::fs::remove_file(&temporary);
            return Err(e);
        }
        Ok(path)
    }

    /// Checks that results can be kept here: the directory exists or can be made, and a file
    /// can be written in it and removed. A spool that can never be written would lose every
    /// result the queue does not take, so it is refused at start (and by `check-config`).
    pub fn check_writable(&self) -> Result<(), String> {
        let refused = |e: std::io::Error| {
            format!("spool_dir {} cannot hold results: {e}", self.dir.display())
        };
        std::fs::create_dir_all(&self.dir).map_err(refused)?;
        let probe = self.dir.join(format!(
            ".write-check-{}.tmp",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&probe, b"ok").map_err(refused)?;
        std::fs::remove_file(&probe).map_err(refused)
    }

    /// Every spooled result, oldest name first. Unreadable files are reported, not deleted.
    pub fn pending(&self) -> Vec<(PathBuf, SpooledResult)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .filter_map(|path| {
                let read = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                if read.is_none() {
                    tracing::error!(
                        "spooled result {} cannot be read; left in place",
                        path.display()
                    );
                }
                read.map(|result| (path, result))
            })
            .collect()
    }

    /// Forgets a delivered (or refused) result.
    pub fn remove(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!("cannot remove spooled result {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn saved_results_come_back_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("spool"));
        assert!(
            spool.pending().is_empty(),
            "a missing directory is an empty spool"
        );
        let result = SpooledResult {
            job_id: "a/../b".into(),
            url: "http://q/done".into(),
            body: serde_json::value::to_raw_value(&json!({"output": 1})).unwrap(),
        };
        let path = spool.save(&result).unwrap();
        assert!(path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("a____b-"));
        let pending = spool.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].0, path);
        assert_eq!(
            (pending[0].1.job_id.as_str(), pending[0].1.body.get()),
            (result.job_id.as_str(), result.body.get())
        );
        spool.remove(&path);
        assert!(spool.pending().is_empty());
    }
}

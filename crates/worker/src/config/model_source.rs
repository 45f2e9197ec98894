//! `[handler] model` (or `MODEL_NAME`): the models come from a Hugging Face repository, given as
//! `org/name` or `org/name:revision` (the SDK's form; revision `main` when none is given), that
//! the platform may have cached. `model_dir` becomes the first of these that exists:
//!
//! 1. the platform's cache, in Hugging Face's layout:
//!    `/runpod-volume/huggingface-cache/hub/models--{org}--{name}/snapshots/{hash}/`, the hash
//!    read from `refs/{revision}` beside `snapshots/` (a revision that is itself a commit hash
//!    names its snapshot directly). `HF_HUB_CACHE` replaces the root, as it does for Hugging
//!    Face's own libraries (`HF_HOME` does not: images set it for other reasons);
//! 2. the SDK's older model cache, `/runpod/cache/{org}/{name}/{revision}`
//!    (root: `RUNPOD_MODEL_CACHE`);
//! 3. `[handler] model_dir` as configured.
//!
//! Where none exists, start-up fails naming every path tried and why each was not used. The
//! repository must hold what `model_dir` would (`minilm.pt`, `tokenizer.json`, each torchscript
//! handler's `model`).

use std::fmt;
use std::path::{Path, PathBuf};

/// Replaces the platform's Hugging Face cache root, as in Hugging Face's own libraries.
pub const HF_HUB_CACHE_ENV: &str = "HF_HUB_CACHE";
/// Where the platform caches models (its "cached models").
pub const PLATFORM_HUB_CACHE: &str = "/runpod-volume/huggingface-cache/hub";
/// Replaces the root of the SDK's older model cache.
pub const SDK_CACHE_ENV: &str = "RUNPOD_MODEL_CACHE";
/// The SDK's older model cache (`rp_model_cache`): `{root}/{model}/{revision}`.
pub const SDK_CACHE: &str = "/runpod/cache";
/// What a model reference must look like.
pub const MODEL_FORM: &str =
    "a Hugging Face repository, org/name, optionally with a revision: org/name:revision";

/// A Hugging Face repository and revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    /// `org/name` (or `name`).
    pub repo: String,
    /// The branch, tag or commit hash; `None`: `main`.
    pub revision: Option<String>,
}

impl ModelRef {
    /// Parses `org/name` or `org/name:revision` (the revision after the last colon, as the
    /// SDK splits it). Every part must be a plain name: no empty parts, no `..`, no absolute
    /// path.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (repo, revision) = match text.rsplit_once(':') {
            Some((repo, revision)) => (repo, Some(revision)),
            None => (text, None),
        };
        let plain = |part: &str| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let repo_parts: Vec<&str> = repo.split('/').collect();
        let revision_ok = revision.is_none_or(|r| r.split('/').all(plain));
        if repo_parts.len() > 2 || !repo_parts.iter().all(|p| plain(p)) || !revision_ok {
            return Err(format!("{text:?} is not {MODEL_FORM}"));
        }
        Ok(Self {
            repo: repo.to_owned(),
            revision: revision.map(str::to_owned),
        })
    }

    /// The revision, `main` when none was given.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.revision {
            Some(revision) => write!(f, "{}:{revision}", self.repo),
            None => write!(f, "{}", self.repo),
        }
    }
}

/// A place looked at, and why it was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tried {
    /// The directory.
    pub path: PathBuf,
    /// Why it was passed over.
    pub why: String,
}

impl fmt::Display for Tried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.path.display(), self.why)
    }
}

/// Which of the places held the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The Hugging Face cache (the platform's, or `HF_HUB_CACHE`).
    HubCache,
    /// The SDK's older model cache.
    SdkCache,
    /// `[handler] model_dir`.
    ModelDir,
}

/// Where the models are read from, and how that was decided (for the start-up log and
/// `check-config`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ModelLocation {
    /// No model named: `[handler] model_dir` as configured.
    #[default]
    Configured,
    /// The named model is in `model_dir`, found at `place` after passing over `passed`.
    Found {
        /// The model.
        model: String,
        /// Where it was found.
        place: Place,
        /// The places before it.
        passed: Vec<Tried>,
    },
    /// The named model is nowhere: each place, and why.
    Missing {
        /// The model.
        model: String,
        /// Every place looked at.
        tried: Vec<Tried>,
    },
}

impl ModelLocation {
    /// One line saying which directory the models are read from and why.
    pub fn describe(&self, model_dir: &Path) -> String {
        let dir = model_dir.display();
        match self {
            Self::Configured => format!("models: {dir} ([handler] model_dir)"),
            Self::Found {
                model,
                place: Place::HubCache,
                ..
            } => format!("models: {dir} ({model}, from the Hugging Face cache)"),
            Self::Found {
                model,
                place: Place::SdkCache,
                passed,
            } => format!(
                "models: {dir} ({model}, from the SDK's model cache; passed over {})",
                list(passed)
            ),
            Self::Found {
                model,
                place: Place::ModelDir,
                passed,
            } => format!(
                "models: {dir} ([handler] model_dir: {model} is in no model cache; passed over {})",
                list(passed)
            ),
            Self::Missing { .. } => {
                format!("models: none ({})", self.missing().unwrap_or_default())
            }
        }
    }

    /// Why start-up must fail, where the named model is nowhere.
    pub fn missing(&self) -> Option<String> {
        let Self::Missing { model, tried } = self else {
            return None;
        };
        Some(format!(
            "model {model} not found: tried {}; cache it on the endpoint (the platform's cached \
             models), or put its files in one of these directories ([handler] model_dir, \
             RUNPOD_MODEL_DIR)",
            list(tried)
        ))
    }
}

fn list(tried: &[Tried]) -> String {
    tried
        .iter()
        .map(Tried::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Looks for `model` in the caches (roots from `var`, else the platform's), then in
/// `model_dir`: the directory to use, if any, and how it was decided.
pub fn locate(
    model: &ModelRef,
    model_dir: &Path,
    var: impl Fn(&str) -> Option<String>,
) -> (Option<PathBuf>, ModelLocation) {
    let root = |name: &str, default: &str| {
        PathBuf::from(
            var(name)
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| default.to_owned()),
        )
    };
    let hub_root = root(HF_HUB_CACHE_ENV, PLATFORM_HUB_CACHE);
    let sdk_dir = root(SDK_CACHE_ENV, SDK_CACHE)
        .join(&model.repo)
        .join(model.revision());
    let name = model.to_string();
    let mut tried = Vec::new();
    let candidates = [
        (Place::HubCache, hub_snapshot(&hub_root, model)),
        (Place::SdkCache, directory(sdk_dir)),
        (Place::ModelDir, directory(model_dir.to_path_buf())),
    ];
    for (place, candidate) in candidates {
        match candidate {
            Ok(path) => {
                let location = ModelLocation::Found {
                    model: name,
                    place,
                    passed: tried,
                };
                return (Some(path), location);
            }
            Err(passed) => tried.push(passed),
        }
    }
    (None, ModelLocation::Missing { model: name, tried })
}

/// `path` if it is a directory.
fn directory(path: PathBuf) -> Result<PathBuf, Tried> {
    if path.is_dir() {
        Ok(path)
    } else {
        Err(Tried {
            path,
            why: "no such directory".to_owned(),
        })
    }
}

/// The snapshot `refs/{revision}` names in the repository's cache directory under `root`.
fn hub_snapshot(root: &Path, model: &ModelRef) -> Result<PathBuf, Tried> {
    let repo = root.join(format!("models--{}", model.repo.replace('/', "--")));
    let revision = model.revision();
    let tried = |path: PathBuf, why: String| Tried { path, why };
    if !repo.is_dir() {
        return Err(tried(repo, "no such directory".to_owned()));
    }
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let hash = if is_commit {
        revision.to_owned()
    } else {
        let refs = repo.join("refs").join(revision);
        let text = std::fs::read_to_string(&refs)
            .map_err(|_| tried(repo.clone(), format!("refs/{revision} not found")))?;
        let hash = text.trim().to_owned();
        let plain = !hash.is_empty() && hash.chars().all(|c| c.is_ascii_alphanumeric());
        if !plain {
            return Err(tried(
                repo,
                format!("refs/{revision} holds {hash:?}, not a commit hash"),
            ));
        }
        hash
    };
    let snapshot = repo.join("snapshots").join(&hash);
    if snapshot.is_dir() {
        Ok(snapshot)
    } else {
        Err(tried(
            snapshot,
            format!("refs/{revision} names snapshot {hash}, which is not there"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

    /// A Hugging Face cache under `root` holding `repo` at `HASH`, `refs/main` naming it.
    fn hub_cache(root: &Path, repo: &str) -> PathBuf {
        let dir = root.join(format!("models--{}", repo.replace('/', "--")));
        let snapshot = dir.join("snapshots").join(HASH);
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(dir.join("refs")).unwrap();
        std::fs::write(dir.join("refs/main"), format!("{HASH}\n")).unwrap();
        snapshot
    }

    fn roots(hub: &Path, sdk: &Path) -> impl Fn(&str) -> Option<String> {
        let (hub, sdk) = (hub.display().to_string(), sdk.display().to_string());
        move |name| match name {
            HF_HUB_CACHE_ENV => Some(hub.clone()),
            SDK_CACHE_ENV => Some(sdk.clone()),
            _ => None,
        }
    }

    #[test]
    fn model_references_take_the_sdks_form_and_nothing_that_escapes_a_directory() {
        let plain = ModelRef::parse("org/name").unwrap();
        assert_eq!(
            (plain.repo.as_str(), plain.revision()),
            ("org/name", "main")
        );
        let pinned = ModelRef::parse("org/name:v1.0").unwrap();
        assert_eq!(pinned.revision(), "v1.0");
        assert_eq!(pinned.to_string(), "org/name:v1.0");
        assert_eq!(ModelRef::parse("gpt2").unwrap().repo, "gpt2");
        for bad in [
            "",
            "org/",
            "/abs",
            "a/b/c",
            "../x",
            "org/name:",
            "org/na me",
            "org/..:main",
        ] {
            assert!(ModelRef::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_hugging_face_cache_comes_first_through_refs_main() {
        let (hub, sdk, dir) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let snapshot = hub_cache(hub.path(), "org/name");
        std::fs::create_dir_all(sdk.path().join("org/name/main")).unwrap();
        let model = ModelRef::parse("org/name").unwrap();
        let (found, location) = locate(&model, dir.path(), roots(hub.path(), sdk.path()));
        assert_eq!(found, Some(snapshot.clone()));
        assert!(matches!(
            location,
            ModelLocation::Found {
                place: Place::HubCache,
                ..
            }
        ));
        assert!(
            location.describe(&snapshot).contains(HASH),
            "{}",
            location.describe(&snapshot)
        );
        let pinned = ModelRef::parse(&format!("org/name:{HASH}")).unwrap();
        std::fs::remove_file(hub.path().join("models--org--name/refs/main")).unwrap();
        let (found, _) = locate(&pinned, dir.path(), roots(hub.path(), sdk.path()));
        assert_eq!(
            found,
            Some(snapshot),
            "a commit hash names its snapshot without refs"
        );
    }

    #[test]
    fn then_the_sdks_cache_then_model_dir_each_saying_what_it_passed_over() {
        let (hub, sdk, dir) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let model = ModelRef::parse("org/name:v2").unwrap();
        let sdk_dir = sdk.path().join("org/name/v2");
        std::fs::create_dir_all(&sdk_dir).unwrap();
        let (found, location) = locate(&model, dir.path(), roots(hub.path(), sdk.path()));
        assert_eq!(found, Some(sdk_dir.clone()));
        let line = location.describe(&sdk_dir);
        assert!(
            line.contains("SDK's model cache")
                && line.contains("models--org--name (no such directory)"),
            "{line}"
        );

        std::fs::remove_dir_all(sdk.path().join("org")).unwrap();
        let (found, location) = locate(&model, dir.path(), roots(hub.path(), sdk.path()));
        assert_eq!(found.as_deref(), Some(dir.path()));
        let line = location.describe(dir.path());
        assert!(
            line.contains("no model cache") && line.contains("org/name/v2"),
            "{line}"
        );
    }

    #[test]
    fn a_model_in_no_place_names_every_path_tried_and_why() {
        let (hub, sdk) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let repo = hub.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), HASH).unwrap();
        let model_dir = hub.path().join("absent");
        let (found, location) = locate(
            &ModelRef::parse("org/name").unwrap(),
            &model_dir,
            roots(hub.path(), sdk.path()),
        );
        assert_eq!(found, None);
        let error = location.missing().unwrap();
        for part in [
            format!("snapshots/{HASH} (refs/main names snapshot {HASH}, which is not there)"),
            format!("{}/org/name/main (no such directory)", sdk.path().display()),
            format!("{} (no such directory)", model_dir.display()),
            "RUNPOD_MODEL_DIR".to_owned(),
        ] {
            assert!(error.contains(&part), "{part} in {error}");
        }
        std::fs::remove_file(repo.join("refs/main")).unwrap();
        let (_, location) = locate(
            &ModelRef::parse("org/name").unwrap(),
            &model_dir,
            roots(hub.path(), sdk.path()),
        );
        assert!(location.missing().unwrap().contains("refs/main not found"));
    }

    #[test]
    fn without_overrides_the_platforms_roots_are_tried() {
        let (_, location) = locate(
            &ModelRef::parse("org/name").unwrap(),
            Path::new("/nonexistent-models"),
            |_| None,
        );
        let error = location.missing().unwrap();
        assert!(
            error.contains("/runpod-volume/huggingface-cache/hub/models--org--name")
                && error.contains("/runpod/cache/org/name/main"),
            "{error}"
        );
    }
}

//! Where model files come from: a local directory or a Hugging Face hub repo.
//!
//! Hub files are looked up in the local hf-hub cache first, without any network access
//! (`models--org--name/refs/<revision>` -> `snapshots/<hash>/<file>`, the layout shared with
//! Python's `huggingface_hub`), and downloaded only when missing and `HF_HUB_OFFLINE` is unset.
//! hf-hub's own `CacheRepo::get` is not used for the lookup: it does not trim the ref file and
//! cannot resolve a revision that is itself a commit hash.

use anyhow::{bail, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Cache location and network policy for hub repos.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache folder (the one holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// Never touch the network (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Hub endpoint (`HF_ENDPOINT`), `None` for huggingface.co.
    pub endpoint: Option<String>,
    /// Access token (`HF_TOKEN`); hf-hub also reads `<cache_dir>/../token`.
    pub token: Option<String>,
}

impl HubOptions {
    /// Options from the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Options from an environment lookup, following `huggingface_hub`'s precedence:
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |k: &str| var(k).filter(|v| !v.is_empty());
        let cache_dir = if let Some(c) = set("HF_HUB_CACHE") {
            PathBuf::from(c)
        } else if let Some(h) = set("HF_HOME") {
            PathBuf::from(h).join("hub")
        } else if let Some(x) = set("XDG_CACHE_HOME") {
            PathBuf::from(x).join("huggingface").join("hub")
        } else {
            PathBuf::from(set("HOME").unwrap_or_else(|| ".".into())).join(".cache").join("huggingface").join("hub")
        };
        let offline = set("HF_HUB_OFFLINE")
            .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        Self { cache_dir, offline, endpoint: set("HF_ENDPOINT"), token: set("HF_TOKEN") }
    }

    /// Explicit cache folder (tests, `--hf-cache`), offline or not.
    pub fn with_cache(cache_dir: impl Into<PathBuf>, offline: bool) -> Self {
        Self { cache_dir: cache_dir.into(), offline, endpoint: None, token: None }
    }
}

/// A model repo on the hub at one revision.
#[derive(Debug)]
pub struct HubRepo {
    pub repo_id: String,
    pub revision: String,
    pub options: HubOptions,
    api: OnceLock<std::result::Result<ApiRepo, String>>,
    /// File list of the revision on the hub, fetched at most once (for `has` when online).
    remote_files: OnceLock<Option<Vec<String>>>,
}

/// A model spec resolved to where its files live (one per command: its size does not matter).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum ModelSource {
    Local(PathBuf),
    Hub(HubRepo),
}

impl ModelSource {
    /// `spec` is an existing directory or a hub id `org/name[@revision]`; hub options come
    /// from the environment.
    pub fn parse(spec: &str) -> Result<Self> {
        Self::parse_with(spec, HubOptions::from_env())
    }

    pub fn parse_with(spec: &str, options: HubOptions) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        if path.exists() {
            bail!("model spec `{spec}` is a file; expected a model directory or a hub repo id (org/name[@revision])");
        }
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, rev),
            None => (spec, "main"),
        };
        if !is_repo_id(id) || revision.is_empty() || revision.contains("..") {
            bail!("model spec `{spec}` is neither an existing directory nor a hub repo id (org/name[@revision])");
        }
        Ok(Self::hub(id, revision, options))
    }

    pub fn local(dir: impl Into<PathBuf>) -> Self {
        Self::Local(dir.into())
    }

    pub fn hub(repo_id: &str, revision: &str, options: HubOptions) -> Self {
        Self::Hub(HubRepo {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            options,
            api: OnceLock::new(),
            remote_files: OnceLock::new(),
        })
    }

    /// A short name for error messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Local(d) => format!("directory {}", d.display()),
            Self::Hub(h) if h.options.offline => {
                format!("hub repo {}@{} (offline, cache {})", h.repo_id, h.revision, h.cache_folder().display())
            }
            Self::Hub(h) => format!("hub repo {}@{}", h.repo_id, h.revision),
        }
    }

    /// Local path of `name`, downloading it when this is a hub repo, the file is not cached
    /// and the hub may be used.
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        match self {
            Self::Local(dir) => {
                let p = dir.join(name);
                if !p.is_file() {
                    bail!("file `{name}` not found in model directory {}", dir.display());
                }
                Ok(p)
            }
            Self::Hub(h) => h.file(name),
        }
    }

    /// Whether `name` exists (cached or, online, listed on the hub). Never downloads it.
    pub fn has(&self, name: &str) -> bool {
        match self {
            Self::Local(dir) => dir.join(name).is_file(),
            Self::Hub(h) => h.cached(name).is_some() || h.listed_remotely(name),
        }
    }
}

impl HubRepo {
    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }

    /// `<cache>/models--org--name`.
    pub fn cache_folder(&self) -> PathBuf {
        self.options.cache_dir.join(self.repo().folder_name())
    }

    /// Commit hash the revision points to in the cache (`refs/<revision>`), or the revision
    /// itself when it names a cached snapshot.
    pub fn cached_commit(&self) -> Option<String> {
        let folder = self.cache_folder();
        if let Ok(hash) = std::fs::read_to_string(folder.join("refs").join(&self.revision)) {
            let hash = hash.trim();
            if !hash.is_empty() {
                return Some(hash.to_string());
            }
        }
        folder.join("snapshots").join(&self.revision).is_dir().then(|| self.revision.clone())
    }

    /// The cached file, with no network access. A dangling snapshot link counts as missing.
    pub fn cached(&self, name: &str) -> Option<PathBuf> {
        let hash = self.cached_commit()?;
        let p = self.cache_folder().join("snapshots").join(hash).join(name);
        p.is_file().then_some(p)
    }

    fn file(&self, name: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(name) {
            return Ok(p);
        }
        if self.options.offline {
            bail!(
                "`{name}` of hub repo {}@{} is not in the local cache {} and HF_HUB_OFFLINE is set \
                 (download it first or unset HF_HUB_OFFLINE)",
                self.repo_id,
                self.revision,
                self.cache_folder().display()
            );
        }
        let api = self.api()?;
        api.get(name).map_err(|e| match unreachable_hub(&e) {
            // ureq's message repeats its cause at every level: say once what failed and what to do.
            Some(cause) => anyhow::anyhow!(
                "cannot reach the Hugging Face hub at {} to download `{name}` of {}@{} ({cause}). Use a local \
                 model folder instead of the repo id, or download the repo once on a machine with network and \
                 copy the cache ({}), then set HF_HUB_OFFLINE=1",
                self.options.endpoint.as_deref().unwrap_or("https://huggingface.co"),
                self.repo_id,
                self.revision,
                self.options.cache_dir.display()
            ),
            None => anyhow::Error::new(e).context(format!(
                "downloading `{name}` of hub repo {}@{} into {}",
                self.repo_id,
                self.revision,
                self.options.cache_dir.display()
            )),
        })
    }

    fn api(&self) -> Result<&ApiRepo> {
        let api = self.api.get_or_init(|| {
            let mut b = ApiBuilder::from_cache(Cache::new(self.options.cache_dir.clone()));
            if let Some(e) = &self.options.endpoint {
                b = b.with_endpoint(e.clone());
            }
            if self.options.token.is_some() {
                b = b.with_token(self.options.token.clone());
            }
            b.build().map(|api| api.repo(self.repo())).map_err(|e| e.to_string())
        });
        api.as_ref().map_err(|e| anyhow::anyhow!("cannot set up the hub client for {}: {e}", self.repo_id))
    }

    fn listed_remotely(&self, name: &str) -> bool {
        if self.options.offline {
            return false;
        }
        let files = self.remote_files.get_or_init(|| {
            let info = self.api().ok()?.info().ok()?;
            Some(info.siblings.into_iter().map(|s| s.rfilename).collect())
        });
        files.as_ref().is_some_and(|f| f.iter().any(|f| f == name))
    }
}

/// `name` or `org/name` with the characters the hub allows.
fn is_repo_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// The transport failure, named once, when the hub could not be reached at all (no DNS, no
/// route, refused); None for errors the hub itself answered with.
fn unreachable_hub(e: &ApiError) -> Option<String> {
    match e {
        ApiError::RequestError(r) => match r.as_ref() {
            ureq::Error::Transport(t) => {
                let what = match t.kind() {
                    ureq::ErrorKind::Dns => "its name does not resolve",
                    ureq::ErrorKind::ConnectionFailed => "the connection failed",
                    ureq::ErrorKind::Io => "the connection broke",
                    ureq::ErrorKind::ProxyConnect => "the proxy refused the connection",
                    _ => return None,
                };
                Some(match t.url() {
                    Some(u) => format!("{what}: {}", u.host_str().unwrap_or("?")),
                    None => what.to_string(),
                })
            }
            ureq::Error::Status(..) => None,
        },
        ApiError::TooManyRetries(inner) => unreachable_hub(inner),
        _ => None,
    }
}

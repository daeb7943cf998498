//! The local backend, for the local executor: one file per tenant secret,
//! `<root>/<tenant>/<name>.json`, readable by the dispatcher's user only.
//!
//! Invariants:
//! - the root and tenant folders are mode 0700 and the files 0600, created so (never
//!   widened afterwards), so a task run as another user reads none of them; the root's
//!   mode is set again at every start;
//! - a write is atomic: a temporary file in the same folder, synced, then renamed over
//!   the old one, so a reader sees the old secret or the new one, never half of either;
//! - writes are serialised in the process (one dispatcher owns a local store), so the
//!   per-tenant limit holds; buffers that held values are zeroed after use.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::SecretString;
use secrecy::zeroize::Zeroize as _;
use serde::{Deserialize, Serialize};

use super::{
    MAX_SECRETS_PER_TENANT, SecretData, SecretError, SecretMeta, Unresolved, Written, data_keys,
    exposed, first_unresolved,
};
use crate::k8s::names::is_dns_label;
use crate::task::EnvValue;

/// Folders: the owner only.
const DIR_MODE: u32 = 0o700;
/// Files: the owner reads and writes.
const FILE_MODE: u32 = 0o600;
const SUFFIX: &str = ".json";

/// A secret file as written.
#[derive(Serialize)]
struct Outgoing<'a> {
    tenant: &'a str,
    name: &'a str,
    created_at: jiff::Timestamp,
    updated_at: jiff::Timestamp,
    data: BTreeMap<&'a str, &'a str>,
}

/// A secret file as read.
#[derive(Deserialize)]
struct Stored {
    tenant: String,
    name: String,
    created_at: jiff::Timestamp,
    updated_at: jiff::Timestamp,
    data: BTreeMap<String, String>,
}

impl Stored {
    fn meta(&self) -> SecretMeta {
        SecretMeta {
            name: self.name.clone(),
            keys: self.data.keys().cloned().collect(),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

impl Drop for Stored {
    fn drop(&mut self) {
        for value in self.data.values_mut() {
            value.zeroize();
        }
    }
}

/// The tenants' secrets as files under one folder.
#[derive(Clone)]
pub struct LocalSecrets {
    root: PathBuf,
    writes: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for LocalSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSecrets")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn io(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SecretError {
    let path = path.to_owned();
    move |source| SecretError::Io {
        operation,
        path,
        source,
    }
}

/// Creates `path` (mode 0700) if missing, and makes sure it is 0700.
fn owner_only_dir(path: &Path) -> Result<(), SecretError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(io("creating", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE)).map_err(io("restricting", path))
}

fn read(path: &Path) -> Result<Option<Stored>, SecretError> {
    let mut bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io("reading", path)(error)),
    };
    let parsed = serde_json::from_slice::<Stored>(&bytes);
    bytes.zeroize();
    parsed.map(Some).map_err(|e| SecretError::Corrupt {
        path: path.to_owned(),
        // serde_json's message names a position and what it expected, never the text.
        detail: e.to_string(),
    })
}

/// Writes `bytes` to `path` atomically, mode 0600.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SecretError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temporary = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        // The rename itself survives a crash once the folder is synced.
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written.map_err(io("writing", path))
}

impl LocalSecrets {
    /// The store in `root`, created (0700) if missing.
    pub fn open(root: PathBuf) -> Result<Self, SecretError> {
        // Absolute, so the store is the same folder whatever the working directory.
        let root = std::path::absolute(&root).unwrap_or(root);
        owner_only_dir(&root)?;
        Ok(Self {
            root,
            writes: Arc::default(),
        })
    }

    /// The folder of `tenant`. Tenant names are RFC 1123 labels (checked when tenants are
    /// made); anything else is refused rather than joined into a path.
    fn tenant_dir(&self, tenant: &str) -> Result<PathBuf, SecretError> {
        if !is_dns_label(tenant) {
            return Err(SecretError::BadName {
                what: format!("tenant name {tenant:?}"),
            });
        }
        Ok(self.root.join(tenant))
    }

    fn file(&self, tenant: &str, name: &str) -> Result<PathBuf, SecretError> {
        // Secret names are checked by the API (RFC 1123 labels); check again before a
        // name becomes a path.
        if !is_dns_label(name) {
            return Err(SecretError::BadName {
                what: format!("secret name {name:?}"),
            });
        }
        Ok(self.tenant_dir(tenant)?.join(format!("{name}{SUFFIX}")))
    }

    /// The secrets of `tenant`, read from their files.
    fn read_all(dir: &Path, tenant: &str) -> Result<Vec<SecretMeta>, SecretError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io("listing", dir)(error)),
        };
        let mut secrets = Vec::new();
        for entry in entries {
            let path = entry.map_err(io("listing", dir))?.path();
            let is_secret = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(SUFFIX) && !n.starts_with('.'));
            if !is_secret {
                continue;
            }
            if let Some(stored) = read(&path)?
                && stored.tenant == tenant
            {
                secrets.push(stored.meta());
            }
        }
        secrets.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(secrets)
    }

    pub(super) async fn put(
        &self,
        tenant: &str,
        name: &str,
        data: SecretData,
        now: jiff::Timestamp,
    ) -> Result<(Written, SecretMeta), SecretError> {
        let dir = self.tenant_dir(tenant)?;
        let path = self.file(tenant, name)?;
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        let _serialised = self.writes.lock().await;
        blocking(move || {
            owner_only_dir(&dir)?;
            let previous = read(&path)?;
            if previous.is_none() && Self::read_all(&dir, &tenant)?.len() >= MAX_SECRETS_PER_TENANT
            {
                return Err(SecretError::TooMany {
                    tenant,
                    limit: MAX_SECRETS_PER_TENANT,
                });
            }
            let created_at = previous.as_ref().map_or(now, |p| p.created_at);
            let file = Outgoing {
                tenant: &tenant,
                name: &name,
                created_at,
                updated_at: now,
                data: data
                    .iter()
                    .map(|(key, value)| (key.as_str(), exposed(value)))
                    .collect(),
            };
            let mut bytes = serde_json::to_vec(&file).map_err(|e| SecretError::Corrupt {
                path: path.clone(),
                detail: e.to_string(),
            })?;
            let written = write_atomically(&path, &bytes);
            bytes.zeroize();
            written?;
            let meta = SecretMeta {
                name,
                keys: data_keys(&data),
                created_at,
                updated_at: now,
            };
            let how = if previous.is_some() {
                Written::Replaced
            } else {
                Written::Created
            };
            Ok((how, meta))
        })
        .await
    }

    pub(super) async fn get(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<SecretMeta>, SecretError> {
        let path = self.file(tenant, name)?;
        let tenant = tenant.to_owned();
        blocking(move || {
            Ok(read(&path)?
                .filter(|s| s.tenant == tenant)
                .map(|s| s.meta()))
        })
        .await
    }

    pub(super) async fn list(&self, tenant: &str) -> Result<Vec<SecretMeta>, SecretError> {
        let dir = self.tenant_dir(tenant)?;
        let tenant = tenant.to_owned();
        blocking(move || Self::read_all(&dir, &tenant)).await
    }

    pub(super) async fn delete(&self, tenant: &str, name: &str) -> Result<bool, SecretError> {
        let path = self.file(tenant, name)?;
        let _serialised = self.writes.lock().await;
        blocking(move || match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(io("deleting", &path)(error)),
        })
        .await
    }

    /// The values `env`'s references name, by variable, for the local executor to put in
    /// a task's environment; or the first reference `tenant`'s secrets cannot satisfy
    /// (deleted, or rewritten without the key, since the task was submitted).
    pub async fn resolve(
        &self,
        tenant: &str,
        env: &BTreeMap<String, EnvValue>,
    ) -> Result<Result<Vec<(String, SecretString)>, Unresolved>, SecretError> {
        let mut files = BTreeMap::new();
        for reference in env.values().filter_map(EnvValue::secret) {
            if !files.contains_key(&reference.secret) {
                let path = self.file(tenant, &reference.secret)?;
                let owner = tenant.to_owned();
                let stored =
                    blocking(move || Ok(read(&path)?.filter(|s| s.tenant == owner))).await?;
                files.insert(reference.secret.clone(), stored);
            }
        }
        let meta = files
            .iter()
            .map(|(name, stored)| (name.clone(), stored.as_ref().map(Stored::meta)))
            .collect();
        if let Some(unresolved) = first_unresolved(env, &meta) {
            return Ok(Err(unresolved));
        }
        let values = env
            .iter()
            .filter_map(|(variable, value)| {
                let reference = value.secret()?;
                let stored = files.get(&reference.secret)?.as_ref()?;
                let value = stored.data.get(&reference.key)?;
                Some((variable.clone(), SecretString::from(value.clone())))
            })
            .collect();
        Ok(Ok(values))
    }
}

/// Runs file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SecretError> + Send + 'static,
) -> Result<T, SecretError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| {
            Err(SecretError::Io {
                operation: "running",
                path: PathBuf::new(),
                source: std::io::Error::other(error.to_string()),
            })
        })
}

//! Tenants' secrets for their tasks: key/value pairs a tenant writes through the API
//! (`PUT /v1/secrets/{name}`) and its tasks reference from their environment
//! (`{"secret": NAME, "key": KEY}`). The pure core checks names, keys and sizes; the
//! [`SecretStore`] keeps the values where the executor can hand them to a task and
//! nothing else reads them: a Kubernetes Secret in the tasks namespace
//! ([`KubernetesSecrets`]), or owner-only files beside the local executor
//! ([`LocalSecrets`]).
//!
//! Invariants:
//! - values only ever go into the store, and out of it only into a task's environment
//!   (the kubelet's `secretKeyRef`, or the local executor's child process): never into
//!   the database, the API's answers, the events or the logs (nothing here derives
//!   `Debug` over a value; [`SecretString`] redacts it);
//! - every operation is scoped to one tenant: a secret of another tenant is absent, the
//!   same answer as a missing one;
//! - whatever [`validate_data`] accepts fits one Kubernetes Secret (names, keys, size).

pub mod kubernetes;
pub mod local;

use std::collections::BTreeMap;
use std::fmt;

use secrecy::{ExposeSecret as _, SecretString};

pub use kubernetes::KubernetesSecrets;
pub use local::LocalSecrets;

use crate::k8s::names::{is_dns_label, is_secret_key};
use crate::task::EnvValue;
use crate::task::submission::FieldError;

/// The most keys one secret holds.
pub const MAX_KEYS: usize = 64;
/// The largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// The most one secret holds, keys and values together, in bytes (a Kubernetes Secret
/// holds at most 1 MiB).
pub const MAX_TOTAL_BYTES: usize = 256 * 1024;
/// The most secrets one tenant keeps.
pub const MAX_SECRETS_PER_TENANT: usize = 100;

/// A secret's data as validated: keys in order, values held as secrets (redacted in
/// `Debug`, zeroed when dropped).
pub type SecretData = BTreeMap<String, SecretString>;

/// A secret as the API shows it: its keys, never its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMeta {
    pub name: String,
    pub keys: Vec<String>,
    pub created_at: jiff::Timestamp,
    pub updated_at: jiff::Timestamp,
}

/// Whether a write made the secret or replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    Replaced,
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The tenant keeps as many secrets as allowed.
    #[error("tenant {tenant} already keeps {limit} secrets, the most allowed; delete one first")]
    TooMany { tenant: String, limit: usize },
    /// The place the secret belongs holds something agent-bus did not write (a Secret
    /// made by hand in the tasks namespace): left alone.
    #[error("{what} exists but was not written by agent-bus for tenant {tenant}; left alone")]
    Foreign { tenant: String, what: String },
    /// A tenant or secret name that is no RFC 1123 label reached a store (the API and
    /// `tenant create` refuse them): refused rather than made into a path or name.
    #[error("{what} is no RFC 1123 label")]
    BadName { what: String },
    /// The Kubernetes API answered with an error or could not be reached.
    #[error("kubernetes, {operation} of secret {name}: {source}")]
    Kubernetes {
        operation: &'static str,
        name: String,
        source: kube::Error,
    },
    /// The local store's files could not be read or written.
    #[error("local secret store, {operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A local secret file is not what agent-bus writes.
    #[error("local secret store: {path} is unreadable: {detail}")]
    Corrupt {
        path: std::path::PathBuf,
        detail: String,
    },
}

/// Checks a secret's name (its path segment): an RFC 1123 label, as tenants and queues.
pub fn validate_name(name: &str) -> Result<(), FieldError> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(FieldError::new(
            "name",
            "must be an RFC 1123 label: 1 to 63 lowercase letters, digits or '-', starting \
             and ending with a letter or digit",
        ))
    }
}

/// Checks a secret's data and takes it into [`SecretString`]s: 1 to [`MAX_KEYS`] keys
/// of Kubernetes' data-key syntax, values of at most [`MAX_VALUE_BYTES`] without NUL (an
/// environment variable cannot hold one), at most [`MAX_TOTAL_BYTES`] in all. A refusal
/// names the key (`data.<key>`), never the value.
pub fn validate_data(data: BTreeMap<String, String>) -> Result<SecretData, FieldError> {
    if data.is_empty() || data.len() > MAX_KEYS {
        return Err(FieldError::new(
            "data",
            format!("must have 1 to {MAX_KEYS} keys"),
        ));
    }
    let mut total = 0usize;
    for (key, value) in &data {
        let field = format!("data.{key}");
        if !is_secret_key(key) {
            return Err(FieldError::new(
                field,
                "key must be 1 to 253 letters, digits, '-', '_' or '.' (not '.' or '..')",
            ));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(FieldError::new(
                field,
                format!("value must be at most {MAX_VALUE_BYTES} bytes"),
            ));
        }
        if value.contains('\0') {
            return Err(FieldError::new(
                field,
                "value must not contain NUL characters (it becomes an environment variable)",
            ));
        }
        total += key.len() + value.len();
    }
    if total > MAX_TOTAL_BYTES {
        return Err(FieldError::new(
            "data",
            format!("keys and values must total at most {MAX_TOTAL_BYTES} bytes"),
        ));
    }
    Ok(data
        .into_iter()
        .map(|(key, value)| (key, SecretString::from(value)))
        .collect())
}

/// A reference of a task's environment that its tenant's secrets cannot satisfy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// The environment variable.
    pub variable: String,
    pub secret: String,
    pub key: String,
    /// The secret's keys when the secret exists (only the key is missing).
    pub existing_keys: Option<Vec<String>>,
}

impl Unresolved {
    /// The field a refusal names: `env.<variable>`.
    #[must_use]
    pub fn field(&self) -> String {
        format!("env.{}", self.variable)
    }
}

impl fmt::Display for Unresolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.existing_keys {
            None => write!(
                f,
                "secret '{}' does not exist (PUT /v1/secrets/{} first)",
                self.secret, self.secret
            ),
            Some(keys) => write!(
                f,
                "secret '{}' has no key '{}' (its keys: {})",
                self.secret,
                self.key,
                keys.join(", ")
            ),
        }
    }
}

/// The first reference of `env` that `meta` (the tenant's secrets by name, `None` for a
/// missing one) cannot satisfy. Pure: the stores feed it what they read.
#[must_use]
pub fn first_unresolved(
    env: &BTreeMap<String, EnvValue>,
    meta: &BTreeMap<String, Option<SecretMeta>>,
) -> Option<Unresolved> {
    env.iter().find_map(|(variable, value)| {
        let reference = value.secret()?;
        let unresolved = |existing_keys| Unresolved {
            variable: variable.clone(),
            secret: reference.secret.clone(),
            key: reference.key.clone(),
            existing_keys,
        };
        match meta.get(&reference.secret).and_then(Option::as_ref) {
            None => Some(unresolved(None)),
            Some(secret) if !secret.keys.contains(&reference.key) => {
                Some(unresolved(Some(secret.keys.clone())))
            }
            Some(_) => None,
        }
    })
}

/// Where the tenants' secrets are kept: chosen with the executor, since the executor is
/// what hands them to tasks.
#[derive(Debug, Clone)]
// One per process: the size of the Kubernetes variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum SecretStore {
    Kubernetes(KubernetesSecrets),
    Local(LocalSecrets),
}

impl SecretStore {
    /// Writes `data` as the whole of `tenant`'s secret `name` (keys not in `data` are
    /// gone), at `now`.
    pub async fn put(
        &self,
        tenant: &str,
        name: &str,
        data: SecretData,
        now: jiff::Timestamp,
    ) -> Result<(Written, SecretMeta), SecretError> {
        match self {
            Self::Kubernetes(store) => store.put(tenant, name, &data, now).await,
            Self::Local(store) => store.put(tenant, name, data, now).await,
        }
    }

    /// `tenant`'s secret `name`, keys only; `None` when it has none of that name.
    pub async fn get(&self, tenant: &str, name: &str) -> Result<Option<SecretMeta>, SecretError> {
        match self {
            Self::Kubernetes(store) => store.get(tenant, name).await,
            Self::Local(store) => store.get(tenant, name).await,
        }
    }

    /// `tenant`'s secrets by name, keys only.
    pub async fn list(&self, tenant: &str) -> Result<Vec<SecretMeta>, SecretError> {
        match self {
            Self::Kubernetes(store) => store.list(tenant).await,
            Self::Local(store) => store.list(tenant).await,
        }
    }

    /// Deletes `tenant`'s secret `name`; `false` when it had none of that name.
    pub async fn delete(&self, tenant: &str, name: &str) -> Result<bool, SecretError> {
        match self {
            Self::Kubernetes(store) => store.delete(tenant, name).await,
            Self::Local(store) => store.delete(tenant, name).await,
        }
    }

    /// The first secret reference of `env` that `tenant`'s secrets cannot satisfy (a
    /// missing secret or key), reading each referenced secret once.
    pub async fn first_unresolved(
        &self,
        tenant: &str,
        env: &BTreeMap<String, EnvValue>,
    ) -> Result<Option<Unresolved>, SecretError> {
        let mut meta = BTreeMap::new();
        for reference in env.values().filter_map(EnvValue::secret) {
            if !meta.contains_key(&reference.secret) {
                let found = self.get(tenant, &reference.secret).await?;
                meta.insert(reference.secret.clone(), found);
            }
        }
        Ok(first_unresolved(env, &meta))
    }
}

/// A secret's keys, in order.
fn data_keys(data: &SecretData) -> Vec<String> {
    data.keys().cloned().collect()
}

/// A value as bytes, for the backends that write it.
fn exposed(value: &SecretString) -> &str {
    value.expose_secret()
}

#[cfg(test)]
mod tests;

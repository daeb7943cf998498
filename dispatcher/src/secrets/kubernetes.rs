//! The Kubernetes backend: each tenant secret is one `Opaque` Secret in the tasks
//! namespace, named `ab-secret.<tenant>.<name>` and labelled with its tenant and name, so
//! a task's Job can take a value with a `secretKeyRef` and the kubelet alone reads it.
//!
//! Invariants:
//! - the object's name is a function of tenant and secret name that no other pair shares
//!   (both are RFC 1123 labels, which hold no '.', the separator), at most 137
//!   characters;
//! - the dispatcher writes values and never reads them back: reads are metadata-only
//!   (the keys are kept in an annotation), so no answer of the API server that could be
//!   logged holds a value;
//! - an object is the tenant's only when its labels say so (managed by agent-bus, this
//!   tenant, this name); anything else of that name is left alone and is absent to the
//!   tenant.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};

use super::{
    MAX_SECRETS_PER_TENANT, SecretData, SecretError, SecretMeta, Written, data_keys, exposed,
};

/// The labels and annotations of a tenant's Secret.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "agent-bus";
/// The same tenant label as the tenant's Jobs carry.
pub const LABEL_TENANT: &str = "agent-bus.io/tenant";
pub const LABEL_SECRET: &str = "agent-bus.io/secret";
/// The keys of the data, as a JSON array: what the API shows without reading values.
pub const ANNOTATION_KEYS: &str = "agent-bus.io/keys";
/// When the tenant last wrote it (RFC 3339).
pub const ANNOTATION_UPDATED_AT: &str = "agent-bus.io/updated-at";

/// Conflicting writes (two replicas writing one secret) are tried again this often.
const WRITE_ATTEMPTS: u32 = 3;

/// The Secret object's name of `tenant`'s secret `name`.
#[must_use]
pub fn object_name(tenant: &str, name: &str) -> String {
    format!("ab-secret.{tenant}.{name}")
}

/// The Secret that holds `tenant`'s secret `name` with `data`, written at `now`. Pure.
#[must_use]
pub fn secret_object(
    namespace: &str,
    tenant: &str,
    name: &str,
    data: &SecretData,
    now: jiff::Timestamp,
) -> Secret {
    let labels = [
        (LABEL_MANAGED_BY, MANAGED_BY),
        (LABEL_TENANT, tenant),
        (LABEL_SECRET, name),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let keys = serde_json::to_string(&data_keys(data)).unwrap_or_default();
    let annotations = [
        (ANNOTATION_KEYS.to_owned(), keys),
        (ANNOTATION_UPDATED_AT.to_owned(), now.to_string()),
    ]
    .into();
    Secret {
        metadata: ObjectMeta {
            name: Some(object_name(tenant, name)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        immutable: Some(false),
        data: Some(
            data.iter()
                .map(|(key, value)| (key.clone(), ByteString(exposed(value).as_bytes().to_vec())))
                .collect::<BTreeMap<_, _>>(),
        ),
        string_data: None,
    }
}

/// Whether `meta` is the object agent-bus writes for `tenant`'s secret `name`.
#[must_use]
pub fn is_owned(meta: &ObjectMeta, tenant: &str, name: &str) -> bool {
    let labels = meta.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    meta.name.as_deref() == Some(object_name(tenant, name).as_str())
        && label(LABEL_MANAGED_BY) == Some(MANAGED_BY)
        && label(LABEL_TENANT) == Some(tenant)
        && label(LABEL_SECRET) == Some(name)
}

/// What the API shows of the object `meta`, when it is `tenant`'s (`None` otherwise).
/// Pure: reads labels and annotations only.
#[must_use]
pub fn meta_of(meta: &ObjectMeta, tenant: &str) -> Option<SecretMeta> {
    let name = meta.labels.as_ref()?.get(LABEL_SECRET)?;
    if !is_owned(meta, tenant, name) {
        return None;
    }
    let annotations = meta.annotations.clone().unwrap_or_default();
    let keys: Vec<String> = annotations
        .get(ANNOTATION_KEYS)
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    let created_at = meta
        .creation_timestamp
        .as_ref()
        .map_or_else(jiff::Timestamp::now, |t| t.0);
    let updated_at = annotations
        .get(ANNOTATION_UPDATED_AT)
        .and_then(|text| text.parse().ok())
        .unwrap_or(created_at);
    Some(SecretMeta {
        name: name.clone(),
        keys,
        created_at,
        updated_at,
    })
}

/// The tenants' Secrets in the tasks namespace.
#[derive(Clone)]
pub struct KubernetesSecrets {
    api: Api<Secret>,
    namespace: String,
}

impl std::fmt::Debug for KubernetesSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSecrets")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl KubernetesSecrets {
    #[must_use]
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }

    fn failed(operation: &'static str, name: &str, source: kube::Error) -> SecretError {
        SecretError::Kubernetes {
            operation,
            name: name.to_owned(),
            source,
        }
    }

    pub(super) async fn put(
        &self,
        tenant: &str,
        name: &str,
        data: &SecretData,
        now: jiff::Timestamp,
    ) -> Result<(Written, SecretMeta), SecretError> {
        let object = object_name(tenant, name);
        let mut last_conflict = None;
        for _ in 0..WRITE_ATTEMPTS {
            let existing = self
                .api
                .get_metadata_opt(&object)
                .await
                .map_err(|e| Self::failed("read", &object, e))?;
            let mut secret = secret_object(&self.namespace, tenant, name, data, now);
            let written = match existing {
                None => {
                    if self.list(tenant).await?.len() >= MAX_SECRETS_PER_TENANT {
                        return Err(SecretError::TooMany {
                            tenant: tenant.to_owned(),
                            limit: MAX_SECRETS_PER_TENANT,
                        });
                    }
                    self.api
                        .create(&PostParams::default(), &secret)
                        .await
                        .map(|created| (Written::Created, created))
                }
                Some(existing) => {
                    if !is_owned(&existing.metadata, tenant, name) {
                        return Err(SecretError::Foreign {
                            tenant: tenant.to_owned(),
                            what: format!("Secret {}/{object}", self.namespace),
                        });
                    }
                    // Optimistic: a write that raced ours makes this one a 409, and the
                    // loop reads again.
                    secret
                        .metadata
                        .resource_version
                        .clone_from(&existing.metadata.resource_version);
                    self.api
                        .replace(&object, &PostParams::default(), &secret)
                        .await
                        .map(|replaced| (Written::Replaced, replaced))
                }
            };
            match written {
                Ok((written, stored)) => {
                    let meta =
                        meta_of(&stored.metadata, tenant).ok_or_else(|| SecretError::Foreign {
                            tenant: tenant.to_owned(),
                            what: format!("Secret {}/{object} as written", self.namespace),
                        })?;
                    return Ok((written, meta));
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    last_conflict = Some(kube::Error::Api(status));
                }
                Err(error) => return Err(Self::failed("write", &object, error)),
            }
        }
        Err(match last_conflict {
            Some(error) => Self::failed("write", &object, error),
            None => Self::failed(
                "write",
                &object,
                kube::Error::Service("no write attempt made".into()),
            ),
        })
    }

    pub(super) async fn get(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<SecretMeta>, SecretError> {
        let object = object_name(tenant, name);
        let found = self
            .api
            .get_metadata_opt(&object)
            .await
            .map_err(|e| Self::failed("read", &object, e))?;
        Ok(found.and_then(|found| meta_of(&found.metadata, tenant)))
    }

    pub(super) async fn list(&self, tenant: &str) -> Result<Vec<SecretMeta>, SecretError> {
        let selector = format!("{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_TENANT}={tenant}");
        let listed = self
            .api
            .list_metadata(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| Self::failed("list", &selector, e))?;
        let mut secrets: Vec<SecretMeta> = listed
            .items
            .iter()
            .filter_map(|item| meta_of(&item.metadata, tenant))
            .collect();
        secrets.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(secrets)
    }

    pub(super) async fn delete(&self, tenant: &str, name: &str) -> Result<bool, SecretError> {
        let object = object_name(tenant, name);
        let found = self
            .api
            .get_metadata_opt(&object)
            .await
            .map_err(|e| Self::failed("read", &object, e))?;
        let Some(found) = found.filter(|found| is_owned(&found.metadata, tenant, name)) else {
            return Ok(false);
        };
        // Only the object just read: one replaced by hand in between is not ours to delete.
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: found.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(&object, &params).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(error) => Err(Self::failed("delete", &object, error)),
        }
    }
}

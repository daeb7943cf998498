//! `/v1/secrets` handlers: a tenant writes a secret's key/value pairs, lists its secrets
//! and their keys, and deletes them. Write-only: no answer ever holds a value. Also the
//! submit-time check that a task's secret references name existing secrets and keys.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::auth::Authenticated;
use super::extract::JsonBody;
use super::{ApiError, AppState};
use crate::secrets::{self, SecretMeta, Written};
use crate::task::TaskSpec;
use crate::task::submission::FieldError;

/// The body of `PUT /v1/secrets/{name}`: the whole of the secret's data (keys left out
/// are removed).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct SecretInput {
    /// 1 to 64 keys (letters, digits, '-', '_', '.'; at most 253 characters), each value
    /// at most 64 KiB, 256 KiB in all.
    pub data: BTreeMap<String, String>,
}

crate::task::submission::objects::objects_only!(deserialize: SecretInput);

/// Keys only: a body's values never reach a log.
impl std::fmt::Debug for SecretInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretInput")
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A secret as the API shows it: its name and keys, never its values.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SecretView {
    pub name: String,
    /// The keys of its data, in order.
    pub keys: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    /// When it was last written; RFC 3339.
    pub updated_at: String,
}

impl From<SecretMeta> for SecretView {
    fn from(meta: SecretMeta) -> Self {
        Self {
            name: meta.name,
            keys: meta.keys,
            created_at: meta.created_at.to_string(),
            updated_at: meta.updated_at.to_string(),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SecretList {
    /// By name.
    pub items: Vec<SecretView>,
}

/// The `{name}` of a `/v1/secrets/{name}` path, as sent (checked by each handler: a PUT
/// refuses a bad name with 422, a read or delete answers 404).
#[derive(Debug, Clone)]
pub struct SecretNamePath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for SecretNamePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::SecretNotFound)?;
        Ok(Self(name))
    }
}

/// Writes a secret: creates it, or replaces all of its data.
#[utoipa::path(
    put, path = "/v1/secrets/{name}", tag = "secrets", operation_id = "putSecret",
    params(("name" = String, Path, description = "Secret name: an RFC 1123 label", min_length = 1, max_length = 63, pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")),
    request_body = SecretInput,
    responses(
        (status = 201, description = "Created", body = SecretView),
        (status = 200, description = "Replaced", body = SecretView),
        (status = 400, description = "The body is not JSON (code `malformed_json`)", body = super::error::ErrorBody),
        (status = 413, description = "The body is larger than `--max-body-bytes` (code `payload_too_large`)", body = super::error::ErrorBody),
        (status = 409, description = "The tenant keeps the most secrets allowed (code `too_many_secrets`, field `name`)", body = super::error::ErrorBody),
        (status = 422, description = "A bad name (`name`), key or value (`data.<key>`)", body = super::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn put(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    SecretNamePath(name): SecretNamePath,
    JsonBody(input): JsonBody<SecretInput>,
) -> Result<Response, ApiError> {
    secrets::validate_name(&name)?;
    let data = secrets::validate_data(input.data)?;
    let (written, meta) = state
        .secrets
        .put(&tenant.name, &name, data, jiff::Timestamp::now())
        .await?;
    tracing::info!(tenant = %tenant.name, secret = %name, keys = ?meta.keys, ?written, "secret written");
    let status = match written {
        Written::Created => StatusCode::CREATED,
        Written::Replaced => StatusCode::OK,
    };
    Ok((status, Json(SecretView::from(meta))).into_response())
}

/// Lists the tenant's secrets and their keys.
#[utoipa::path(get, path = "/v1/secrets", tag = "secrets", operation_id = "listSecrets",
    responses((status = 200, body = SecretList)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
) -> Result<Json<SecretList>, ApiError> {
    let items = state.secrets.list(&tenant.name).await?;
    Ok(Json(SecretList {
        items: items.into_iter().map(SecretView::from).collect(),
    }))
}

/// Reads one secret's keys (never its values).
#[utoipa::path(get, path = "/v1/secrets/{name}", tag = "secrets", operation_id = "getSecret",
    params(("name" = String, Path, description = "Secret name")),
    responses((status = 200, body = SecretView), (status = 404, description = "No such secret of this tenant (code `not_found`)", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_one(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    SecretNamePath(name): SecretNamePath,
) -> Result<Json<SecretView>, ApiError> {
    if secrets::validate_name(&name).is_err() {
        return Err(ApiError::SecretNotFound);
    }
    let meta = state
        .secrets
        .get(&tenant.name, &name)
        .await?
        .ok_or(ApiError::SecretNotFound)?;
    Ok(Json(meta.into()))
}

/// Deletes a secret. Tasks that reference it and have not started fail at launch
/// (`launch_rejected`, naming the secret).
#[utoipa::path(delete, path = "/v1/secrets/{name}", tag = "secrets", operation_id = "deleteSecret",
    params(("name" = String, Path, description = "Secret name")),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such secret of this tenant (code `not_found`)", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    SecretNamePath(name): SecretNamePath,
) -> Result<StatusCode, ApiError> {
    if secrets::validate_name(&name).is_err() {
        return Err(ApiError::SecretNotFound);
    }
    if state.secrets.delete(&tenant.name, &name).await? {
        tracing::info!(tenant = %tenant.name, secret = %name, "secret deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::SecretNotFound)
    }
}

/// 409 (`secret_not_found`) naming `env.<VAR>` when a secret reference of `spec` names a secret `tenant` does
/// not have, or a key that secret lacks.
pub(super) async fn check_references(
    state: &AppState,
    tenant: &str,
    spec: &TaskSpec,
) -> Result<(), ApiError> {
    match state.secrets.first_unresolved(tenant, &spec.env).await? {
        None => Ok(()),
        Some(unresolved) => Err(ApiError::Conflict {
            code: "secret_not_found",
            error: FieldError::new(unresolved.field(), unresolved.to_string()),
        }),
    }
}

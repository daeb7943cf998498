//! Extractors that turn every rejection into the API's one error shape
//! ([`ApiError`]): JSON bodies (400 for malformed JSON, 413 past the body limit, 422
//! naming the field for a wrong type or unknown field), query strings (422 naming
//! `query`), and task ids in paths (404 for anything that is not a task id, the same
//! answer as for another tenant's task).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::task::TaskId;
use crate::task::submission::FieldError;

/// A JSON request body of type `T`.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let body = Bytes::from_request(request, state).await;
        parse_body(body, state.max_body_bytes).map(Self)
    }
}

/// The query string, deserialised into `T`.
#[derive(Debug, Clone)]
pub struct QueryParams<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(query)| Self(query))
            .map_err(|rejection| FieldError::new("query", rejection.body_text()).into())
    }
}

/// The task id of a `/…/tasks/{id}…` path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskIdPath(pub TaskId);

impl<S: Send + Sync> FromRequestParts<S> for TaskIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::NotFound)?;
        id.parse().map(Self).map_err(|_| ApiError::NotFound)
    }
}

/// The task id and attempt number of a `/…/tasks/{id}/attempts/{attempt}…` path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptPath {
    pub id: TaskId,
    pub attempt: u32,
}

impl<S: Send + Sync> FromRequestParts<S> for AttemptPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path((id, attempt)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::NotFound)?;
        Ok(Self {
            id: id.parse().map_err(|_| ApiError::NotFound)?,
            attempt: attempt.parse().map_err(|_| ApiError::NotFound)?,
        })
    }
}

/// Parses a JSON body; syntax errors are 400, a wrong type or unknown field is 422 with
/// the field's path.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::MalformedJson(rejection.body_text())
        }
    })?;
    let deserializer = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_data() {
            let message = inner.to_string();
            let field = field_path(&path, &message);
            ApiError::Invalid(FieldError::new(field, strip_position(&message)))
        } else {
            ApiError::MalformedJson(inner.to_string())
        }
    })
}

/// The JSON path of the field to blame. The path serde reports ends at the offending
/// value, except for a missing field, where it ends at the object that lacks it (`.` at
/// the top) and only the message names the field: "missing field `x` …".
fn field_path(path: &str, message: &str) -> String {
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    match (missing, path) {
        (Some(name), ".") => name.to_owned(),
        (Some(name), parent) => format!("{parent}.{name}"),
        (None, path) => path.to_owned(),
    }
}

/// serde_json appends " at line L column C", which means nothing to a client that sent
/// compact JSON.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(index) => message[..index].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Bytes;

    use super::{ApiError, field_path, parse_body, strip_position};

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: u32,
    }

    fn parsed(text: &'static str) -> Result<Body, ApiError> {
        parse_body::<Body>(Ok(Bytes::from_static(text.as_bytes())), 1024)
    }

    #[test]
    fn rejections_name_the_field_or_the_syntax() {
        assert!(parsed(r#"{"name": "a", "count": 1}"#).is_ok());
        assert!(matches!(parsed("{"), Err(ApiError::MalformedJson(_))));
        let field = |result: Result<Body, ApiError>| match result {
            Err(ApiError::Invalid(error)) => error.field,
            other => panic!("expected a field error, got {other:?}"),
        };
        assert_eq!(field(parsed(r#"{"name": "a", "count": -1}"#)), "count");
        assert_eq!(field(parsed(r#"{"name": "a"}"#)), "count");
        assert_eq!(
            field(parsed(r#"{"name": "a", "count": 1, "extra": 0}"#)),
            "extra"
        );
    }

    #[test]
    fn serde_messages_become_client_messages() {
        assert_eq!(
            field_path("gpus", "unknown field `gpus`, expected one of `name`"),
            "gpus"
        );
        assert_eq!(
            field_path(".", "missing field `image` at line 1 column 12"),
            "image"
        );
        assert_eq!(
            field_path("resources.gpu", "missing field `class` at line 1 column 54"),
            "resources.gpu.class"
        );
        assert_eq!(
            strip_position("invalid type: string \"x\", expected u32 at line 1 column 9"),
            "invalid type: string \"x\", expected u32"
        );
    }
}

//! The API server's `Retry-After` header, carried into the error the kube client returns.
//!
//! API Priority and Fairness refuses a request it has no seat for with `429` and a
//! `Retry-After` header (one second upward, growing while it keeps refusing) over a
//! plain-text body. kube-client turns a body that is not a `Status` into one with no
//! `retryAfterSeconds`, and never shows headers, so the launcher (the one retry layer
//! toward Kubernetes) would back off on its own clock instead of the server's.
//!
//! Invariants: only a 429 or 503 response with a `Retry-After` of whole seconds is
//! touched; its body becomes a `Status` with `details.retryAfterSeconds` set (a `Status`
//! body is kept, its own non-zero `retryAfterSeconds` winning); every other response
//! passes through unread. A refusal's body is read to at most [`MAX_REFUSAL_BYTES`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, header::RETRY_AFTER};
use http_body_util::{BodyExt as _, Either, Full, Limited};
use kube::core::Status;
use kube::core::response::StatusDetails;
use tower::{Layer, Service};

/// The most of a refusal's body kept as the `Status` message; the API server's own are
/// under a hundred bytes.
pub const MAX_REFUSAL_BYTES: usize = 16 * 1024;

/// The layer to give `kube::client::ClientBuilder::with_layer`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryAfterLayer;

impl<S> Layer<S> for RetryAfterLayer {
    type Service = RetryAfterStatus<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RetryAfterStatus { inner }
    }
}

/// A service whose refusals carry the server's `Retry-After` in their `Status`.
#[derive(Debug, Clone)]
pub struct RetryAfterStatus<S> {
    inner: S,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, Request, ResBody> Service<Request> for RetryAfterStatus<S>
where
    S: Service<Request, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Either<ResBody, Full<Bytes>>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            let Some(seconds) = refusal_wait(response.status(), response.headers()) else {
                return Ok(response.map(Either::Left));
            };
            let (mut parts, body) = response.into_parts();
            // A body that fails or runs long still leaves a refusal to report: its
            // status and wait are what the caller acts on.
            let text = match Limited::new(body, MAX_REFUSAL_BYTES).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => Bytes::new(),
            };
            let status = with_retry_after(parts.status, &text, seconds);
            let json = serde_json::to_vec(&status).unwrap_or_default();
            parts.headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            parts.headers.remove(http::header::CONTENT_LENGTH);
            Ok(Response::from_parts(
                parts,
                Either::Right(Full::new(Bytes::from(json))),
            ))
        })
    }
}

/// The whole seconds a 429 or 503 asks the client to wait, if it says.
fn refusal_wait(status: StatusCode, headers: &HeaderMap) -> Option<u32> {
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    // An HTTP date is allowed by RFC 9110 but never sent by the API server.
    let seconds: u32 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (seconds > 0).then_some(seconds)
}

/// The `Status` a refusal means: its own when the body is one, else one made from its
/// text; either way with `retryAfterSeconds`.
fn with_retry_after(code: StatusCode, body: &[u8], seconds: u32) -> Status {
    let mut status = serde_json::from_slice::<Status>(body).unwrap_or_else(|_| {
        let reason = if code == StatusCode::TOO_MANY_REQUESTS {
            "TooManyRequests"
        } else {
            "ServiceUnavailable"
        };
        Status::failure(String::from_utf8_lossy(body).trim(), reason).with_code(code.as_u16())
    });
    let details = status.details.get_or_insert_with(|| StatusDetails {
        name: String::new(),
        group: String::new(),
        kind: String::new(),
        uid: String::new(),
        causes: Vec::new(),
        retry_after_seconds: 0,
    });
    if details.retry_after_seconds == 0 {
        details.retry_after_seconds = seconds;
    }
    status
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use k8s_openapi::api::batch::v1::Job;
    use kube::Api;
    use tower::{ServiceBuilder, service_fn};

    use super::RetryAfterLayer;

    /// What the launcher sees when a server answers a create with `status`, `headers` and
    /// `body`: the client's error, through the real kube-client error path.
    async fn create_refused(status: u16, headers: &[(&str, &str)], body: &str) -> kube::Error {
        let mut answer = Response::builder().status(status);
        for (name, value) in headers {
            answer = answer.header(*name, *value);
        }
        let answer = answer
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let service = ServiceBuilder::new()
            .layer(RetryAfterLayer)
            .service(service_fn(move |_: Request<kube::client::Body>| {
                let answer = answer.clone();
                async move { Ok::<_, std::convert::Infallible>(answer) }
            }));
        let client = kube::Client::new(service, "default");
        let jobs: Api<Job> = Api::namespaced(client, "default");
        jobs.create(&kube::api::PostParams::default(), &Job::default())
            .await
            .unwrap_err()
    }

    fn wait_and_code(error: &kube::Error) -> (u32, u16, String) {
        match error {
            kube::Error::Api(status) => (
                status.details.as_ref().map_or(0, |d| d.retry_after_seconds),
                status.code,
                status.message.clone(),
            ),
            other => panic!("not an API error: {other}"),
        }
    }

    #[tokio::test]
    async fn priority_and_fairness_plain_text_429_carries_its_retry_after() {
        // The API server's APF refusal, as sent (filters/maxinflight.go tooManyRequests).
        let error = create_refused(
            429,
            &[
                ("retry-after", "4"),
                ("content-type", "text/plain; charset=utf-8"),
            ],
            "Too many requests, please try again later.\n",
        )
        .await;
        assert_eq!(
            wait_and_code(&error),
            (
                4,
                429,
                "Too many requests, please try again later.".to_owned()
            )
        );
    }

    #[tokio::test]
    async fn a_status_body_keeps_its_own_wait_and_gains_the_headers_when_it_has_none() {
        let own = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"slow down","reason":"TooManyRequests","code":429,"details":{"retryAfterSeconds":7}}"#;
        let error = create_refused(429, &[("retry-after", "2")], own).await;
        assert_eq!(wait_and_code(&error), (7, 429, "slow down".to_owned()));

        let none = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"etcd is busy","reason":"ServiceUnavailable","code":503}"#;
        let error = create_refused(503, &[("retry-after", "3")], none).await;
        assert_eq!(wait_and_code(&error), (3, 503, "etcd is busy".to_owned()));
    }

    #[tokio::test]
    async fn other_answers_pass_untouched() {
        // No header, a date, a 500 with a header: the client's own reading stands.
        for (status, headers) in [
            (429, vec![]),
            (429, vec![("retry-after", "Wed, 21 Oct 2026 07:28:00 GMT")]),
            (500, vec![("retry-after", "5")]),
        ] {
            let error = create_refused(status, &headers, "nope").await;
            assert_eq!(wait_and_code(&error), (0, status, "nope".to_owned()));
        }
    }
}

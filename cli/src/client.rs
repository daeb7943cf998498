//! The REST API client: one blocking HTTP agent with the tenant's bearer token. Every
//! answer that is not a success becomes an [`Error`] that says what happened in terms
//! of the API (token refused, no such task, the API's own message naming the field).
//!
//! Invariants: a call never waits forever (connect and whole-call timeouts; streams
//! have a per-read timeout well above the server's 15 s keep-alive instead); bodies read
//! into memory are bounded.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::Value;
use ureq::http::Response;

use crate::error::{Error, Result};

/// Largest JSON answer read into memory (a page of 500 tasks is well below).
const MAX_JSON_BODY: u64 = 64 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole ordinary call.
const CALL_TIMEOUT: Duration = Duration::from_mins(1);
/// Silence on a stream after which it is taken as lost: the server sends a keep-alive
/// every 15 s.
const STREAM_READ_TIMEOUT: Duration = Duration::from_mins(1);

/// The dispatcher's default address (`dispatcher serve --listen`).
pub(crate) const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

#[derive(Debug, Clone)]
pub(crate) struct Client {
    server: String,
    token: Token,
    calls: ureq::Agent,
    /// Event streams: the server's keep-alives keep them from going quiet.
    streams: ureq::Agent,
    /// Followed logs: plain text, quiet while the task is.
    quiet_streams: ureq::Agent,
}

/// The API key; never printed (`Debug` redacts it).
#[derive(Clone)]
pub(crate) struct Token(pub(crate) String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A query string's parameters, in order.
pub(crate) type Query<'a> = &'a [(&'a str, String)];

impl Client {
    pub(crate) fn new(server: &str, token: Token) -> Result<Self> {
        let server = server.trim_end_matches('/').to_owned();
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            return Err(Error::usage(format!(
                "server '{server}' must be an http:// or https:// URL"
            )));
        }
        let agent = |whole: Option<Duration>, per_read: Option<Duration>| {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .user_agent(concat!("agent-bus-cli/", env!("CARGO_PKG_VERSION")))
                .timeout_connect(Some(CONNECT_TIMEOUT))
                .timeout_global(whole)
                .timeout_per_read(per_read)
                .build()
                .new_agent()
        };
        Ok(Self {
            server,
            token,
            calls: agent(Some(CALL_TIMEOUT), None),
            streams: agent(None, Some(STREAM_READ_TIMEOUT)),
            quiet_streams: agent(None, None),
        })
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server)
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token.0)
    }

    /// `GET path?query` as JSON.
    pub(crate) fn get_json(&self, path: &str, query: Query<'_>) -> Result<Value> {
        let response = self
            .calls
            .get(self.url(path))
            .header("authorization", self.bearer())
            .query_pairs(query.iter().map(|(k, v)| (*k, v.as_str())))
            .call()
            .map_err(|e| self.transport(&e))?;
        self.json(self.checked(response, path)?)
    }

    /// `POST path?query` with a JSON body (or none) and extra headers, as JSON.
    pub(crate) fn post_json(
        &self,
        path: &str,
        query: Query<'_>,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value> {
        let mut request = self
            .calls
            .post(self.url(path))
            .header("authorization", self.bearer())
            .query_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let sent = match body {
            Some(body) => request
                .content_type("application/json")
                .send(body.to_string()),
            None => request.send_empty(),
        };
        let response = sent.map_err(|e| self.transport(&e))?;
        self.json(self.checked(response, path)?)
    }

    /// `GET path?query` as a stream of bytes: Server-Sent Events, which carry
    /// keep-alives, so silence is a lost stream; or, `quiet`, followed logs, which may be
    /// silent as long as the task is.
    pub(crate) fn stream(
        &self,
        path: &str,
        query: Query<'_>,
        quiet: bool,
    ) -> Result<impl BufRead + use<>> {
        let agent = if quiet {
            &self.quiet_streams
        } else {
            &self.streams
        };
        let response = agent
            .get(self.url(path))
            .header("authorization", self.bearer())
            .query_pairs(query.iter().map(|(k, v)| (*k, v.as_str())))
            .call()
            .map_err(|e| self.transport(&e))?;
        let response = self.checked(response, path)?;
        Ok(BufReader::new(response.into_body().into_reader()))
    }

    /// A failure to reach the server at all, or to read its answer.
    pub(crate) fn transport(&self, error: &ureq::Error) -> Error {
        let detail = match error {
            ureq::Error::Io(io) => io.to_string(),
            ureq::Error::HostNotFound => "no such host".to_owned(),
            ureq::Error::ConnectionFailed => "connection failed".to_owned(),
            ureq::Error::Timeout(what) => format!("timed out ({what})"),
            other => other.to_string(),
        };
        match error {
            ureq::Error::BadUri(_) | ureq::Error::Http(_) => Error::usage(format!(
                "server '{}' is not a usable URL: {detail}",
                self.server
            )),
            ureq::Error::BodyExceedsLimit(_) | ureq::Error::Protocol(_) => Error::Protocol {
                server: self.server.clone(),
                detail,
            },
            _ => Error::Unreachable {
                server: self.server.clone(),
                detail,
            },
        }
    }

    /// The response when it is a success; otherwise its error, from the API's error
    /// body where there is one.
    fn checked(
        &self,
        mut response: Response<ureq::Body>,
        path: &str,
    ) -> Result<Response<ureq::Body>> {
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        Err(api_error(&self.server, path, status, &body))
    }

    fn json(&self, mut response: Response<ureq::Body>) -> Result<Value> {
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_JSON_BODY)
            .read_to_string()
            .map_err(|e| self.transport(&e))?;
        serde_json::from_str(&text).map_err(|e| Error::Protocol {
            server: self.server.clone(),
            detail: format!("not JSON: {e}"),
        })
    }
}

/// The error of a non-success answer `status` with `body` to a request for `path`.
pub(crate) fn api_error(server: &str, path: &str, status: u16, body: &str) -> Error {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let detail = parsed.as_ref().map(|v| &v["error"]);
    let message = detail.and_then(|d| d["message"].as_str()).map_or_else(
        || {
            let text = body.trim();
            if text.is_empty() || text.len() > 200 || text.contains('\n') {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {text}")
            }
        },
        str::to_owned,
    );
    let field = detail.and_then(|d| d["field"].as_str());
    let message = match field {
        Some(field) if !message.starts_with(field) => format!("{field}: {message}"),
        _ => message,
    };
    match status {
        401 | 403 => Error::TokenRefused {
            server: server.to_owned(),
            detail: message,
        },
        404 if path.starts_with("/v1/tasks/")
            && detail.is_none_or(|d| d["code"].is_null() || d["code"] == "not_found") =>
        {
            Error::NoSuchTask {
                id: path
                    .trim_start_matches("/v1/tasks/")
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            }
        }
        502..=504 => Error::Unreachable {
            server: server.to_owned(),
            detail: message,
        },
        500..=599 => Error::Server {
            server: server.to_owned(),
            detail: message,
        },
        _ => Error::Refused {
            message: format!("the dispatcher refused the request: {message}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit;

    #[test]
    fn answers_become_one_line_errors_with_their_exit_codes() {
        let s = "http://h:1";
        let e = api_error(
            s,
            "/v1/tasks",
            401,
            r#"{"error":{"code":"unauthorized","message":"missing or invalid API key"}}"#,
        );
        assert_eq!(
            e.to_string(),
            "the dispatcher at http://h:1 refused the token (missing or invalid API key)"
        );
        assert_eq!(e.exit_code(), exit::TOKEN_REFUSED);

        let e = api_error(
            s,
            "/v1/tasks/abc/events",
            404,
            r#"{"error":{"code":"not_found","message":"task not found"}}"#,
        );
        assert_eq!(e.to_string(), "no such task: abc");
        assert_eq!(e.exit_code(), exit::REFUSED);

        let e = api_error(
            s,
            "/v1/tasks",
            422,
            r#"{"error":{"code":"invalid_field","message":"name: must be a DNS label","field":"name"}}"#,
        );
        assert_eq!(
            e.to_string(),
            "the dispatcher refused the request: name: must be a DNS label"
        );
        let e = api_error(
            s,
            "/v1/tasks",
            422,
            r#"{"error":{"code":"invalid_field","message":"must be key=value","field":"label"}}"#,
        );
        assert_eq!(
            e.to_string(),
            "the dispatcher refused the request: label: must be key=value"
        );

        let e = api_error(s, "/v1/tasks", 503, "<html>\n</html>");
        assert_eq!(
            e.to_string(),
            "cannot reach the dispatcher at http://h:1: HTTP 503"
        );
        assert_eq!(e.exit_code(), exit::UNREACHABLE);
        assert!(e.is_transient());

        let e = api_error(
            s,
            "/v1/tasks",
            500,
            r#"{"error":{"code":"internal","message":"internal error"}}"#,
        );
        assert_eq!(e.exit_code(), exit::SERVER_ERROR);
    }

    #[test]
    fn the_server_must_be_an_http_url() {
        let e = Client::new("localhost:8080", Token("k".into())).unwrap_err();
        assert_eq!(e.exit_code(), exit::USAGE);
        assert!(Client::new("https://bus.example/", Token("k".into())).is_ok());
    }

    #[test]
    fn the_token_is_never_printed() {
        assert_eq!(format!("{:?}", Token("secret".into())), "Token(<redacted>)");
    }
}

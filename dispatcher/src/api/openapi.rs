//! The OpenAPI document, generated from the handlers' annotations and the types they
//! exchange, so it cannot drift from the code; served at `GET /openapi.json`, printed by
//! `dispatcher openapi` and checked in as `docs/openapi.json` (a test fails when they
//! differ).
//!
//! What this module owns, in the order [`document`] applies it:
//! 1. utoipa's document of [`ApiDoc`] (OpenAPI 3.1);
//! 2. the responses every operation shares because of its extractors ([`shared_responses`]):
//!    an operation secured by a tenant key can answer 401, 403 (`tenant_disabled`), 503
//!    (the store is down) and 500; one secured by a report token 401 and 403;
//! 3. the limits the operator configured ([`Limits`]), written into the submission's
//!    schema ([`state_limits`]): the served document says what this dispatcher accepts.
//!    The keys of a map (environment variable names, a secret's keys) are stated as
//!    `x-propertyNames`, with JSON Schema's `propertyNames` meaning, which 3.0 lacks;
//! 4. the conversion to OpenAPI 3.0.3 ([`to_openapi_30`]).
//!
//! Why 3.0.3: the client generators people use (progenitor, openapi-generator,
//! openapi-typescript's older majors) read 3.0 and refuse or misread 3.1, and utoipa 5
//! writes 3.1 only (no setting picks 3.0). The conversion is a small pure function over
//! the JSON, tested below: it changes only what 3.0 cannot say and leaves the meaning.
//!
//! Invariant: the document is a pure function of the code and the [`Limits`]; keys are
//! sorted, so the checked-in file is stable.

use axum::Json;
use axum::extract::State;
use serde_json::{Map, Value, json};
use utoipa::OpenApi;

use super::logs::{Include, SINCE_PATTERN};
use super::{ApiError, AppState};
use crate::secrets;
use crate::task::retry::{
    MAX_BACKOFF_CAP_SECONDS, MAX_BACKOFF_SECONDS, MAX_MATCHES_PER_RULE, MAX_MEMORY_FACTOR,
    MAX_RULES,
};
use crate::task::submission::{Limits, RESERVED_ENV};
use crate::task::webhook::{self, WebhookEvent};

/// An RFC 1123 label (task, queue and secret names).
const DNS_LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// An image reference: printable ASCII without spaces, not starting with `/`, `:`, `@`
/// or `-`.
const IMAGE: &str = "^[!-,.0-9;-?A-~][!-~]*$";
/// Any text without NUL characters.
const NO_NUL: &str = "^[^\\u0000]*$";
/// A secret's key: letters, digits, `-`, `_`, `.`, but not `.` or `..`.
const SECRET_KEY: &str = "^(?!\\.\\.?$)[-._a-zA-Z0-9]+$";
/// An absolute path of letters, digits, `-`, `_`, `.`, without `.`, `..` or empty parts
/// and without a trailing `/`, not at or under the reserved `/agent-bus`, `/dev`,
/// `/proc` and `/sys`.
const MOUNT_PATH: &str = "^(?!/(agent-bus|dev|proc|sys)(/|$))(/(?!\\.\\.?(/|$))[-._a-zA-Z0-9]+)+$";

/// The OpenAPI version served (see the module docs for why not 3.1).
pub const OPENAPI_VERSION: &str = "3.0.3";

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "agent-bus", description = "Submit tasks and follow them to their end; each runs as one Kubernetes Job."),
    paths(
        super::tasks::submit,
        super::tasks::get_one,
        super::task_list::list,
        super::tasks::cancel,
        super::tasks::events,
        super::webhooks::list,
        super::secrets::put,
        super::secrets::list,
        super::secrets::get_one,
        super::secrets::delete,
        super::reports::receive,
        super::logs::read,
        super::logs::receive,
        super::usage::usage,
        super::healthz,
        super::readyz,
    ),
    components(schemas(
        super::error::ErrorBody,
        super::usage::GroupByParam,
        super::task_list::ListView
    )),
    tags(
        (name = "tasks", description = "Task submission and tracking"),
        (name = "secrets", description = "Tenants' secrets for their tasks' environment: written, listed by key, deleted; values are never returned"),
        (name = "usage", description = "Spend and budgets"),
        (name = "internal", description = "Reports of the runner inside each task's pod"),
        (name = "probes", description = "Liveness and readiness"),
    )
)]
pub struct ApiDoc;

/// The document this dispatcher serves: [`ApiDoc`] with the shared responses and
/// `limits`, as OpenAPI 3.0.3.
pub fn document(limits: &Limits) -> Result<Value, serde_json::Error> {
    let mut doc = serde_json::to_value(ApiDoc::openapi())?;
    security_schemes(&mut doc);
    shared_responses(&mut doc);
    state_limits(&mut doc, limits);
    query_rules(&mut doc);
    to_openapi_30(&mut doc);
    Ok(doc)
}

/// The document as `docs/openapi.json` holds it: the default limits, pretty-printed,
/// ending in a newline. What `dispatcher openapi` prints.
pub fn document_text(limits: &Limits) -> Result<String, serde_json::Error> {
    let mut text = serde_json::to_string_pretty(&document(limits)?)?;
    text.push('\n');
    Ok(text)
}

/// `GET /openapi.json`: the document with this dispatcher's limits.
pub async fn serve(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    document(&state.limits)
        .map(Json)
        .map_err(|e| ApiError::Internal(format!("rendering the OpenAPI document: {e}")))
}

fn security_schemes(doc: &mut Value) {
    let schemes = json!({
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A tenant's API key (`ab_…`), from `dispatcher tenant create` or `tenant rotate-key`."
        },
        "report_token": {
            "type": "http",
            "scheme": "bearer",
            "description": "The report token of one task attempt (`AGENT_BUS_REPORT_TOKEN` in the task's environment); runners only."
        }
    });
    if let Some(components) = object_at(doc, "components") {
        components.insert("securitySchemes".to_owned(), schemes);
    }
}

/// The responses an operation's extractors give, whatever the handler does, added where
/// the annotation does not declare them itself.
fn shared_responses(doc: &mut Value) {
    let error = |description: &str| {
        json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        })
    };
    let tenant = [
        (
            "401",
            "No API key, or one no tenant holds (code `unauthorized`)",
        ),
        ("403", "The tenant is disabled (code `tenant_disabled`)"),
        (
            "500",
            "An internal error (code `internal`; the details are in the dispatcher's log under the response's `x-request-id`)",
        ),
        (
            "503",
            "The database or queue is unavailable (code `unavailable`, with `Retry-After`)",
        ),
    ];
    let runner = [
        (
            "401",
            "No report token, or a forged or expired one (code `unauthorized`)",
        ),
        (
            "403",
            "The token belongs to another task or attempt (code `forbidden`)",
        ),
        ("500", "An internal error (code `internal`)"),
        (
            "503",
            "The database is unavailable (code `unavailable`, with `Retry-After`)",
        ),
    ];
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for operation in paths.values_mut().filter_map(Value::as_object_mut) {
        for operation in operation.values_mut().filter_map(Value::as_object_mut) {
            let schemes: Vec<String> = operation
                .get("security")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_object)
                .flat_map(|requirement| requirement.keys().cloned())
                .collect();
            let shared: &[(&str, &str)] = if schemes.iter().any(|s| s == "bearer") {
                &tenant
            } else if schemes.iter().any(|s| s == "report_token") {
                &runner
            } else {
                &[]
            };
            let Some(responses) = operation
                .entry("responses")
                .or_insert_with(|| json!({}))
                .as_object_mut()
            else {
                continue;
            };
            for (status, description) in shared {
                responses
                    .entry((*status).to_owned())
                    .or_insert_with(|| error(description));
            }
        }
    }
}

/// The schema of `name` in `components/schemas`, as an object.
fn component<'a>(doc: &'a mut Value, name: &str) -> Option<&'a mut Map<String, Value>> {
    doc.pointer_mut(&format!("/components/schemas/{name}"))
        .and_then(Value::as_object_mut)
}

/// The schema of property `field` of component `name`, as an object (a property utoipa
/// wrote as a bare `$ref` gets siblings, which [`to_openapi_30`] moves into `allOf`).
fn property<'a>(doc: &'a mut Value, name: &str, field: &str) -> Option<&'a mut Map<String, Value>> {
    component(doc, name)?
        .get_mut("properties")?
        .get_mut(field)?
        .as_object_mut()
}

fn object_at<'a>(doc: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    doc.as_object_mut()?
        .entry(key.to_owned())
        .or_insert_with(|| json!({}))
        .as_object_mut()
}

/// Merges `constraints` into the schema of `name.property`.
fn constrain(doc: &mut Value, name: &str, field: &str, constraints: Value) {
    if let (Some(schema), Value::Object(constraints)) = (property(doc, name, field), constraints) {
        schema.extend(constraints);
    }
}

/// The schema of query parameter `name` of `GET path`.
fn query_parameter<'a>(doc: &'a mut Value, path: &str, name: &str) -> Option<&'a mut Value> {
    doc.get_mut("paths")?
        .get_mut(path)?
        .get_mut("get")?
        .get_mut("parameters")?
        .as_array_mut()?
        .iter_mut()
        .find(|p| p.get("name") == Some(&json!(name)) && p.get("in") == Some(&json!("query")))?
        .get_mut("schema")
}

/// What query values the API takes, where a Rust type cannot say it: `since` is a
/// date-time of [`SINCE_PATTERN`]'s shape, `include` one of [`Include::VALUES`].
fn query_rules(doc: &mut Value) {
    if let Some(schema) = query_parameter(doc, "/v1/tasks/{id}/logs", "since") {
        *schema = json!({"type": "string", "format": "date-time", "pattern": SINCE_PATTERN});
    }
    if let Some(schema) = query_parameter(doc, "/v1/tasks/{id}/events", "include") {
        *schema = json!({"type": "string", "enum": Include::VALUES});
    }
}

/// The operator's limits, as the submission's schema states them: the same bounds
/// `task::submission::validate` checks, so a client (or schemathesis) learns them from
/// the document. What JSON Schema cannot say (the byte totals of `command` and `args`,
/// a quantity's largest amount in every spelling, secret references that must exist) the
/// descriptions say; quantities get a pattern of the canonical spellings within the
/// limit (see [`quantity_pattern`]).
fn state_limits(doc: &mut Value, limits: &Limits) {
    let sub = "Submission";
    static_rules(doc);
    constrain(
        doc,
        sub,
        "timeout_seconds",
        json!({"minimum": 1, "maximum": limits.max_timeout_seconds}),
    );
    constrain(
        doc,
        sub,
        "queue_ttl_seconds",
        json!({"minimum": 1, "maximum": limits.max_queue_ttl_seconds}),
    );
    constrain(
        doc,
        sub,
        "max_retries",
        json!({"minimum": 0, "maximum": limits.max_retries}),
    );
    constrain(
        doc,
        sub,
        "priority",
        json!({"minimum": -limits.max_priority, "maximum": limits.max_priority}),
    );
    constrain(
        doc,
        sub,
        "command",
        json!({"maxItems": limits.max_command_entries}),
    );
    constrain(
        doc,
        sub,
        "args",
        json!({"maxItems": limits.max_command_entries}),
    );
    constrain(
        doc,
        sub,
        "env",
        json!({"maxProperties": limits.max_env_entries}),
    );
    if let Some(value) = component(doc, "EnvValue").and_then(|schema| {
        schema
            .get_mut("oneOf")?
            .as_array_mut()?
            .iter_mut()
            .find(|v| v.get("type") == Some(&json!("string")))?
            .as_object_mut()
    }) {
        value.insert("maxLength".to_owned(), json!(limits.max_env_value_bytes));
    }
    // No prefix allowed: no label (annotation) at all.
    let labels = if limits.label_prefixes.is_empty() {
        0
    } else {
        limits.max_labels
    };
    constrain(doc, sub, "labels", json!({"maxProperties": labels}));
    if limits.annotation_prefixes.is_empty() {
        constrain(doc, sub, "annotations", json!({"maxProperties": 0}));
    }
    if !limits.queues.is_empty() {
        constrain(
            doc,
            sub,
            "queue",
            json!({"enum": limits.queues.iter().collect::<Vec<_>>()}),
        );
    }
    if limits.volume_claims.is_empty() {
        constrain(doc, sub, "volumes", json!({"maxItems": 0}));
    } else {
        constrain(doc, sub, "volumes", json!({"maxItems": limits.max_volumes}));
        constrain(
            doc,
            "VolumeInput",
            "claim",
            json!({"enum": limits.volume_claims.keys().collect::<Vec<_>>()}),
        );
    }
    let cpu_millis = limits.max_cpu.millicores();
    constrain(
        doc,
        "ResourcesInput",
        "cpu",
        json!({"pattern": quantity_pattern(&[("", cpu_millis / 1000), ("m", cpu_millis)])}),
    );
    let memory = |max: u64| {
        const MIB: u64 = 1024 * 1024;
        quantity_pattern(&[("Gi", max / (1024 * MIB)), ("Mi", max / MIB)])
    };
    constrain(
        doc,
        "ResourcesInput",
        "memory",
        json!({"pattern": memory(limits.max_memory.bytes())}),
    );
    constrain(
        doc,
        "WebhookInput",
        "url",
        json!({"maxLength": webhook::MAX_URL_BYTES, "pattern": webhook::url_pattern()}),
    );
    constrain(
        doc,
        "WebhookInput",
        "events",
        json!({"minItems": 1, "maxItems": WebhookEvent::ALL.len(), "uniqueItems": true,
               "items": {"type": "string", "enum": WebhookEvent::ALL.map(WebhookEvent::as_str)}}),
    );
    constrain(
        doc,
        sub,
        "shm",
        json!({"pattern": memory(limits.max_shm.bytes())}),
    );
    constrain(
        doc,
        "ScratchInput",
        "size",
        json!({"pattern": memory(limits.max_scratch.bytes())}),
    );
    gpu_limits(doc, limits);
}

/// The rules of `task::submission::validate` that no flag changes.
fn static_rules(doc: &mut Value) {
    let dns_label = json!({"minLength": 1, "maxLength": 63, "pattern": DNS_LABEL});
    let no_nul = json!({"pattern": NO_NUL});
    constrain(doc, "Submission", "name", dns_label.clone());
    constrain(doc, "Submission", "queue", dns_label.clone());
    constrain(
        doc,
        "Submission",
        "image",
        json!({"minLength": 1, "maxLength": 512, "pattern": IMAGE}),
    );
    // `command` has a serde default (an empty list), which validation refuses.
    constrain(doc, "Submission", "command", json!({"minItems": 1}));
    if let Some(required) = component(doc, "Submission")
        .and_then(|schema| {
            schema
                .entry("required")
                .or_insert_with(|| json!([]))
                .as_array_mut()
        })
        .filter(|required| !required.contains(&json!("command")))
    {
        required.push(json!("command"));
    }
    for field in ["command", "args"] {
        if let Some(items) = property(doc, "Submission", field)
            .and_then(|schema| schema.get_mut("items"))
            .and_then(Value::as_object_mut)
        {
            items.insert("pattern".to_owned(), json!(NO_NUL));
        }
    }
    if let Some(plain) = component(doc, "EnvValue").and_then(|schema| {
        schema
            .get_mut("oneOf")?
            .as_array_mut()?
            .iter_mut()
            .find(|v| v.get("type") == Some(&json!("string")))?
            .as_object_mut()
    }) && let Value::Object(rule) = no_nul
    {
        plain.extend(rule);
    }
    constrain(
        doc,
        "Submission",
        "env",
        json!({"x-propertyNames": {"maxLength": 256, "pattern": env_name_pattern()}}),
    );
    constrain(
        doc,
        "SecretInput",
        "data",
        json!({
            "minProperties": 1,
            "maxProperties": secrets::MAX_KEYS,
            "additionalProperties": {"type": "string", "maxLength": secrets::MAX_VALUE_BYTES, "pattern": NO_NUL},
            "x-propertyNames": {"minLength": 1, "maxLength": 253, "pattern": SECRET_KEY},
        }),
    );
    constrain(doc, "SecretRef", "secret", dns_label);
    constrain(
        doc,
        "SecretRef",
        "key",
        json!({"minLength": 1, "maxLength": 253, "pattern": SECRET_KEY}),
    );
    for schema in ["VolumeInput", "ScratchInput"] {
        constrain(
            doc,
            schema,
            "mount_path",
            json!({"minLength": 2, "maxLength": 256, "pattern": MOUNT_PATH}),
        );
    }
    constrain(
        doc,
        "RetryPolicyInput",
        "backoff_seconds",
        json!({"minimum": 0, "maximum": MAX_BACKOFF_SECONDS}),
    );
    constrain(
        doc,
        "RetryPolicyInput",
        "max_backoff_seconds",
        json!({"minimum": 1, "maximum": MAX_BACKOFF_CAP_SECONDS}),
    );
    constrain(
        doc,
        "RetryPolicyInput",
        "rules",
        json!({"maxItems": MAX_RULES}),
    );
    constrain(
        doc,
        "RetryRuleInput",
        "on_exit_codes",
        json!({"maxItems": MAX_MATCHES_PER_RULE, "items": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 255}}),
    );
    constrain(
        doc,
        "RetryRuleInput",
        "on_failure_classes",
        json!({"maxItems": MAX_MATCHES_PER_RULE}),
    );
    constrain(
        doc,
        "MutationInput",
        "memory_factor",
        json!({"minimum": 1, "exclusiveMinimum": true, "maximum": MAX_MEMORY_FACTOR}),
    );
    split_retry_rule(doc);
}

/// Only a rule that retries (`retry`, `ignore`) may change the next attempt (`mutate`):
/// `RetryRuleInput` is one of two shapes, a `fail` rule having no `mutate`.
fn split_retry_rule(doc: &mut Value) {
    let Some(schema) = component(doc, "RetryRuleInput") else {
        return;
    };
    let description = schema.remove("description");
    let base = Value::Object(std::mem::take(schema));
    let shape = |actions: Value, mutate: bool| {
        let mut shape = base.clone();
        if let Some(properties) = shape.get_mut("properties").and_then(Value::as_object_mut) {
            properties.insert(
                "action".to_owned(),
                json!({"type": "string", "enum": actions}),
            );
            if !mutate {
                properties.remove("mutate");
            }
        }
        shape
    };
    let retries = shape(json!(["retry", "ignore"]), true);
    let fails = shape(json!(["fail"]), false);
    schema.insert("oneOf".to_owned(), json!([retries, fails]));
    if let Some(description) = description {
        schema.insert("description".to_owned(), description);
    }
}

/// An environment variable's name a tenant may set: letters, digits and `_`, not
/// starting with a digit, and none of [`RESERVED_ENV`] (a `*` ends a reserved prefix).
fn env_name_pattern() -> String {
    let reserved: Vec<String> = RESERVED_ENV
        .iter()
        .map(|(name, _)| match name.strip_suffix('*') {
            Some(prefix) => prefix.to_owned(),
            None => format!("{name}$"),
        })
        .collect();
    format!("^(?!({}))[A-Za-z_][A-Za-z0-9_]*$", reserved.join("|"))
}

/// A GPU request names a known class and at most as many GPUs as one node of that class
/// holds (and the operator's per-task maximum): one variant of `GpuInput` per distinct
/// maximum, each with its classes.
fn gpu_limits(doc: &mut Value, limits: &Limits) {
    let mut by_max: std::collections::BTreeMap<u32, Vec<&String>> =
        std::collections::BTreeMap::new();
    for (class, per_node) in &limits.gpu_classes {
        by_max
            .entry((*per_node).min(limits.max_gpus))
            .or_default()
            .push(class);
    }
    let Some(schema) = component(doc, "GpuInput") else {
        return;
    };
    let base = Value::Object(schema.clone());
    let variants: Vec<Value> = by_max
        .iter()
        .map(|(max, classes)| {
            let mut variant = base.clone();
            if let Some(properties) = variant.get_mut("properties") {
                properties["class"]["enum"] = json!(classes);
                properties["count"]["minimum"] = json!(1);
                properties["count"]["maximum"] = json!(max);
            }
            if let Some(variant) = variant.as_object_mut() {
                variant.remove("description");
            }
            variant
        })
        .collect();
    let description = schema.remove("description");
    schema.clear();
    match <[Value; 1]>::try_from(variants) {
        Ok([Value::Object(only)]) => schema.extend(only),
        Ok(_) => {}
        Err(variants) => {
            schema.insert("oneOf".to_owned(), Value::Array(variants));
        }
    }
    if let Some(description) = description {
        schema.insert("description".to_owned(), description);
    }
}

/// A pattern of the whole numbers 1 to `max` written with each unit suffix: `[("", 64),
/// ("m", 64000)]` matches `1` to `64` and `1m` to `64000m`. The API takes every spelling
/// of a Kubernetes quantity (`1.5`, `1e3m`, `2G`); the pattern states the canonical ones
/// that are within the limit, so whatever matches it is accepted.
fn quantity_pattern(units: &[(&str, u64)]) -> String {
    let alternatives: Vec<String> = units
        .iter()
        .filter(|(_, max)| *max >= 1)
        .map(|(unit, max)| format!("(?:{}){unit}", number_range(*max)))
        .collect();
    format!("^(?:{})$", alternatives.join("|"))
}

/// A regular expression matching the decimal numbers 1 to `max` without leading zeros.
fn number_range(max: u64) -> String {
    let digits: Vec<u32> = max
        .to_string()
        .chars()
        .filter_map(|c| c.to_digit(10))
        .collect();
    let n = digits.len();
    let mut parts = Vec::new();
    // Fewer digits than `max`: any such number.
    if n > 1 {
        parts.push(if n == 2 {
            "[1-9]".to_owned()
        } else {
            format!("[1-9][0-9]{{0,{}}}", n - 2)
        });
    }
    // As many digits: a prefix of `max`, one digit below it, then anything.
    for i in 0..n {
        let low = u32::from(i == 0);
        let Some(high) = digits[i].checked_sub(1) else {
            continue;
        };
        if high < low {
            continue;
        }
        let prefix: String = digits[..i].iter().map(u32::to_string).collect();
        let rest = n - i - 1;
        let tail = match rest {
            0 => String::new(),
            1 => "[0-9]".to_owned(),
            _ => format!("[0-9]{{{rest}}}"),
        };
        let digit = if low == high {
            low.to_string()
        } else {
            format!("[{low}-{high}]")
        };
        parts.push(format!("{prefix}{digit}{tail}"));
    }
    parts.push(max.to_string());
    parts.join("|")
}

/// Rewrites utoipa's OpenAPI 3.1 document as 3.0.3, in place. In every schema:
/// `"type": [T, "null"]` becomes `"type": T, "nullable": true`; a `oneOf`/`anyOf` with a
/// `{"type": "null"}` member loses it and becomes nullable; `const` becomes a one-value
/// `enum`; `examples` becomes its first `example`; a `$ref` with siblings (3.0 ignores
/// them) moves into `allOf`; a numeric `exclusiveMinimum`/`exclusiveMaximum` becomes the
/// bound with the boolean flag; `contentMediaType`/`contentEncoding` go. Outside schemas:
/// `info.license.identifier`, `info.summary`, `jsonSchemaDialect` and `webhooks` go.
pub fn to_openapi_30(doc: &mut Value) {
    let Some(root) = doc.as_object_mut() else {
        return;
    };
    root.insert("openapi".to_owned(), json!(OPENAPI_VERSION));
    root.remove("jsonSchemaDialect");
    root.remove("webhooks");
    if let Some(info) = root.get_mut("info").and_then(Value::as_object_mut) {
        info.remove("summary");
        if let Some(license) = info.get_mut("license").and_then(Value::as_object_mut) {
            license.remove("identifier");
        }
    }
    if let Some(schemas) = root
        .get_mut("components")
        .and_then(|c| c.get_mut("schemas"))
        .and_then(Value::as_object_mut)
    {
        schemas.values_mut().for_each(schema_30);
    }
    let Some(paths) = root.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut().filter_map(Value::as_object_mut) {
        for (key, operation) in item.iter_mut() {
            if key == "parameters" {
                parameters_30(operation);
                continue;
            }
            let Some(operation) = operation.as_object_mut() else {
                continue;
            };
            if let Some(parameters) = operation.get_mut("parameters") {
                parameters_30(parameters);
            }
            if let Some(content) = operation
                .get_mut("requestBody")
                .and_then(|body| body.get_mut("content"))
            {
                content_30(content);
            }
            for response in operation
                .get_mut("responses")
                .and_then(Value::as_object_mut)
                .into_iter()
                .flat_map(|r| r.values_mut())
            {
                if let Some(content) = response.get_mut("content") {
                    content_30(content);
                }
                for header in response
                    .get_mut("headers")
                    .and_then(Value::as_object_mut)
                    .into_iter()
                    .flat_map(|h| h.values_mut())
                {
                    if let Some(schema) = header.get_mut("schema") {
                        schema_30(schema);
                    }
                }
            }
        }
    }
}

fn parameters_30(parameters: &mut Value) {
    for parameter in parameters.as_array_mut().into_iter().flatten() {
        if let Some(schema) = parameter.get_mut("schema") {
            schema_30(schema);
        }
    }
}

fn content_30(content: &mut Value) {
    for media in content
        .as_object_mut()
        .into_iter()
        .flat_map(|c| c.values_mut())
    {
        if let Some(schema) = media.get_mut("schema") {
            schema_30(schema);
        }
    }
}

/// One schema and everything under it, 3.1 to 3.0.
fn schema_30(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    // Children first: a member's nullability is decided before its parent looks at it.
    for key in ["items", "not", "additionalProperties"] {
        if let Some(child) = object.get_mut(key) {
            schema_30(child);
        }
    }
    for key in ["properties", "patternProperties"] {
        if let Some(children) = object.get_mut(key).and_then(Value::as_object_mut) {
            children.values_mut().for_each(schema_30);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(members) = object.get_mut(key).and_then(Value::as_array_mut) {
            members.iter_mut().for_each(schema_30);
        }
    }

    if let Some(Value::Array(types)) = object.get("type") {
        let nullable = types.iter().any(|t| t == "null");
        let rest: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
        match rest.as_slice() {
            [] => {
                object.remove("type");
            }
            [one] => {
                object.insert("type".to_owned(), one.clone());
            }
            _ => {
                // 3.0 has one type per schema: one member per type.
                object.remove("type");
                let members = rest.into_iter().map(|t| json!({"type": t})).collect();
                object.insert("anyOf".to_owned(), Value::Array(members));
            }
        }
        if nullable {
            object.insert("nullable".to_owned(), json!(true));
        }
    }
    for key in ["oneOf", "anyOf"] {
        let Some(members) = object.get_mut(key).and_then(Value::as_array_mut) else {
            continue;
        };
        let before = members.len();
        members.retain(|member| member != &json!({"type": "null"}));
        if members.len() == before {
            continue;
        }
        object.insert("nullable".to_owned(), json!(true));
        if let Some(Value::Array(members)) = object.get(key)
            && let [only] = members.as_slice()
        {
            let only = only.clone();
            object.remove(key);
            // A `$ref` keeps its siblings (nullable, description) through `allOf`.
            if only.get("$ref").is_some() {
                object.insert("allOf".to_owned(), json!([only]));
            } else if let Value::Object(only) = only {
                for (k, v) in only {
                    object.entry(k).or_insert(v);
                }
            }
        }
    }
    if let Some(value) = object.remove("const") {
        object.insert("enum".to_owned(), json!([value]));
    }
    if let Some(examples) = object.remove("examples")
        && let Some(first) = examples.as_array().and_then(|e| e.first())
    {
        object.insert("example".to_owned(), first.clone());
    }
    for (exclusive, bound) in [
        ("exclusiveMinimum", "minimum"),
        ("exclusiveMaximum", "maximum"),
    ] {
        if let Some(value) = object.get(exclusive).filter(|v| v.is_number()).cloned() {
            object.insert(bound.to_owned(), value);
            object.insert(exclusive.to_owned(), json!(true));
        }
    }
    // 3.0 has no `propertyNames`: utoipa's `{"type": "string"}` says nothing (keys are
    // strings); any other rule is kept as the extension.
    if let Some(names) = object.remove("propertyNames")
        && names != json!({"type": "string"})
    {
        object.entry("x-propertyNames").or_insert(names);
    }
    object.remove("contentMediaType");
    object.remove("contentEncoding");
    object.remove("$schema");
    if object.len() > 1
        && let Some(reference) = object.remove("$ref")
        && let Some(members) = object
            .entry("allOf")
            .or_insert_with(|| json!([]))
            .as_array_mut()
    {
        members.insert(0, json!({"$ref": reference}));
    }
}

#[cfg(test)]
mod tests {
    use regex::Regex;
    use serde_json::{Value, json};

    use super::{Limits, document, document_text, number_range, quantity_pattern, to_openapi_30};

    #[allow(clippy::needless_pass_by_value)] // called with json!(…) temporaries
    fn converted(schema: Value) -> Value {
        let mut doc = json!({"openapi": "3.1.0", "components": {"schemas": {"S": schema}}});
        to_openapi_30(&mut doc);
        assert_eq!(doc["openapi"], "3.0.3");
        doc["components"]["schemas"]["S"].take()
    }

    #[test]
    fn declared_queues_are_the_queues_enum() {
        let open = document(&Limits::default()).unwrap();
        let queue = &open["components"]["schemas"]["Submission"]["properties"]["queue"];
        assert!(queue.get("enum").is_none(), "{queue}");
        let limits = Limits {
            queues: ["default", "gpu"].map(str::to_owned).into(),
            ..Limits::default()
        };
        let declared = document(&limits).unwrap();
        let queue = &declared["components"]["schemas"]["Submission"]["properties"]["queue"];
        assert_eq!(queue["enum"], json!(["default", "gpu"]), "{queue}");
    }

    #[test]
    fn the_31_forms_become_30_forms() {
        assert_eq!(
            converted(json!({"type": ["string", "null"], "maxLength": 3})),
            json!({"type": "string", "nullable": true, "maxLength": 3})
        );
        assert_eq!(
            converted(
                json!({"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/T"}], "description": "d"})
            ),
            json!({"allOf": [{"$ref": "#/components/schemas/T"}], "nullable": true, "description": "d"})
        );
        assert_eq!(
            converted(json!({"oneOf": [{"type": "null"}, {"type": "integer", "minimum": 0}]})),
            json!({"type": "integer", "minimum": 0, "nullable": true})
        );
        assert_eq!(
            converted(json!({"$ref": "#/components/schemas/T", "description": "d"})),
            json!({"allOf": [{"$ref": "#/components/schemas/T"}], "description": "d"})
        );
        assert_eq!(
            converted(
                json!({"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {"type": "string"}})
            ),
            json!({"type": "object", "additionalProperties": {"type": "string"}})
        );
        assert_eq!(
            converted(json!({"const": "x", "examples": ["x", "y"]})),
            json!({"enum": ["x"], "example": "x"})
        );
        assert_eq!(
            converted(json!({"type": "number", "exclusiveMinimum": 1})),
            json!({"type": "number", "minimum": 1, "exclusiveMinimum": true})
        );
        assert_eq!(
            converted(
                json!({"type": "object", "properties": {"a": {"type": ["integer", "null"]}}, "additionalProperties": {"type": ["string", "null"]}})
            ),
            json!({"type": "object", "properties": {"a": {"type": "integer", "nullable": true}}, "additionalProperties": {"type": "string", "nullable": true}})
        );
        assert_eq!(
            converted(
                json!({"type": "array", "items": {"type": "string", "contentMediaType": "text/plain"}})
            ),
            json!({"type": "array", "items": {"type": "string"}})
        );
        assert_eq!(
            converted(json!({"$ref": "#/components/schemas/T"})),
            json!({"$ref": "#/components/schemas/T"}),
            "a bare reference stays"
        );
    }

    /// Every 3.1-only form is gone from the served document.
    #[test]
    #[allow(clippy::items_after_statements)]
    fn the_document_is_openapi_30() {
        let doc = document(&Limits::default()).unwrap();
        assert_eq!(doc["openapi"], "3.0.3");
        fn walk(value: &Value, path: &str) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::Array(_)) = map.get("type") {
                        panic!("type array at {path}");
                    }
                    assert!(
                        map.get("type") != Some(&json!("null")),
                        "null type at {path}"
                    );
                    assert!(!map.contains_key("const"), "const at {path}");
                    assert!(
                        !map.contains_key("propertyNames"),
                        "propertyNames at {path}"
                    );
                    if map.contains_key("$ref") {
                        assert_eq!(map.len(), 1, "$ref with siblings at {path}");
                    }
                    for (k, v) in map {
                        walk(v, &format!("{path}/{k}"));
                    }
                }
                Value::Array(items) => {
                    for (i, v) in items.iter().enumerate() {
                        walk(v, &format!("{path}/{i}"));
                    }
                }
                _ => {}
            }
        }
        walk(&doc, "");
    }

    #[test]
    fn operations_have_the_agreed_ids_and_declare_their_errors() {
        let doc = document(&Limits::default()).unwrap();
        let mut ids = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let id = operation["operationId"].as_str().unwrap();
                assert!(
                    id.chars().next().unwrap().is_ascii_lowercase() && !id.contains('_'),
                    "{method} {path}: {id} is not lowerCamelCase"
                );
                ids.push(id.to_owned());
                let responses = operation["responses"].as_object().unwrap();
                let secured = operation.get("security").is_some();
                for status in ["401", "403", "500", "503"] {
                    assert!(
                        responses.contains_key(status) == secured || id == "readyz",
                        "{id} and {status}"
                    );
                }
                for (status, response) in responses {
                    if (status.starts_with('4') || status.starts_with('5')) && id != "readyz" {
                        assert_eq!(
                            response["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/ErrorBody",
                            "{id} {status}"
                        );
                    }
                }
            }
        }
        ids.sort();
        for id in [
            "cancelTask",
            "deleteSecret",
            "getSecret",
            "getTask",
            "getTaskEvents",
            "getUsage",
            "healthz",
            "listSecrets",
            "listTasks",
            "postReport",
            "putSecret",
            "readyz",
            "submitTask",
        ] {
            assert!(ids.iter().any(|i| i == id), "{id} missing from {ids:?}");
        }
    }

    /// utoipa names a component after its type and keeps the last of two types of one
    /// name: the retry rules' classes were once declared as the runner's.
    #[test]
    fn each_failure_class_has_its_own_component() {
        let doc = document(&Limits::default()).unwrap();
        let names = |component: &str| -> Vec<String> {
            doc["components"]["schemas"][component]["enum"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        let retry: Vec<String> = crate::task::retry::FailureClass::ALL
            .iter()
            .map(|class| {
                serde_json::to_value(class)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(names("FailureClass"), retry);
        assert!(names("RunnerFailureClass").contains(&"gpu_xid".to_owned()));
        let items =
            &doc["components"]["schemas"]["RetryRule"]["properties"]["on_failure_classes"]["items"];
        assert_eq!(items["$ref"], "#/components/schemas/FailureClass");
    }

    #[test]
    fn ranges_match_exactly_the_numbers_up_to_the_maximum() {
        for max in [1, 7, 9, 10, 19, 64, 100, 512, 1000, 64000, 65535, 524_288] {
            let pattern = Regex::new(&format!("^(?:{})$", number_range(max))).unwrap();
            for n in 0..=(max + 1200) {
                assert_eq!(
                    pattern.is_match(&n.to_string()),
                    (1..=max).contains(&n),
                    "{n} against 1..={max}: {pattern}"
                );
            }
            assert!(!pattern.is_match("01"));
        }
        let cpu = Regex::new(&quantity_pattern(&[("", 64), ("m", 64000)])).unwrap();
        for (text, ok) in [
            ("1", true),
            ("64", true),
            ("65", false),
            ("500m", true),
            ("64000m", true),
            ("64001m", false),
            ("0", false),
            ("1.5", false),
        ] {
            assert_eq!(cpu.is_match(text), ok, "{text}");
        }
    }

    /// `docs/openapi.json` is what the code generates with the default limits.
    /// `UPDATE_OPENAPI=1 cargo test -p dispatcher --lib openapi` rewrites it.
    #[test]
    fn the_checked_in_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let generated = document_text(&Limits::default()).unwrap();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
            return;
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/openapi.json differs from the generated document; regenerate it with\n  \
             cargo run -p dispatcher -- openapi > docs/openapi.json\n(or UPDATE_OPENAPI=1 cargo test -p dispatcher --lib openapi)"
        );
    }
}

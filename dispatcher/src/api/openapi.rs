//! The OpenAPI 3 document, generated from the handlers' annotations and the types they
//! exchange, so it cannot drift from the code.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "agent-bus", description = "Submit tasks and follow them to their end; each runs as one Kubernetes Job."),
    paths(
        super::tasks::submit,
        super::tasks::get_one,
        super::tasks::list,
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
    modifiers(&BearerAuth),
    tags(
        (name = "tasks", description = "Task submission and tracking"),
        (name = "secrets", description = "Tenants' secrets for their tasks' environment: written, listed by key, deleted; values are never returned"),
        (name = "usage", description = "Spend and budgets"),
        (name = "internal", description = "Reports of the runner inside each task's pod"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "report_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// `GET /openapi.json`.
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

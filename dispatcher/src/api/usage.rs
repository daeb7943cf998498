//! `GET /v1/usage`: a tenant's spend over a time range, grouped by queue or UTC day, with
//! its budgets and what it has spent of them. A range covers at most 400 days (so at
//! most 400 day groups): a longer one is shortened to its last 400 days, and the answer's
//! `from` and `to` say what was summed.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::auth::Authenticated;
use super::extract::QueryParams;
use super::{ApiError, AppState};
use crate::cost::{Period, round_cents};
use crate::store::{Budget, GroupBy, UsageGroup};
use crate::task::submission::FieldError;

/// The longest range one request may cover.
const MAX_RANGE_DAYS: i64 = 400;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start, inclusive: RFC 3339 (`2026-11-01T00:00:00Z`) or a UTC date (`2026-11-01`).
    /// Default: the start of the current UTC month. At most 400 days before `to`: an
    /// earlier one counts from there.
    #[param(format = DateTime)]
    pub from: Option<String>,
    /// End, exclusive, in the same forms. Default: now. One before `from` is an empty
    /// range.
    #[param(format = DateTime)]
    pub to: Option<String>,
    /// `queue` (default) or `day`.
    #[param(value_type = Option<GroupByParam>)]
    pub group_by: Option<String>,
}

/// How `GET /v1/usage` groups, for the document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupByParam {
    Queue,
    Day,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub tenant: String,
    /// RFC 3339.
    pub from: String,
    pub to: String,
    /// `queue` or `day`.
    pub group_by: &'static str,
    /// Tasks that finished in the range, by group.
    pub groups: Vec<UsageGroup>,
    /// Sum of the groups.
    pub total_dollars: f64,
    /// What tasks not yet finished have cost so far (not in the groups).
    pub unfinished_dollars: f64,
    pub budget: BudgetView,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BudgetView {
    #[serde(flatten)]
    pub budget: Budget,
    /// Spent in the current UTC day and month, unfinished tasks included: what the budgets
    /// are checked against.
    pub spent_today_dollars: f64,
    pub spent_this_month_dollars: f64,
}

/// Parses a `from`/`to` value: RFC 3339 or a UTC date.
fn instant(field: &str, text: &str) -> Result<jiff::Timestamp, ApiError> {
    if let Ok(at) = text.parse::<jiff::Timestamp>() {
        return Ok(at);
    }
    text.parse::<jiff::civil::Date>()
        .ok()
        .and_then(|date| date.to_zoned(jiff::tz::TimeZone::UTC).ok())
        .map(|zoned| zoned.timestamp())
        .ok_or_else(|| {
            FieldError::new(
                field,
                format!("'{text}' is neither an RFC 3339 time (2026-11-01T00:00:00Z) nor a date (2026-11-01)"),
            )
            .into()
        })
}

/// The tenant's spend.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", operation_id = "getUsage", params(UsageQuery),
    responses((status = 200, body = Usage),
        (status = 422, description = "A query parameter breaks a rule, named in `field`", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn usage(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    QueryParams(query): QueryParams<UsageQuery>,
) -> Result<Json<Usage>, ApiError> {
    let now = jiff::Timestamp::now();
    let from = query
        .from
        .as_deref()
        .map(|text| instant("from", text))
        .transpose()?
        .unwrap_or_else(|| Period::Month.start(now));
    let to = query
        .to
        .as_deref()
        .map(|text| instant("to", text))
        .transpose()?
        .unwrap_or(now);
    // Each of `from` and `to` is checked alone (the OpenAPI document can state that): an
    // empty range has no usage, and a longer one than the most one answer covers is
    // shortened to its last days; the answer's `from` and `to` say what was summed.
    let to = to.max(from);
    let longest = jiff::SignedDuration::from_hours(MAX_RANGE_DAYS * 24);
    let from = to
        .checked_sub(longest)
        .map_or(from, |earliest| from.max(earliest));
    let (group_by, group_name) = match query.group_by.as_deref() {
        None | Some("queue") => (GroupBy::Queue, "queue"),
        Some("day") => (GroupBy::Day, "day"),
        Some(other) => {
            return Err(
                FieldError::new("group_by", format!("'{other}' is not one of queue, day")).into(),
            );
        }
    };
    let groups = state
        .store()
        .usage(&tenant.name, from, to, group_by)
        .await?;
    let total = round_cents(groups.iter().map(|g| g.total_dollars).sum());
    let spend = state.spend(&tenant.name, now).await?;
    Ok(Json(Usage {
        tenant: tenant.name.clone(),
        from: from.to_string(),
        to: to.to_string(),
        group_by: group_name,
        groups,
        total_dollars: total,
        unfinished_dollars: round_cents(spend.unfinished_dollars),
        budget: BudgetView {
            budget: tenant.budget,
            spent_today_dollars: round_cents(spend.day_dollars),
            spent_this_month_dollars: round_cents(spend.month_dollars),
        },
    }))
}

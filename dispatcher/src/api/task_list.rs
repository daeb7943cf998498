//! `GET /v1/tasks`: a tenant's tasks, newest first, a page at a time, as summaries (what a
//! list shows, read without the spec blob) or, with `view=full`, as whole tasks.
//!
//! Invariants:
//! - a page holds at most `limit` items and, past its first item, at most
//!   [`AppState::list_page_max_bytes`] bytes of items: a page that stops early at the byte
//!   cap still returns at least one item, and its `next_cursor` is its last item's id, so
//!   pages chained through `next_cursor` return every task exactly once;
//! - the summary view never reads the spec blob (a task's spec may be a mebibyte); the
//!   full view reads whole tasks a few at a time, so a page holds at most the byte cap
//!   plus one chunk of tasks in memory however large the specs are.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use axum::extract::State;

use super::auth::Authenticated;
use super::extract::QueryParams;
use super::tasks::{JobRef, TaskView};
use super::{ApiError, AppState};
use crate::cost::TaskCost;
use crate::launcher::job_spec::job_name;
use crate::store::ListFilter;
use crate::task::submission::FieldError;
use crate::task::{Reason, Resources, TaskId, TaskState, TaskSummary};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;
/// The default of [`AppState::list_page_max_bytes`]: the items of one page, serialized.
/// Past it a page ends early (after at least one item) and `next_cursor` goes on.
pub const DEFAULT_PAGE_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Whole tasks read from the store at once for `view=full`: each may be a mebibyte, so a
/// page's memory stays near the byte cap instead of `limit` specs.
const FULL_VIEW_CHUNK: u32 = 8;

/// What each item of a list page holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ListView {
    /// `TaskSummaryView`: what a list shows, without the spec's command, arguments,
    /// environment, volumes and annotations.
    #[default]
    Summary,
    /// `TaskView`: the task as `GET /v1/tasks/{id}` shows it (without `attempts`,
    /// `runner`, `queue_position` and `estimated_start`).
    Full,
}

impl std::str::FromStr for ListView {
    type Err = FieldError;

    fn from_str(value: &str) -> Result<Self, FieldError> {
        match value {
            "summary" => Ok(Self::Summary),
            "full" => Ok(Self::Full),
            _ => Err(FieldError::new("view", "must be summary or full")),
        }
    }
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only tasks in this state.
    #[param(value_type = Option<TaskState>)]
    pub state: Option<String>,
    /// Only tasks of this queue.
    pub queue: Option<String>,
    /// Only tasks with this label, as `key=value`.
    #[param(pattern = "=")]
    pub label: Option<String>,
    /// Page size, 1 to 500 (default 50). A page may hold fewer items: it also ends
    /// before its items pass 4 MiB (after at least one); `next_cursor` then goes on.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(format = Uuid)]
    pub cursor: Option<String>,
    /// `summary` (default): each item a `TaskSummaryView`, without the heavy parts of the
    /// spec; `full`: each item a whole `TaskView`.
    #[param(value_type = Option<ListView>)]
    pub view: Option<String>,
}

/// A task as a list shows it: its progress, cost and the spec fields a table prints.
/// A `TaskView` (`view=full`) has every one of these fields too.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskSummaryView {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub queue: String,
    pub priority: i32,
    pub image: String,
    pub resources: Resources,
    pub state: TaskState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub attempt: u32,
    /// Retries used against `max_retries`.
    pub retries_used: u32,
    /// While the task waits out a retry's backoff: when its next attempt may start; RFC
    /// 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The Kubernetes Job of the current attempt, once the task was handed to the cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRef>,
    /// The GPU class of the current attempt (a fallback may differ from the request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_class: Option<String>,
    /// What the task has cost so far (final once it is over).
    pub cost: TaskCost,
    /// RFC 3339.
    pub created_at: String,
    pub updated_at: String,
    /// When the current attempt's Job (or process) was created; RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<String>,
    /// When the command started running; RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When the task reached its final state; RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// When it expires if no launcher has taken it by then (its queue TTL); RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl TaskSummaryView {
    fn new(task: TaskSummary, state: &AppState) -> Self {
        let launched = !matches!(task.state, TaskState::Queued | TaskState::Launching);
        let cost = TaskCost::of_summary(&task, state.lifecycle.prices(), jiff::Timestamp::now());
        let job = state.cluster.as_ref().filter(|_| launched).map(|_| JobRef {
            namespace: state.launch.namespace.clone(),
            name: job_name(&task.id, task.attempt),
        });
        Self {
            id: task.id.to_string(),
            tenant: task.tenant,
            name: task.name,
            queue: task.queue,
            priority: task.priority,
            image: task.image,
            resources: task.resources,
            state: task.state,
            reason: task.reason,
            message: task.message,
            attempt: task.attempt,
            retries_used: task.retries.counted,
            next_attempt_at: task
                .next_attempt_at
                .filter(|_| task.state == TaskState::Queued)
                .map(|t| t.to_string()),
            exit_code: task.exit_code,
            job,
            gpu_class: task.gpu_class,
            cost,
            created_at: task.created_at.to_string(),
            updated_at: task.updated_at.to_string(),
            launched_at: task.timeline.launched_at.map(|t| t.to_string()),
            started_at: task.timeline.started_at.map(|t| t.to_string()),
            finished_at: task.timeline.finished_at.map(|t| t.to_string()),
            expires_at: task.expires_at.map(|t| t.to_string()),
        }
    }
}

/// A page of tasks, newest first.
// The handler writes pages item by item (`PageWriter`) to stop at the byte cap; this type
// is the document's description of what it writes.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskPage {
    /// `TaskSummaryView` items; with `view=full`, `TaskView` items (which have every field
    /// of a summary).
    pub items: Vec<TaskSummaryView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The items of a page as JSON, written one at a time up to `limit` items and, past the
/// first, `max_bytes` bytes.
#[derive(Debug)]
struct PageWriter {
    items: Vec<u8>,
    count: u32,
    limit: u32,
    max_bytes: usize,
    last: Option<TaskId>,
}

/// Whether an item went on the page.
#[derive(Debug, PartialEq, Eq)]
enum Pushed {
    Added,
    /// The page is full (its `limit`, or its byte cap): the item is left for the next.
    Full,
}

impl PageWriter {
    fn new(limit: u32, max_bytes: usize) -> Self {
        Self {
            items: Vec::new(),
            count: 0,
            limit,
            max_bytes,
            last: None,
        }
    }

    fn push<T: Serialize>(&mut self, id: TaskId, item: &T) -> Result<Pushed, ApiError> {
        if self.count >= self.limit {
            return Ok(Pushed::Full);
        }
        let json = serde_json::to_vec(item).map_err(|e| ApiError::Internal(e.to_string()))?;
        // The first item always goes on, whatever its size: a page is never empty while
        // tasks remain, so paging always moves on.
        let separator = usize::from(self.count > 0);
        if self.count > 0 && self.items.len() + separator + json.len() > self.max_bytes {
            return Ok(Pushed::Full);
        }
        if separator == 1 {
            self.items.push(b',');
        }
        self.items.extend_from_slice(&json);
        self.count += 1;
        self.last = Some(id);
        Ok(Pushed::Added)
    }

    /// How many rows to read next: what is left of the page plus one, which tells
    /// whether more follow, at most `chunk`.
    fn wanted(&self, chunk: u32) -> u32 {
        (self.limit - self.count + 1).min(chunk)
    }

    /// The page's body: its items, and `next_cursor` (the last item's id) when `more`
    /// follow.
    fn finish(self, more: bool) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.items.len() + 64);
        body.extend_from_slice(b"{\"items\":[");
        body.extend_from_slice(&self.items);
        body.push(b']');
        if let Some(last) = self.last.filter(|_| more) {
            body.extend_from_slice(b",\"next_cursor\":\"");
            // A UUID: nothing in it needs escaping.
            body.extend_from_slice(last.to_string().as_bytes());
            body.push(b'"');
        }
        body.push(b'}');
        body
    }
}

/// Lists the tenant's tasks, newest first.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", operation_id = "listTasks", params(ListQuery),
    responses((status = 200, description = "A page: at most `limit` items, fewer when the items would pass 4 MiB (at least one while tasks remain); follow `next_cursor` for the rest", body = TaskPage),
        (status = 422, description = "A query parameter breaks a rule, named in `field`", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Response, ApiError> {
    let view = query
        .view
        .as_deref()
        .map(str::parse::<ListView>)
        .transpose()?
        .unwrap_or_default();
    let task_state = query
        .state
        .map(|s| s.parse::<TaskState>())
        .transpose()
        .map_err(|e| FieldError::new("state", e.to_string()))?;
    let label = query
        .label
        .map(|label| {
            label
                .split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| FieldError::new("label", "must be key=value"))
        })
        .transpose()?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(FieldError::new("limit", format!("must be between 1 and {MAX_PAGE}")).into());
    }
    let before = query
        .cursor
        .map(|c| c.parse::<TaskId>())
        .transpose()
        .map_err(|_| {
            FieldError::new("cursor", "must be a next_cursor returned by this endpoint")
        })?;
    let mut filter = ListFilter {
        state: task_state,
        queue: query.queue,
        label,
        limit: 0,
        before,
    };
    let chunk = match view {
        ListView::Summary => MAX_PAGE + 1,
        ListView::Full => FULL_VIEW_CHUNK,
    };
    let mut page = PageWriter::new(limit, state.list_page_max_bytes);
    let more = loop {
        filter.limit = page.wanted(chunk);
        let (read, full) = match view {
            ListView::Summary => {
                let tasks = state
                    .store()
                    .list_task_summaries(&tenant.name, &filter)
                    .await?;
                let read = tasks.len();
                let mut full = false;
                for task in tasks {
                    let id = task.id;
                    if page.push(id, &TaskSummaryView::new(task, &state))? == Pushed::Full {
                        full = true;
                        break;
                    }
                }
                (read, full)
            }
            ListView::Full => {
                let tasks = state.store().list_tasks(&tenant.name, &filter).await?;
                let read = tasks.len();
                let mut full = false;
                for task in tasks {
                    let id = task.id;
                    if page.push(id, &TaskView::listed(task, &state))? == Pushed::Full {
                        full = true;
                        break;
                    }
                }
                (read, full)
            }
        };
        if full {
            break true;
        }
        if read < filter.limit as usize {
            break false;
        }
        filter.before = page.last;
    };
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        page.finish(more),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::{PageWriter, Pushed};
    use crate::task::TaskId;

    fn item(bytes: usize) -> String {
        "x".repeat(bytes)
    }

    #[test]
    fn a_page_stops_at_its_limit() {
        let mut page = PageWriter::new(2, 1024);
        assert_eq!(
            page.wanted(100),
            3,
            "one more than the page tells whether more follow"
        );
        assert_eq!(page.push(TaskId::new(), &1).unwrap(), Pushed::Added);
        assert_eq!(page.push(TaskId::new(), &2).unwrap(), Pushed::Added);
        assert_eq!(page.push(TaskId::new(), &3).unwrap(), Pushed::Full);
        let body: serde_json::Value = serde_json::from_slice(&page.finish(false)).unwrap();
        assert_eq!(body, serde_json::json!({"items": [1, 2]}));
    }

    #[test]
    fn a_page_stops_before_its_byte_cap_but_always_holds_one_item() {
        let mut page = PageWriter::new(10, 100);
        let first = TaskId::new();
        assert_eq!(
            page.push(first, &item(500)).unwrap(),
            Pushed::Added,
            "alone, however large"
        );
        assert_eq!(page.push(TaskId::new(), &item(1)).unwrap(), Pushed::Full);
        let body: serde_json::Value = serde_json::from_slice(&page.finish(true)).unwrap();
        assert_eq!(body["items"].as_array().unwrap().len(), 1);
        assert_eq!(body["next_cursor"], first.to_string());

        let mut page = PageWriter::new(10, 100);
        // Two items of 40 bytes (with quotes) and a comma fit in 100; a third does not.
        assert_eq!(page.push(TaskId::new(), &item(38)).unwrap(), Pushed::Added);
        assert_eq!(page.push(TaskId::new(), &item(38)).unwrap(), Pushed::Added);
        assert_eq!(page.push(TaskId::new(), &item(38)).unwrap(), Pushed::Full);
        assert_eq!(page.count, 2);
    }

    #[test]
    fn an_empty_page_is_an_empty_list() {
        let page = PageWriter::new(10, 100);
        let body: serde_json::Value = serde_json::from_slice(&page.finish(true)).unwrap();
        assert_eq!(body, serde_json::json!({"items": []}));
    }
}

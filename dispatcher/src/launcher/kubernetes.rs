//! The Kubernetes executor: creates the Job of a claimed task, and deletes it on cancel.
//!
//! A task whose secret references no longer resolve (the secret was deleted after the
//! submit) fails its launch with a message naming the variable and the secret, and no Job
//! is made.
//!
//! Invariant: exactly one Job per attempt. The name is a function of task id and attempt,
//! so a create after a crash collides (409); a collision with a Job carrying the same
//! task and attempt labels is success, anything else is a rejection.
//!
//! A refusal is read by [`refusal`] (pure): a namespace whose ResourceQuota is full
//! refuses with 403 "exceeded quota", which is a wait for room ([`LaunchOutcome::ClusterQuota`]),
//! not a rejection; other 400/403/404/422 answers will never change and fail the task.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

use super::LaunchOutcome;
use super::job_spec::{LABEL_ATTEMPT, LABEL_TASK_ID, LaunchConfig, build_job, job_name};
use crate::report::ReportIssuer;
use crate::secrets::{KubernetesSecrets, SecretStore};
use crate::task::{Task, TaskId};

/// Creates and deletes task Jobs in one namespace.
#[derive(Clone)]
pub struct KubernetesExecutor {
    jobs: Api<Job>,
    /// Where the tenants' Secrets are: checked before a Job that references them is made.
    secrets: SecretStore,
    config: std::sync::Arc<LaunchConfig>,
    /// `None`: no report URL is configured; runners run commands but report nowhere.
    reports: Option<ReportIssuer>,
}

impl std::fmt::Debug for KubernetesExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesExecutor")
            .field("namespace", &self.config.namespace)
            .finish_non_exhaustive()
    }
}

/// How many times one launch retries a transient API error before leaving the task to
/// the stale-launch reconciler.
const TRANSIENT_ATTEMPTS: u32 = 5;
/// The longest wait a server's `retryAfterSeconds` may impose on one launch.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// What a refused create means for the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The namespace's ResourceQuota has no room now: wait and create again later.
    ClusterQuota,
    /// Forbidden or invalid for good: fail the task.
    Rejected,
    /// Anything else (429, 5xx): retry soon.
    Transient,
}

/// Reads a refused create's HTTP `code` and Status `message`. The quota admission plugin
/// answers 403 with "exceeded quota: NAME, requested: …, used: …, limited: …" when the
/// namespace is full, and "status unknown for quota" before the quota controller has
/// counted what the namespace uses; both pass with time. Its "failed quota: … must
/// specify …" (a quota that needs requests the Job lacks) does not.
#[must_use]
pub fn refusal(code: u16, message: &str) -> Refusal {
    let room = message.contains("exceeded quota") || message.contains("status unknown for quota");
    match code {
        403 if room => Refusal::ClusterQuota,
        400 | 403 | 404 | 422 => Refusal::Rejected,
        _ => Refusal::Transient,
    }
}

/// How long to wait before retrying after `error`: the API server's own `retryAfterSeconds`
/// (sent with 429 Too Many Requests and some 5xx), capped, or else `backoff`.
fn retry_delay(error: &kube::Error, backoff: Duration) -> Duration {
    let asked = match error {
        kube::Error::Api(status) => status.details.as_ref().map_or(0, |d| d.retry_after_seconds),
        _ => 0,
    };
    if asked > 0 {
        Duration::from_secs(u64::from(asked)).min(MAX_RETRY_AFTER)
    } else {
        backoff
    }
}

impl KubernetesExecutor {
    #[must_use]
    pub fn new(
        client: kube::Client,
        config: std::sync::Arc<LaunchConfig>,
        reports: Option<ReportIssuer>,
    ) -> Self {
        Self {
            secrets: SecretStore::Kubernetes(KubernetesSecrets::new(
                client.clone(),
                &config.namespace,
            )),
            jobs: Api::namespaced(client, &config.namespace),
            config,
            reports,
        }
    }

    /// Creates the Job of `task`'s current attempt.
    #[tracing::instrument(skip_all, fields(task_id = %task.id, tenant = %task.tenant, attempt = task.attempt))]
    pub async fn launch(&self, task: &Task) -> LaunchOutcome {
        let access = self
            .reports
            .as_ref()
            .map(|issuer| issuer.access(task, jiff::Timestamp::now()));
        let job = match build_job(task, &self.config, access.as_ref()) {
            Ok(job) => job,
            Err(error) => return LaunchOutcome::Rejected(error.to_string()),
        };
        let name = job_name(&task.id, task.attempt);
        // A secret deleted (or rewritten without the key) since the submit would only
        // show as a pod that cannot start: fail the launch now, naming it. (A deletion
        // after the Job is made is the watcher's: the container cannot be configured.)
        match self
            .secrets
            .first_unresolved(&task.tenant, &task.spec.env)
            .await
        {
            Ok(None) => {}
            Ok(Some(unresolved)) => {
                tracing::info!(job = %name, variable = %unresolved.variable, secret = %unresolved.secret, "a referenced secret is gone; the launch fails");
                return LaunchOutcome::Rejected(format!("{}: {unresolved}", unresolved.field()));
            }
            Err(error) => return LaunchOutcome::Transient(error.to_string()),
        }
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=TRANSIENT_ATTEMPTS {
            match self.jobs.create(&PostParams::default(), &job).await {
                Ok(_) => {
                    tracing::info!(job = %name, "job created");
                    return LaunchOutcome::Launched;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    return self.adopt_existing(task, &name).await;
                }
                Err(kube::Error::Api(status))
                    if refusal(status.code, &status.message) == Refusal::ClusterQuota =>
                {
                    tracing::info!(job = %name, message = %status.message, "no room in the namespace's quota; the task waits");
                    return LaunchOutcome::ClusterQuota(status.message);
                }
                Err(kube::Error::Api(status))
                    if refusal(status.code, &status.message) == Refusal::Rejected =>
                {
                    tracing::warn!(job = %name, code = status.code, message = %status.message, "job rejected");
                    return LaunchOutcome::Rejected(format!(
                        "kubernetes refused the job ({}): {}",
                        status.code, status.message
                    ));
                }
                Err(error) => {
                    // 429 (the API server's own back-pressure), 5xx and transport errors
                    // pass: wait as long as the server asks, or back off exponentially.
                    tracing::warn!(job = %name, attempt, error = %error, "job create failed, retrying");
                    if attempt < TRANSIENT_ATTEMPTS {
                        tokio::time::sleep(retry_delay(&error, delay)).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    } else {
                        return LaunchOutcome::Transient(error.to_string());
                    }
                }
            }
        }
        LaunchOutcome::Transient("retries exhausted".to_owned())
    }

    /// A Job of that name exists: ours from before a crash, or someone else's.
    async fn adopt_existing(&self, task: &Task, name: &str) -> LaunchOutcome {
        match self.jobs.get_opt(name).await {
            Ok(Some(existing)) => {
                let labels = existing.metadata.labels.unwrap_or_default();
                let ours = labels.get(LABEL_TASK_ID) == Some(&task.id.simple())
                    && labels.get(LABEL_ATTEMPT) == Some(&task.attempt.to_string());
                if ours {
                    tracing::info!(job = %name, "job already existed (launched before a restart)");
                    LaunchOutcome::Launched
                } else {
                    LaunchOutcome::Rejected(format!(
                        "a job named {name} exists and belongs to another task"
                    ))
                }
            }
            // Deleted between our create and get: create again next time.
            Ok(None) => LaunchOutcome::Transient(format!("job {name} vanished after a conflict")),
            Err(error) => LaunchOutcome::Transient(error.to_string()),
        }
    }

    /// Deletes the Job of `task`'s current attempt (its pods go with it, in the background).
    pub async fn delete(&self, task: &Task) -> Result<(), kube::Error> {
        self.delete_attempt(task.id, task.attempt).await
    }

    /// Deletes the Job of `attempt` of task `task_id`; a Job already gone is fine.
    pub async fn delete_attempt(&self, task_id: TaskId, attempt: u32) -> Result<(), kube::Error> {
        let name = job_name(&task_id, attempt);
        match self.jobs.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {
                tracing::info!(%task_id, job = %name, "job deleted");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kube::core::Status;
    use kube::core::response::StatusDetails;

    use super::{Refusal, refusal, retry_delay};

    #[test]
    fn an_exceeded_quota_is_a_wait_and_other_refusals_are_final() {
        let full = "jobs.batch \"ab-1\" is forbidden: exceeded quota: tasks, requested: count/jobs.batch=1, used: count/jobs.batch=3, limited: count/jobs.batch=3";
        let cases = [
            (403, full, Refusal::ClusterQuota),
            (
                403,
                "jobs.batch \"ab-1\" is forbidden: status unknown for quota: tasks, resource: count/jobs.batch",
                Refusal::ClusterQuota,
            ),
            (
                403,
                "jobs.batch \"ab-1\" is forbidden: failed quota: tasks: must specify requests.cpu",
                Refusal::Rejected,
            ),
            (
                403,
                "jobs.batch is forbidden: User \"system:serviceaccount:x:y\" cannot create resource \"jobs\"",
                Refusal::Rejected,
            ),
            (
                422,
                "Job.batch \"ab-1\" is invalid: spec.template.spec.containers[0].image: Required value",
                Refusal::Rejected,
            ),
            (404, "namespaces \"gone\" not found", Refusal::Rejected),
            (400, "bad request", Refusal::Rejected),
            // Only a 403 is the quota plugin's answer.
            (422, full, Refusal::Rejected),
            (429, "too many requests", Refusal::Transient),
            (500, full, Refusal::Transient),
            (503, "unavailable", Refusal::Transient),
        ];
        for (code, message, expected) in cases {
            assert_eq!(refusal(code, message), expected, "{code} {message}");
        }
    }

    fn too_many_requests(retry_after_seconds: u32) -> kube::Error {
        let details = StatusDetails {
            name: String::new(),
            group: String::new(),
            kind: String::new(),
            uid: String::new(),
            causes: Vec::new(),
            retry_after_seconds,
        };
        kube::Error::Api(Box::new(Status {
            code: 429,
            details: Some(details),
            ..Status::failure("slow down", "TooManyRequests")
        }))
    }

    #[test]
    fn the_servers_retry_after_wins_over_backoff_up_to_a_cap() {
        let backoff = Duration::from_millis(200);
        assert_eq!(
            retry_delay(&too_many_requests(3), backoff),
            Duration::from_secs(3)
        );
        assert_eq!(
            retry_delay(&too_many_requests(600), backoff),
            Duration::from_secs(30)
        );
        assert_eq!(retry_delay(&too_many_requests(0), backoff), backoff);
        let unavailable = kube::Error::Api(Box::new(Status {
            code: 503,
            ..Status::failure("down", "ServiceUnavailable")
        }));
        assert_eq!(retry_delay(&unavailable, backoff), backoff);
    }
}

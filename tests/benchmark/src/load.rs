//! Load generators and what they measured: an open loop (requests sent at a fixed
//! arrival rate whatever the answers, as users arrive) and a closed loop (a fixed number
//! of requests in flight, to saturate), both of `POST /v1/tasks`, plus the percentile
//! arithmetic every part shares. Times are wall-clock milliseconds (`now_ms`), so they
//! compare with the store's stage timestamps and the Job watch on the same machine.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Mutex;

/// The body of every submitted task: small, CPU only, the same Job the baseline creates.
pub(crate) fn task_body() -> serde_json::Value {
    serde_json::json!({"name": "bench", "image": "registry.invalid/bench:1", "command": ["true"],
                       "resources": {"cpu": "100m", "memory": "64Mi"}})
}

/// Wall-clock now, in (fractional) unix milliseconds.
pub(crate) fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// One accepted submission.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    /// The task id, hyphenated as the API and the store write it.
    pub(crate) id: String,
    /// Just before the request was sent.
    pub(crate) sent_ms: f64,
    /// When the 201 was read.
    pub(crate) answered_ms: f64,
}

/// What one load run got back.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) sent: usize,
    pub(crate) accepted: Vec<Accepted>,
    /// 503 answers whose error code was `overloaded` (load shed at once).
    pub(crate) overloaded: usize,
    /// Any other answer that was not a 201, and transport errors.
    pub(crate) other_errors: usize,
    /// No answer within the request timeout.
    pub(crate) timed_out: usize,
    /// From the first send to the last answer.
    pub(crate) seconds: f64,
}

impl Outcome {
    pub(crate) fn answered_fraction(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.accepted.len() as f64 / self.sent as f64
    }

    /// Submit latencies (answer minus send) of the accepted requests, in ms.
    pub(crate) fn latencies(&self) -> Vec<f64> {
        self.accepted
            .iter()
            .map(|a| a.answered_ms - a.sent_ms)
            .collect()
    }
}

/// Where to submit, and as whom.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) key: String,
}

impl Target {
    pub(crate) fn new(base: String, key: String) -> anyhow::Result<Self> {
        // Enough idle connections for the highest rate, so the client does not open one
        // per request (which would measure the kernel, not the dispatcher).
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(2048)
            .build()?;
        Ok(Self { http, base, key })
    }

    async fn submit_one(&self, body: &serde_json::Value, timeout: Duration, into: &Mutex<Outcome>) {
        let sent_ms = now_ms();
        let answer = tokio::time::timeout(timeout, async {
            let response = self
                .http
                .post(format!("{}/v1/tasks", self.base))
                .bearer_auth(&self.key)
                .json(body)
                .send()
                .await?;
            let status = response.status();
            let value = response.json::<serde_json::Value>().await?;
            Ok::<_, reqwest::Error>((status, value))
        })
        .await;
        let answered_ms = now_ms();
        let mut outcome = into.lock().await;
        match answer {
            Err(_) => outcome.timed_out += 1,
            Ok(Ok((status, value))) if status == reqwest::StatusCode::CREATED => {
                match value["id"].as_str() {
                    Some(id) => outcome.accepted.push(Accepted {
                        id: id.to_owned(),
                        sent_ms,
                        answered_ms,
                    }),
                    None => outcome.other_errors += 1,
                }
            }
            Ok(Ok((status, value)))
                if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                    && value["error"]["code"] == "overloaded" =>
            {
                outcome.overloaded += 1;
            }
            // Transport errors and any other answer.
            Ok(_) => outcome.other_errors += 1,
        }
    }

    /// Sends `rate` requests a second for `duration`, each on its own task, whatever the
    /// answers (open loop: a slow server makes requests pile up, as real users would);
    /// waits for every answer or its `timeout`. At most `rate × duration` requests.
    pub(crate) async fn open_loop(
        &self,
        rate: u32,
        duration: Duration,
        timeout: Duration,
    ) -> Outcome {
        let total = (f64::from(rate) * duration.as_secs_f64()).round() as usize;
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        let body = Arc::new(task_body());
        let start = tokio::time::Instant::now();
        let first = now_ms();
        let mut requests = tokio::task::JoinSet::new();
        for i in 0..total {
            // Each send at its own scheduled time from the start: a late tick does not
            // shift the ones after it.
            let at = start + Duration::from_secs_f64(i as f64 / f64::from(rate.max(1)));
            tokio::time::sleep_until(at).await;
            let (target, body, outcome) = (self.clone(), body.clone(), outcome.clone());
            requests.spawn(async move { target.submit_one(&body, timeout, &outcome).await });
        }
        while requests.join_next().await.is_some() {}
        let mut outcome = std::mem::take(&mut *outcome.lock().await);
        outcome.sent = total;
        outcome.seconds = (now_ms() - first) / 1000.0;
        outcome
    }

    /// Sends `total` requests with `concurrency` in flight (closed loop: as fast as the
    /// server answers).
    pub(crate) async fn closed_loop(
        &self,
        total: usize,
        concurrency: usize,
        timeout: Duration,
    ) -> Outcome {
        use futures::StreamExt as _;
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        let body = task_body();
        let first = now_ms();
        futures::stream::iter(0..total)
            .for_each_concurrent(concurrency.max(1), |_| {
                let (outcome, body) = (outcome.clone(), &body);
                async move { self.submit_one(body, timeout, &outcome).await }
            })
            .await;
        let mut outcome = std::mem::take(&mut *outcome.lock().await);
        outcome.sent = total;
        outcome.seconds = (now_ms() - first) / 1000.0;
        outcome
    }
}

/// The `p` quantile (0..=1) of `values` (nearest rank), NaN when empty.
pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The median of `values`, NaN when empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// Milliseconds for a table cell: `n/a` when not measured.
pub(crate) fn ms(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.1} ms")
    } else {
        "n/a".to_owned()
    }
}

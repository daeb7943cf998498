//! What a tenant may not do and what an operator can do about a tenant, through the API
//! (`router().oneshot()`, on both stores) and the real `dispatcher` binary: labels and
//! annotations only under the operator's prefixes, reserved environment variables and
//! oversize resources refused with a 422 naming the field (also by the embedded
//! default's binary); `--help` and connection errors without the passwords of the
//! environment; `tenant list`, `rotate-key` (the old key is refused at once), `disable`
//! (403) and `enable`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use dispatcher::api::{self, ExposeSecret as _};
use dispatcher::store::Store;
use dispatcher::task::submission::Limits;
use serde_json::{Value, json};

use crate::common::{api_on, on_both_stores, run_dispatcher, start_local_dispatcher, task_body};

on_both_stores!(
    only_allowed_keys_safe_env_and_bounded_resources_are_accepted,
    a_replaced_key_is_refused_at_once_and_a_disabled_tenant_gets_403,
);

fn with(field: &str, value: Value) -> Value {
    let mut body = task_body("probe");
    body[field] = value;
    body
}

async fn only_allowed_keys_safe_env_and_bounded_resources_are_accepted(store: Store) {
    // The defaults: no label or annotation at all.
    let defaults = api_on(store.clone(), |state| {
        state.limits = Arc::new(Limits::default());
    })
    .await;
    let key = defaults.tenant("acme", 100).await;
    for (body, field, says) in [
        (
            with("labels", json!({"example.com/team": "ml"})),
            "labels.example.com/team",
            "allows no tenant labels",
        ),
        (
            with("annotations", json!({"example.com/owner": "ml"})),
            "annotations.example.com/owner",
            "allows no tenant annotations",
        ),
    ] {
        let (status, value) = defaults.submit(&key, &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{value}");
        assert_eq!(value["error"]["field"], field, "{value}");
        let message = value["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }

    // The test APIs allow example.com/ (crate::common::test_limits).
    let api = api_on(store, |_| {}).await;
    let key = api.tenant("globex", 100).await;
    let mut body = with("labels", json!({"example.com/team": "ml"}));
    body["annotations"] = json!({"example.com/owner": "ml"});
    body["env"] = json!({"MALLOC_ARENA_MAX": "2", "NCCL_DEBUG": "INFO"});
    body["resources"] =
        json!({"cpu": "64", "memory": "512Gi", "gpu": {"count": 8, "class": "a100"}});
    let (status, created) = api.submit(&key, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["labels"], json!({"example.com/team": "ml"}));
    assert_eq!(created["annotations"], json!({"example.com/owner": "ml"}));

    let refused = [
        (
            with(
                "annotations",
                json!({"io.kubernetes.cri-o.Devices": "/dev/nvidia0"}),
            ),
            "annotations.io.kubernetes.cri-o.Devices",
        ),
        (
            with(
                "annotations",
                json!({"k8s.v1.cni.cncf.io/networks": "macvlan"}),
            ),
            "annotations.k8s.v1.cni.cncf.io/networks",
        ),
        (
            with("annotations", json!({"sidecar.istio.io/inject": "true"})),
            "annotations.sidecar.istio.io/inject",
        ),
        (
            with(
                "annotations",
                json!({"vault.hashicorp.com/agent-inject": "true"}),
            ),
            "annotations.vault.hashicorp.com/agent-inject",
        ),
        (
            with("annotations", json!({"agent-bus.io/test-exit-code": "3"})),
            "annotations.agent-bus.io/test-exit-code",
        ),
        (
            with("labels", json!({"kueue.x-k8s.io/priority-class": "urgent"})),
            "labels.kueue.x-k8s.io/priority-class",
        ),
        (with("labels", json!({"team": "ml"})), "labels.team"),
        (
            with("labels", json!({"agent-bus.io/tenant": "acme"})),
            "labels.agent-bus.io/tenant",
        ),
        (
            with(
                "labels",
                json!({"node-role.kubernetes.io/control-plane": ""}),
            ),
            "labels.node-role.kubernetes.io/control-plane",
        ),
        (
            with("env", json!({"NVIDIA_VISIBLE_DEVICES": "all"})),
            "env.NVIDIA_VISIBLE_DEVICES",
        ),
        (
            with("env", json!({"CUDA_VISIBLE_DEVICES": "0,1"})),
            "env.CUDA_VISIBLE_DEVICES",
        ),
        (
            with("env", json!({"LD_PRELOAD": "/tmp/x.so"})),
            "env.LD_PRELOAD",
        ),
        (
            with("env", json!({"LD_LIBRARY_PATH": "/tmp"})),
            "env.LD_LIBRARY_PATH",
        ),
        (with("env", json!({"GCONV_PATH": "/tmp"})), "env.GCONV_PATH"),
        (
            with("env", json!({"AGENT_BUS_REPORT_TOKEN": "x"})),
            "env.AGENT_BUS_REPORT_TOKEN",
        ),
        (with("resources", json!({"cpu": "100000"})), "resources.cpu"),
        (with("resources", json!({"cpu": "64001m"})), "resources.cpu"),
        (
            with("resources", json!({"memory": "513Gi"})),
            "resources.memory",
        ),
        (
            with("resources", json!({"gpu": {"count": 9, "class": "a100"}})),
            "resources.gpu.count",
        ),
        (with("shm", json!("300Gi")), "shm"),
    ];
    for (body, field) in refused {
        let (status, value) = api.submit(&key, &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {value}");
        assert_eq!(value["error"]["code"], "invalid_field");
        assert_eq!(value["error"]["field"], field, "{value}");
    }
    let (_, list) = api.get(&key, "/v1/tasks").await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "nothing refused was stored"
    );
}

async fn a_replaced_key_is_refused_at_once_and_a_disabled_tenant_gets_403(store: Store) {
    let api = api_on(store, |_| {}).await;
    let old = api.tenant("acme", 100).await;
    let (status, _) = api.get(&old, "/v1/tasks").await;
    assert_eq!(status, StatusCode::OK);
    // What `dispatcher tenant rotate-key` does.
    let new = api::new_api_key().expose_secret().to_owned();
    api.store
        .replace_api_key("acme", &api::hash_api_key(&new))
        .await
        .unwrap();
    let (status, value) = api.get(&old, "/v1/tasks").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{value}");
    let (status, _) = api.get(&new, "/v1/tasks").await;
    assert_eq!(status, StatusCode::OK);

    api.store
        .set_tenant_disabled("acme", Some(jiff::Timestamp::now()))
        .await
        .unwrap();
    for (method, uri, body) in [
        (Method::GET, "/v1/tasks", None),
        (Method::POST, "/v1/tasks", Some(task_body("t").to_string())),
        (Method::GET, "/v1/usage", None),
    ] {
        let (status, _, value) = api
            .call(method, uri, Some(&new), body.as_deref(), &[])
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri}: {value}");
        assert_eq!(value["error"]["code"], "tenant_disabled");
        assert!(
            value["error"]["message"]
                .as_str()
                .unwrap()
                .contains("'acme' is disabled")
        );
    }
    // A wrong key is still 401, not 403: being disabled is told only to the key's holder.
    let (status, _) = api.get("ab_wrong", "/v1/tasks").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    api.store.set_tenant_disabled("acme", None).await.unwrap();
    let (status, _) = api.get(&new, "/v1/tasks").await;
    assert_eq!(status, StatusCode::OK);
}

/// `dispatcher ARGS` with `env` set: (success, stdout and stderr together).
async fn dispatcher_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(args)
        .envs(env.iter().copied())
        .env("AGENT_BUS_LOG", "warn")
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

const PASSWORD: &str = "hunter2";

#[tokio::test]
async fn help_never_shows_the_secrets_of_the_environment() {
    let env = [
        ("DATABASE_URL", "postgres://u:hunter2@h/db"),
        ("REDIS_URL", "redis://:hunter2@h"),
        (
            "AGENT_BUS_REPORT_SECRET",
            "hunter2hunter2hunter2hunter2hunter2",
        ),
    ];
    for args in [
        &["serve", "--help"][..],
        &["serve", "-h"],
        &["migrate", "--help"],
        &["tenant", "create", "--help"],
        &["tenant", "list", "--help"],
        &["tenant", "rotate-key", "--help"],
    ] {
        let (ok, output) = dispatcher_with_env(args, &env).await;
        assert!(ok, "{args:?}: {output}");
        assert!(output.contains("DATABASE_URL"), "{args:?}: {output}");
        assert!(
            !output.contains(PASSWORD),
            "{args:?} shows a password:\n{output}"
        );
    }
}

#[tokio::test]
async fn a_failed_connection_names_the_database_without_its_password() {
    let port = testsupport::free_port();
    let url = format!("postgres://agent:hunter2@127.0.0.1:{port}/agent_bus");
    let (ok, output) = dispatcher_with_env(
        &["migrate", "--database-max-connections", "1"],
        &[("DATABASE_URL", url.as_str())],
    )
    .await;
    assert!(!ok, "{output}");
    assert!(output.contains("agent:***@127.0.0.1"), "{output}");
    assert!(!output.contains(PASSWORD), "{output}");
}

#[tokio::test]
async fn tenant_commands_list_rotate_disable_and_enable() {
    let dispatcher = start_local_dispatcher("sqlite://agent-bus.db").await;
    let status = |key: String, path: &'static str| {
        let http = dispatcher.http.clone();
        let url = format!("{}{path}", dispatcher.base);
        async move {
            let response = http.get(url).bearer_auth(key).send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let old = dispatcher.key.clone();
    assert_eq!(status(old.clone(), "/v1/tasks").await.0, 200);

    // The embedded default refuses what a tenant may not send, as the API tests show.
    for (body, field) in [
        (
            with("env", json!({"LD_PRELOAD": "/tmp/x.so"})),
            "env.LD_PRELOAD",
        ),
        (with("resources", json!({"cpu": "100000"})), "resources.cpu"),
        (with("labels", json!({"team": "ml"})), "labels.team"),
    ] {
        let response = dispatcher
            .http
            .post(format!("{}/v1/tasks", dispatcher.base))
            .bearer_auth(&old)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 422);
        let value: Value = response.json().await.unwrap();
        assert_eq!(value["error"]["field"], field, "{value}");
    }

    let (ok, new, stderr) =
        run_dispatcher(&dispatcher.dir, &["tenant", "rotate-key", "acme"]).await;
    assert!(ok, "{stderr}");
    assert!(new.starts_with("ab_") && new.len() == 67, "{new}");
    assert_eq!(
        status(old.clone(), "/v1/tasks").await.0,
        401,
        "the old key is refused at once"
    );
    assert_eq!(status(new.clone(), "/v1/tasks").await.0, 200);

    let (ok, table, stderr) = run_dispatcher(&dispatcher.dir, &["tenant", "list"]).await;
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("DISABLED"),
        "{table}"
    );
    assert!(lines[1].starts_with("acme "), "{table}");
    let disabled_column = |table: &str| {
        table
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .to_owned()
    };
    assert_eq!(disabled_column(&table), "-", "{table}");
    assert!(
        !table.contains(&new) && !table.contains(&old),
        "no key in the list: {table}"
    );
    assert!(
        !table.contains(&api::hash_api_key(&new)),
        "no hash either: {table}"
    );

    let (ok, said, stderr) = run_dispatcher(&dispatcher.dir, &["tenant", "disable", "acme"]).await;
    assert!(ok, "{stderr}");
    assert!(said.starts_with("acme: disabled since "), "{said}");
    let (code, body) = status(new.clone(), "/v1/tasks").await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("tenant_disabled")),
        "{body}"
    );
    let response = dispatcher
        .http
        .post(format!("{}/v1/tasks", dispatcher.base))
        .bearer_auth(&new)
        .json(&task_body("while-disabled"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    let (_, table, _) = run_dispatcher(&dispatcher.dir, &["tenant", "list"]).await;
    assert!(
        disabled_column(&table).starts_with("20"),
        "a disabled time: {table}"
    );

    let (ok, said, stderr) = run_dispatcher(&dispatcher.dir, &["tenant", "enable", "acme"]).await;
    assert!(ok, "{stderr}");
    assert_eq!(said, "acme: enabled");
    assert_eq!(status(new.clone(), "/v1/tasks").await.0, 200);

    let (ok, _, stderr) =
        run_dispatcher(&dispatcher.dir, &["tenant", "rotate-key", "nobody"]).await;
    assert!(!ok);
    assert!(stderr.contains("nobody"), "{stderr}");
}

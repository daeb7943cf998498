//! Tenants' secrets through the API (`router().oneshot()`, on a fresh PostgreSQL database
//! and an SQLite file, with the local secret store): write-only, scoped to their tenant,
//! checked when a task references them; and a task that references one runs with the
//! value while the value appears in no answer, no event and nowhere in the database. The
//! embedded default end to end (`local_*`): the `dispatcher` binary runs a task with a
//! secret, logs nothing of it, and fails a launch whose secret was deleted, once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use dispatcher::launcher::{LaunchOutcome, LocalExecutor};
use dispatcher::lifecycle::Claim;
use dispatcher::task::TaskId;
use serde_json::{Value, json};
use sha2::Digest as _;
use sqlx::Connection as _;
use testsupport::poll_until;

use crate::common::{Db, TestApi, api_on, on_both_stores, run_dispatcher, wait_until_ready};

on_both_stores!(
    secrets_are_write_only_and_scoped_to_their_tenant,
    a_task_runs_with_its_secret_and_the_value_appears_nowhere,
);

/// A value no other text in a test contains.
const VALUE: &str = "s3cret-8d1f0a7c-value";
/// A plain env value, stored with its task: proof that a database search sees the tasks.
pub(crate) const PLAIN: &str = "plain-0f3a9c-stored";

impl TestApi {
    async fn put_secret(&self, key: &str, name: &str, body: &Value) -> (StatusCode, Value) {
        let (status, _, value) = self
            .call(
                Method::PUT,
                &format!("/v1/secrets/{name}"),
                Some(key),
                Some(&body.to_string()),
                &[],
            )
            .await;
        (status, value)
    }

    async fn delete_secret(&self, key: &str, name: &str) -> (StatusCode, Value) {
        let (status, _, value) = self
            .call(
                Method::DELETE,
                &format!("/v1/secrets/{name}"),
                Some(key),
                None,
                &[],
            )
            .await;
        (status, value)
    }
}

fn field(body: &Value) -> &str {
    body["error"]["field"].as_str().unwrap_or_default()
}

async fn secrets_are_write_only_and_scoped_to_their_tenant(db: Db) {
    let api = api_on(db.store, |_| {}).await;
    let acme = api.tenant("acme", 10).await;
    let globex = api.tenant("globex", 10).await;

    let (status, created) = api
        .put_secret(
            &acme,
            "openai",
            &json!({"data": {"token": VALUE, "org": "org-1"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["name"], "openai");
    assert_eq!(created["keys"], json!(["org", "token"]));
    assert!(created["updated_at"].is_string() && created["created_at"].is_string());
    let (status, replaced) = api
        .put_secret(&acme, "openai", &json!({"data": {"token": VALUE}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(
        replaced["keys"],
        json!(["token"]),
        "a write replaces the data"
    );
    assert_eq!(replaced["created_at"], created["created_at"]);

    let (status, one) = api.get(&acme, "/v1/secrets/openai").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, replaced);
    let (status, list) = api.get(&acme, "/v1/secrets").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list, json!({"items": [replaced]}));
    for body in [&created, &replaced, &one, &list] {
        assert!(!body.to_string().contains(VALUE), "a value in {body}");
    }

    // Another tenant: the name is free for it, and acme's secret does not exist for it.
    let (status, _) = api.get(&globex, "/v1/secrets/openai").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = api.delete_secret(&globex, "openai").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (_, theirs) = api.get(&globex, "/v1/secrets").await;
    assert_eq!(theirs, json!({"items": []}));
    let (status, _) = api
        .put_secret(&globex, "openai", &json!({"data": {"key": "globex"}}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, still) = api.get(&acme, "/v1/secrets/openai").await;
    assert_eq!(
        still["keys"],
        json!(["token"]),
        "acme's secret is untouched"
    );

    // Refusals name the field, and never echo a value.
    let refused = [
        ("Bad_Name", json!({"data": {"k": "v"}}), "name"),
        ("ok", json!({"data": {}}), "data"),
        ("ok", json!({"data": {"a/b": VALUE}}), "data.a/b"),
        (
            "ok",
            json!({"data": {"k": format!("{VALUE}\u{0}")}}),
            "data.k",
        ),
        ("ok", json!({"data": {"k": "v"}, "value": "x"}), "value"),
        ("ok", json!({"data": {"k": 5}}), "data.k"),
        ("ok", json!({}), "data"),
    ];
    for (name, body, expected) in refused {
        let (status, answer) = api.put_secret(&acme, name, &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(field(&answer), expected, "{body}: {answer}");
        assert!(!answer.to_string().contains(VALUE), "{answer}");
    }
    let (status, _) = api.get(&acme, "/v1/secrets/Bad_Name").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = api.call(Method::GET, "/v1/secrets", None, None, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, body) = api.delete_secret(&acme, "openai").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, _) = api.get(&acme, "/v1/secrets/openai").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api.delete_secret(&acme, "openai").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, theirs) = api.get(&globex, "/v1/secrets/openai").await;
    assert_eq!(
        theirs["keys"],
        json!(["key"]),
        "globex's secret is untouched"
    );

    let (_, _, doc) = api
        .call(Method::GET, "/openapi.json", None, None, &[])
        .await;
    for path in ["/v1/secrets", "/v1/secrets/{name}"] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    for (method, path) in [
        ("put", "/v1/secrets/{name}"),
        ("delete", "/v1/secrets/{name}"),
    ] {
        assert!(doc["paths"][path].get(method).is_some(), "{method} {path}");
    }
    for schema in [
        "SecretInput",
        "SecretView",
        "SecretList",
        "EnvValue",
        "SecretRef",
    ] {
        assert!(
            doc["components"]["schemas"].get(schema).is_some(),
            "{schema} missing from the OpenAPI document"
        );
    }
}

/// A shell test that `$TOKEN` holds [`VALUE`], without the value in the command (which is
/// stored with the task): it compares SHA-256 digests.
fn checks_the_token() -> Value {
    let digest = hex::encode(sha2::Sha256::digest(VALUE.as_bytes()));
    json!([
        "sh",
        "-c",
        format!("test \"$(printf %s \"$TOKEN\" | sha256sum | cut -c1-64)\" = {digest}")
    ])
}

async fn a_task_runs_with_its_secret_and_the_value_appears_nowhere(db: Db) {
    let url = db.url.clone();
    let api = api_on(db.store, |_| {}).await;
    let acme = api.tenant("acme", 10).await;
    let globex = api.tenant("globex", 10).await;
    let (status, _) = api
        .put_secret(&acme, "openai", &json!({"data": {"token": VALUE}}))
        .await;
    assert_eq!(status, StatusCode::CREATED);

    let task = |env: Value| json!({"name": "uses-secret", "image": "unused", "command": checks_the_token(), "env": env});
    // References are checked at submit: the secret and the key must exist for this tenant.
    let refused = [
        (
            &acme,
            json!({"TOKEN": {"secret": "missing", "key": "token"}}),
            "secret 'missing' does not exist (PUT /v1/secrets/missing first)",
        ),
        (
            &acme,
            json!({"TOKEN": {"secret": "openai", "key": "nope"}}),
            "secret 'openai' has no key 'nope' (its keys: token)",
        ),
        (
            &globex,
            json!({"TOKEN": {"secret": "openai", "key": "token"}}),
            "secret 'openai' does not exist (PUT /v1/secrets/openai first)",
        ),
    ];
    for (key, env, message) in refused {
        let (status, body) = api.submit(key, &task(env)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "secret_not_found");
        assert_eq!(field(&body), "env.TOKEN");
        assert_eq!(body["error"]["message"], message);
    }
    let (status, body) = api
        .submit(
            &acme,
            &task(json!({"TOKEN": {"secret": "openai", "key": "token", "value": "x"}})),
        )
        .await;
    assert_eq!(
        (status, field(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "env.TOKEN.value"),
        "a reference holds nothing else: {body}"
    );

    let reference = json!({"secret": "openai", "key": "token"});
    let (status, created) = api
        .submit(&acme, &task(json!({"TOKEN": reference, "MODE": PLAIN})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["env"], json!({"MODE": PLAIN, "TOKEN": reference}));

    // Launched for real by the local executor (bare commands, no runner), with the
    // values read from the API's own secret store.
    let dir = std::env::temp_dir().join(format!(
        "agent-bus-secret-run-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let secrets = match &api.state.secrets {
        dispatcher::secrets::SecretStore::Local(local) => local.clone(),
        dispatcher::secrets::SecretStore::Kubernetes(_) => unreachable!(),
    };
    let executor = LocalExecutor::new(api.lifecycle().clone(), dir.clone()).with_secrets(secrets);
    let id: TaskId = created["id"].as_str().unwrap().parse().unwrap();
    let Claim::Claimed(claimed) = api.lifecycle().claim(id).await.unwrap() else {
        panic!("not claimed");
    };
    assert_eq!(
        executor.launch(&claimed).await,
        LaunchOutcome::AlreadyHandled
    );
    let done = poll_until("the task to end", Duration::from_secs(30), || async {
        let (_, task) = api.get(&acme, &format!("/v1/tasks/{id}")).await;
        if task["state"] == "running" {
            Err(task.to_string())
        } else {
            Ok(task)
        }
    })
    .await;
    assert_eq!(
        done["state"], "succeeded",
        "the command saw the value: {done}"
    );

    let (_, events) = api.get(&acme, &format!("/v1/tasks/{id}/events")).await;
    let (_, page) = api.get(&acme, "/v1/tasks").await;
    for body in [&created, &done, &events, &page] {
        assert!(!body.to_string().contains(VALUE), "the value in {body}");
    }
    assert_nowhere_in_the_database(&url, VALUE, PLAIN).await;
    let _ = std::fs::remove_dir_all(dir);

    // A request accepted before its secret was deleted replays; a new one is refused.
    let body = task(json!({"TOKEN": reference})).to_string();
    let submit = |idempotency: &'static str| {
        let body = body.clone();
        let api = api.clone();
        let acme = acme.clone();
        async move {
            api.call(
                Method::POST,
                "/v1/tasks",
                Some(&acme),
                Some(&body),
                &[("idempotency-key", idempotency)],
            )
            .await
        }
    };
    let (status, _, first) = submit("before-the-delete").await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (status, _) = api.delete_secret(&acme, "openai").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, headers, replayed) = submit("before-the-delete").await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(replayed["id"], first["id"]);
    let (status, _, refused) = submit("after-the-delete").await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(field(&refused), "env.TOKEN");
}

/// Fails if `value` is in any row of any table of the database at `url` (PostgreSQL: each
/// row cast to text; SQLite: the bytes of the file and its write-ahead log), or if
/// `present` (text a task stored) is not: the search must see what the store wrote.
pub(crate) async fn assert_nowhere_in_the_database(url: &str, value: &str, present: &str) {
    let contains = |text: &[u8], what: &str| text.windows(what.len()).any(|w| w == what.as_bytes());
    if let Some(path) = url.strip_prefix("sqlite://") {
        let mut seen = false;
        for file in [path.to_owned(), format!("{path}-wal")] {
            if let Ok(bytes) = std::fs::read(&file) {
                assert!(!contains(&bytes, value), "the value is in {file}");
                seen |= contains(&bytes, present);
            }
        }
        assert!(seen, "{present} is in none of the database's files");
        return;
    }
    let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap();
    let mut seen = false;
    for (table,) in tables {
        // The table names come from the catalogue, not from a client.
        let rows: (Option<String>,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT string_agg(t::text, E'\\n') FROM \"{table}\" t"
        )))
        .fetch_one(&mut connection)
        .await
        .unwrap();
        let text = rows.0.unwrap_or_default();
        assert!(!text.contains(value), "the value is in table {table}");
        seen |= text.contains(present);
    }
    assert!(seen, "{present} is in no table");
}

/// The secret's digest check as the local executor's runner runs it.
fn local_task(name: &str, extra: &Value) -> Value {
    let mut body = json!({"name": name, "image": "unused", "command": checks_the_token(),
        "env": {"TOKEN": {"secret": "openai", "key": "token"}, "MODE": PLAIN}});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

/// `dispatcher serve --executor local` in `dir` on its SQLite file, logging at `debug`
/// into `dir/dispatcher.log`; its base URL.
async fn serve_logging(dir: &Path) -> (tokio::process::Child, String) {
    let port = testsupport::free_port();
    let listen = format!("127.0.0.1:{port}");
    // A metrics port of its own: the default one may be taken (a `make run` beside).
    let metrics = format!("127.0.0.1:{}", testsupport::free_port());
    let log = std::fs::File::create(dir.join("dispatcher.log")).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(["serve", "--executor", "local", "--listen", &listen])
        .args(["--metrics-listen", &metrics])
        .current_dir(dir)
        .env("AGENT_BUS_LOG", "debug")
        .env("DATABASE_URL", "sqlite://agent-bus.db")
        .env_remove("REDIS_URL")
        .env_remove("KUBECONFIG")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://{listen}");
    wait_until_ready(&reqwest::Client::new(), &base, Duration::from_secs(30)).await;
    (child, base)
}

struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn wait_for(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        poll_until(&format!("task {id}"), Duration::from_secs(30), || async {
            let (_, task) = self
                .send(reqwest::Method::GET, &format!("/v1/tasks/{id}"), None)
                .await;
            if done(&task) {
                Ok(task)
            } else {
                Err(task.to_string())
            }
        })
        .await
    }
}

#[tokio::test]
async fn local_tasks_get_their_secret_in_the_environment_and_nothing_else_holds_it() {
    let dir = std::env::temp_dir().join(format!(
        "agent-bus-local-secrets-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (created, key, stderr) = run_dispatcher(&dir, &["tenant", "create", "acme"]).await;
    assert!(created, "{stderr}");
    let (mut child, base) = serve_logging(&dir).await;
    let client = Client {
        http: reqwest::Client::new(),
        base,
        key,
    };

    let (status, body) = client
        .send(
            reqwest::Method::PUT,
            "/v1/secrets/openai",
            Some(&json!({"data": {"token": VALUE}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let file = dir.join("agent-bus-secrets/acme/openai.json");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);
        assert_eq!(mode(&dir.join("agent-bus-secrets")), 0o700);
    }

    let (status, task) = client
        .send(
            reqwest::Method::POST,
            "/v1/tasks",
            Some(&local_task("uses-secret", &json!({}))),
        )
        .await;
    assert_eq!(status, 201, "{task}");
    let id = task["id"].as_str().unwrap().to_owned();
    let done = client
        .wait_for(&id, |t| {
            ["succeeded", "failed"].contains(&t["state"].as_str().unwrap_or_default())
        })
        .await;
    assert_eq!(
        done["state"], "succeeded",
        "the command saw the value: {done}"
    );
    let (_, events) = client
        .send(
            reqwest::Method::GET,
            &format!("/v1/tasks/{id}/events"),
            None,
        )
        .await;
    for body in [&task, &done, &events] {
        assert!(!body.to_string().contains(VALUE), "the value in {body}");
    }

    // A secret deleted after the submit fails the launch of the attempt that needs it,
    // naming the variable and the secret; the retries left are not spent on it.
    let (status, task) = client
        .send(
            reqwest::Method::POST,
            "/v1/tasks",
            Some(&local_task(
                "deleted-later",
                &json!({"command": ["sh", "-c", "exit 1"], "max_retries": 3, "retry_policy": {"backoff_seconds": 6}}),
            )),
        )
        .await;
    assert_eq!(status, 201, "{task}");
    let id = task["id"].as_str().unwrap().to_owned();
    client.wait_for(&id, |t| t["reason"] == "retrying").await;
    let (status, _) = client
        .send(reqwest::Method::DELETE, "/v1/secrets/openai", None)
        .await;
    assert_eq!(status, 204);
    let failed = client
        .wait_for(&id, |t| {
            ["succeeded", "failed"].contains(&t["state"].as_str().unwrap_or_default())
        })
        .await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["reason"], "launch_rejected", "{failed}");
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("env.TOKEN: secret 'openai' does not exist"),
        "{failed}"
    );
    assert_eq!(
        failed["attempt"], 2,
        "one failed launch, no retry of it: {failed}"
    );
    assert_eq!(failed["retries_used"], 1, "{failed}");

    let _ = child.start_kill();
    let _ = child.wait().await;
    assert_nowhere_in_the_database(
        &format!("sqlite://{}", dir.join("agent-bus.db").display()),
        VALUE,
        PLAIN,
    )
    .await;
    let log = std::fs::read_to_string(dir.join("dispatcher.log")).unwrap();
    assert!(
        log.contains("secret written"),
        "the log is the dispatcher's: {log}"
    );
    assert!(!log.contains(VALUE), "the value is in the dispatcher's log");
    let _ = std::fs::remove_dir_all(&dir);
}

//! `helm test`'s submit -> Job pod: rendered, admitted by the API server, and its scripts
//! run for real against the dispatcher launching into the test cluster.

use std::process::Stdio;

use crate::conventions::named;
use crate::rbac::{apply_dev_overlay, service_account_kubeconfig};
use crate::support::*;
use serde_json::{Value, json};
use testsupport::{CLUSTER_TIMEOUT, poll_until, unique_suffix, with_database, with_redis_keyspace};
use tokio::io::AsyncBufReadExt as _;

/// The shell script of a container of the rendered `helm test` pod (`sh -ec <script>`).
fn script(container: &Value) -> String {
    let command = container["command"].as_array().unwrap();
    assert_eq!(
        command[..2],
        [json!("/bin/sh"), json!("-ec")],
        "{container}"
    );
    command[2].as_str().unwrap().to_owned()
}

/// The rendered `helm test` pod cannot run on this cluster: kwok plays the kubelet, so
/// pods run no process, and it keeps a test pod `Running` for ever (`helm test` on a dev
/// install times out with `-test-readyz` still `Running`). So its
/// two scripts run here, as they are, against the real dispatcher launching into the
/// cluster: the tenant script with the dispatcher binary and the database, the submit
/// script with curl against the api. Only the paths (`/usr/local/bin/dispatcher`,
/// `/work`) and the api URL differ from the pod.
#[tokio::test]
async fn the_helm_test_submits_a_task_through_the_api_and_waits_for_its_job() {
    testsupport::needs_env!(
        Cluster,
        Postgres,
        Redis,
        Program("kubectl"),
        Program("helm"),
        Program("curl")
    );
    let names = Names::unique("deploy-helmtest");
    with_installation(
        &names,
        || {},
        || async {
            let names = &names;
            // The helm test pod as the chart renders it (the API server admits it below, in the
            // restricted release namespace).
            let rendered = helm_template(names, Some("values-dev.yaml"));
            let pod = parsed(&rendered)
                .into_iter()
                .find(|o| o["kind"] == "Pod" && o["metadata"]["name"] == "agent-bus-test-submit")
                .unwrap();
            assert_eq!(pod["metadata"]["annotations"]["helm.sh/hook"], "test");
            let init = &pod["spec"]["initContainers"][0];
            let submit = &pod["spec"]["containers"][0];
            assert_eq!(init["image"], "localhost/agent-bus:dev");
            assert_eq!(
                named(&submit["env"], "API").unwrap()["value"],
                "http://agent-bus-api:8080"
            );
            let timeout = named(&submit["env"], "TIMEOUT").unwrap()["value"]
                .as_str()
                .unwrap()
                .to_owned();
            let tenant = named(&init["env"], "TENANT").unwrap()["value"]
                .as_str()
                .unwrap()
                .to_owned();
            let (tenant_script, submit_script) = (script(init), script(submit));

            let rendered = objects(&apply_dev_overlay(names));
            let pod_yaml = yaml_docs(&helm_template(names, Some("values-dev.yaml")))
                .into_iter()
                .find(|doc| kind_of(doc) == "Pod" && doc.contains("name: agent-bus-test-submit\n"))
                .unwrap();
            let out = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&pod_yaml));
            assert!(!out.stderr.contains("Warning"), "{}", out.stderr);
            let launcher =
                dispatcher_container(find(&rendered, "Deployment", "agent-bus-launcher")).unwrap();
            let report_url = env_value(launcher, "AGENT_BUS_REPORT_URL").to_owned();
            let runner_image = env_value(launcher, "AGENT_BUS_RUNNER_IMAGE").to_owned();
            let placement = config_map(&rendered)["data"]["placement.yaml"]
                .as_str()
                .unwrap()
                .to_owned();
            let (report_url, runner_image, placement) = (&report_url, &runner_image, &placement);
            let (tenant_script, submit_script, timeout, tenant) =
                (&tenant_script, &submit_script, &timeout, &tenant);
            with_database(|db| async move {
                with_redis_keyspace(|redis| async move {
                    let dir = std::env::temp_dir()
                        .join(format!("agent-bus-helmtest-{}", unique_suffix()));
                    let work = dir.join("work");
                    std::fs::create_dir_all(&work).unwrap();
                    let kubeconfig = service_account_kubeconfig(names, &dir);
                    let placement_file = dir.join("placement.yaml");
                    std::fs::write(&placement_file, placement).unwrap();
                    let dispatcher = dispatcher_binary();
                    let local = |script: &str| {
                        // `/work/` first: the binary's own path may hold it.
                        script
                            .replace("/work/", &format!("{}/", work.display()))
                            .replace("/usr/local/bin/dispatcher", dispatcher.to_str().unwrap())
                    };
                    let listen = format!("127.0.0.1:{}", testsupport::free_port());
                    let metrics_listen = format!("127.0.0.1:{}", testsupport::free_port());
                    let _dispatcher = tokio::process::Command::new(&dispatcher)
                        .args([
                            "serve",
                            "--executor",
                            "kubernetes",
                            "--listen",
                            &listen,
                            "--metrics-listen",
                            &metrics_listen,
                            "--reconcile-interval",
                            "1",
                        ])
                        .env("KUBECONFIG", &kubeconfig)
                        .env("DATABASE_URL", &db.url)
                        .env("REDIS_URL", &redis.url)
                        .env("AGENT_BUS_REDIS_PREFIX", &redis.prefix)
                        .env("AGENT_BUS_NAMESPACE", &names.tasks)
                        .env("AGENT_BUS_LEASE_NAMESPACE", &names.dispatcher)
                        .env("AGENT_BUS_INSTANCE", "deploy-helm-test")
                        .env("AGENT_BUS_PLACEMENT_FILE", &placement_file)
                        .env("AGENT_BUS_REPORT_URL", report_url)
                        .env("AGENT_BUS_RUNNER_IMAGE", runner_image)
                        .env("AGENT_BUS_LOG", "warn")
                        // The Jobs are read after their tasks are over.
                        .env("AGENT_BUS_KEEP_FINISHED_JOBS", "10m")
                        .stdout(Stdio::inherit())
                        .stderr(Stdio::inherit())
                        .kill_on_drop(true)
                        .spawn()
                        .unwrap();
                    let base = format!("http://{listen}");
                    let readyz = format!("{base}/readyz");
                    poll_until("the dispatcher to be ready", CLUSTER_TIMEOUT, || async {
                        let out = tokio::process::Command::new(&dispatcher)
                            .args(["healthcheck", "--url", &readyz])
                            .output()
                            .await
                            .unwrap();
                        if out.status.success() {
                            Ok(())
                        } else {
                            Err(String::from_utf8_lossy(&out.stderr).into_owned())
                        }
                    })
                    .await;

                    // The script cancels its task, which deletes the Job: a watch of the tasks
                    // namespace's Jobs, from before the first submission, sees them created.
                    let mut watch = tokio::process::Command::new(tool("kubectl"))
                        .args(["get", "jobs", "-n", &names.tasks, "--watch", "-o", "name"])
                        .stdout(Stdio::piped())
                        .stderr(Stdio::inherit())
                        .kill_on_drop(true)
                        .spawn()
                        .unwrap();
                    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
                    let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
                    let collect = {
                        let seen = seen.clone();
                        tokio::spawn(async move {
                            while let Ok(Some(line)) = lines.next_line().await {
                                seen.lock().unwrap().push(line);
                            }
                        })
                    };

                    // Twice: the first `helm test` creates the tenant, the next gives it a new key.
                    let mut jobs = Vec::new();
                    for round in 0..2 {
                        let out = tokio::process::Command::new("sh")
                            .args(["-ec", &local(tenant_script)])
                            .env("TENANT", tenant)
                            .env("DATABASE_URL", &db.url)
                            .output()
                            .await
                            .unwrap();
                        let said = String::from_utf8_lossy(&out.stdout);
                        assert!(
                            out.status.success(),
                            "round {round}: {said}{}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        assert_eq!(
                            said.trim(),
                            format!("tenant {tenant} has a fresh key"),
                            "the key stays out of the log"
                        );
                        let out = tokio::process::Command::new("sh")
                            .args(["-ec", &local(submit_script)])
                            .env("API", &base)
                            .env("TIMEOUT", timeout)
                            .output()
                            .await
                            .unwrap();
                        let said = String::from_utf8_lossy(&out.stdout).into_owned();
                        assert!(
                            out.status.success(),
                            "round {round}: {said}{}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        let id = said
                            .lines()
                            .find_map(|line| line.strip_prefix("submitted task "))
                            .unwrap_or_else(|| panic!("{said}"))
                            .to_owned();
                        assert!(
                            said.contains(&format!(
                                "task {id} has its Job: \"job\":{{\"namespace\":\"{}\",\"name\":",
                                names.tasks
                            )),
                            "{said}"
                        );
                        assert!(
                            said.contains(&format!("task {id} cancelled or over")),
                            "{said}"
                        );
                        let job = said
                            .split("\"name\":\"")
                            .nth(1)
                            .and_then(|rest| rest.split('"').next())
                            .unwrap()
                            .to_owned();
                        assert!(
                            job.contains(&id.replace('-', "")),
                            "{job} is not task {id}'s"
                        );
                        jobs.push(job);
                    }
                    // The Jobs the script saw were created in the tasks namespace.
                    for job in &jobs {
                        let wanted = format!("job.batch/{job}");
                        poll_until(
                            &format!("{wanted} in the watch"),
                            CLUSTER_TIMEOUT,
                            || async {
                                let seen = seen.lock().unwrap();
                                if seen.contains(&wanted) {
                                    Ok(())
                                } else {
                                    Err(format!("{seen:?}"))
                                }
                            },
                        )
                        .await;
                    }
                    drop(watch);
                    collect.abort();
                    std::fs::remove_dir_all(&dir).unwrap();
                })
                .await;
            })
            .await;
        },
    )
    .await;
}

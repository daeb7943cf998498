//! Where tasks run: which executor `--executor` (or `auto`) picks and why, the Kubernetes
//! client it uses, the runner binary of the local executor, and the clean-up the local
//! executor needs at start (its tasks die with the process), and who its tasks run as.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::config::{ExecutorChoice, ServeArgs};
use crate::k8s::rate_limit::RateLimitLayer;
use crate::k8s::retry_after::RetryAfterLayer;
use crate::launcher::isolation::{self, TaskUsers};
use crate::metrics::Metrics;
use crate::metrics::kubernetes::KubernetesMetricsLayer;
use crate::store::Store;

/// Which executor `auto` picks, and the words for the first log line.
pub(super) fn choose_executor(
    choice: ExecutorChoice,
    kubeconfig: Option<&Path>,
    in_cluster_token: &Path,
) -> (ExecutorChoice, String) {
    match choice {
        ExecutorChoice::Kubernetes => (
            ExecutorChoice::Kubernetes,
            "--executor kubernetes".to_owned(),
        ),
        ExecutorChoice::Local => (ExecutorChoice::Local, "--executor local".to_owned()),
        ExecutorChoice::Stub => (
            ExecutorChoice::Stub,
            "--executor stub (benchmarks only: nothing runs)".to_owned(),
        ),
        ExecutorChoice::Auto => {
            if let Some(path) = kubeconfig.filter(|p| p.exists()) {
                (
                    ExecutorChoice::Kubernetes,
                    format!("auto: kubeconfig {} exists", path.display()),
                )
            } else if in_cluster_token.exists() {
                (
                    ExecutorChoice::Kubernetes,
                    format!(
                        "auto: in-cluster service account ({})",
                        in_cluster_token.display()
                    ),
                )
            } else {
                (ExecutorChoice::Local, "auto: no kubeconfig (--kubeconfig/KUBECONFIG) and no in-cluster service account".to_owned())
            }
        }
    }
}

/// A client from the kubeconfig when it exists, else the in-cluster service account; its
/// requests are counted in the metrics.
pub(super) async fn kube_client(
    kubeconfig: Option<&PathBuf>,
    rate: &RateLimitLayer,
    metrics: &Metrics,
) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig.filter(|p| p.exists()) {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?
        }
        None => kube::Config::incluster().context("in-cluster kubernetes configuration")?,
    };
    // One retry layer toward the API server: the launcher's, which honours the server's
    // retryAfterSeconds and gives a task back to the reconciler after a few tries.
    // kube-client's own retry of 429/503/504 under it would multiply the creates exactly
    // when the server asks for fewer (and hide them from the request metrics).
    let mut config = config;
    config.default_retry = false;
    Ok(kube::client::ClientBuilder::try_from(config)?
        // The server's Retry-After (APF's 429s carry it only as a header) reaches the
        // launcher's retry as the Status's retryAfterSeconds.
        .with_layer(&RetryAfterLayer)
        .with_layer(&KubernetesMetricsLayer::new(metrics.clone()))
        // Outside the metrics: a request counted is one sent, not one waiting its turn.
        .with_layer(rate)
        .build())
}

/// The runner the local executor uses: the configured path, else `runner` beside this
/// executable (`own_executable`), else on the search path (the `PATH` value).
pub(super) fn find_runner(
    configured: Option<&Path>,
    own_executable: Option<&Path>,
    search_path: Option<&OsStr>,
) -> anyhow::Result<PathBuf> {
    if let Some(path) = configured {
        anyhow::ensure!(
            path.is_file(),
            "--runner-path {}: no such file",
            path.display()
        );
        return Ok(path.to_owned());
    }
    let beside = own_executable
        .and_then(|exe| exe.parent().map(|dir| dir.join("runner")))
        .filter(|path| path.is_file());
    let on_path = || {
        search_path.and_then(|paths| {
            std::env::split_paths(paths)
                .map(|dir| dir.join("runner"))
                .find(|path| path.is_file())
        })
    };
    beside.or_else(on_path).ok_or_else(|| {
        anyhow::anyhow!(
            "the local executor runs every task through the runner, and none was found next to the dispatcher or on PATH: build it (cargo build --release -p runner) or pass --runner-path"
        )
    })
}

/// Who the local executor's tasks run as: as root, a user per tenant; else the
/// dispatcher's own user, which it only accepts for one tenant on loopback unless
/// `--local-executor-shared-user` says otherwise.
pub(super) async fn local_task_users(args: &ServeArgs, store: &Store) -> anyhow::Result<TaskUsers> {
    if nix::unistd::geteuid().is_root() {
        return Ok(TaskUsers::PerTenant {
            uid_base: args.local_task_uid_base,
        });
    }
    // Tasks run as this user: keep them out of this process's environment (database
    // and Redis URLs with passwords, --report-secret) and memory, as the runner does.
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(target: super::LOG_TARGET, %error, "cannot make the dispatcher non-dumpable: local tasks may read its environment");
    }
    if args.local_executor_shared_user {
        tracing::warn!(
            target: super::LOG_TARGET,
            "local tasks run as the dispatcher's own user (--local-executor-shared-user): they can read its database, its report-token key and each other's files"
        );
        return Ok(TaskUsers::Shared { more_tenants: true });
    }
    let tenants = store.tenant_count().await.context("counting tenants")?;
    if let Some(refusal) = isolation::shared_user_refusal(args.listen, tenants) {
        anyhow::bail!(refusal);
    }
    Ok(TaskUsers::Shared {
        more_tenants: false,
    })
}

/// The local executor's work folder: the configured one, else `agent-bus-work` in the
/// current folder, unless tasks run as users of their own and other users cannot reach
/// it (a clone in root's 0700 home: `make run` as root), then `/var/lib/agent-bus/work`.
pub(super) fn local_workdir(configured: Option<&Path>, users: TaskUsers) -> PathBuf {
    const BESIDE: &str = "agent-bus-work";
    const SYSTEM: &str = "/var/lib/agent-bus/work";
    if let Some(path) = configured {
        return path.to_owned();
    }
    let beside = std::path::absolute(BESIDE).unwrap_or_else(|_| PathBuf::from(BESIDE));
    if let TaskUsers::PerTenant { .. } = users
        && let Some(closed) = isolation::closed_to_others(&beside)
    {
        tracing::info!(
            target: super::LOG_TARGET,
            closed = %closed.display(),
            workdir = SYSTEM,
            "task users cannot reach {BESIDE} here: local tasks work under {SYSTEM} (--local-workdir chooses)"
        );
        return PathBuf::from(SYSTEM);
    }
    PathBuf::from(BESIDE)
}

/// With a user per tenant, checks that the first of those users can run `runner` in
/// `workdir`: that the dispatcher may change user, and that every folder above both is
/// open to other users.
pub(super) async fn check_task_users(
    runner: &Path,
    workdir: &Path,
    users: TaskUsers,
) -> anyhow::Result<()> {
    let TaskUsers::PerTenant { uid_base } = users else {
        return Ok(());
    };
    let ran = tokio::process::Command::new(runner)
        .arg("--version")
        .env_clear()
        .current_dir(workdir)
        .uid(uid_base)
        .gid(uid_base)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let problem = match ran {
        Ok(output) if output.status.success() => return Ok(()),
        Ok(output) => format!(
            "it exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => error.to_string(),
    };
    let advice = match isolation::closed_to_others(workdir) {
        Some(closed) => format!(
            "{} is closed to other users, so no task user reaches the work folder below it: pass --local-workdir in a folder others may pass (o+x), for example /var/lib/agent-bus/work",
            closed.display()
        ),
        None => "every folder above both must be open to other users (o+x), and the dispatcher needs CAP_SETUID, CAP_SETGID, CAP_CHOWN and CAP_KILL".to_owned(),
    };
    anyhow::bail!(
        "the local executor runs each tenant's tasks as a user of its own (from --local-task-uid-base {uid_base}), and user {uid_base} cannot run {} in {}: {problem}. {advice}",
        runner.display(),
        workdir.display()
    )
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{choose_executor, find_runner};
    use crate::config::ExecutorChoice;

    /// A fresh folder under the system's temporary one, removed when dropped.
    struct Folder(PathBuf);

    impl Folder {
        fn new() -> Self {
            let path = std::env::temp_dir()
                .join(format!("agent-bus-app-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn file(&self, name: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, "").unwrap();
            path
        }
    }

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn an_explicit_executor_is_taken_as_is() {
        let nowhere = Path::new("/nonexistent/agent-bus/token");
        for choice in [
            ExecutorChoice::Kubernetes,
            ExecutorChoice::Local,
            ExecutorChoice::Stub,
        ] {
            assert_eq!(choose_executor(choice, None, nowhere).0, choice);
        }
        assert_eq!(
            choose_executor(ExecutorChoice::Local, None, nowhere).1,
            "--executor local"
        );
    }

    #[test]
    fn auto_is_kubernetes_with_a_kubeconfig_or_a_service_account() {
        let folder = Folder::new();
        let kubeconfig = folder.file("kubeconfig");
        let token = folder.file("token");
        let missing = folder.0.join("missing");

        let (choice, why) = choose_executor(ExecutorChoice::Auto, Some(&kubeconfig), &missing);
        assert_eq!(choice, ExecutorChoice::Kubernetes);
        assert_eq!(
            why,
            format!("auto: kubeconfig {} exists", kubeconfig.display())
        );

        let (choice, why) = choose_executor(ExecutorChoice::Auto, Some(&missing), &token);
        assert_eq!(choice, ExecutorChoice::Kubernetes);
        assert!(why.starts_with("auto: in-cluster service account"), "{why}");

        let (choice, why) = choose_executor(ExecutorChoice::Auto, Some(&missing), &missing);
        assert_eq!(choice, ExecutorChoice::Local);
        assert!(why.starts_with("auto: no kubeconfig"), "{why}");
    }

    #[test]
    fn the_runner_is_the_configured_one_else_beside_the_executable_else_on_path() {
        let beside = Folder::new();
        let on_path = Folder::new();
        let configured = on_path.file("my-runner");
        let exe = beside.file("dispatcher");
        let path = std::env::join_paths([beside.0.join("empty"), on_path.0.clone()]).unwrap();

        assert_eq!(
            find_runner(Some(&configured), Some(&exe), Some(&path)).unwrap(),
            configured
        );
        let error = find_runner(Some(&beside.0.join("nope")), None, None).unwrap_err();
        assert!(error.to_string().starts_with("--runner-path "), "{error}");

        assert!(find_runner(None, Some(&exe), Some(&path)).is_err());
        let on_path_runner = on_path.file("runner");
        assert_eq!(
            find_runner(None, Some(&exe), Some(&path)).unwrap(),
            on_path_runner
        );
        let beside_runner = beside.file("runner");
        assert_eq!(
            find_runner(None, Some(&exe), Some(&path)).unwrap(),
            beside_runner
        );
        assert!(find_runner(None, None, None).is_err());
    }
}

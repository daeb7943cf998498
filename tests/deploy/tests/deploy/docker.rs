//! The image and docker-compose: BuildKit's Dockerfile checks and the Compose loader
//! (both through `deploylint`).

use crate::support::*;
use serde_json::{Value, json};
use testsupport::unique_suffix;

// --- the image and docker-compose ------------------------------------------------------------

#[test]
fn the_dockerfile_passes_buildkits_checks_and_runs_non_root_with_a_shell_free_healthcheck() {
    testsupport::needs_env!(Program("deploylint"));
    let out = run(deploylint(), &["dockerfile", "Dockerfile"], None);
    let summary: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(summary["problems"], json!([]), "{}", out.stderr);
    let stages = summary["stages"].as_array().unwrap();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    let runtime = stages.last().unwrap();
    assert_eq!(runtime["user"], "65532:65532");
    assert_eq!(
        runtime["healthcheck"],
        json!([
            "CMD",
            "/usr/local/bin/dispatcher",
            "healthcheck",
            "--url",
            "http://127.0.0.1:8080/readyz"
        ])
    );
    assert_eq!(
        runtime["entrypoint"],
        json!(["exec-form", "/usr/local/bin/dispatcher"])
    );
    let copies = runtime["copies_from"].to_string();
    for binary in ["/usr/local/bin/dispatcher", "/usr/local/bin/runner"] {
        assert!(
            copies.contains(binary),
            "{binary} not copied from the build stage: {copies}"
        );
    }
    // The build context leaves out the target folder and local state.
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    for line in ["*", "**/target/", "**/*.db"] {
        assert!(
            ignore.lines().any(|l| l == line),
            ".dockerignore lacks {line}"
        );
    }
    // The runner is built for glibc 2.31 (old CUDA and PyTorch user images) the way
    // tests/env/build-runner builds the binary the runner's tests check, with the same
    // pinned ziglang and cargo-zigbuild.
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let versions = std::fs::read_to_string(repo_root().join("tests/env/versions.env")).unwrap();
    for name in ["ZIGLANG_VERSION", "CARGO_ZIGBUILD_VERSION"] {
        let pinned = versions
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("tests/env/versions.env has no {name}"));
        assert!(
            dockerfile
                .lines()
                .any(|l| l.trim() == format!("ARG {name}={pinned}")),
            "the Dockerfile does not pin {name}={pinned} like tests/env/versions.env"
        );
    }
    let build_runner = std::fs::read_to_string(repo_root().join("tests/env/build-runner")).unwrap();
    for (file, text, command) in [
        (
            "Dockerfile",
            &dockerfile,
            "cargo zigbuild --release --locked -p runner --target \"${runner_target}.2.31\"",
        ),
        (
            "tests/env/build-runner",
            &build_runner,
            "cargo zigbuild --release --locked -p runner --target \"$zig_target\"",
        ),
    ] {
        assert!(text.contains(command), "{file} no longer runs `{command}`");
    }
    assert!(build_runner.contains("zig_target=$rust_target.2.31"));
    assert!(
        dockerfile.contains("\"target/${runner_target}/release/runner\" /out/runner"),
        "the image's runner is not the glibc 2.31 build"
    );
    // What the HEALTHCHECK runs exists in the binary.
    let help = std::process::Command::new(dispatcher_binary())
        .args(["healthcheck", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--url"));
}

#[test]
fn docker_compose_passes_the_compose_loader_with_limits_and_health_checks() {
    testsupport::needs_env!(
        Program("deploylint"),
        Program("promtool"),
        Program("amtool")
    );
    let out = run(deploylint(), &["compose", "docker-compose.yml"], None);
    let project: Value = serde_json::from_str(&out.stdout).unwrap();
    let services = project["services"].as_object().unwrap();
    let names: Vec<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "alertmanager",
            "dispatcher",
            "grafana",
            "postgres",
            "prometheus",
            "redis"
        ]
    );
    for (name, service) in services {
        let limits = &service["deploy"]["resources"]["limits"];
        assert!(
            limits["cpus"].as_f64().unwrap() > 0.0,
            "{name}: no CPU limit"
        );
        assert!(
            limits["memory"].as_str().unwrap().parse::<u64>().unwrap() > 0,
            "{name}: no memory limit"
        );
        let test = service["healthcheck"]["test"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no health check"));
        assert_eq!(test[0], "CMD", "{name}: health check in exec form");
    }
    assert_eq!(
        services["dispatcher"]["depends_on"]["postgres"]["condition"],
        "service_healthy"
    );
    assert_eq!(
        services["dispatcher"]["depends_on"]["redis"]["condition"],
        "service_healthy"
    );
    // The configuration files it mounts are valid for their programs.
    let prometheus = run(
        tool("promtool"),
        &["check", "config", "deploy/compose/prometheus.yml"],
        None,
    );
    assert!(
        prometheus.stdout.contains("SUCCESS"),
        "{}",
        prometheus.stdout
    );
    let alertmanager = run(
        tool("amtool"),
        &["check-config", "deploy/compose/alertmanager.yml"],
        None,
    );
    assert!(
        alertmanager.stdout.contains("SUCCESS"),
        "{}",
        alertmanager.stdout
    );
    // A misspelt key is refused (the loader validates against the Compose schema).
    let bad = std::env::temp_dir().join(format!("agent-bus-compose-{}.yml", unique_suffix()));
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    std::fs::write(
        &bad,
        text.replacen(
            "    restart: unless-stopped",
            "    restart: unless-stopped\n    restrat: always",
            1,
        ),
    )
    .unwrap();
    let refused = run_status(deploylint(), &["compose", bad.to_str().unwrap()], None);
    std::fs::remove_file(&bad).unwrap();
    assert!(!refused.success);
    assert!(refused.stderr.contains("restrat"), "{}", refused.stderr);
}

/// `buildah` on the storage `tests/env/image` keeps its images in.
fn buildah(storage: &str, args: &[&str]) -> Output {
    let runroot = format!("{storage}.run");
    let mut all = vec![
        "--root",
        storage,
        "--runroot",
        &runroot,
        "--storage-driver",
        "vfs",
    ];
    all.extend_from_slice(args);
    run("buildah", &all, None)
}

/// The seed's ceiling for the image.
const MAX_IMAGE_BYTES: u64 = 800 * 1000 * 1000;

/// The image, built for real from the Dockerfile by buildah (`tests/env/image`: base images
/// made from Debian's packages, the binaries this test run built, cached by content hash),
/// then inspected and run: non-root user, entrypoint, command, health check, OCI labels,
/// size, and `dispatcher --version` and the runner inside it.
#[test]
fn the_image_builds_from_the_dockerfile_and_runs_its_binaries() {
    // The glibc 2.31 runner (tests/env/build-runner) is the image's runner.
    testsupport::needs_env!(Var("AGENT_BUS_RUNNER_GLIBC231"));
    let runner = std::env::var("AGENT_BUS_RUNNER_GLIBC231").unwrap();
    let dispatcher = dispatcher_binary();
    let built = run(
        repo_root().join("tests/env/image"),
        &[dispatcher.to_str().unwrap(), &runner],
        None,
    );
    let value = |key: &str| {
        built
            .stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("tests/env/image printed no {key}: {}", built.stdout))
            .to_owned()
    };
    let (image, storage) = (value("AGENT_BUS_IMAGE"), value("AGENT_BUS_IMAGE_STORAGE"));
    assert_eq!(image, "localhost/agent-bus:dev");

    let inspected: Value =
        serde_json::from_str(&buildah(&storage, &["inspect", "--type", "image", &image]).stdout)
            .unwrap();
    let config = &inspected["Docker"]["config"];
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["Entrypoint"], json!(["/usr/local/bin/dispatcher"]));
    assert_eq!(config["Cmd"], json!(["serve"]));
    assert_eq!(config["WorkingDir"], "/var/lib/agent-bus");
    assert_eq!(config["ExposedPorts"], json!({"8080/tcp": {}}));
    assert_eq!(
        config["Healthcheck"]["Test"],
        json!([
            "CMD",
            "/usr/local/bin/dispatcher",
            "healthcheck",
            "--url",
            "http://127.0.0.1:8080/readyz"
        ])
    );
    let labels = &config["Labels"];
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(labels["org.opencontainers.image.title"], "agent-bus");
    assert_eq!(labels["org.opencontainers.image.version"], version);
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert!(labels["org.opencontainers.image.source"].is_string());

    let images: Value =
        serde_json::from_str(&buildah(&storage, &["images", "--json", &image]).stdout).unwrap();
    // buildah shows it as go-units does: three significant digits, powers of 1000.
    let shown = images[0]["size"].as_str().unwrap();
    let (amount, unit) = shown.split_once(' ').unwrap();
    let factor = match unit {
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => panic!("size {shown}"),
    };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a few hundred MB
    let size = (amount.parse::<f64>().unwrap() * factor) as u64;
    eprintln!("image {image}: {shown}");
    assert!(
        size <= MAX_IMAGE_BYTES,
        "{size} bytes, more than {MAX_IMAGE_BYTES}"
    );

    // Its binaries run inside it, as its user (chroot isolation: no container runtime).
    let container = buildah(&storage, &["from", "--quiet", &image])
        .stdout
        .trim()
        .to_owned();
    let inside = |command: &[&str]| {
        let mut args = vec!["run", "--isolation", "chroot", &container, "--"];
        args.extend_from_slice(command);
        buildah(&storage, &args)
    };
    let id = inside(&["id", "-u"]);
    let dispatcher_version = inside(&["/usr/local/bin/dispatcher", "--version"]);
    let runner_version = inside(&["/usr/local/bin/runner", "--version"]);
    let installed = inside(&[
        "sh",
        "-c",
        "/usr/local/bin/runner install /tmp/bin && /tmp/bin/runner --version",
    ]);
    buildah(&storage, &["rm", &container]);
    assert_eq!(id.stdout.trim(), "65532");
    assert_eq!(
        dispatcher_version.stdout.trim(),
        format!("dispatcher {version}")
    );
    assert_eq!(runner_version.stdout.trim(), format!("runner {version}"));
    assert_eq!(
        installed.stdout.trim(),
        format!("runner {version}"),
        "{}",
        installed.stderr
    );
}

/// The build stage copies every workspace member (cargo loads them all to build one), and
/// `.dockerignore` lets each into the context: a new member once broke the build.
#[test]
fn the_build_stage_copies_every_workspace_member() {
    let manifest = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    // `members = ["cli", "dispatcher", …]` on one line, as the workspace writes it.
    let members: Vec<&str> = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = ["))
        .unwrap()
        .split('"')
        .skip(1)
        .step_by(2)
        .collect();
    assert!(members.contains(&"dispatcher"), "{members:?}");
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    for member in members {
        assert!(
            dockerfile
                .lines()
                .any(|l| l.trim() == format!("COPY {member} {member}")),
            "the Dockerfile does not copy workspace member {member}"
        );
        assert!(
            ignore.lines().any(|l| l.trim() == format!("!{member}/")),
            ".dockerignore keeps workspace member {member} out"
        );
    }
}

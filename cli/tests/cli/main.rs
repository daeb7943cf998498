//! The `agent-bus` binary against a real dispatcher on the embedded defaults (SQLite, the
//! in-process queue, the local executor): no test environment needed (the progress bar
//! test needs util-linux's `script` for a terminal, and skips without it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Dispatcher, Spawned, cli_command, poll_until, run, scratch_dir};

/// The exit codes `agent-bus --help` and docs/CLI.md document.
const USAGE: i32 = 64;
const REFUSED: i32 = 65;
const UNREACHABLE: i32 = 69;
const TOKEN_REFUSED: i32 = 77;
const CANCELLED: i32 = 121;
const TIMED_OUT: i32 = 124;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn submit_wait_exits_with_the_exit_code_of_the_task() {
    let bus = Dispatcher::start();
    let ran = bus.run(&[
        "submit",
        "--name",
        "fails",
        "--image",
        "unused",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo out; echo boom >&2; exit 3",
    ]);
    assert_eq!(ran.code, 3, "{ran:?}");
    assert!(ran.stderr.contains("agent-bus: task "), "{ran:?}");
    assert!(
        ran.stderr
            .contains("failed (exit_code, exit code 3) attempt 1"),
        "state changes go to standard error: {ran:?}"
    );
    assert!(ran.stderr.contains("running"), "{ran:?}");
    assert!(!ran.stderr.contains("error"), "{ran:?}");

    let ok = bus.run(&["submit", "--image", "unused", "--wait", "--", "true"]);
    assert_eq!(ok.code, 0, "{ok:?}");
    assert!(ok.stderr.contains("succeeded"), "{ok:?}");
}

#[test]
fn submit_wait_shows_the_output_of_the_task_by_stream() {
    // The log lines come through the event stream's include=logs.
    let bus = Dispatcher::start();
    let ran = bus.run(&[
        "submit",
        "--name",
        "talks",
        "--image",
        "unused",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo out one; echo err one >&2; echo out two; exit 3",
    ]);
    assert_eq!(ran.code, 3, "{ran:?}");
    assert_eq!(ran.stdout, "out one\nout two\n", "{ran:?}");
    assert!(ran.stderr.contains("err one\n"), "{ran:?}");
}

#[test]
fn logs_prints_the_output_of_a_finished_task() {
    // GET /v1/tasks/{id}/logs. One stream only: the runner reads
    // stdout and stderr apart, so their relative order is whatever it saw.
    let bus = Dispatcher::start();
    let id = bus
        .run(&[
            "submit",
            "--image",
            "unused",
            "--",
            "sh",
            "-c",
            "echo a; echo b; echo c",
        ])
        .ok();
    let id = id.trim();
    assert_eq!(bus.run(&["wait", "--quiet", id]).code, 0);
    assert_eq!(bus.run(&["logs", id]).ok(), "a\nb\nc\n");
    assert_eq!(bus.run(&["logs", id, "--tail", "1"]).ok(), "c\n");
    let stamped = bus
        .run(&["logs", id, "--timestamps", "--attempt", "1"])
        .ok();
    assert!(
        stamped
            .lines()
            .nth(1)
            .is_some_and(|l| l.ends_with(" stdout b")),
        "{stamped}"
    );
    assert_eq!(bus.run(&["logs", id, "-f"]).ok(), "a\nb\nc\n");
    let line = bus.run(&["logs", id, "--attempt", "5"]).error(REFUSED);
    assert!(line.contains("attempt"), "{line}");
}

#[test]
fn a_yaml_task_file_with_flags_on_top_and_json_output() {
    let bus = Dispatcher::start();
    let file = bus.dir.join("task.yaml");
    std::fs::write(
        &file,
        "name: from-file\nimage: unused\ncommand: [sh, -c]\nargs: ['echo $WHO $WHAT']\n\
         env:\n  WHO: file\n  WHAT: world\ntimeout_seconds: 600\n",
    )
    .unwrap();
    let task = json(
        &bus.run(&[
            "submit",
            "-f",
            file.to_str().unwrap(),
            "--env",
            "WHO=flag",
            "--retries",
            "1",
            "-o",
            "json",
        ])
        .ok(),
    );
    assert_eq!(task["name"], "from-file");
    assert_eq!(task["env"]["WHO"], "flag", "a flag overrides the file");
    assert_eq!(task["env"]["WHAT"], "world");
    assert_eq!(task["max_retries"], 1);
    assert_eq!(task["timeout_seconds"], 600);
    let id = task["id"].as_str().unwrap();

    assert_eq!(bus.run(&["wait", id]).code, 0);
    let done = json(&bus.run(&["get", id, "-o", "json"]).ok());
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["message"], "flag world\n");
    let yaml: Value = serde_saphyr::from_str(&bus.run(&["get", id, "-o", "yaml"]).ok()).unwrap();
    assert_eq!(yaml["id"], done["id"]);
    let summary = bus.run(&["get", id]).ok();
    assert!(summary.contains("Name:          from-file\n"), "{summary}");
    assert!(summary.contains("State:         succeeded\n"), "{summary}");
    assert!(summary.contains("Exit code:     0\n"), "{summary}");

    let events = bus.run(&["events", id]).ok();
    let states: Vec<&str> = events
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(states.first(), Some(&"queued"), "{events}");
    assert_eq!(states.last(), Some(&"succeeded"), "{events}");
    let followed = bus.run(&["events", "-f", "-o", "json", id]).ok();
    assert_eq!(
        json(followed.lines().last().unwrap())["to"],
        "succeeded",
        "{followed}"
    );

    let from_stdin = {
        let mut command = bus.cli(&["submit", "-f", "-", "--name", "piped", "-o", "json"]);
        command.stdin(Stdio::piped());
        let mut child = Spawned::new(command);
        let mut stdin = child.stdin().unwrap();
        std::io::Write::write_all(&mut stdin, br#"{"image": "unused", "command": ["true"]}"#)
            .unwrap();
        drop(stdin);
        json(&child.finish(support::RUN_DEADLINE).ok())
    };
    assert_eq!(from_stdin["name"], "piped");
}

#[test]
fn list_shows_a_kubectl_like_table_and_follows_pages() {
    let bus = Dispatcher::start_with(&["--tenant-label-prefixes", "example.com/"]);
    let first = bus
        .run(&[
            "submit", "--name", "first", "--image", "unused", "--", "true",
        ])
        .ok();
    let second = bus
        .run(&[
            "submit",
            "--name",
            "second",
            "--image",
            "unused",
            "--cpu",
            "1",
            "--label",
            "example.com/team=ml",
            "--",
            "true",
        ])
        .ok();
    let (first, second) = (first.trim(), second.trim());
    assert_eq!(bus.run(&["wait", "-q", first]).code, 0);
    assert_eq!(bus.run(&["wait", "-q", second]).code, 0);

    let table = bus.run(&["list"]).ok();
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "NAME", "ID", "STATE", "ATTEMPT", "AGE", "DURATION", "COST", "GPU"
        ],
        "{table}"
    );
    assert_eq!(lines.len(), 3, "{table}");
    assert_eq!(
        lines[1][..4],
        ["second", second, "succeeded", "1"],
        "newest first: {table}"
    );
    assert_eq!(lines[2][..4], ["first", first, "succeeded", "1"], "{table}");
    assert_eq!(lines[1][7], "-", "no GPU: {table}");
    // The columns line up: each header starts where its values start.
    let header = table.lines().next().unwrap();
    let row = table.lines().nth(1).unwrap();
    assert_eq!(header.find("STATE"), row.find("succeeded"), "{table}");

    let wide = bus.run(&["list", "-o", "wide"]).ok();
    assert!(wide.lines().next().unwrap().ends_with("IMAGE"), "{wide}");

    let page = bus.run(&["list", "--limit", "1"]);
    assert_eq!(page.code, 0, "{page:?}");
    assert_eq!(page.stdout.lines().count(), 2, "{page:?}");
    assert!(page.stderr.contains("agent-bus list --cursor "), "{page:?}");
    let cursor = page.stderr.trim().rsplit(' ').next().unwrap();
    let rest = bus.run(&["list", "--cursor", cursor]).ok();
    assert!(rest.contains(first) && !rest.contains(second), "{rest}");

    let all = json(&bus.run(&["list", "-A", "-o", "json"]).ok());
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    assert_eq!(all["items"][0]["image"], "unused", "{all}");
    assert!(all["items"][0].get("command").is_none(), "summaries: {all}");
    let full = json(&bus.run(&["list", "--full", "-o", "json"]).ok());
    assert!(
        full["items"][0]["command"].is_array(),
        "whole tasks: {full}"
    );
    let yaml: Value = serde_saphyr::from_str(&bus.run(&["list", "-o", "yaml"]).ok()).unwrap();
    assert_eq!(yaml["items"][0]["id"], second);
    // Filters are the API's.
    assert_eq!(
        bus.run(&["list", "--state", "failed"]).ok().lines().count(),
        1
    );
    assert_eq!(
        bus.run(&["list", "--queue", "default"])
            .ok()
            .lines()
            .count(),
        3
    );
    let bad = bus.run(&["list", "--state", "bogus"]).error(REFUSED);
    assert!(bad.contains("state"), "the error names the field: {bad}");

    let usage = bus.run(&["usage"]).ok();
    assert!(
        usage.contains("QUEUE") && usage.contains("default"),
        "{usage}"
    );
    assert_eq!(
        json(&bus.run(&["usage", "-o", "json"]).ok())["tenant"],
        "acme"
    );
}

#[test]
fn cancelled_and_timed_out_tasks_have_their_own_exit_codes() {
    let bus = Dispatcher::start();
    let slow = bus
        .run(&[
            "submit",
            "--image",
            "unused",
            "--timeout",
            "1",
            "--",
            "sleep",
            "30",
        ])
        .ok();
    let long = bus
        .run(&["submit", "--image", "unused", "--", "sleep", "30"])
        .ok();
    let (slow, long) = (slow.trim(), long.trim());
    let timed_out = bus.run(&["wait", slow]);
    assert_eq!(timed_out.code, TIMED_OUT, "{timed_out:?}");

    poll_until("the long task to run", Duration::from_secs(30), || {
        let task = json(&bus.run(&["get", long, "-o", "json"]).ok());
        (task["state"] == "running").then_some(())
    });
    let waiting = Spawned::new(bus.cli(&["wait", long]));
    assert_eq!(
        bus.run(&["cancel", long]).ok(),
        format!("task {long} cancelled\n")
    );
    let waited = waiting.finish(support::RUN_DEADLINE);
    assert_eq!(waited.code, CANCELLED, "{waited:?}");
    assert_eq!(
        bus.run(&["cancel", long]).ok(),
        format!("task {long} had already ended: cancelled\n")
    );
}

#[test]
fn wait_reconnects_when_the_dispatcher_restarts() {
    // No launcher at first: the task stays queued while `wait` follows it.
    let mut bus = Dispatcher::start_with(&["--roles", "api,watcher"]);
    let id = bus
        .run(&["submit", "--image", "unused", "--", "sh", "-c", "exit 5"])
        .ok();
    let id = id.trim().to_owned();
    let waiting = Spawned::new(bus.cli(&["wait", &id]));
    // The stream is open once `wait` has shown the first state.
    waiting.await_stderr("] queued", Duration::from_secs(30));
    bus.restart_with(&[]);
    let waited = waiting.finish(support::RUN_DEADLINE);
    assert_eq!(waited.code, 5, "{waited:?}");
    assert!(waited.stderr.contains("reconnecting"), "{waited:?}");
    let queued = waited.stderr.matches("] queued").count();
    assert_eq!(queued, 1, "nothing is shown twice: {waited:?}");
}

#[test]
fn errors_are_one_line_with_documented_exit_codes() {
    let bus = Dispatcher::start();
    let dead = format!("http://127.0.0.1:{}", testsupport::free_port());
    let line = run({
        let mut command = cli_command(&bus.dir);
        command.args(["--server", &dead, "--token", "k", "list"]);
        command
    })
    .error(UNREACHABLE);
    assert!(
        line.starts_with(&format!(
            "agent-bus: error: cannot reach the dispatcher at {dead}: "
        )),
        "{line}"
    );
    let line = run({
        let mut command = cli_command(&bus.dir);
        command.args(["--server", &dead, "--token", "k", "wait", "x"]);
        command
    })
    .error(UNREACHABLE);
    assert!(
        line.contains("cannot reach the dispatcher"),
        "at once, not after retries: {line}"
    );

    let line = run({
        let mut command = cli_command(&bus.dir);
        command.args(["--server", &bus.base, "--token", "ab_wrong", "list"]);
        command
    })
    .error(TOKEN_REFUSED);
    assert!(line.contains("refused the token"), "{line}");
    assert!(
        !line.contains("ab_wrong"),
        "the token is not echoed: {line}"
    );

    let missing = "019adf00-0000-7000-8000-000000000000";
    let line = bus.run(&["get", missing]).error(REFUSED);
    assert_eq!(line, format!("agent-bus: error: no such task: {missing}"));
    bus.run(&["wait", missing]).error(REFUSED);
    bus.run(&["logs", missing]).error(REFUSED);

    let line = bus
        .run(&[
            "submit", "--name", "Bad_Name", "--image", "unused", "--", "true",
        ])
        .error(REFUSED);
    assert!(
        line.contains("name"),
        "the API's message names the field: {line}"
    );

    let line = bus
        .run(&["submit", "--gpu", "a100:x", "--", "true"])
        .error(USAGE);
    assert!(line.contains("--gpu"), "{line}");
    let line = bus.run(&["get"]).error(USAGE);
    assert!(line.contains("<ID>"), "{line}");
    bus.run(&["submit", "-f", "/nonexistent/task.yaml"])
        .error(USAGE);
    let line = run({
        let mut command = cli_command(&bus.dir);
        command.args(["list"]);
        command
    })
    .error(USAGE);
    assert!(line.contains("AGENT_BUS_TOKEN"), "{line}");
}

#[test]
fn contexts_come_after_flags_and_variables() {
    let bus = Dispatcher::start();
    let dir = scratch_dir("contexts");
    let config = dir.join("agent-bus").join("config.yaml");
    let cli = |args: &[&str]| {
        let mut command = cli_command(&dir);
        command.env("XDG_CONFIG_HOME", &dir).args(args);
        command
    };
    run(cli(&[
        "config",
        "set-context",
        "local",
        "--server",
        &bus.base,
        "--token",
        &bus.key,
    ]))
    .ok();
    run(cli(&[
        "config",
        "set-context",
        "dead",
        "--server",
        "http://127.0.0.1:9",
        "--token",
        "x",
    ]))
    .ok();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the config file holds keys");
    let contexts = run(cli(&["config", "get-contexts"])).ok();
    assert!(
        contexts.contains(&format!("*        local  {}  yes", bus.base)),
        "{contexts}"
    );
    assert!(!contexts.contains(&bus.key), "{contexts}");

    run(cli(&["list"])).ok();
    run(cli(&["--context", "dead", "list"])).error(UNREACHABLE);
    run(cli(&["config", "use-context", "dead"])).ok();
    assert_eq!(run(cli(&["config", "current-context"])).ok(), "dead\n");
    run(cli(&["list"])).error(UNREACHABLE);
    run(cli(&["list", "--server", &bus.base])).error(TOKEN_REFUSED);
    run(cli(&["list", "--server", &bus.base, "--token", &bus.key])).ok();
    let mut from_env = cli(&["list"]);
    from_env
        .env("AGENT_BUS_URL", &bus.base)
        .env("AGENT_BUS_TOKEN", &bus.key);
    run(from_env).ok();
    let mut flag_over_env = cli(&["list", "--token", "ab_wrong"]);
    flag_over_env
        .env("AGENT_BUS_URL", &bus.base)
        .env("AGENT_BUS_TOKEN", &bus.key);
    run(flag_over_env).error(TOKEN_REFUSED);
    run(cli(&["config", "use-context", "nope"])).error(USAGE);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn completion_and_help() {
    let dir = scratch_dir("completion");
    let script = run({
        let mut command = cli_command(&dir);
        command.args(["completion", "bash"]);
        command
    })
    .ok();
    assert!(script.starts_with("_agent__bus() {"), "{script}");
    assert!(script.contains("complete -F _agent__bus "), "{script}");
    for shell in ["zsh", "fish"] {
        let mut command = cli_command(&dir);
        command.args(["completion", shell]);
        assert!(!run(command).ok().is_empty());
    }
    let help = run({
        let mut command = cli_command(&dir);
        command
            .env("AGENT_BUS_TOKEN", "ab_secret_value")
            .arg("--help");
        command
    })
    .ok();
    assert!(help.contains("Exit codes:"), "{help}");
    assert!(help.contains("124   the task timed out"), "{help}");
    assert!(
        !help.contains("ab_secret_value"),
        "--help never shows the token"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A task that reports progress 40 ("epoch 2/5"), then prints `tick` lines until `marker`
/// exists (a minute at most).
fn progress_task(marker: &std::path::Path) -> String {
    format!(
        "echo \"progress 40 epoch 2/5\" >> \"$AGENT_BUS_REPORT_FILE\"; i=0; \
         until test -e {m} || test $i -ge 200; do echo tick; sleep 0.3; i=$((i+1)); done; \
         test -e {m}",
        m = marker.display()
    )
}

/// On a terminal, `submit --wait` draws a bar from the task's progress reports; piped, it
/// draws none. `script` (util-linux) gives it a terminal. The task goes on until the test
/// has seen what it waits for, so nothing depends on timing.
#[test]
fn a_progress_bar_is_drawn_on_a_terminal_only() {
    testsupport::needs_env!(Program("script"));
    let bus = Dispatcher::start();

    // On a terminal.
    let marker = bus.dir.join("seen-on-terminal");
    let run_sh = bus.dir.join("run.sh");
    std::fs::write(
        &run_sh,
        format!(
            "#!/bin/sh\nexec '{}' --server '{}' --token '{}' submit --image unused --wait -- sh -c '{}'\n",
            support::AGENT_BUS,
            bus.base,
            bus.key,
            progress_task(&marker)
        ),
    )
    .unwrap();
    let mut script = std::process::Command::new("script");
    script
        .args(["-qfec", &format!("sh {}", run_sh.display()), "/dev/null"])
        .current_dir(&bus.dir)
        .env_remove("AGENT_BUS_URL")
        .env_remove("AGENT_BUS_TOKEN")
        .env_remove("AGENT_BUS_CONFIG")
        .env("XDG_CONFIG_HOME", bus.dir.join("config"))
        .env("TERM", "xterm")
        .stdin(Stdio::null());
    let terminal = Spawned::new(script);
    // script copies the terminal to its standard output: the bar, then a tick line.
    terminal.await_stdout(" 40% epoch 2/5", Duration::from_secs(30));
    std::fs::write(&marker, "").unwrap();
    let ran = terminal.finish(support::RUN_DEADLINE);
    assert_eq!(ran.code, 0, "{ran:?}");

    // Piped: the same task, no bar.
    let marker = bus.dir.join("seen-piped");
    let piped = Spawned::new(bus.cli(&[
        "submit",
        "--image",
        "unused",
        "--wait",
        "--",
        "sh",
        "-c",
        &progress_task(&marker),
    ]));
    piped.await_stdout("tick", Duration::from_secs(30));
    let id = piped.stderr_text();
    let id = id
        .split_whitespace()
        .find(|word| word.len() == 36 && word.matches('-').count() == 4)
        .unwrap_or_else(|| panic!("no task id in {id}"))
        .to_owned();
    // The progress is stored; the CLI reads it before any tick written later.
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    poll_until("the progress report", Duration::from_secs(30), || {
        let mut response = agent
            .get(format!(
                "{}/v1/tasks/{id}/events?include=progress",
                bus.base
            ))
            .header("Authorization", format!("Bearer {}", bus.key))
            .call()
            .ok()?;
        let text = response.body_mut().read_to_string().ok()?;
        text.contains("event: progress").then_some(())
    });
    let ticks = piped.stdout_text().matches("tick").count();
    piped.await_stdout_count("tick", ticks + 2, Duration::from_secs(30));
    std::fs::write(&marker, "").unwrap();
    let ran = piped.finish(support::RUN_DEADLINE);
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(
        !ran.stderr.contains('%') && !ran.stderr.contains('\r'),
        "{ran:?}"
    );
}

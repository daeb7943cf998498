//! `agent-bus submit`: the task file (`-f`, YAML or JSON) and the flags, turned into the
//! JSON body of `POST /v1/tasks` (the dispatcher's `Submission`: `name`, `image`,
//! `command`, `args`, `env`, `resources.{cpu,memory,gpu.{class,count}}`,
//! `timeout_seconds`, `max_retries`, `queue`, `priority`, `labels`, `webhook.url`).
//!
//! Invariants: [`build`] is pure; a flag overrides the file's field (for `env` and
//! `labels`, the file's key of the same name); the dispatcher validates the result, so
//! this module checks only what it must parse.

use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

/// `--gpu CLASS[:N]`: a GPU class and a count (1 when not given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gpu {
    pub(crate) class: String,
    pub(crate) count: u32,
}

pub(crate) fn parse_gpu(text: &str) -> Result<Gpu, String> {
    let (class, count) = match text.split_once(':') {
        Some((class, count)) => {
            let count = count
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("'{count}' is not a GPU count of at least 1"))?;
            (class, count)
        }
        None => (text, 1),
    };
    if class.is_empty() {
        return Err("expected CLASS or CLASS:N, e.g. a100 or a100:2".to_owned());
    }
    Ok(Gpu {
        class: class.to_owned(),
        count,
    })
}

/// `KEY=VALUE` (`--env`, `--label`); the value may be empty or hold `=`.
pub(crate) fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

/// `--env-secret KEY=SECRET:KEY`: a variable set from a key of one of the tenant's
/// secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EnvSecret {
    pub(crate) name: String,
    pub(crate) secret: String,
    pub(crate) key: String,
}

pub(crate) fn parse_env_secret(text: &str) -> Result<EnvSecret, String> {
    let usage = || format!("'{text}' is not NAME=SECRET:KEY");
    let (name, reference) = parse_pair(text).map_err(|_| usage())?;
    match reference.split_once(':') {
        Some((secret, key)) if !secret.is_empty() && !key.is_empty() => Ok(EnvSecret {
            name,
            secret: secret.to_owned(),
            key: key.to_owned(),
        }),
        _ => Err(usage()),
    }
}

/// A duration in whole seconds: `90`, `90s`, `5m`, `1h30m`, `2h`, `1d`.
pub(crate) fn parse_seconds(text: &str) -> Result<u32, String> {
    if let Ok(seconds) = text.parse::<u32>() {
        return Ok(seconds);
    }
    let span: jiff::SignedDuration = text
        .parse()
        .map_err(|_| format!("'{text}' is not a duration such as 90, 90s, 5m or 1h30m"))?;
    u32::try_from(span.as_secs())
        .ok()
        .filter(|_| span.subsec_nanos() == 0)
        .ok_or_else(|| format!("'{text}' is not a whole, positive number of seconds"))
}

/// What the flags of `submit` set; `None` and empty leave the file's value.
#[derive(Debug, Clone, Default)]
pub(crate) struct Overrides {
    pub(crate) name: Option<String>,
    pub(crate) image: Option<String>,
    pub(crate) cpu: Option<String>,
    pub(crate) memory: Option<String>,
    pub(crate) gpu: Option<Gpu>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) env_secrets: Vec<EnvSecret>,
    pub(crate) retries: Option<u32>,
    pub(crate) timeout_seconds: Option<u32>,
    pub(crate) queue: Option<String>,
    pub(crate) priority: Option<i32>,
    pub(crate) labels: Vec<(String, String)>,
    pub(crate) webhook: Option<String>,
    /// The command after `--`: replaces the file's `command` and `args`.
    pub(crate) command: Vec<String>,
}

/// Parses a task file's text: YAML, of which JSON is a subset.
pub(crate) fn parse_file(source: &str, text: &str) -> Result<Value> {
    let value: Value = crate::yaml::from_str(text)
        .map_err(|e| Error::usage(format!("task file {source}: {e}")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(Error::usage(format!(
            "task file {source}: must be a mapping of the task's fields (name, image, command, ...)"
        )))
    }
}

/// The submission: the file's fields (or none), with the flags on top.
pub(crate) fn build(file: Option<Value>, flags: Overrides) -> Result<Value> {
    let mut task = match file {
        Some(Value::Object(map)) => map,
        Some(_) => return Err(Error::usage("the task file must be a mapping")),
        None => Map::new(),
    };
    let mut set = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            task.insert(key.to_owned(), value);
        }
    };
    set("name", flags.name.map(Value::from));
    set("image", flags.image.map(Value::from));
    set("max_retries", flags.retries.map(Value::from));
    set("timeout_seconds", flags.timeout_seconds.map(Value::from));
    set("queue", flags.queue.map(Value::from));
    set("priority", flags.priority.map(Value::from));
    set("webhook", flags.webhook.map(|url| json!({"url": url})));
    if !flags.command.is_empty() {
        task.insert("command".to_owned(), Value::from(flags.command));
        task.remove("args");
    }

    if flags.cpu.is_some() || flags.memory.is_some() || flags.gpu.is_some() {
        let resources = object_at(&mut task, "resources")?;
        if let Some(cpu) = flags.cpu {
            resources.insert("cpu".to_owned(), Value::from(cpu));
        }
        if let Some(memory) = flags.memory {
            resources.insert("memory".to_owned(), Value::from(memory));
        }
        if let Some(gpu) = flags.gpu {
            let entry = object_at(resources, "gpu")?;
            entry.insert("class".to_owned(), Value::from(gpu.class));
            entry.insert("count".to_owned(), Value::from(gpu.count));
        }
    }
    if !flags.env.is_empty() || !flags.env_secrets.is_empty() {
        let env = object_at(&mut task, "env")?;
        for (name, value) in flags.env {
            env.insert(name, Value::from(value));
        }
        for secret in flags.env_secrets {
            env.insert(
                secret.name,
                json!({"secret": secret.secret, "key": secret.key}),
            );
        }
    }
    if !flags.labels.is_empty() {
        let labels = object_at(&mut task, "labels")?;
        for (key, value) in flags.labels {
            labels.insert(key, Value::from(value));
        }
    }
    if !task.contains_key("name")
        && let Some(name) = task
            .get("command")
            .and_then(|c| c.get(0))
            .and_then(Value::as_str)
            .and_then(name_from_program)
    {
        task.insert("name".to_owned(), Value::from(name));
    }
    Ok(Value::Object(task))
}

/// The object at `key` of `map`, created when missing.
fn object_at<'a>(map: &'a mut Map<String, Value>, key: &str) -> Result<&'a mut Map<String, Value>> {
    map.entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| Error::usage(format!("task file: '{key}' must be a mapping")))
}

/// A default task name from the program's file name (`/usr/bin/python3` → `python3`),
/// when it makes a DNS label.
fn name_from_program(program: &str) -> Option<String> {
    let base = program.rsplit('/').next()?.to_ascii_lowercase();
    let name: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let name = name.trim_matches('-').to_owned();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_flags_name_a_class_and_a_count() {
        assert_eq!(
            parse_gpu("a100:2"),
            Ok(Gpu {
                class: "a100".into(),
                count: 2
            })
        );
        assert_eq!(
            parse_gpu("h100"),
            Ok(Gpu {
                class: "h100".into(),
                count: 1
            })
        );
        assert!(parse_gpu("a100:0").is_err());
        assert!(parse_gpu("a100:two").is_err());
        assert!(parse_gpu(":2").is_err());
    }

    #[test]
    fn env_flags_are_pairs_and_secret_references() {
        assert_eq!(parse_pair("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_pair("EMPTY="), Ok(("EMPTY".into(), String::new())));
        assert!(parse_pair("=x").is_err());
        assert!(parse_pair("NOVALUE").is_err());
        assert_eq!(
            parse_env_secret("OPENAI_API_KEY=openai:token"),
            Ok(EnvSecret {
                name: "OPENAI_API_KEY".into(),
                secret: "openai".into(),
                key: "token".into()
            })
        );
        assert!(parse_env_secret("K=openai").is_err());
        assert!(parse_env_secret("K=:token").is_err());
    }

    #[test]
    fn durations_are_seconds_or_friendly() {
        assert_eq!(parse_seconds("90"), Ok(90));
        assert_eq!(parse_seconds("90s"), Ok(90));
        assert_eq!(parse_seconds("5m"), Ok(300));
        assert_eq!(parse_seconds("1h30m"), Ok(5400));
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("-5m").is_err());
        assert!(parse_seconds("1.5s").is_err());
    }

    #[test]
    fn flags_build_the_submission() {
        let flags = Overrides {
            name: Some("train".into()),
            image: Some("pytorch/pytorch:2.5".into()),
            cpu: Some("4".into()),
            memory: Some("16Gi".into()),
            gpu: Some(parse_gpu("a100:2").unwrap()),
            env: vec![("EPOCHS".into(), "3".into())],
            env_secrets: vec![parse_env_secret("HF_TOKEN=hf:token").unwrap()],
            retries: Some(2),
            timeout_seconds: Some(3600),
            queue: Some("gpu".into()),
            priority: Some(5),
            labels: vec![("team.example.com/owner".into(), "ml".into())],
            webhook: Some("https://hooks.example.com/bus".into()),
            command: vec!["python".into(), "train.py".into()],
        };
        assert_eq!(
            build(None, flags).unwrap(),
            json!({
                "name": "train", "image": "pytorch/pytorch:2.5",
                "command": ["python", "train.py"],
                "resources": {"cpu": "4", "memory": "16Gi", "gpu": {"class": "a100", "count": 2}},
                "env": {"EPOCHS": "3", "HF_TOKEN": {"secret": "hf", "key": "token"}},
                "max_retries": 2, "timeout_seconds": 3600, "queue": "gpu", "priority": 5,
                "labels": {"team.example.com/owner": "ml"},
                "webhook": {"url": "https://hooks.example.com/bus"}
            })
        );
    }

    #[test]
    fn flags_override_the_file_and_merge_into_its_maps() {
        let file = parse_file(
            "task.yaml",
            "name: from-file\nimage: busybox\ncommand: [sh, -c]\nargs: ['echo hi']\n\
             env: {A: file, B: file}\nresources: {cpu: '1', gpu: {class: t4, count: 1, allow_fallback: false}}\n",
        )
        .unwrap();
        let flags = Overrides {
            image: Some("alpine".into()),
            env: vec![("B".into(), "flag".into())],
            gpu: Some(parse_gpu("a100:4").unwrap()),
            ..Overrides::default()
        };
        assert_eq!(
            build(Some(file.clone()), flags).unwrap(),
            json!({
                "name": "from-file", "image": "alpine", "command": ["sh", "-c"], "args": ["echo hi"],
                "env": {"A": "file", "B": "flag"},
                "resources": {"cpu": "1", "gpu": {"class": "a100", "count": 4, "allow_fallback": false}}
            })
        );
        let flags = Overrides {
            command: vec!["true".into()],
            ..Overrides::default()
        };
        let built = build(Some(file), flags).unwrap();
        assert_eq!(built["command"], json!(["true"]));
        assert!(
            built.get("args").is_none(),
            "a command after -- replaces the file's args too"
        );
    }

    #[test]
    fn json_files_parse_and_other_shapes_are_refused() {
        let file = parse_file("t.json", r#"{"name": "j", "command": ["true"]}"#).unwrap();
        assert_eq!(file["name"], "j");
        assert!(parse_file("t.yaml", "- a\n- b\n").is_err());
        assert!(parse_file("t.yaml", "name: [unclosed\n").is_err());
    }

    #[test]
    fn a_missing_name_comes_from_the_program() {
        let flags = Overrides {
            command: vec!["/usr/bin/Python3.12".into(), "x.py".into()],
            ..Overrides::default()
        };
        assert_eq!(build(None, flags).unwrap()["name"], "python3-12");
    }
}

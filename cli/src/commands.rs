//! What each subcommand does: reads the API through [`Client`] and prints through
//! [`crate::view`]. Returns the process's exit code.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::{
    Cli, Command, ConfigCommand, Format, GroupBy, ListArgs, ListFormat, LogsArgs, SubmitArgs,
    UsageArgs, WaitArgs,
};
use crate::client::{Client, DEFAULT_SERVER};
use crate::config::{ConfigFile, Context, default_path, resolve};
use crate::error::{Error, Result, write_err, write_out};
use crate::sse::{StateEvent, TaskEvent, read_events};
use crate::submit::{Overrides, build, parse_file};
use crate::view::{self, Task};
use crate::wait::{WaitOptions, copy_stream, state_line, wait};
use crate::{exit, sse};

/// Where `set-context` may take its server and token from: only what was typed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Typed {
    pub(crate) server: bool,
    pub(crate) token: bool,
}

pub(crate) fn run(cli: Cli, typed: Typed) -> Result<u8> {
    let config_path = cli.config.clone().or_else(|| {
        let xdg = std::env::var_os("XDG_CONFIG_HOME").map(std::path::PathBuf::from);
        let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
        default_path(xdg.as_deref(), home.as_deref())
    });
    let client = || -> Result<Client> {
        let file = match &config_path {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let context = file.context(cli.context.as_deref())?;
        let (server, token) = resolve(cli.server.clone(), cli.token.clone(), context)?;
        Client::new(&server, token)
    };
    match cli.command {
        Command::Submit(args) => submit(&client()?, *args),
        Command::Get { id, output } => {
            let task = client()?.get_json(&task_path(&id)?, &[])?;
            match output {
                Some(format) => write_out(&view::structured(&task, format == Format::Yaml)?)?,
                None => write_out(&view::task_summary(
                    &Task::from_value(&task)?,
                    jiff::Timestamp::now(),
                ))?,
            }
            Ok(exit::OK)
        }
        Command::List(args) => list(&client()?, &args),
        Command::Logs(args) => logs(&client()?, &args),
        Command::Events { id, follow, output } => events(&client()?, &id, follow, output),
        Command::Wait { id, wait: args } => {
            let client = client()?;
            task_path(&id)?;
            wait(&client, &id, wait_options(&args))
        }
        Command::Cancel { id } => {
            let client = client()?;
            let path = task_path(&id)?;
            // The answer is the task either way; read first to tell the two apart.
            let before = client.get_json(&path, &[])?;
            let text = match before["state"].as_str() {
                Some(state) if exit::for_task(state, None).is_some() => {
                    format!("task {id} had already ended: {state}\n")
                }
                _ => {
                    let task = client.post_json(&format!("{path}/cancel"), &[], &[], None)?;
                    format!(
                        "task {id} {}\n",
                        task["state"].as_str().unwrap_or("cancelled")
                    )
                }
            };
            write_out(&text)?;
            Ok(exit::OK)
        }
        Command::Usage(args) => usage(&client()?, &args),
        Command::Completion { shell } => {
            let mut script = Vec::new();
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "agent-bus", &mut script);
            write_out(&String::from_utf8_lossy(&script))?;
            Ok(exit::OK)
        }
        Command::Config(command) => {
            let path = config_path.ok_or_else(|| {
                Error::usage("no config file: set HOME or XDG_CONFIG_HOME, or pass --config")
            })?;
            config(
                &path,
                command,
                cli.server.as_ref(),
                cli.token.as_ref(),
                typed,
            )
        }
    }
}

/// `/v1/tasks/{id}`, for an id that cannot change the path's meaning.
fn task_path(id: &str) -> Result<String> {
    let plain = !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if plain {
        Ok(format!("/v1/tasks/{id}"))
    } else {
        Err(Error::usage(format!("'{id}' is not a task id")))
    }
}

fn wait_options(args: &WaitArgs) -> WaitOptions {
    WaitOptions {
        reconnect_for: Duration::from_secs(u64::from(args.reconnect_for)),
        states: !args.quiet,
    }
}

fn submit(client: &Client, args: SubmitArgs) -> Result<u8> {
    let file = match &args.file {
        Some(path) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|e| {
                Error::Io {
                    what: "reading the task from standard input".into(),
                    source: e,
                }
            })?;
            Some(parse_file("(standard input)", &text)?)
        }
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
                what: format!("task file {}", path.display()),
                source: e,
            })?;
            Some(parse_file(&path.display().to_string(), &text)?)
        }
        None => None,
    };
    let body = build(
        file,
        Overrides {
            name: args.name,
            image: args.image,
            cpu: args.cpu,
            memory: args.memory,
            gpu: args.gpu,
            env: args.env,
            env_secrets: args.env_secret,
            retries: args.retries,
            timeout_seconds: args.timeout,
            queue: args.queue,
            priority: args.priority,
            labels: args.label,
            webhook: args.webhook,
            command: args.command,
        },
    )?;
    let mut headers = Vec::new();
    if let Some(key) = &args.idempotency_key {
        headers.push(("idempotency-key", key.as_str()));
    }
    let query: Vec<(&str, String)> = if args.dry_run {
        vec![("dry_run", "true".to_owned())]
    } else {
        Vec::new()
    };
    let answer = client.post_json("/v1/tasks", &query, &headers, Some(&body))?;
    if args.dry_run {
        write_out(&view::structured(
            &answer,
            args.output != Some(Format::Json),
        )?)?;
        return Ok(exit::OK);
    }
    let id = answer["id"].as_str().unwrap_or_default().to_owned();
    match args.output {
        Some(format) => write_out(&view::structured(&answer, format == Format::Yaml)?)?,
        None if args.wait => write_err(&format!(
            "agent-bus: task {id} ({}) submitted\n",
            answer["name"].as_str().unwrap_or_default()
        )),
        None => write_out(&format!("{id}\n"))?,
    }
    if args.wait {
        task_path(&id)?;
        return wait(client, &id, wait_options(&args.wait_args));
    }
    Ok(exit::OK)
}

fn list(client: &Client, args: &ListArgs) -> Result<u8> {
    const MAX_PAGE: u32 = 500;
    let mut items = Vec::new();
    let mut cursor = args.cursor.clone();
    let wanted = if args.all { u32::MAX } else { args.limit };
    loop {
        let left = wanted.saturating_sub(items.len() as u32);
        let mut query = vec![("limit", left.min(MAX_PAGE).to_string())];
        // The tables need only the summaries; whole tasks only when asked for.
        if args.full {
            query.push(("view", "full".to_owned()));
        }
        for (key, value) in [
            ("state", &args.state),
            ("queue", &args.queue),
            ("label", &args.selector),
            ("cursor", &cursor),
        ] {
            if let Some(value) = value {
                query.push((key, value.clone()));
            }
        }
        let mut page = client.get_json("/v1/tasks", &query)?;
        if let Some(Value::Array(page_items)) = page.get_mut("items").map(Value::take) {
            items.extend(page_items);
        }
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() || items.len() as u32 >= wanted {
            break;
        }
    }
    match args.output {
        Some(ListFormat::Json | ListFormat::Yaml) => {
            let mut answer = json!({ "items": items });
            if let Some(cursor) = &cursor {
                answer["next_cursor"] = Value::from(cursor.clone());
            }
            write_out(&view::structured(
                &answer,
                args.output == Some(ListFormat::Yaml),
            )?)?;
        }
        format => {
            let tasks = items
                .iter()
                .map(Task::from_value)
                .collect::<Result<Vec<_>>>()?;
            write_out(&view::task_table(
                &tasks,
                jiff::Timestamp::now(),
                format == Some(ListFormat::Wide),
            ))?;
            if let Some(cursor) = cursor {
                write_err(&format!(
                    "agent-bus: more tasks: agent-bus list --cursor {cursor}\n"
                ));
            }
        }
    }
    Ok(exit::OK)
}

fn logs(client: &Client, args: &LogsArgs) -> Result<u8> {
    let mut query = Vec::new();
    if let Some(attempt) = args.attempt {
        query.push(("attempt", attempt.to_string()));
    }
    if let Some(tail) = args.tail {
        query.push(("tail", tail.to_string()));
    }
    if let Some(since) = &args.since {
        query.push(("since", since.clone()));
    }
    if args.timestamps {
        query.push(("timestamps", "true".to_owned()));
    }
    if args.follow {
        query.push(("follow", "true".to_owned()));
    }
    let reader = client.stream(
        &format!("{}/logs", task_path(&args.id)?),
        &query,
        args.follow,
    )?;
    copy_stream(client, reader)?;
    Ok(exit::OK)
}

fn events(client: &Client, id: &str, follow: bool, output: Option<Format>) -> Result<u8> {
    let path = format!("{}/events", task_path(id)?);
    if !follow {
        let answer = client.get_json(&path, &[])?;
        if let Some(format) = output {
            write_out(&view::structured(&answer, format == Format::Yaml)?)?;
            return Ok(exit::OK);
        }
        let mut text = String::new();
        for item in answer["items"].as_array().into_iter().flatten() {
            let event: StateEvent =
                serde_json::from_value(item.clone()).map_err(|e| Error::Protocol {
                    server: client.server().to_owned(),
                    detail: format!("an event this client cannot read: {e}"),
                })?;
            text.push_str(&state_line(&event, true));
        }
        write_out(&text)?;
        return Ok(exit::OK);
    }
    let reader = client.stream(&path, &[("follow", "true".to_owned())], false)?;
    let mut failure = None;
    let read = read_events(reader, |event| {
        let data = event.data.clone();
        let written = match (TaskEvent::from(event), output) {
            (TaskEvent::State(_), Some(Format::Json)) => write_out(&format!("{data}\n")),
            (TaskEvent::State(_), Some(Format::Yaml)) => {
                let value: Value = serde_json::from_str(&data).unwrap_or_default();
                view::structured(&value, true).and_then(|text| write_out(&format!("---\n{text}")))
            }
            (TaskEvent::State(state), None) => write_out(&state_line(&state, true)),
            _ => Ok(()),
        };
        written.map_err(|e| failure = Some(e)).is_ok()
    });
    if let Some(e) = failure {
        return Err(e);
    }
    read.map_err(|e| match e {
        sse::SseError::Read(io) => Error::Unreachable {
            server: client.server().to_owned(),
            detail: format!("the event stream broke: {io}"),
        },
        other => Error::Protocol {
            server: client.server().to_owned(),
            detail: other.to_string(),
        },
    })?;
    Ok(exit::OK)
}

fn usage(client: &Client, args: &UsageArgs) -> Result<u8> {
    let mut query = vec![(
        "group_by",
        match args.group_by {
            GroupBy::Queue => "queue",
            GroupBy::Day => "day",
        }
        .to_owned(),
    )];
    if let Some(from) = &args.from {
        query.push(("from", from.clone()));
    }
    if let Some(to) = &args.to {
        query.push(("to", to.clone()));
    }
    let answer = client.get_json("/v1/usage", &query)?;
    if let Some(format) = args.output {
        write_out(&view::structured(&answer, format == Format::Yaml)?)?;
        return Ok(exit::OK);
    }
    write_out(&view::usage_text(&answer))?;
    Ok(exit::OK)
}

fn config(
    path: &std::path::Path,
    command: ConfigCommand,
    server: Option<&String>,
    token: Option<&String>,
    typed: Typed,
) -> Result<u8> {
    let mut file = ConfigFile::load(path)?;
    match command {
        ConfigCommand::SetContext { name } => {
            let context = file
                .contexts
                .entry(name.clone())
                .or_insert_with(Context::default);
            if typed.server {
                context.server = server.cloned();
            }
            if typed.token {
                context.token = token.cloned();
            }
            if file.current_context.is_none() {
                file.current_context = Some(name.clone());
            }
            file.save(path)?;
            write_out(&format!("context {name} saved in {}\n", path.display()))?;
        }
        ConfigCommand::UseContext { name } => {
            file.context(Some(&name))?;
            file.current_context = Some(name.clone());
            file.save(path)?;
            write_out(&format!("current context: {name}\n"))?;
        }
        ConfigCommand::GetContexts => {
            let rows = file
                .contexts
                .iter()
                .map(|(name, context)| {
                    vec![
                        if file.current_context.as_deref() == Some(name) {
                            "*".to_owned()
                        } else {
                            String::new()
                        },
                        name.clone(),
                        context
                            .server
                            .clone()
                            .unwrap_or_else(|| DEFAULT_SERVER.to_owned()),
                        if context.token.is_some() { "yes" } else { "no" }.to_owned(),
                    ]
                })
                .collect();
            write_out(&view::plain_table(
                &["CURRENT", "NAME", "SERVER", "TOKEN"],
                rows,
            ))?;
        }
        ConfigCommand::CurrentContext => match &file.current_context {
            Some(name) => write_out(&format!("{name}\n"))?,
            None => return Err(Error::usage("no current context")),
        },
        ConfigCommand::DeleteContext { name } => {
            if file.contexts.remove(&name).is_none() {
                return Err(Error::usage(format!("no context '{name}'")));
            }
            if file.current_context.as_deref() == Some(&name) {
                file.current_context = None;
            }
            file.save(path)?;
            write_out(&format!("context {name} deleted\n"))?;
        }
    }
    Ok(exit::OK)
}

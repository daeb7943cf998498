//! The config file (`$XDG_CONFIG_HOME/agent-bus/config.yaml`, else
//! `~/.config/agent-bus/config.yaml`, or `--config`): named contexts, each a server and a
//! token, and the current one, like kubectl's. And the resolution of the server and token
//! a command uses: flag, then environment variable (clap merges those two), then the
//! context, then the dispatcher's default address.
//!
//! Invariants: the file is written whole (a temporary file renamed over it) and readable
//! by its owner only (0600), since it holds API keys; its folder is created 0700.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::{DEFAULT_SERVER, Token};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) current_context: Option<String>,
    #[serde(default)]
    pub(crate) contexts: BTreeMap<String, Context>,
}

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Context {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token: Option<String>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Where the config file is when `--config` names none: `$XDG_CONFIG_HOME` or `$HOME`'s
/// `.config`; `None` when neither is set.
pub(crate) fn default_path(xdg_config_home: Option<&Path>, home: Option<&Path>) -> Option<PathBuf> {
    let base = match xdg_config_home.filter(|p| p.is_absolute()) {
        Some(dir) => dir.to_path_buf(),
        None => home?.join(".config"),
    };
    Some(base.join("agent-bus").join("config.yaml"))
}

fn config_error(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::Config {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

impl ConfigFile {
    /// Reads `path`; a missing file is an empty config.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(config_error(path, e)),
        };
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        crate::yaml::from_str(&text).map_err(|e| config_error(path, e))
    }

    /// Writes the whole file, 0600, through a temporary file in the same folder.
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| config_error(path, e))?;
        let text = crate::yaml::to_string(self).map_err(|e| config_error(path, e))?;
        let temporary = dir.join(format!(".config.yaml.{}", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .and_then(|mut file| {
                // An older file of that name may have other permissions.
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                file.write_all(text.as_bytes())?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&temporary, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(config_error(path, e));
        }
        Ok(())
    }

    /// The context `name` (the current one when `None`); `Ok(None)` when no context is
    /// current. Naming a context that does not exist is an error.
    pub(crate) fn context(&self, name: Option<&str>) -> Result<Option<&Context>> {
        let Some(name) = name.or(self.current_context.as_deref()) else {
            return Ok(None);
        };
        self.contexts.get(name).map(Some).ok_or_else(|| {
            Error::usage(format!(
                "no context '{name}' in the config file (agent-bus config get-contexts lists them)"
            ))
        })
    }
}

/// The server and token a command uses: `flag_or_env` first (clap has put a flag before
/// its environment variable), then the context.
pub(crate) fn resolve(
    server_flag_or_env: Option<String>,
    token_flag_or_env: Option<String>,
    context: Option<&Context>,
) -> Result<(String, Token)> {
    let server = server_flag_or_env
        .or_else(|| context.and_then(|c| c.server.clone()))
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    let token = token_flag_or_env
        .or_else(|| context.and_then(|c| c.token.clone()))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Error::usage(
                "no API key: pass --token, set AGENT_BUS_TOKEN, or save one with \
                 `agent-bus config set-context NAME --server URL --token KEY`",
            )
        })?;
    Ok((server, Token(token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(server: &str, token: &str) -> Context {
        Context {
            server: Some(server.into()),
            token: Some(token.into()),
        }
    }

    #[test]
    fn a_flag_or_variable_wins_over_the_context() {
        let ctx = context("http://ctx:1", "ctx-key");
        let (server, token) = resolve(None, None, Some(&ctx)).unwrap();
        assert_eq!(
            (server.as_str(), token.0.as_str()),
            ("http://ctx:1", "ctx-key")
        );
        let (server, token) = resolve(
            Some("http://flag:2".into()),
            Some("flag-key".into()),
            Some(&ctx),
        )
        .unwrap();
        assert_eq!(
            (server.as_str(), token.0.as_str()),
            ("http://flag:2", "flag-key")
        );
        let (server, _) = resolve(None, Some("k".into()), None).unwrap();
        assert_eq!(server, DEFAULT_SERVER);
        let error = resolve(None, None, None).unwrap_err();
        assert!(error.to_string().contains("AGENT_BUS_TOKEN"), "{error}");
    }

    #[test]
    fn the_file_lives_under_xdg_config_home_or_home() {
        assert_eq!(
            default_path(Some(Path::new("/x")), Some(Path::new("/home/u"))),
            Some(PathBuf::from("/x/agent-bus/config.yaml"))
        );
        assert_eq!(
            default_path(Some(Path::new("relative")), Some(Path::new("/home/u"))),
            Some(PathBuf::from("/home/u/.config/agent-bus/config.yaml"))
        );
        assert_eq!(default_path(None, None), None);
    }

    #[test]
    fn contexts_round_trip_through_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("agent-bus-cli-config-{}", std::process::id()));
        let path = dir.join("nested").join("config.yaml");
        let mut config = ConfigFile::load(&path).unwrap();
        assert_eq!(config, ConfigFile::default());
        config
            .contexts
            .insert("local".into(), context("http://127.0.0.1:8080", "k1"));
        config.current_context = Some("local".into());
        config.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = ConfigFile::load(&path).unwrap();
        assert_eq!(again, config);
        assert_eq!(
            again.context(None).unwrap().and_then(|c| c.token.clone()),
            Some("k1".into())
        );
        assert!(again.context(Some("prod")).is_err());
        assert!(!format!("{again:?}").contains("k1"), "Debug hides tokens");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

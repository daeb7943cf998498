//! A fresh PostgreSQL database per test, on the server in `DATABASE_URL`.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;
use sqlx::{Connection as _, PgConnection};

use crate::{EnvError, env_var, unique_suffix};

/// A database that exists for one test.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// The database's name (`test_<random>`).
    pub name: String,
    /// A connection URL for it.
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates an empty database on the server of `DATABASE_URL`.
    pub async fn create() -> Result<Self, EnvError> {
        let admin_url = env_var("DATABASE_URL")?;
        let name = format!("test_{}", unique_suffix());
        let mut admin = connect(&admin_url).await?;
        // The name is ours (`test_` and hex), never user input.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .map_err(|source| EnvError::Postgres {
                url: admin_url.clone(),
                source,
            })?;
        let _ = admin.close().await;
        let url = with_database_name(&admin_url, &name);
        Ok(Self {
            name,
            url,
            admin_url,
        })
    }

    /// Drops the database, ending any connection still open to it.
    pub async fn drop_database(&self) -> Result<(), EnvError> {
        let mut admin = connect(&self.admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        )))
        .execute(&mut admin)
        .await
        .map_err(|source| EnvError::Postgres {
            url: self.admin_url.clone(),
            source,
        })?;
        let _ = admin.close().await;
        Ok(())
    }
}

async fn connect(url: &str) -> Result<PgConnection, EnvError> {
    PgConnection::connect(url)
        .await
        .map_err(|source| EnvError::Postgres {
            url: url.to_owned(),
            source,
        })
}

/// `postgres://u@h:p/old?x=y` with the database `name` instead of `old`.
fn with_database_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

/// Runs `body` with a fresh database and drops it afterwards, whatever the outcome.
pub async fn with_database<F, Fut, T>(body: F) -> T
where
    F: FnOnce(TestDatabase) -> Fut,
    Fut: Future<Output = T>,
{
    let database = TestDatabase::create()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let outcome = AssertUnwindSafe(body(database.clone()))
        .catch_unwind()
        .await;
    if let Err(e) = database.drop_database().await {
        eprintln!("warning: dropping test database {}: {e}", database.name);
    }
    match outcome {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[cfg(test)]
mod tests {
    use super::with_database_name;

    #[test]
    fn replaces_the_database_and_keeps_the_rest() {
        assert_eq!(
            with_database_name("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database_name("postgres://u:p@h:1/db?sslmode=disable", "t2"),
            "postgres://u:p@h:1/t2?sslmode=disable"
        );
        assert_eq!(
            with_database_name("postgres://h:1", "t3"),
            "postgres://h:1/t3"
        );
    }
}

/// A PostgreSQL server of the test's own, for tests that stop and start it (an outage
/// must not disturb the shared server other tests use). Uses Debian's binaries, as
/// `tests/env/up` does; runs as the `postgres` user when the tests run as root.
#[derive(Debug)]
pub struct PrivatePostgres {
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    /// Initialises a data folder and starts the server on a free loopback port.
    #[must_use]
    pub fn start() -> Self {
        let bin = crate::postgres_bin().expect(
            "a PostgreSQL bin folder under /usr/lib/postgresql (installed by tests/env/up)",
        );
        let dir = std::env::temp_dir().join(format!("agent-bus-pg-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Self { dir, bin, port };
        server.chown();
        server.run(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        server.start_again();
        server
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn is_root() -> bool {
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
    }

    fn chown(&self) {
        if Self::is_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir)
                .status()
                .unwrap();
            assert!(status.success());
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut command = if Self::is_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            std::process::Command::new(&path)
        };
        let output = command.args(args).output().unwrap();
        assert!(
            output.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A connection URL for the `postgres` database.
    #[must_use]
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        );
    }

    /// Stops the server at once (fast shutdown: open connections are cut).
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if Self::is_root() {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .output()
        } else {
            std::process::Command::new(&path).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

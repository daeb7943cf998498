//! Who the local executor's tasks run as, and the folders they run in.
//!
//! As root, each tenant's tasks run as a user and group of their own: uid = gid =
//! `--local-task-uid-base` + the tenant's slot (given once per tenant name and never
//! to another, see `Store::local_task_slot`), with no supplementary groups (the standard
//! library drops them when it changes the uid as root). No `/etc/passwd` entry is
//! needed. The folders:
//!
//! ```text
//! <work root>/                     root, 0711: anyone may pass, nobody but root lists or writes
//!   <tenant>/                      root, group = the tenant's, 0710: only its tasks pass
//!     <task id>-<attempt>/         the tenant's user, 0700: the task's HOME and working folder
//! ```
//!
//! Invariants: no task can write where the dispatcher creates, changes the owner of or
//! reads a path by name, except inside its own attempt folder, whose termination log is
//! read without following links and bounded; so a task cannot plant a link that makes
//! the dispatcher act on another file. Without root, every task runs as the dispatcher's
//! own user, which isolates nothing: the dispatcher then serves one tenant on loopback
//! only unless `--local-executor-shared-user` says otherwise
//! ([`shared_user_refusal`]).

use std::fs::{DirBuilder, Permissions};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Who tasks run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskUsers {
    /// The dispatcher is root: each tenant's tasks run as `uid_base + slot`.
    PerTenant { uid_base: u32 },
    /// Tasks run as the dispatcher's own user; `more_tenants` when
    /// `--local-executor-shared-user` accepts that for more than one tenant.
    Shared { more_tenants: bool },
}

/// The user and group one task runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskUser {
    pub uid: u32,
    pub gid: u32,
}

/// The highest user id handed out: 2^32 - 2 and - 1 mean "no id" to the kernel.
const MAX_TASK_UID: u32 = u32::MAX - 2;

impl TaskUser {
    /// The user of the tenant in `slot` above `uid_base`; `None` past the id range.
    #[must_use]
    pub fn of_slot(uid_base: u32, slot: u32) -> Option<Self> {
        uid_base
            .checked_add(slot)
            .filter(|uid| *uid <= MAX_TASK_UID && *uid != 0)
            .map(|uid| Self { uid, gid: uid })
    }
}

/// Why a folder could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("preparing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is writable by other users (mode {mode:o}): the local executor's work folder (--local-workdir) must not be",
        path.display()
    )]
    OpenRoot { path: PathBuf, mode: u32 },
    #[error("{} is not a folder (a link or a file is in the way)", path.display())]
    NotAFolder { path: PathBuf },
    #[error("tenant name '{0}' cannot name a folder")]
    TenantName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IsolationError + '_ {
    move |source| IsolationError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Why a dispatcher that is not root must not serve (`None`: it may): it listens
/// beyond loopback, or it has more than one tenant, and `--local-executor-shared-user`
/// was not given.
#[must_use]
pub fn shared_user_refusal(listen: SocketAddr, tenants: u64) -> Option<String> {
    if listen.ip().is_loopback() {
        too_many_tenants(tenants)
    } else {
        Some(refusal(&format!("it listens on {listen}, beyond loopback")))
    }
}

/// Why a dispatcher that is not root must not run a task (`None`: it may), for
/// `tenants` tenants and no `--local-executor-shared-user`.
#[must_use]
pub fn too_many_tenants(tenants: u64) -> Option<String> {
    (tenants > 1).then(|| refusal(&format!("it has {tenants} tenants")))
}

fn refusal(why: &str) -> String {
    format!(
        "the local executor refuses to serve: the dispatcher is not root, so every task would run as the dispatcher's own user and could read its database, its report-token key and every other task's files, and {why}. Run it as root (each tenant's tasks then run as a user of their own), listen on loopback with one tenant, or pass --local-executor-shared-user to accept tasks sharing one user"
    )
}

/// Creates the work root (if missing) and makes it root's 0711 when tasks get users of
/// their own; refuses a folder others may write to. Returns it absolute.
pub fn prepare_root(path: &Path, users: TaskUsers) -> Result<PathBuf, IsolationError> {
    let path = std::path::absolute(path).map_err(io(path))?;
    let created = match DirBuilder::new().mode(0o700).create(&path) {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::AlreadyExists => false,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // The folders made above it are 0755 whatever the umask (the dispatcher's is
            // 077): task users must pass them.
            let mut missing: Vec<&Path> = path
                .ancestors()
                .take_while(|folder| {
                    std::fs::symlink_metadata(folder)
                        .is_err_and(|e| e.kind() == ErrorKind::NotFound)
                })
                .collect();
            missing.reverse();
            for folder in missing {
                match DirBuilder::new().mode(0o755).create(folder) {
                    Ok(()) => std::fs::set_permissions(folder, Permissions::from_mode(0o755))
                        .map_err(io(folder))?,
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io(folder)(e)),
                }
            }
            true
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
    if !meta.is_dir() {
        return Err(IsolationError::NotAFolder { path });
    }
    let mode = meta.mode() & 0o7777;
    if !created && mode & 0o022 != 0 {
        return Err(IsolationError::OpenRoot { path, mode });
    }
    if let TaskUsers::PerTenant { .. } = users {
        std::os::unix::fs::chown(&path, Some(0), Some(0)).map_err(io(&path))?;
        std::fs::set_permissions(&path, Permissions::from_mode(0o711)).map_err(io(&path))?;
    } else {
        // A root left by a dispatcher that ran as root is not ours to write in: say so
        // now rather than at every launch.
        nix::unistd::access(
            &path,
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .map_err(|errno| io(&path)(std::io::Error::from(errno)))?;
    }
    Ok(path)
}

/// The runner's copy in the work root, where every task user can run it (`.runner`:
/// tenant names are RFC 1123 labels, so no tenant folder has this name).
const RUNNER_COPY: &str = ".runner";

/// With a user per tenant, copies `runner` into `root` (from [`prepare_root`]) as root's
/// 0755 and returns the copy, so tasks can run it wherever the build put it (a target
/// folder under a home that is 0700, for one); tasks cannot change it, since the root
/// is root's 0711. Shared: `runner` as it is. The copy is written beside and renamed
/// over the last one, so a task starting meanwhile runs one or the other, never half.
pub fn install_runner(
    root: &Path,
    runner: &Path,
    users: TaskUsers,
) -> Result<PathBuf, IsolationError> {
    if let TaskUsers::Shared { .. } = users {
        return Ok(runner.to_owned());
    }
    let copy = root.join(RUNNER_COPY);
    let partial = root.join(format!("{RUNNER_COPY}.{}", std::process::id()));
    std::fs::copy(runner, &partial).map_err(io(runner))?;
    std::os::unix::fs::chown(&partial, Some(0), Some(0)).map_err(io(&partial))?;
    std::fs::set_permissions(&partial, Permissions::from_mode(0o755)).map_err(io(&partial))?;
    std::fs::rename(&partial, &copy).map_err(io(&copy))?;
    Ok(copy)
}

/// The first folder from `/` down to `path` that other users may not pass (no o+x),
/// if any: a task user cannot reach a work root below it.
#[must_use]
pub fn closed_to_others(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .find(|folder| {
            std::fs::metadata(folder).is_ok_and(|meta| meta.is_dir() && meta.mode() & 0o001 == 0)
        })
        .map(Path::to_owned)
}

/// Creates `path` as a folder with `mode` unless it is one already; a link or a file in
/// its place is refused.
fn folder(path: &Path, mode: u32) -> Result<(), IsolationError> {
    match DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
            if meta.is_dir() {
                Ok(())
            } else {
                Err(IsolationError::NotAFolder {
                    path: path.to_owned(),
                })
            }
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// The folder attempt `name` of a task of `tenant` runs in, under `root` (from
/// [`prepare_root`]): created if missing, owned by `user` when tasks have users of
/// their own.
pub fn attempt_folder(
    root: &Path,
    tenant: &str,
    name: &str,
    user: Option<TaskUser>,
) -> Result<PathBuf, IsolationError> {
    let component = |text: &str| {
        !(text.is_empty() || text == "." || text == ".." || text.contains(['/', '\0']))
    };
    if !component(tenant) {
        return Err(IsolationError::TenantName(tenant.to_owned()));
    }
    if !component(name) {
        return Err(IsolationError::TenantName(name.to_owned()));
    }
    let tenant_dir = root.join(tenant);
    let dir = tenant_dir.join(name);
    let Some(user) = user else {
        // Sharing the dispatcher's user isolates nothing; an executor built without
        // `prepare_root` (tests of the executor alone) has its root made here.
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tenant_dir)
            .map_err(io(&tenant_dir))?;
        folder(&dir, 0o700)?;
        return Ok(dir);
    };
    folder(&tenant_dir, 0o710)?;
    // Set every time: a folder made before this tenant had its user, or by an older
    // dispatcher, is put right.
    std::os::unix::fs::chown(&tenant_dir, Some(0), Some(user.gid)).map_err(io(&tenant_dir))?;
    std::fs::set_permissions(&tenant_dir, Permissions::from_mode(0o710))
        .map_err(io(&tenant_dir))?;
    folder(&dir, 0o700)?;
    std::fs::set_permissions(&dir, Permissions::from_mode(0o700)).map_err(io(&dir))?;
    std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid)).map_err(io(&dir))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::os::unix::fs::MetadataExt as _;

    use super::{
        IsolationError, TaskUser, TaskUsers, attempt_folder, closed_to_others, install_runner,
        prepare_root, shared_user_refusal,
    };

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn without_root_one_tenant_on_loopback_is_served_and_anything_more_is_refused() {
        assert_eq!(shared_user_refusal(addr("127.0.0.1:8080"), 1), None);
        assert_eq!(shared_user_refusal(addr("[::1]:8080"), 0), None);
        let beyond = shared_user_refusal(addr("0.0.0.0:8080"), 1).unwrap();
        assert!(beyond.contains("listens on 0.0.0.0:8080"), "{beyond}");
        assert!(beyond.contains("--local-executor-shared-user"), "{beyond}");
        let tenants = shared_user_refusal(addr("127.0.0.1:8080"), 2).unwrap();
        assert!(tenants.contains("it has 2 tenants"), "{tenants}");
        assert!(
            tenants.contains("--local-executor-shared-user"),
            "{tenants}"
        );
    }

    #[test]
    fn task_users_stay_in_the_id_range() {
        assert_eq!(
            TaskUser::of_slot(2_000_000_000, 3),
            Some(TaskUser {
                uid: 2_000_000_003,
                gid: 2_000_000_003
            })
        );
        assert_eq!(
            TaskUser::of_slot(u32::MAX - 3, 1),
            Some(TaskUser {
                uid: u32::MAX - 2,
                gid: u32::MAX - 2
            })
        );
        assert_eq!(TaskUser::of_slot(u32::MAX - 3, 2), None);
        assert_eq!(TaskUser::of_slot(u32::MAX, 1), None);
        assert_eq!(TaskUser::of_slot(0, 0), None, "never root");
    }

    #[test]
    fn folders_refuse_links_open_roots_and_odd_names() {
        let base =
            std::env::temp_dir().join(format!("agent-bus-iso-{}", uuid::Uuid::new_v4().simple()));
        let root = prepare_root(
            &base.join("work"),
            TaskUsers::Shared {
                more_tenants: false,
            },
        )
        .unwrap();
        let dir = attempt_folder(&root, "acme", "t-1", None).unwrap();
        assert_eq!(dir, root.join("acme").join("t-1"));
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        // Again: the same folder.
        assert_eq!(attempt_folder(&root, "acme", "t-1", None).unwrap(), dir);
        std::os::unix::fs::symlink("/etc", root.join("acme").join("t-2")).unwrap();
        assert!(matches!(
            attempt_folder(&root, "acme", "t-2", None),
            Err(IsolationError::NotAFolder { .. })
        ));
        for bad in ["", "..", "a/b"] {
            assert!(matches!(
                attempt_folder(&root, bad, "t-1", None),
                Err(IsolationError::TenantName(_))
            ));
        }
        let open = base.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        assert!(matches!(
            prepare_root(
                &open,
                TaskUsers::Shared {
                    more_tenants: false
                }
            ),
            Err(IsolationError::OpenRoot { .. })
        ));
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn folders_made_above_the_work_root_are_open_to_pass() {
        let base =
            std::env::temp_dir().join(format!("agent-bus-iso-{}", uuid::Uuid::new_v4().simple()));
        // The dispatcher's umask is 077 and the modes are set explicitly for that; a
        // test cannot change the umask without reaching the other tests' threads.
        let root = prepare_root(
            &base.join("lib").join("work"),
            TaskUsers::Shared {
                more_tenants: false,
            },
        )
        .unwrap();
        for folder in [base.clone(), base.join("lib")] {
            assert_eq!(
                std::fs::metadata(&folder).unwrap().mode() & 0o777,
                0o755,
                "{}",
                folder.display()
            );
        }
        assert_eq!(closed_to_others(root.parent().unwrap()), None);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn the_first_folder_closed_to_others_is_named() {
        use std::os::unix::fs::PermissionsExt as _;
        let base =
            std::env::temp_dir().join(format!("agent-bus-iso-{}", uuid::Uuid::new_v4().simple()));
        let inner = base.join("home").join("clone").join("agent-bus-work");
        std::fs::create_dir_all(&inner).unwrap();
        assert_eq!(closed_to_others(&inner), None);
        let home = base.join("home");
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(closed_to_others(&inner), Some(home));
        // A path that does not exist yet is judged by the folders that do.
        assert_eq!(closed_to_others(&base.join("missing").join("work")), None);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_shared_user_runs_the_runner_where_it_is_and_task_users_run_roots_copy() {
        use std::os::unix::fs::PermissionsExt as _;
        let base =
            std::env::temp_dir().join(format!("agent-bus-iso-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&base).unwrap();
        let runner = base.join("runner");
        std::fs::write(&runner, "#!/bin/sh\n").unwrap();
        let shared = TaskUsers::Shared {
            more_tenants: false,
        };
        let root = prepare_root(&base.join("work"), shared).unwrap();
        assert_eq!(install_runner(&root, &runner, shared).unwrap(), runner);
        if nix::unistd::geteuid().is_root() {
            let users = TaskUsers::PerTenant {
                uid_base: 2_000_000_000,
            };
            let root = prepare_root(&base.join("work"), users).unwrap();
            for _ in 0..2 {
                let copy = install_runner(&root, &runner, users).unwrap();
                assert_eq!(copy, root.join(".runner"));
                let meta = std::fs::metadata(&copy).unwrap();
                assert_eq!((meta.uid(), meta.permissions().mode() & 0o7777), (0, 0o755));
                assert_eq!(std::fs::read(&copy).unwrap(), b"#!/bin/sh\n");
            }
            let names: Vec<_> = std::fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(
                names,
                [std::ffi::OsString::from(".runner")],
                "no partial copy left"
            );
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}

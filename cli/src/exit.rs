//! The exit codes of `agent-bus`: one table, printed by `agent-bus --help` and
//! docs/CLI.md. `wait` and `submit --wait` exit with the task's own exit code when it
//! failed with one, so ours sit where commands rarely exit: the `sysexits.h` block for
//! the client's own troubles, and 120–124 for the ends of a task that have no exit code
//! (124 for a timeout, like `timeout(1)`).

/// The task succeeded, or the command did what it was asked.
pub(crate) const OK: u8 = 0;
/// A flag, an argument, a task file or the config file is wrong (EX_USAGE).
pub(crate) const USAGE: u8 = 64;
/// The API refused the request: no such task (404), an invalid field (422), over quota
/// or budget (429, 402), and the other 4xx answers (EX_DATAERR).
pub(crate) const REFUSED: u8 = 65;
/// The dispatcher cannot be reached: connection refused, no such host, TLS failure,
/// timeout, or a 502/503/504 answer (EX_UNAVAILABLE).
pub(crate) const UNREACHABLE: u8 = 69;
/// The dispatcher answered 500, or something the client does not understand
/// (EX_SOFTWARE).
pub(crate) const SERVER_ERROR: u8 = 70;
/// The token was refused (401), or its tenant is disabled (403) (EX_NOPERM).
pub(crate) const TOKEN_REFUSED: u8 = 77;
/// The config file cannot be read or written (EX_CONFIG).
pub(crate) const CONFIG: u8 = 78;
/// The task failed without an exit code (out of memory, image pull, unschedulable, lost
/// heartbeat, ...).
pub(crate) const FAILED_WITHOUT_EXIT_CODE: u8 = 120;
/// The task was cancelled.
pub(crate) const CANCELLED: u8 = 121;
/// The task expired in its queue (its queue TTL passed before it was launched).
pub(crate) const EXPIRED: u8 = 122;
/// The task ran past its timeout.
pub(crate) const TIMED_OUT: u8 = 124;
/// Standard output was closed (`agent-bus logs ID | head`): 128 + SIGPIPE, silently.
pub(crate) const BROKEN_PIPE: u8 = 141;

/// The exit code table of `agent-bus --help`.
pub(crate) const HELP: &str = "\
Exit codes:
  0     success; with `wait` and `submit --wait`: the task succeeded
  1-255 `wait`, `submit --wait`: the exit code of the task's last attempt, when it failed with one
  64    usage error: a flag, argument, task file or config file is wrong
  65    the API refused the request (no such task, invalid field, over quota or budget)
  69    the dispatcher cannot be reached (or answered 502/503/504)
  70    the dispatcher failed (500) or answered something unexpected
  77    the token was refused (401), or its tenant is disabled (403)
  78    the config file cannot be read or written
  120   the task failed without an exit code (out of memory, image pull, unschedulable, ...)
  121   the task was cancelled
  122   the task expired in its queue
  124   the task timed out
  141   standard output was closed";

/// How `wait` exits for a task that ended in `state` (the API's name) with `exit_code`;
/// `None` while the task is not over.
pub(crate) fn for_task(state: &str, exit_code: Option<i64>) -> Option<u8> {
    match state {
        "succeeded" => Some(OK),
        "failed" => Some(match exit_code.map(u8::try_from) {
            // 0 is no failure code: the runner reported a failure class instead.
            Some(Ok(code)) if code != 0 => code,
            _ => FAILED_WITHOUT_EXIT_CODE,
        }),
        "cancelled" => Some(CANCELLED),
        "expired" => Some(EXPIRED),
        "timed_out" => Some(TIMED_OUT),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_exits_with_its_own_code_or_a_documented_one() {
        let cases = [
            ("succeeded", Some(0), Some(0)),
            ("failed", Some(3), Some(3)),
            ("failed", Some(255), Some(255)),
            ("failed", None, Some(FAILED_WITHOUT_EXIT_CODE)),
            ("failed", Some(0), Some(FAILED_WITHOUT_EXIT_CODE)),
            ("failed", Some(-9), Some(FAILED_WITHOUT_EXIT_CODE)),
            ("failed", Some(300), Some(FAILED_WITHOUT_EXIT_CODE)),
            ("cancelled", None, Some(CANCELLED)),
            ("expired", None, Some(EXPIRED)),
            ("timed_out", Some(137), Some(TIMED_OUT)),
            ("running", None, None),
            ("queued", None, None),
        ];
        for (state, code, want) in cases {
            assert_eq!(for_task(state, code), want, "{state} {code:?}");
        }
    }

    #[test]
    fn the_help_lists_every_code() {
        for code in [
            USAGE,
            REFUSED,
            UNREACHABLE,
            SERVER_ERROR,
            TOKEN_REFUSED,
            CONFIG,
            FAILED_WITHOUT_EXIT_CODE,
            CANCELLED,
            EXPIRED,
            TIMED_OUT,
            BROKEN_PIPE,
        ] {
            assert!(HELP.contains(&format!("\n  {code:<6}")), "{code} missing");
        }
    }
}

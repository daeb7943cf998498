//! How flag values are read: the one duration parser, fractions, and the value lists of
//! the domain enums (kept here so the domain stays free of clap). Also the one read of
//! `PATH`.

use std::ffi::OsString;
use std::time::Duration;

use clap::ValueEnum;
use clap::builder::PossibleValue;
use secrecy::SecretString;

use crate::cost::BudgetAction;
use crate::launcher::job_spec::ImagePullPolicy;

/// A duration constant as `--help` shows it and [`parse_duration`] reads it back
/// (`86400s`); built once, as clap wants a `&'static str`.
macro_rules! duration_default {
    ($duration:expr) => {{
        static TEXT: ::std::sync::OnceLock<String> = ::std::sync::OnceLock::new();
        TEXT.get_or_init(|| $crate::config::values::format_duration($duration))
            .as_str()
    }};
}
pub(super) use duration_default;

/// A secret flag value (a URL with a password, a key), kept as a [`SecretString`]: zeroed
/// when dropped and never printed by `Debug`.
// clap's value parsers take a function returning a `Result`.
#[allow(clippy::unnecessary_wraps)]
pub(super) fn secret(text: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(text))
}

/// A GPU quota of one class, `CLASS=N`: a GPU class name and a count.
pub(super) fn parse_gpu_quota(text: &str) -> Result<(String, u32), String> {
    let Some((class, count)) = text.split_once('=') else {
        return Err(format!("'{text}' is not CLASS=N (for example a100=4)"));
    };
    if !crate::k8s::names::is_class_name(class) {
        return Err(format!(
            "'{class}' is not a GPU class name: 1 to 63 lowercase letters, digits, '-' or '.'"
        ));
    }
    let count = count
        .parse::<u32>()
        .map_err(|_| format!("'{count}' is not a number of GPUs (0 or more)"))?;
    Ok((class.to_owned(), count))
}

/// Dollars: a finite number, 0 or more.
pub(super) fn parse_dollars(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
        _ => Err(format!("'{text}' is not a number of dollars (0 or more)")),
    }
}

pub(super) fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value > 0.0 && value <= 1.0 => Ok(value),
        _ => Err(format!(
            "'{text}' is not a fraction between 0 (excluded) and 1"
        )),
    }
}

/// A queue name: a DNS label, as a submission's `queue`.
pub(super) fn parse_queue_name(text: &str) -> Result<String, String> {
    let name = text.trim();
    if crate::k8s::names::is_dns_label(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "'{text}' is not a queue name: 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit"
        ))
    }
}

/// A limit on things open or in flight at once (requests, streams): 1 to 1,000,000.
pub(super) fn parse_count_limit(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(limit) if (1..=1_000_000).contains(&limit) => Ok(limit),
        _ => Err(format!(
            "'{text}' is not a whole number between 1 and 1000000"
        )),
    }
}

/// A duration as flags and variables write it: whole seconds (`120`, as always) or a
/// friendly duration (`2m`, `1h 30m`, `24h`), to the second.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    static FRIENDLY: jiff::fmt::friendly::SpanParser = jiff::fmt::friendly::SpanParser::new();
    let trimmed = text.trim();
    if let Ok(seconds) = trimmed.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    match FRIENDLY.parse_unsigned_duration(trimmed) {
        Ok(duration) if duration.subsec_nanos() == 0 => Ok(duration),
        Ok(_) => Err(format!("'{text}' is not a whole number of seconds")),
        Err(_) => Err(format!(
            "'{text}' is not a duration: whole seconds (120) or a duration like 2m or 1h 30m"
        )),
    }
}

/// How `--help` shows a duration default: whole seconds with their unit (`120s`).
pub(super) fn format_duration(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
}

/// The `PATH` variable, where the local executor looks for the runner last.
#[must_use]
pub fn program_search_path() -> Option<OsString> {
    std::env::var_os("PATH")
}

impl ValueEnum for BudgetAction {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.as_str()))
    }
}

impl ValueEnum for ImagePullPolicy {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{format_duration, parse_duration};

    #[test]
    fn durations_are_whole_seconds_or_friendly() {
        for (text, seconds) in [
            ("120", 120),
            (" 5 ", 5),
            ("0", 0),
            ("2m", 120),
            ("1h 30m", 5400),
            ("24h", 86_400),
            ("1 hour 1 second", 3601),
            ("90s", 90),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(seconds)),
                "{text}"
            );
        }
        for text in ["", "-5", "1.5s", "250ms", "soon", "5 parsecs", "1 day"] {
            let error = parse_duration(text).unwrap_err();
            assert!(error.contains(&format!("'{text}'")), "{text}: {error}");
        }
    }

    #[test]
    fn a_default_shown_in_help_parses_back() {
        for seconds in [0, 5, 90, 86_400] {
            let duration = Duration::from_secs(seconds);
            assert_eq!(parse_duration(&format_duration(duration)), Ok(duration));
        }
    }
}

//! YAML in and out of the CLI (`-f task.yaml`, `-o yaml`, the config file) through
//! serde-saphyr, with the rules every YAML input here follows:
//! - booleans are YAML 1.2's only (`true`, `false`, also `True`, `FALSE`): `yes`, `no`,
//!   `on`, `off` stay strings,
//!   so `name: no` is never `false`;
//! - a key given twice is an error, not the later value;
//! - an input is at most [`MAX_INPUT_BYTES`], and serde-saphyr's budget bounds its depth,
//!   nodes and aliases (no alias bombs);
//! - errors are one line and name the line and column.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest YAML input read (a task file or the config file): far above any real one
/// (the API refuses task bodies of more than a few MiB anyway).
pub(crate) const MAX_INPUT_BYTES: usize = 4 * 1024 * 1024;

/// Why an input was not read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum YamlError {
    #[error("larger than {MAX_INPUT_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Syntax(String),
}

/// The options of every read: strict booleans, duplicate keys refused, no source snippet
/// (errors stay one line), the default budget.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        with_snippet: false,
    }
}

/// Parses one YAML document (JSON is a subset).
pub(crate) fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(YamlError::TooLarge);
    }
    serde_saphyr::from_str_with_options(text, options())
        .map_err(|e| YamlError::Syntax(one_line(&e.to_string())))
}

/// Renders `value` as a YAML document.
pub(crate) fn to_string<T: Serialize>(value: &T) -> Result<String, String> {
    serde_saphyr::to_string(value).map_err(|e| one_line(&e.to_string()))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{MAX_INPUT_BYTES, YamlError, from_str, to_string};

    #[test]
    fn booleans_are_strict_and_other_words_stay_strings() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Flag {
            on: bool,
        }
        let value: Value = from_str("a: yes\nb: no\nc: true\nd: off\ne: False\n").unwrap();
        assert_eq!(
            value,
            json!({"a": "yes", "b": "no", "c": true, "d": "off", "e": false})
        );
        let error = from_str::<Flag>("on: yes\n").unwrap_err().to_string();
        assert!(error.contains("line 1"), "{error}");
    }

    #[test]
    fn errors_are_one_line_with_line_and_column() {
        for text in ["a: 1\nb: [1, 2\n", "a: 1\na: 2\n", "a:\n  - 1\n b: 2\n"] {
            let error = from_str::<Value>(text).unwrap_err().to_string();
            assert!(!error.contains('\n'), "{error}");
            assert!(error.contains("line"), "{text:?}: {error}");
            assert!(error.contains("column"), "{text:?}: {error}");
        }
    }

    #[test]
    fn inputs_are_bounded() {
        let big = format!("a: \"{}\"\n", "x".repeat(MAX_INPUT_BYTES));
        assert!(matches!(from_str::<Value>(&big), Err(YamlError::TooLarge)));
        let bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n";
        assert!(from_str::<Value>(bomb).is_err());
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(from_str::<Value>(&deep).is_err());
    }

    #[test]
    fn what_is_printed_reads_back_the_same() {
        let value = json!({
            "id": "01J0000000000000000000000",
            "name": "no",
            "flag": "yes",
            "number_text": "1.0",
            "null_text": "null",
            "empty": "",
            "multi": "a\nb: c\n",
            "gpus": 2,
            "price": 0.5,
            "none": null,
            "ok": true,
            "list": [],
            "map": {},
            "command": ["python", "-c", "print('hi: there')"],
        });
        let text = to_string(&value).unwrap();
        let back: Value = from_str(&text).unwrap();
        assert_eq!(back, value, "{text}");
    }
}

//! Kubernetes name rules the dispatcher checks before anything reaches the API server:
//! RFC 1123 labels (tenants, queues, task names, secret names), class and claim names, the
//! name part of label and annotation keys, and the keys of a Secret's data. Pure functions, shared by submission validation,
//! the placement catalogue and the Job builder.

/// RFC 1123 label: lowercase alphanumerics and '-', starting and ending alphanumeric,
/// 1 to 63 characters.
#[must_use]
pub fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Names of GPU classes and claims: lowercase letters, digits, '-' and '.', 1 to 63
/// characters, starting and ending with a letter or digit.
#[must_use]
pub fn is_class_name(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// The name part of a label or annotation key: at most 63 letters, digits, '-', '_' or
/// '.', starting and ending with a letter or digit.
#[must_use]
pub fn is_label_name(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A key of a Secret's (or ConfigMap's) data: 1 to 253 letters, digits, '-', '_' or '.',
/// and not `.` or `..` (Kubernetes' own rule, so every key agent-bus accepts can be
/// stored in a Secret and referenced by a `secretKeyRef`).
#[must_use]
pub fn is_secret_key(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value != "."
        && value != ".."
}

#[cfg(test)]
mod tests {
    use super::{is_class_name, is_dns_label, is_label_name, is_secret_key};

    #[test]
    fn secret_keys_follow_kubernetes_data_keys() {
        for (key, valid) in [
            ("token", true),
            ("OPENAI_API_KEY", true),
            ("tls.crt", true),
            (".hidden", true),
            ("-", true),
            (".", false),
            ("..", false),
            ("", false),
            ("a/b", false),
            ("a b", false),
            ("é", false),
        ] {
            assert_eq!(is_secret_key(key), valid, "{key:?}");
        }
        assert!(is_secret_key(&"k".repeat(253)));
        assert!(!is_secret_key(&"k".repeat(254)));
    }

    #[test]
    fn names_follow_their_rules() {
        for (name, label, class, key) in [
            ("a", true, true, true),
            ("a-b", true, true, true),
            ("a.b", false, true, true),
            ("a_b", false, false, true),
            ("A", false, false, true),
            ("-a", false, false, false),
            ("a-", false, false, false),
            ("", false, false, false),
        ] {
            assert_eq!(is_dns_label(name), label, "dns label {name:?}");
            assert_eq!(is_class_name(name), class, "class name {name:?}");
            assert_eq!(is_label_name(name), key, "key name {name:?}");
        }
        let long = "a".repeat(64);
        assert!(!is_dns_label(&long) && !is_class_name(&long) && !is_label_name(&long));
    }
}

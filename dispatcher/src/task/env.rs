//! A task's environment variable: a plain value, or a reference to a key of one of its
//! tenant's secrets (`{"secret": "openai", "key": "token"}`).
//!
//! Invariant: a [`SecretRef`] is all a task ever holds of a secret. The value is looked
//! up where the command starts (a `secretKeyRef` the kubelet resolves, or the local
//! executor's secret store), so it never reaches the task's spec, the store, the API's
//! views or the events.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// The value of one environment variable, as submitted and as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum EnvValue {
    /// The value itself.
    Plain(String),
    /// A key of a secret of the task's tenant (`PUT /v1/secrets/{name}`); the value is
    /// set when the command starts.
    Secret(SecretRef),
}

/// Which key of which of the tenant's secrets a variable takes its value from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    /// The secret's name (`PUT /v1/secrets/{name}`).
    pub secret: String,
    /// A key of its data.
    pub key: String,
}

impl EnvValue {
    /// The secret this variable refers to, if it is a reference.
    #[must_use]
    pub fn secret(&self) -> Option<&SecretRef> {
        match self {
            Self::Plain(_) => None,
            Self::Secret(reference) => Some(reference),
        }
    }
}

impl From<&str> for EnvValue {
    fn from(value: &str) -> Self {
        Self::Plain(value.to_owned())
    }
}

impl From<String> for EnvValue {
    fn from(value: String) -> Self {
        Self::Plain(value)
    }
}

impl From<SecretRef> for EnvValue {
    fn from(reference: SecretRef) -> Self {
        Self::Secret(reference)
    }
}

/// By hand rather than `untagged`: serde's untagged enums answer any mistake with "data
/// did not match any variant"; this one says what an env value may be, and a reference's
/// own errors (`unknown field`, `missing field`) come through.
impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvValueVisitor;

        impl<'de> Visitor<'de> for EnvValueVisitor {
            type Value = EnvValue;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a string, or {"secret": NAME, "key": KEY}"#)
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<EnvValue, E> {
                Ok(EnvValue::Plain(value.to_owned()))
            }

            fn visit_string<E: de::Error>(self, value: String) -> Result<EnvValue, E> {
                Ok(EnvValue::Plain(value))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<EnvValue, A::Error> {
                SecretRef::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(EnvValue::Secret)
            }
        }

        deserializer.deserialize_any(EnvValueVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::{EnvValue, SecretRef};

    fn parse(json: &str) -> Result<EnvValue, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn a_value_is_a_string_or_a_reference_and_round_trips() {
        assert_eq!(parse(r#""fast""#), Ok(EnvValue::Plain("fast".into())));
        let reference = EnvValue::Secret(SecretRef {
            secret: "openai".into(),
            key: "token".into(),
        });
        assert_eq!(
            parse(r#"{"secret": "openai", "key": "token"}"#),
            Ok(reference.clone())
        );
        for value in [EnvValue::Plain("x".into()), reference] {
            let text = serde_json::to_string(&value).unwrap();
            assert_eq!(parse(&text), Ok(value));
        }
    }

    #[test]
    fn mistakes_say_what_a_value_may_be() {
        let wrong_type = parse("5").unwrap_err();
        assert!(
            wrong_type.contains(r#"expected a string, or {"secret": NAME, "key": KEY}"#),
            "{wrong_type}"
        );
        let extra = parse(r#"{"secret": "a", "key": "b", "value": "c"}"#).unwrap_err();
        assert!(extra.contains("unknown field `value`"), "{extra}");
        let missing = parse(r#"{"secret": "a"}"#).unwrap_err();
        assert!(missing.contains("missing field `key`"), "{missing}");
    }
}

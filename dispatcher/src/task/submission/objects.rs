//! JSON objects only, for the structs a client writes. serde's derived `Deserialize` of a
//! struct also reads a JSON array of its fields in declaration order, so
//! `"retry_policy": [null, null]` was taken as a retry policy although the API's schema
//! (and every reader of it) says an object. A struct under [`objects_only!`] is read
//! through [`ObjectOnly`], which asks the format for a map where the derive asks for a
//! struct: an array is then the ordinary "invalid type" error, with its field path.
//!
//! Kept by hand (about 40 lines): no maintained crate offers this switch, and serde's own
//! `deserialize_struct` cannot be told to refuse sequences.

use serde::Deserializer;
use serde::de::Visitor;

/// A deserializer that reads a struct only from a map (a JSON object).
#[derive(Debug)]
pub struct ObjectOnly<D>(pub D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Implements `Serialize` and `Deserialize` for structs that derive both with
/// `#[serde(remote = "Self")]` (which makes the derives inherent functions): serialising
/// is the derived one, deserialising the derived one through [`ObjectOnly`].
///
/// `objects_only!(deserialize: T)` for a struct that derives `Deserialize` only.
macro_rules! objects_only {
    (deserialize: $($ty:ty),+ $(,)?) => {$(
        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                <$ty>::deserialize($crate::task::submission::objects::ObjectOnly(deserializer))
            }
        }
    )+};
    ($($ty:ty),+ $(,)?) => {$(
        $crate::task::submission::objects::objects_only!(deserialize: $ty);

        impl ::serde::Serialize for $ty {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                <$ty>::serialize(self, serializer)
            }
        }
    )+};
}
pub(crate) use objects_only;

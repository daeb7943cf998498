//! CPU and memory amounts in Kubernetes quantity notation (`500m`, `2`, `1.5`, `512Mi`,
//! `1G`, `1e9`), parsed once into exact integers so that comparisons, prices and the Job
//! we emit never depend on how a tenant spelled a number.
//!
//! Invariants: a [`Cpu`] is a positive whole number of millicores; a [`Memory`] a positive
//! whole number of bytes; both print in a canonical form that Kubernetes parses back to
//! the same amount.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a quantity was refused, in words a tenant can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("is empty")]
    Empty,
    #[error("must not be negative")]
    Negative,
    #[error("must be greater than zero")]
    Zero,
    #[error(
        "'{0}' is not a Kubernetes quantity (a number with an optional suffix such as m, k, M, G, Ki, Mi, Gi)"
    )]
    Malformed(String),
    #[error("'{0}' is finer than {1}")]
    TooPrecise(String, &'static str),
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// A CPU amount in millicores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cpu {
    millicores: u64,
}

/// A memory amount in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Memory {
    bytes: u64,
}

impl Cpu {
    /// `n` whole cores (at least one).
    #[must_use]
    pub const fn from_cores(n: u64) -> Self {
        let n = if n == 0 { 1 } else { n };
        Self {
            millicores: n.saturating_mul(1000),
        }
    }

    #[must_use]
    pub fn from_millicores(millicores: u64) -> Option<Self> {
        (millicores > 0).then_some(Self { millicores })
    }

    #[must_use]
    pub fn millicores(self) -> u64 {
        self.millicores
    }

    /// Cores as a float, for prices.
    #[must_use]
    pub fn cores(self) -> f64 {
        self.millicores as f64 / 1000.0
    }
}

impl Memory {
    #[must_use]
    pub fn from_bytes(bytes: u64) -> Option<Self> {
        (bytes > 0).then_some(Self { bytes })
    }

    /// `n` GiB; `n` must be at least 1 (a constant in configuration defaults).
    #[must_use]
    pub const fn from_gib(n: u64) -> Self {
        let n = if n == 0 { 1 } else { n };
        Self {
            bytes: n * 1024 * 1024 * 1024,
        }
    }

    /// The sum, saturating (a pod's memory plus its shared memory).
    #[must_use]
    pub fn saturating_add(self, other: Self) -> Self {
        Self {
            bytes: self.bytes.saturating_add(other.bytes),
        }
    }

    #[must_use]
    pub fn bytes(self) -> u64 {
        self.bytes
    }

    /// GiB as a float, for prices.
    #[must_use]
    pub fn gib(self) -> f64 {
        self.bytes as f64 / f64::from(1u32 << 30)
    }
}

/// A quantity as an exact fraction: `mantissa × 10^-scale × multiplier`.
struct Parsed {
    mantissa: u128,
    scale: u32,
    multiplier: u128,
    exponent10: i32,
}

fn parse(text: &str) -> Result<Parsed, QuantityError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(QuantityError::Empty);
    }
    if text.starts_with('-') {
        return Err(QuantityError::Negative);
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    let malformed = || QuantityError::Malformed(text.to_owned());
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(malformed());
    }
    let digits = format!("{whole}{fraction}");
    if digits.len() > 30 {
        return Err(QuantityError::TooLarge(text.to_owned()));
    }
    let mantissa: u128 = digits.parse().map_err(|_| malformed())?;
    let scale = fraction.len() as u32;
    let (multiplier, exponent10) = match suffix {
        "" => (1, 0),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        exponent if exponent.starts_with(['e', 'E']) => {
            let value: i32 = exponent[1..].parse().map_err(|_| malformed())?;
            if !(-18..=18).contains(&value) {
                return Err(QuantityError::TooLarge(text.to_owned()));
            }
            (1, value)
        }
        _ => return Err(malformed()),
    };
    Ok(Parsed {
        mantissa,
        scale,
        multiplier,
        exponent10,
    })
}

/// `parsed × 10^shift` as a whole number, if it is one.
fn to_integer(
    parsed: &Parsed,
    shift: i32,
    text: &str,
    unit: &'static str,
) -> Result<u64, QuantityError> {
    let too_large = || QuantityError::TooLarge(text.trim().to_owned());
    let exponent = parsed.exponent10 + shift - parsed.scale as i32;
    let value = parsed
        .mantissa
        .checked_mul(parsed.multiplier)
        .ok_or_else(too_large)?;
    let value = if exponent >= 0 {
        10u128
            .checked_pow(exponent as u32)
            .and_then(|p| value.checked_mul(p))
            .ok_or_else(too_large)?
    } else {
        let divisor = 10u128
            .checked_pow(exponent.unsigned_abs())
            .ok_or_else(too_large)?;
        if value % divisor != 0 {
            return Err(QuantityError::TooPrecise(text.trim().to_owned(), unit));
        }
        value / divisor
    };
    let value = u64::try_from(value).map_err(|_| too_large())?;
    if value == 0 {
        return Err(QuantityError::Zero);
    }
    Ok(value)
}

impl FromStr for Cpu {
    type Err = QuantityError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let millicores = to_integer(&parse(text)?, 3, text, "1m (a thousandth of a core)")?;
        Ok(Self { millicores })
    }
}

impl FromStr for Memory {
    type Err = QuantityError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes = to_integer(&parse(text)?, 0, text, "one byte")?;
        Ok(Self { bytes })
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.millicores.is_multiple_of(1000) {
            write!(f, "{}", self.millicores / 1000)
        } else {
            write!(f, "{}m", self.millicores)
        }
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ];
        for (suffix, size) in UNITS {
            if self.bytes.is_multiple_of(size) {
                return write!(f, "{}{suffix}", self.bytes / size);
            }
        }
        write!(f, "{}", self.bytes)
    }
}

macro_rules! serde_as_string {
    ($type:ty) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_string!(Cpu);
serde_as_string!(Memory);

#[cfg(test)]
mod tests {
    use super::{Cpu, Memory, QuantityError};

    fn cpu(text: &str) -> Result<u64, QuantityError> {
        text.parse::<Cpu>().map(Cpu::millicores)
    }

    fn memory(text: &str) -> Result<u64, QuantityError> {
        text.parse::<Memory>().map(Memory::bytes)
    }

    #[test]
    fn cpu_amounts_become_millicores() {
        let cases = [
            ("500m", 500),
            ("1", 1000),
            ("2", 2000),
            ("0.5", 500),
            ("1.25", 1250),
            ("100m", 100),
            ("+3", 3000),
            ("1e0", 1000),
        ];
        for (text, millicores) in cases {
            assert_eq!(cpu(text), Ok(millicores), "{text}");
        }
    }

    #[test]
    fn memory_amounts_become_bytes() {
        let cases = [
            ("512Mi", 512 << 20),
            ("1Gi", 1 << 30),
            ("1G", 1_000_000_000),
            ("1e9", 1_000_000_000),
            ("1.5Gi", 3 << 29),
            ("128974848", 128_974_848),
            ("129M", 129_000_000),
            ("64Ki", 65536),
        ];
        for (text, bytes) in cases {
            assert_eq!(memory(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn bad_amounts_say_what_is_wrong() {
        assert_eq!(cpu("-1"), Err(QuantityError::Negative));
        assert_eq!(cpu("0"), Err(QuantityError::Zero));
        assert_eq!(cpu(""), Err(QuantityError::Empty));
        assert!(matches!(cpu("0.0001"), Err(QuantityError::TooPrecise(..))));
        assert!(matches!(cpu("two"), Err(QuantityError::Malformed(..))));
        assert!(matches!(cpu("1.2.3"), Err(QuantityError::Malformed(..))));
        assert!(matches!(memory("1Zi"), Err(QuantityError::Malformed(..))));
        assert!(matches!(memory("."), Err(QuantityError::Malformed(..))));
        assert!(matches!(memory("0.5"), Err(QuantityError::TooPrecise(..))));
        assert!(matches!(
            memory("99999999Ei"),
            Err(QuantityError::TooLarge(..))
        ));
        assert!(matches!(memory("1e99"), Err(QuantityError::TooLarge(..))));
        assert!(matches!(
            memory("9999999999999999999999999999999999"),
            Err(QuantityError::TooLarge(..))
        ));
    }

    #[test]
    fn canonical_forms_parse_back_to_the_same_amount() {
        for text in ["500m", "2", "1.5", "250m"] {
            let parsed: Cpu = text.parse().unwrap();
            assert_eq!(parsed.to_string().parse::<Cpu>().unwrap(), parsed);
        }
        assert_eq!("1.5".parse::<Cpu>().unwrap().to_string(), "1500m");
        assert_eq!("1024Mi".parse::<Memory>().unwrap().to_string(), "1Gi");
        assert_eq!("1G".parse::<Memory>().unwrap().to_string(), "1000000000");
        assert_eq!("1.5Gi".parse::<Memory>().unwrap().to_string(), "1536Mi");
    }
}

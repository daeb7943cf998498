//! Label values: the closed sets as enums that encode to their fixed words, and the
//! bound on the values clients choose (tenant, queue, model), which keeps at most
//! [`MAX_LABEL_VALUES`] distinct values per label and folds the rest into [`OTHER`].

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

use crate::cost::Period;
use crate::task::{Reason, TaskState};

/// Distinct values a client-chosen label may take in one family before the rest are
/// counted as `other`.
pub const MAX_LABEL_VALUES: usize = 200;

/// The value a label takes once its family has seen [`MAX_LABEL_VALUES`] others.
pub const OTHER: &str = "other";

/// Defines an enum of label values, each variant written as its fixed word (`as_str`
/// and the exposition agree). prometheus-client's derive would write the variant's
/// Rust name instead.
macro_rules! label_values {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident => $word:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant),+
        }

        impl $name {
            /// The word the exposition carries.
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $word),+
                }
            }
        }

        impl prometheus_client::encoding::EncodeLabelValue for $name {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder,
            ) -> Result<(), std::fmt::Error> {
                prometheus_client::encoding::EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}
pub(super) use label_values;

label_values! {
    /// Whether an operation of the store or the queue succeeded.
    pub enum Outcome {
        Ok => "ok",
        Error => "error",
    }
}

impl Outcome {
    #[must_use]
    pub fn of(ok: bool) -> Self {
        if ok { Self::Ok } else { Self::Error }
    }
}

impl EncodeLabelValue for TaskState {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

label_values! {
    /// A budget's period as a label ([`Period`] is not `Hash`).
    pub enum BudgetPeriod {
        Day => "day",
        Month => "month",
    }
}

impl From<Period> for BudgetPeriod {
    fn from(period: Period) -> Self {
        match period {
            Period::Day => Self::Day,
            Period::Month => Self::Month,
        }
    }
}

impl EncodeLabelValue for crate::task::retry::FailureClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl EncodeLabelValue for crate::task::retry::RetryAction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// A task's reason as a label: `none` when it has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReasonOrNone(pub Option<Reason>);

impl EncodeLabelValue for ReasonOrNone {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.map_or("none", Reason::as_str), encoder)
    }
}

/// Keeps the distinct values of client-chosen labels per label below a bound, so that a
/// client inventing model names cannot grow the scrape without limit.
#[derive(Debug, Default)]
pub struct BoundedValues {
    seen: Mutex<HashMap<&'static str, HashSet<String>>>,
}

impl BoundedValues {
    /// `value` while `label` has seen fewer than [`MAX_LABEL_VALUES`] distinct values (or
    /// has seen this one), else [`OTHER`].
    pub(super) fn admit(&self, label: &'static str, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let values = seen.entry(label).or_default();
        if values.contains(value) {
            return value.to_owned();
        }
        if values.len() < MAX_LABEL_VALUES {
            values.insert(value.to_owned());
            value.to_owned()
        } else {
            OTHER.to_owned()
        }
    }
}

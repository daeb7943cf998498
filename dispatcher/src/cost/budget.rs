//! A tenant's budgets: dollars per UTC day and month, and what a spent one does. Plain
//! values: the store keeps them, the API shows them, the budget check compares them
//! with spend.

use super::{Period, Spend};

/// What a spent budget does.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BudgetAction {
    /// Metrics and the `AgentBusTenantBudgetExceeded` alert only.
    #[default]
    Alert,
    /// Also refuse new tasks with 402 until the period ends.
    Refuse,
}

impl BudgetAction {
    pub const ALL: [Self; 2] = [Self::Alert, Self::Refuse];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Refuse => "refuse",
        }
    }
}

impl std::str::FromStr for BudgetAction {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "alert" => Ok(Self::Alert),
            "refuse" => Ok(Self::Refuse),
            other => Err(format!(
                "budget action '{other}' is not one of alert, refuse"
            )),
        }
    }
}

/// A tenant's budgets in dollars per UTC day and month; `None`: no budget.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Budget {
    pub daily_dollars: Option<f64>,
    pub monthly_dollars: Option<f64>,
    pub action: BudgetAction,
}

impl Budget {
    #[must_use]
    pub fn is_set(&self) -> bool {
        self.daily_dollars.is_some() || self.monthly_dollars.is_some()
    }

    /// The budget of `period`, if there is one.
    #[must_use]
    pub fn limit(&self, period: Period) -> Option<f64> {
        match period {
            Period::Day => self.daily_dollars,
            Period::Month => self.monthly_dollars,
        }
    }
}

/// A budget with action `refuse` that `spend` has used up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpentBudget {
    pub period: Period,
    pub spent: f64,
    pub limit: f64,
}

impl SpentBudget {
    /// What `tenant` has spent of which budget, in words (the 402 of a submission and
    /// the reason a retry was not made say the same).
    #[must_use]
    pub fn describe(&self, tenant: &str) -> String {
        format!(
            "tenant '{tenant}' has spent ${:.2} of its {} budget of ${:.2}",
            self.spent,
            self.period.adjective(),
            self.limit
        )
    }
}

impl Budget {
    /// The first budget of action `refuse` that `spending` has reached (`None` with action
    /// `alert`, or while every budget has room).
    #[must_use]
    pub fn refusing(&self, spending: &Spend) -> Option<SpentBudget> {
        if self.action != BudgetAction::Refuse {
            return None;
        }
        Period::ALL.into_iter().find_map(|period| {
            let limit = self.limit(period)?;
            let spent = spending.of(period);
            (spent >= limit).then_some(SpentBudget {
                period,
                spent,
                limit,
            })
        })
    }
}

//! Errors, by the component that met them and a fixed word for their kind (an HTTP status
//! as `http_503`, a store or queue operation, `watch_stream`, ...; never a message).

use std::borrow::Cow;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::Metrics;
use super::labels::label_values;
use super::registry::Registrar;

label_values! {
    /// The component that met an error.
    pub enum ErrorComponent {
        Api => "api",
        Store => "store",
        Queue => "queue",
        Kubernetes => "kubernetes",
        Launcher => "launcher",
        Watcher => "watcher",
        RunnerReports => "runner_reports",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    component: ErrorComponent,
    kind: Cow<'static, str>,
}

#[derive(Debug)]
pub(super) struct ErrorFamilies {
    errors: Family<ErrorLabels, Counter>,
}

impl ErrorFamilies {
    pub(super) fn register(registrar: &mut Registrar<'_>) -> Self {
        let families = Self {
            errors: Family::default(),
        };
        registrar.counter(
            "errors",
            &["component", "kind"],
            "Errors, by component (api, store, queue, kubernetes, launcher, watcher, runner_reports) and kind",
            families.errors.clone(),
        );
        families
    }
}

impl Metrics {
    /// Counts an error of `component` of `kind` (a fixed word, never a message).
    pub fn error(&self, component: ErrorComponent, kind: impl Into<Cow<'static, str>>) {
        self.inner
            .errors
            .errors
            .get_or_create(&ErrorLabels {
                component,
                kind: kind.into(),
            })
            .inc();
    }
}

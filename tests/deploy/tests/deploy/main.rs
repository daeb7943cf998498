//! The deployment files, proven on the real test environment: the Helm chart
//! (`helm/agent-bus`), the Kustomize tree (`manifests/`), the Dockerfile and
//! docker-compose.yml.
//!
//! - the chart lints with each values file and its schema refuses unknown keys;
//! - the chart's and each overlay's rendered objects pass a server-side dry-run (the
//!   Prometheus Operator and External Secrets CRDs they use are installed from
//!   `tests/deploy/fixtures/crds.yaml` first), with no Pod Security warning;
//! - `helm install` with values-dev.yaml creates every object and its pods are admitted
//!   in a `restricted` namespace;
//! - the dispatcher's ServiceAccount may do what the dispatcher does and nothing more
//!   (`kubectl auth can-i`), and the real dispatcher binary, running with that
//!   ServiceAccount's token, launches a task whose Job is admitted in the `restricted`
//!   tasks namespace, under its ResourceQuota and LimitRange;
//! - the chart works as operators use it: as a subchart with `global` values, with common
//!   and pod labels, priority classes and extra volumes and environment, its ServiceMonitor
//!   and PrometheusRule selected by kube-prometheus-stack's `release` label, the Grafana
//!   dashboard as a sidecar ConfigMap, an Ingress for the public API only, the dev image,
//!   and `helm test`'s submit -> Job script run against the real dispatcher;
//! - dev, staging and prod (values files and overlays) each lint, dry-run and agree;
//! - the roles' database pools fit the server's connections at the most replicas, and a
//!   chart whose pools would not is refused at render time;
//! - the chart and the overlays agree on RBAC rules, probes, security contexts and
//!   resources, and the alert rules agree in their three copies and pass their promtool
//!   tests; the Alertmanager example routes as documented and the Grafana dashboard names
//!   only metrics the dispatcher exposes;
//! - the Dockerfile passes BuildKit's checks and docker-compose.yml the Compose loader
//!   (both through `deploylint`, built by `tests/env/build`).
//!
//! Every test uses its own namespaces (unique suffix), so parallel runs never collide, and
//! deletes them afterwards.
//!
//! One test binary, a module per concern. Every test needs parts of the test environment
//! (`eval "$(tests/env/up)"`: the cluster, helm, kubectl, promtool, amtool, deploylint)
//! and says which first (`testsupport::needs_env!`): without them it skips with one line,
//! under `make test` it fails. `every_value_is_documented_in_the_chart_readme` needs
//! nothing. The dispatcher binary the tests run is the one `cargo test --workspace`
//! builds beside this test binary (alone: `cargo build -p dispatcher` first).
// Tests fail by panicking, helpers included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod agreement;
mod alerts;
mod chart;
mod conventions;
mod docker;
mod egress;
mod helm_test;
mod keda;
mod network_policy;
mod placement;
mod pools;
mod rbac;
mod task_pods;

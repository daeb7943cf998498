# The two commands of the README: `make run` and `make test`.
.PHONY: run test bench env-up env-down env-status

# Where cargo builds (CI sets CARGO_TARGET_DIR, see tests/run).
target_dir := $(or $(CARGO_TARGET_DIR),target)

## Runs the dispatcher on its embedded defaults (tasks run through the runner, built
## beside it). The same build as `make test` (dev profile, dependencies optimised, the
## workspace's features), so right after `make test` it rebuilds none of the dependency
## tree; the binary runs directly, since `cargo run -p dispatcher` would resolve other
## features and rebuild. docs/TESTING.md has the figures.
run:
	cargo build --workspace --bins
	$(target_dir)/debug/dispatcher serve

## Brings the real test environment up, runs fmt, clippy and every test, takes it down.
test:
	tests/run

## The test environment on its own: `eval "$$(tests/env/up)"` exports its variables.
env-up:
	tests/env/up
env-down:
	tests/env/down
env-status:
	tests/env/status

## The benchmark against issue 15's goals, kube-rs direct as baseline; writes
## docs/BENCHMARKS.md (`tests/bench --million` adds the million-queued part). make test
## runs its smoke (tests/benchmark/tests/smoke.rs) with the test build's binaries.
bench:
	tests/bench

# The two commands of the README: `make run` and `make test`.
.PHONY: run test bench env-up env-down env-status

## Runs the dispatcher on its embedded defaults (tasks run through the runner, built
## beside it).
run:
	cargo build --release -p runner
	cargo run --release -p dispatcher -- serve

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

## Submit-to-Job benchmark against kube-rs direct; writes docs/BENCHMARKS.md.
bench:
	tests/bench

# The README's commands; see scripts/ for what each does.
.PHONY: test example build

test:
	scripts/test.sh

example:
	scripts/run-example.sh

build:
	cargo build --workspace --all-targets --locked

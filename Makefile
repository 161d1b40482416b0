# The README's commands; see scripts/ for what each does.
.PHONY: test example build

test:
	scripts/test.sh

example:
	scripts/run-example.sh

build:
	cargo build --workspace --all-targets --locked

# The builder VM's kernel, root filesystem and manifest in build/vms/ (needs root); the smoke
# test boots them under QEMU and runs dockerd, a container and a build inside.
.PHONY: builder-vm smoke-builder-vm
builder-vm:
	scripts/build-builder-vm.sh

smoke-builder-vm:
	scripts/smoke-builder-vm.sh

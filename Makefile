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

# End-to-end: the node agent boots build/vms/ (QEMU here, Firecracker on a KVM host; VMM=...)
# and builds examples/hello inside it, cloned from a git daemon, uploaded to SeaweedFS S3, a
# signed webhook to a receiver, all in an "outside" namespace (docs/BUILDER-VM.md). The failing
# variant checks that a Dockerfile error is reported as the user's and the VM still shuts down.
.PHONY: test-builder-vm test-builder-vm-failing
test-builder-vm:
	scripts/test-builder-vm.sh examples/hello main

test-builder-vm-failing:
	scripts/test-builder-vm.sh --expect-user-error examples/failing main

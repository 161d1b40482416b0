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
# The modern variant builds examples/modern (BuildKit features, a target, build args, a build
# secret, an ADD --checksum from a served URL) and checks its rootfs file by file.
.PHONY: test-builder-vm test-builder-vm-failing test-builder-vm-modern
test-builder-vm:
	scripts/test-builder-vm.sh examples/hello main

test-builder-vm-modern:
	scripts/test-builder-vm.sh --serve examples/modern/served --secret app_token \
		--submit-arg --target=app --submit-arg --build-arg=APP_VERSION=1.2.3 \
		--submit-arg --build-arg=ASSET_URL={served}/asset.txt \
		--check examples/modern/check-rootfs.sh examples/modern main

test-builder-vm-failing:
	scripts/test-builder-vm.sh --expect-user-error examples/failing main

# Hostile tenant: examples/hostile's RUN steps attack the VM's isolation (metadata, a private
# LAN, the host's ports and the node's API, another VM running beside it, the config drive,
# forged progress lines and reports, io_uring, a connection flood); the suite checks from the
# outside that nothing got through and the node kept serving (docs/security/hostile-suite.md).
.PHONY: test-builder-vm-hostile
test-builder-vm-hostile:
	scripts/test-builder-vm.sh --hostile examples/hostile main

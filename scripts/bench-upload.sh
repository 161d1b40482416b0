#!/usr/bin/env bash
# Benchmark of the rootfs upload (issue 12): our multipart upload (`builder-agent upload`, the
# code a build uploads its rootfs with: several parts in flight, Content-MD5 and a signed SHA-256
# per part) against `aws s3 cp` of the same file to the same S3 server, same endpoint, same
# credentials, same part size (aws keeps its own 10 requests in flight).
#
# Makes an incompressible file of rootfs size, then uploads it BENCH_ROUNDS times with each tool,
# alternating which goes first, removing each object after its run (outside the timing). Prints
# each run, the medians, and ends with
#   ratio_vs_aws_cli=ours/aws          (median over median; goal <= 1.0)
#
# Runs as root and installs what is missing: awscli from Debian (apt-get) when there is no
# `aws`, SeaweedFS as scripts/test.sh does. It uses the S3 server of the test services
# (scripts/lib/services.sh), started here (S3 only) when BUILDER_TEST_S3_ENDPOINT is not set and
# stopped on exit when this run started it (running ones are reused and left running).
# Knobs (environment):
#   BENCH_DIR (/var/tmp/bench-upload)  BENCH_MIB (1024)  BENCH_ROUNDS (5)  BENCH_PART_MIB (16)
#   BENCH_PARTS_IN_FLIGHT (the agent's default)
#   BUILDER_AGENT (target/release/builder-agent, built if missing)
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "bench-upload: run as root (it installs packages and starts services)" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/services.sh
source "$repo/scripts/lib/services.sh"
bt_ensure_commands python3=python3 curl=curl
command -v aws >/dev/null || bt_apt_install awscli
leased=false
if [ -z "${BUILDER_TEST_S3_ENDPOINT:-}" ]; then
	bt_ensure_weed
	bt_lease_take
	leased=true
	bt_lock
	bt_start_s3
	bt_unlock
	eval "$(bt_env)"
fi
dir=${BENCH_DIR:-/var/tmp/bench-upload}
mib=${BENCH_MIB:-1024}
rounds=${BENCH_ROUNDS:-5}
part_mib=${BENCH_PART_MIB:-16}
agent=${BUILDER_AGENT:-$repo/target/release/builder-agent}
bucket=$BUILDER_TEST_S3_BUCKET
prefix=bench-upload-$$

log() { echo "bench-upload: $*" >&2; }
now() { date +%s.%N; }
# Sets $result to the seconds between two `now` values.
elapsed() { result=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"); }

# aws reads the endpoint's credentials and its transfer settings from here, not ~/.aws.
export AWS_ACCESS_KEY_ID=$BUILDER_TEST_S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$BUILDER_TEST_S3_SECRET_KEY
export AWS_DEFAULT_REGION=$BUILDER_TEST_S3_REGION AWS_CONFIG_FILE=$dir/aws-config
export AWS_SHARED_CREDENTIALS_FILE=/dev/null
aws_s3() { aws --endpoint-url "$BUILDER_TEST_S3_ENDPOINT" s3 "$@"; }

finish() {
	aws_s3 rm --quiet --recursive "s3://$bucket/$prefix/" >/dev/null 2>&1 || true
	rm -f "$dir/rootfs.ext4" "$dir/secrets.json" "$dir/aws-config" "$dir/ours.json"
	rmdir "$dir" 2>/dev/null || true
	if $leased; then bt_lease_release; fi
}
trap finish EXIT

# shellcheck source=scripts/lib/toolchain.sh
source "$repo/scripts/lib/toolchain.sh"
bt_ensure_release_binary "$agent" builder-agent "$repo"

mkdir -p "$dir"
printf '[default]\ns3 =\n  multipart_threshold = %dMB\n  multipart_chunksize = %dMB\n' \
	"$part_mib" "$part_mib" >"$dir/aws-config"
(
	umask 077
	python3 - "$dir/secrets.json" <<-'EOF'
		import json, os, sys
		json.dump({"s3": {
		    "endpoint": os.environ["BUILDER_TEST_S3_ENDPOINT"],
		    "region": os.environ["BUILDER_TEST_S3_REGION"],
		    "access_key_id": os.environ["BUILDER_TEST_S3_ACCESS_KEY"],
		    "secret_access_key": os.environ["BUILDER_TEST_S3_SECRET_KEY"],
		}}, open(sys.argv[1], "w"))
	EOF
)
log "making $dir/rootfs.ext4 ($mib MiB, random)"
head -c "$((mib << 20))" /dev/urandom >"$dir/rootfs.ext4"
flight_args=()
[ -z "${BENCH_PARTS_IN_FLIGHT:-}" ] || flight_args=(--parts-in-flight "$BENCH_PARTS_IN_FLIGHT")

run_ours() {
	local key=$prefix/ours-$1 t0 t1
	t0=$(now)
	"$agent" upload "$dir/rootfs.ext4" --secrets "$dir/secrets.json" --bucket "$bucket" \
		--key "$key" --part-size-mib "$part_mib" "${flight_args[@]}" >"$dir/ours.json"
	t1=$(now)
	elapsed "$t0" "$t1"
	parts_in_flight=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["parts_in_flight"])' "$dir/ours.json")
	check_size "$key"
}

run_aws() {
	local key=$prefix/aws-$1 t0 t1
	t0=$(now)
	aws_s3 cp --quiet "$dir/rootfs.ext4" "s3://$bucket/$key"
	t1=$(now)
	elapsed "$t0" "$t1"
	check_size "$key"
}

# Fails unless the object has the file's size; then removes it.
check_size() {
	local size
	size=$(aws --endpoint-url "$BUILDER_TEST_S3_ENDPOINT" s3api head-object --bucket "$bucket" \
		--key "$1" --query ContentLength --output text)
	[ "$size" = "$((mib << 20))" ] || { log "s3://$bucket/$1 has $size bytes, expected $((mib << 20))"; exit 1; }
	aws_s3 rm --quiet "s3://$bucket/$1"
}

ours=() theirs=()
order=(ours aws)
for round in $(seq 1 "$rounds"); do
	for name in "${order[@]}"; do
		"run_$name" "$round"
		if [ "$name" = ours ]; then ours+=("$result"); else theirs+=("$result"); fi
		echo "round $round: $name=$result"
	done
	order=("${order[1]}" "${order[0]}")
done

python3 - "$mib" "$part_mib" "$parts_in_flight" "${ours[*]}" "${theirs[*]}" <<-'EOF'
	import statistics, sys
	mib, part_mib, in_flight = sys.argv[1:4]
	ours, aws = (statistics.median(map(float, runs.split())) for runs in sys.argv[4:6])
	print(f"file_mib={mib} part_mib={part_mib} ours_parts_in_flight={in_flight}")
	print(f"ours_median_s={ours:.3f} ours_mib_per_s={int(mib) / ours:.0f}")
	print(f"aws_cli_median_s={aws:.3f} aws_cli_mib_per_s={int(mib) / aws:.0f}")
	print(f"ratio_vs_aws_cli={ours / aws:.2f}")
EOF

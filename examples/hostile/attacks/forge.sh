#!/bin/sh
# Forged state: the agent's progress lines (as they are, after a carriage return, after an
# erase-line escape), its exit line, and a report, a log and a progress event posted to the
# node's VM listener without the build's key.
# shellcheck source=examples/hostile/attacks/lib.sh
. /hostile/attacks/lib.sh
echo "# printed (judged from the outside: the node's events): forged progress lines" >>"$results"
for phase in clone checkout build export convert upload notify; do
	echo "==> $phase"
done
printf '\r==> upload\n'
printf '\033[2K\r==> upload\n'
printf 'builder-agent: ==> upload\n'
echo "builder-agent: exit=0"

# Tell the suite when the forged lines were printed (it compares with the recorded states).
[ -z "$CONTROL" ] || $hostile http forged-announce GET "$CONTROL" /forged-progress - >/dev/null
id=$(build_id)
listener=$(own_listener)
echo "build id $id, VM listener $listener"
now=$(date +%s)
fake_sig=v1=$(printf '%064d' 0 | tr 0 a)
cat >/tmp/report.json <<JSON
{"build_id":"$id","status":"succeeded","repo_url":"https://evil.example/forged.git","revision":"main",
 "commit_sha":"0000000000000000000000000000000000000000","image_digest":"sha256:$(printf '%064d' 0)",
 "rootfs":{"location":"s3://forged-bucket/forged.ext4","size_bytes":1,"sha256":"$(printf '%064d' 0)"},
 "error":null,"phases":[],"started_at_unix_ms":${now}000,"duration_ms":1}
JSON
verdict() { # NAME RESULT_LINE: any 2xx answer means the node took it
	case $2 in
	*status=2??) record "$1 REACHED the node accepted it: ${2#* }" ;;
	*) record "$1 blocked ${2#* }" ;;
	esac
}
out=$($hostile http forged-report POST "$listener" "/v1/internal/builds/$id/complete" /tmp/report.json \
	"x-builder-timestamp: $now" "x-builder-signature: $fake_sig")
verdict forged-report "$out"
out=$($hostile http forged-report-unsigned POST "$listener" "/v1/internal/builds/$id/complete" /tmp/report.json)
verdict forged-report-unsigned "$out"
echo '==> upload (forged log line)' >/tmp/log.txt
out=$($hostile http forged-log POST "$listener" "/v1/internal/builds/$id/logs/build" /tmp/log.txt \
	"x-builder-timestamp: $now" "x-builder-signature: $fake_sig")
verdict forged-log "$out"
echo "{\"build_id\":\"$id\",\"phase\":\"upload\",\"at_unix_ms\":${now}000}" >/tmp/event.json
for route in events progress phase; do
	out=$($hostile http "forged-$route" POST "$listener" "/v1/internal/builds/$id/$route" /tmp/event.json \
		"x-builder-timestamp: $now" "x-builder-signature: $fake_sig")
	verdict "forged-event-$route" "$out"
done
exit 0

# Shared by the lab scenarios: build.sh puts it in dom0 as /lab.sh, scenarios source it.
ok() { echo "FERRY-RESULT PASS $*"; }
fail() { echo "FERRY-RESULT FAIL $*"; exit 0; }
NET="--transport tcp --insecure --timeout 60s"
# migrate_retry ARGS...: `ferry migrate ARGS --json` (report in /tmp/out.json), tried
# again while the peer is not listening yet; shows the outcome and fails the scenario
# unless the migration verified.
migrate_retry() {
  for i in $(seq 150); do
    ferry migrate "$@" --json > /tmp/out.json 2>/tmp/out.err && break
    grep -qiE "refused|connecting" /tmp/out.err || break
    sleep 2
  done
  grep -v "^  round\|^ferry: started" /tmp/out.err | sed 's/^/FERRY-OUT /'
  echo "FERRY-REPORT $(tr -d '\n ' < /tmp/out.json | cut -c1-2500)"
  grep -q '"verified": *true' /tmp/out.json || fail "ferry migrate $* did not verify"
}

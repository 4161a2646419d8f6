#!/usr/bin/env bash
# Makes this fixture: a factory created by tufa before its channels were separated
# (ADR 0009), with CI builds 1 and 2 published and build 1 released by a wave, as the
# tables of a schema-0005 database (tables.json), the server's master key, its blobs,
# the downloaded offline keys archive and the admin token.
#
#   git worktree add --detach /tmp/legacy-src ae0ccf9   # the last commit before ADR 0009
#   python3 -m venv /tmp/legacy-venv && /tmp/legacy-venv/bin/pip install -e '/tmp/legacy-src[server]'
#   tests/data/legacy-factory/make.sh /tmp/legacy-venv/bin
#
# Roots and production targets are made to last (100 and 10 years): the tests load
# them years from now. Online metadata expires; the server re-signs it when it starts.
set -euo pipefail
bin=$1
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
port=18791
export TUFA_OPERATOR_TOKEN=tufa_op_legacy_fixture_0123456789abcdefghij
"$bin/tufa-server" run --data-dir "$work/data" --port "$port" \
  --root-expiry 36500d --prod-targets-expiry 36500d >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
export TUFA_CONFIG="$work/config.json" TUFA_SERVER="http://127.0.0.1:$port"
"$bin/tufa" factory create legacy --token "$TUFA_OPERATOR_TOKEN" --login --json >"$work/created.json"
cd "$work"
"$bin/tufa" keys download legacy-keys.tgz
for build in 1 2; do
  head -c 4096 /dev/zero | tr '\0' "$build" >"image-$build.bin"
  "$bin/tufa" targets add "rpi4-image-$build" --file "image-$build.bin" --version "$build" \
    --hardware-id rpi4 --tag main
  if [ "$build" = 1 ]; then
    "$bin/tufa" waves init release-1 1 main -k legacy-keys.tgz --expires 3650d
    "$bin/tufa" waves complete release-1
  fi
done
kill "$server"; wait "$server" || true
"$bin/python" - "$work" "$here" <<'PY'
import base64, json, shutil, sys
from datetime import datetime
from pathlib import Path
from sqlalchemy import create_engine, inspect, select, MetaData

work, here = Path(sys.argv[1]), Path(sys.argv[2])
engine = create_engine(f"sqlite:///{work}/data/tufa.db")
meta = MetaData()
meta.reflect(engine)
def encode(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    return value
tables = {}
with engine.connect() as conn:
    for table in meta.sorted_tables:
        rows = conn.execute(select(table)).mappings().all()
        tables[table.name] = [{k: encode(v) for k, v in row.items()} for row in rows]
(here / "tables.json").write_text(json.dumps(tables, indent=1, sort_keys=True) + "\n")
shutil.copy(work / "data" / "master.key", here / "master.key")
shutil.rmtree(here / "blobs", ignore_errors=True)
shutil.copytree(work / "data" / "blobs", here / "blobs", ignore=shutil.ignore_patterns("incoming"))
shutil.copy(work / "legacy-keys.tgz", here / "legacy-keys.tgz")
created = json.loads((work / "created.json").read_text())
(here / "tokens.json").write_text(json.dumps({
    "operator": "tufa_op_legacy_fixture_0123456789abcdefghij",
    "admin": created["admin_token"],
}, indent=1) + "\n")
PY
echo "fixture written to $here"

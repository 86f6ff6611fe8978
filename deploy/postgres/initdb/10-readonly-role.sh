#!/bin/bash
# Run once by the postgres image when it makes the database: the role `hindsight_read`, which
# can read every table and view (pg_read_all_data) and write nothing, for people who inspect
# the relabel store with SQL. Skipped when POSTGRES_READONLY_PASSWORD is empty.
set -euo pipefail
if [[ -z "${POSTGRES_READONLY_PASSWORD:-}" ]]; then
  echo "10-readonly-role: POSTGRES_READONLY_PASSWORD is empty; no read-only role made"
  exit 0
fi
psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username="$POSTGRES_USER" --dbname="$POSTGRES_DB" \
  --set=pw="$POSTGRES_READONLY_PASSWORD" --set=db="$POSTGRES_DB" <<'SQL'
CREATE ROLE hindsight_read LOGIN PASSWORD :'pw';
GRANT pg_read_all_data TO hindsight_read;
ALTER ROLE hindsight_read SET default_transaction_read_only = on;
GRANT CONNECT ON DATABASE :"db" TO hindsight_read;
SQL
echo "10-readonly-role: role hindsight_read made"

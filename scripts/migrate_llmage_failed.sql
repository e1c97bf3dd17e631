-- Brings an existing llmage llmusage_accounting_failed table (llmage's model: amount / cost as
-- double(18,5), use_time / failed_time / handled_time as timestamp) to billing_module's schema
-- (models/llmusage_accounting_failed.json), keeping every row.
--
-- MySQL / MariaDB. Run it once, on the database that holds the table, after a backup:
--     mysql -h HOST -u USER -p DBNAME < scripts/migrate_llmage_failed.sql
-- A second run stops at the first statement (the columns exist) and changes nothing.
-- DDL commits implicitly in MySQL, so the steps are ordered to be safe to resume by hand.
--
-- What changes:
--  * amount, cost: double currency units -> bigint micro-units (1e-6), exactly: the double is
--    read as the decimal(18,5) the column declared, then scaled by 10^6 in decimal arithmetic.
--  * timestamps -> datetime in UTC (the module's convention): the session time zone is UTC while
--    the columns change type, so each TIMESTAMP's instant becomes its UTC wall time.
--  * new columns: request_id, model_name, failure_code, retry_state, next_retry_at, handled_by,
--    resolved_time. Migrated rows refer to llmage's llmusage rows, which this module cannot
--    re-price, so they wait for an operator (retry_state 'exhausted', failure_code
--    'llmage_migrated') and keep llmage's usage id in request_id.
--  * llmusageid becomes unique (one failure row per usage record). llmage added a new row per
--    repeated failure; for such a usage id the newest row keeps llmusageid and the older rows
--    keep it in request_id only (llmusageid NULL), so no row is dropped.

SET time_zone = '+00:00';

-- 1. types of the time columns, defaults, and the new columns (amounts next to the old ones)
ALTER TABLE llmusage_accounting_failed
  MODIFY use_time DATETIME NULL DEFAULT NULL COMMENT 'use time (UTC)',
  MODIFY failed_time DATETIME NULL DEFAULT NULL COMMENT 'failed time (UTC)',
  MODIFY handled_time DATETIME NULL DEFAULT NULL COMMENT 'handled time (UTC)',
  MODIFY retry_count INT DEFAULT '0',
  MODIFY handled VARCHAR(1) DEFAULT '0',
  ADD COLUMN amount_micro BIGINT NULL COMMENT 'amount (micro-units)',
  ADD COLUMN cost_micro BIGINT NULL COMMENT 'cost (micro-units)',
  ADD COLUMN request_id VARCHAR(64) NULL COMMENT 'request id (idempotency key)',
  ADD COLUMN model_name VARCHAR(128) NULL COMMENT 'model name',
  ADD COLUMN failure_code VARCHAR(32) NULL COMMENT 'failure code',
  ADD COLUMN retry_state VARCHAR(16) DEFAULT 'waiting' COMMENT 'retry state: waiting/exhausted/resolved',
  ADD COLUMN next_retry_at DATETIME NULL COMMENT 'next automatic retry (UTC)',
  ADD COLUMN handled_by VARCHAR(64) NULL COMMENT 'handled by',
  ADD COLUMN resolved_time DATETIME NULL COMMENT 'accounted on retry at (UTC)';

-- 2. exact amounts; the migrated rows' state
UPDATE llmusage_accounting_failed
   SET amount_micro = CAST(CAST(amount AS DECIMAL(18,5)) * 1000000 AS SIGNED),
       cost_micro = CAST(CAST(cost AS DECIMAL(18,5)) * 1000000 AS SIGNED),
       request_id = llmusageid,
       failure_code = 'llmage_migrated',
       retry_state = 'exhausted',
       next_retry_at = NULL,
       retry_count = COALESCE(retry_count, 0),
       handled = COALESCE(handled, '0');

-- 3. one row per usage id: older duplicates keep the id in request_id only
UPDATE llmusage_accounting_failed f
  JOIN llmusage_accounting_failed newer
    ON newer.llmusageid = f.llmusageid
   AND (COALESCE(newer.failed_time, '1000-01-01') > COALESCE(f.failed_time, '1000-01-01')
        OR (COALESCE(newer.failed_time, '1000-01-01') = COALESCE(f.failed_time, '1000-01-01') AND newer.id > f.id))
   SET f.llmusageid = NULL;

-- 4. the micro-unit columns take the old names
ALTER TABLE llmusage_accounting_failed
  DROP COLUMN amount,
  DROP COLUMN cost;
ALTER TABLE llmusage_accounting_failed
  CHANGE amount_micro amount BIGINT NULL COMMENT 'amount (micro-units: 1e-6 of the currency unit)',
  CHANGE cost_micro cost BIGINT NULL COMMENT 'cost (micro-units: 1e-6 of the currency unit)';

-- 5. the module's new indexes (llmage's idx_laf_* indexes have the module's names already)
CREATE UNIQUE INDEX llmusage_accounting_failed_idx_laf_llmusageid ON llmusage_accounting_failed(llmusageid);
CREATE INDEX llmusage_accounting_failed_idx_laf_retry ON llmusage_accounting_failed(retry_state, next_retry_at);
CREATE INDEX llmusage_accounting_failed_idx_laf_cust_page ON llmusage_accounting_failed(userorgid, handled, failed_time, id);
CREATE INDEX llmusage_accounting_failed_idx_laf_page ON llmusage_accounting_failed(handled, failed_time, id);

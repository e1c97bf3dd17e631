-- Issue 13 (product semantics) for an existing MariaDB database of billing_module.
-- `billing-module initdb` creates only missing tables and indexes, so a database created before
-- this release needs these statements once (new databases get the columns from the models).
-- Idempotent on MariaDB (IF NOT EXISTS): run it while the module is stopped:
--     mysql billing < scripts/migrate_products_13.sql
-- On SQLite (no IF NOT EXISTS for columns) run each ALTER once, e.g.
--     ALTER TABLE product_subscription ADD COLUMN skipped_periods INTEGER NOT NULL DEFAULT 0;

-- periods that ended before a late renewal ran: skipped, never charged (docs/products.md)
ALTER TABLE product_subscription ADD COLUMN IF NOT EXISTS `skipped_periods` INT NOT NULL DEFAULT 0
    comment '跳过的周期数 (periods that ended before a late renewal ran: never charged)';

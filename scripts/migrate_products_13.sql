-- Issue 13 (product semantics) for an existing MariaDB database of billing_module.
-- `billing-module initdb` creates only missing tables and indexes, so a database created before
-- this release needs these statements once (new databases get the columns from the models).
-- Idempotent on MariaDB (IF NOT EXISTS): run it while the module is stopped:
--     mysql billing < scripts/migrate_products_13.sql
-- On SQLite (no IF NOT EXISTS for columns) run each ALTER once, e.g.
--     ALTER TABLE product_subscription ADD COLUMN skipped_periods INTEGER NOT NULL DEFAULT 0;
--     ALTER TABLE product ADD COLUMN fractional TEXT NOT NULL DEFAULT '1';
--     ALTER TABLE product ADD COLUMN period_anchor TEXT NOT NULL DEFAULT 'second';

-- periods that ended before a late renewal ran: skipped, never charged (docs/products.md)
ALTER TABLE product_subscription ADD COLUMN IF NOT EXISTS `skipped_periods` INT NOT NULL DEFAULT 0
    comment '跳过的周期数 (periods that ended before a late renewal ran: never charged)';

-- whether a product accepts fractional quantities; existing products keep accepting them ('1'),
-- new ones in token / call / image / request units default to whole units ('0')
ALTER TABLE product ADD COLUMN IF NOT EXISTS `fractional` CHAR(1) NOT NULL DEFAULT '1'
    comment '允许小数数量: 1 yes (second, char), 0 whole units only (token, call, image)';

-- where a product's periods start: 'day' (midnight of the subscription day in the configured
-- timezone; new products) or 'second' (the second of subscribing; existing products keep it)
ALTER TABLE product ADD COLUMN IF NOT EXISTS `period_anchor` VARCHAR(8) NOT NULL DEFAULT 'second'
    comment '周期起点: day = midnight of the subscription day in the configured time zone, second = the second of subscribing';

#!/usr/bin/env bash
# Grants every billing_module page and endpoint to the platform's roles, the platform's way:
# run from the host (Sage) root, where set_role_perm.py lives:
#     bash /path/to/billing_module/scripts/setup_billing_perms.sh
# Re-running is harmless. Restart the host afterwards (rbac caches role permissions).
# Hosts without set_role_perm.py: python scripts/billing_perms.py (same paths and roles, via SQL).
# tests/test_perms.py fails when a .dspy or .ui under wwwroot/ is missing here.
set -euo pipefail

if [ ! -f set_role_perm.py ]; then
    echo "run this from the host root (set_role_perm.py not found in $(pwd))" >&2
    exit 1
fi

set_perm() { python set_role_perm.py "$1" "$2"; }


# the platform's administering roles: everything
ADMIN_ROLES="owner.superuser owner.admin reseller.admin provider.admin reseller.operator"
# a customer organisation's users: a session of these roles is a customer caller limited to the
# user's organisation (Caller.for_session, the same scope rule as a customer API key), so they
# may hold the customer pages and the read APIs that show their organisation's own books (usage
# without cost and margin)
CUSTOMER_ROLES="customer.admin customer.user"

# the customer area: a customer user's own organisation (every figure through the API as its caller)
CUSTOMER_PAGES="
/billing_module/my/index.ui
/billing_module/my/balance.ui
/billing_module/my/usage.ui
/billing_module/my/subscriptions.ui
/billing_module/my/statements.ui
/billing_module/my/budgets.ui
"
# pages
PAGES="
/billing_module/index.ui
/billing_module/menu.ui
/billing_module/failed_accounting.ui
/billing_module/usage_logs.ui
/billing_module/balances.ui
/billing_module/budgets.ui
/billing_module/product_resources.ui
/billing_module/product_suppliers.ui
/billing_module/product_subscriptions.ui
/billing_module/product_consumption.ui
/billing_module/sync_status.ui
/billing_module/alerts.ui
/billing_module/products.ui
/billing_module/tables.ui
$CUSTOMER_PAGES
/billing_module/my/keys.ui
"
# page actions: runs the POST APIs below for a page (admin roles only)
ACTION_PAGES="
/billing_module/action.ui
"
# read APIs
READ_APIS="
/billing_module/api/health.dspy
/billing_module/api/balance.dspy
/billing_module/api/balances.dspy
/billing_module/api/transactions.dspy
/billing_module/api/pricing.dspy
/billing_module/api/quote.dspy
/billing_module/api/users.dspy
/billing_module/api/failed_accounting_list.dspy
/billing_module/api/usage_list.dspy
/billing_module/api/usage_export.dspy
/billing_module/api/usage_stats.dspy
/billing_module/api/products.dspy
/billing_module/api/product.dspy
/billing_module/api/product_bindings.dspy
/billing_module/api/product_suppliers.dspy
/billing_module/api/product_subscriptions.dspy
/billing_module/api/product_quota.dspy
/billing_module/api/product_usage_list.dspy
/billing_module/api/product_overage.dspy
/billing_module/api/product_stats.dspy
/billing_module/api/sync_status.dspy
/billing_module/api/customer_keys.dspy
/billing_module/api/statements.dspy
/billing_module/api/statement_export.dspy
/billing_module/api/alerts.dspy
/billing_module/api/alert_webhook.dspy
/billing_module/api/budgets.dspy
"
# read APIs a customer user may call: prices, what each product sells, and its own
# organisation's balance, ledger, subscriptions and statements
CUSTOMER_APIS="
/billing_module/api/pricing.dspy
/billing_module/api/quote.dspy
/billing_module/api/products.dspy
/billing_module/api/product.dspy
/billing_module/api/product_bindings.dspy
/billing_module/api/balance.dspy
/billing_module/api/transactions.dspy
/billing_module/api/product_subscriptions.dspy
/billing_module/api/product_quota.dspy
/billing_module/api/statements.dspy
/billing_module/api/statement_export.dspy
/billing_module/api/usage_list.dspy
/billing_module/api/usage_stats.dspy
/billing_module/api/usage_export.dspy
/billing_module/api/alerts.dspy
/billing_module/api/alert_webhook.dspy
/billing_module/api/budgets.dspy
"
# write APIs
WRITE_APIS="
/billing_module/api/accounting.dspy
/billing_module/api/accounting_submit.dspy
/billing_module/api/accounting_batch.dspy
/billing_module/api/authorize.dspy
/billing_module/api/settle.dspy
/billing_module/api/release.dspy
/billing_module/api/recharge.dspy
/billing_module/api/adjust.dspy
/billing_module/api/refund.dspy
/billing_module/api/account_update.dspy
/billing_module/api/failed_accounting_retry.dspy
/billing_module/api/failed_accounting_handle.dspy
/billing_module/api/product_save.dspy
/billing_module/api/product_bind.dspy
/billing_module/api/product_unbind.dspy
/billing_module/api/product_supplier_add.dspy
/billing_module/api/product_supplier_update.dspy
/billing_module/api/product_supplier_disable.dspy
/billing_module/api/product_subscribe.dspy
/billing_module/api/budget_set.dspy
/billing_module/api/product_subscription_cancel.dspy
/billing_module/api/product_subscription_resume.dspy
/billing_module/api/product_use.dspy
/billing_module/api/sync_run.dspy
/billing_module/api/customer_key_create.dspy
/billing_module/api/customer_key_revoke.dspy
/billing_module/api/alert_webhook_set.dspy
/billing_module/api/alert_redeliver.dspy
"
# the native routes of the hot endpoints (billing_module/api/native.py): the same handlers as
# their .dspy paths above, at /billing_module/fast/<name>, granted like them
FAST_APIS="
/billing_module/fast/accounting
/billing_module/fast/accounting_batch
/billing_module/fast/authorize
/billing_module/fast/settle
/billing_module/fast/release
/billing_module/fast/balance
/billing_module/fast/quote
"
# the native routes of the customer roles' read APIs above
CUSTOMER_FAST_APIS="
/billing_module/fast/quote
/billing_module/fast/balance
"
# CRUD pages generated by json/build.sh (read-only browsers; the code tables are editable)
GENERATED="
/billing_module/appcodes/index.ui
/billing_module/appcodes/get_appcodes.dspy
/billing_module/appcodes/add_appcodes.dspy
/billing_module/appcodes/update_appcodes.dspy
/billing_module/appcodes/delete_appcodes.dspy
/billing_module/appcodes_kv/index.ui
/billing_module/appcodes_kv/get_appcodes_kv.dspy
/billing_module/appcodes_kv/add_appcodes_kv.dspy
/billing_module/appcodes_kv/update_appcodes_kv.dspy
/billing_module/appcodes_kv/delete_appcodes_kv.dspy
/billing_module/sync_state/index.ui
/billing_module/sync_state/get_sync_state.dspy
/billing_module/users_cache/index.ui
/billing_module/users_cache/get_users_cache.dspy
/billing_module/llmage_cache/index.ui
/billing_module/llmage_cache/get_llmage_cache.dspy
/billing_module/pricing_cache/index.ui
/billing_module/pricing_cache/get_pricing_cache.dspy
"

# open to anyone: the standalone host's login (a host with rbac answers it 404 and uses its own)
# and the health check monitors call. rbac sees grants to the literal role "any" only when its role
# table has a row whose id is "any" (rbac/userperm.py load_roleperms joins on it); platform databases
# are seeded with it, and scripts/billing_perms.py inserts it when it is missing.
for path in /billing_module/login.ui /billing_module/login.dspy /billing_module/logout.dspy /billing_module/api/health.dspy; do
    set_perm any "$path"
done
# the Prometheus scrape: an admin key or metrics.scrape_token, checked by the endpoint itself
for path in /billing_module/metrics/index.dspy /billing_module/api/metrics.dspy; do
    set_perm any "$path"
done
# the sync export: machine callers, every request signed with an app or admin key and verified
# by the endpoint itself (api/sync_export.py)
for path in /billing_module/sync/users.dspy /billing_module/sync/pricing.dspy /billing_module/sync/llmage.dspy /billing_module/sync/uapi.dspy; do
    set_perm any "$path"
done

for role in $ADMIN_ROLES; do
    for path in $PAGES $ACTION_PAGES $READ_APIS $WRITE_APIS $FAST_APIS $GENERATED; do
        set_perm "$role" "$path"
    done
done
for role in $CUSTOMER_ROLES; do
    for path in $CUSTOMER_PAGES $CUSTOMER_APIS $CUSTOMER_FAST_APIS; do
        set_perm "$role" "$path"
    done
done
# a customer organisation's admin also manages its organisation's customer-scoped API keys
for path in /billing_module/my/keys.ui /billing_module/api/customer_keys.dspy /billing_module/api/customer_key_create.dspy /billing_module/api/customer_key_revoke.dspy; do
    set_perm customer.admin "$path"
done

echo "billing_module permissions registered; restart the host so rbac reloads them"

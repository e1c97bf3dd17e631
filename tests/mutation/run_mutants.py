"""Planted-bug campaign: apply each mutant to a temporary copy of the tree, run the tests that
must kill it, report killed / survived. Not part of the runtime package and not collected by
pytest. Usage, from the repository root:

    python tests/mutation/run_mutants.py                 # SQLite
    BILLING_TEST_MYSQL=mysql://root@127.0.0.1:3306/test python tests/mutation/run_mutants.py
    BILLING_TEST_MYSQL=... python tests/mutation/run_mutants.py --backend mysql   # MariaDB only
    python tests/mutation/run_mutants.py --only held_ignored_when_covering

A mutant whose snippet is no longer in its file (the code moved) is reported as ``stale``: update
its snippet, do not drop it. The unmutated copy must pass every killing test first.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLANTED = "tests/test_planted_bugs.py"
RECOVERY = "tests/test_recovery.py"
PRODUCTS = "tests/test_products.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str            # file relative to the repository root
    original: str        # exact snippet, must occur exactly once
    replacement: str
    tests: tuple         # pytest node ids that must fail with the mutant in place


MUTANTS = [
    Mutant("backoff_never_grows", "billing_module/failures.py",
           "acc.retry_base_seconds * (2 ** retry_count)", "acc.retry_base_seconds * (2 ** 0)",
           (f"{PLANTED}::test_retry_backoff_grows_retry_by_retry",)),
    Mutant("failure_record_reopens_accounted", "billing_module/failures.py",
           '            elif rec.status == "accounted":\n                return None',
           "            elif False:\n                return None",
           (f"{PLANTED}::test_recording_a_failure_never_turns_an_accounted_event_back",)),
    Mutant("submit_skips_payload_hash", "billing_module/accounting.py",
           "return _queued_view(row)\n        if existing.payload_hash != ev.hash:",
           "return _queued_view(row)\n        if False:",
           (f"{PLANTED}::test_submit_refuses_a_reused_request_id_with_another_payload",
            f"{PLANTED}::test_submit_over_http_answers_409_for_a_reused_request_id")),
    Mutant("post_many_balance_before_entry", "billing_module/ledger.py",
           "entries[-1].update(balance_after=running, currency=row.currency)",
           'entries[-1].update(balance_after=running - item["amount"], currency=row.currency)',
           (f"{PLANTED}::test_batched_entries_carry_their_running_balance",)),
    Mutant("release_after_settle", "billing_module/ledger.py",
           '            if hold.status == "settled":\n                raise Conflict(f"hold {hold.id} is settled',
           '            if False:\n                raise Conflict(f"hold {hold.id} is settled',
           (f"{PLANTED}::test_a_settled_hold_cannot_be_released",)),
    Mutant("close_hold_not_only_open", "billing_module/ledger.py",
           "\"where id = ${h}$ and status = 'open'\", {\"st\": status",
           "\"where id = ${h}$\", {\"st\": status",
           (f"{PLANTED}::test_an_expiry_racing_a_settle_releases_nothing_twice",)),
    Mutant("held_ignored_when_covering", "billing_module/ledger.py",
           'cond += " and balance - held + ${amt}$ - ${hd}$ >= -coalesce(credit_limit, 0)"',
           'cond += " and balance + ${amt}$ - ${hd}$ >= -coalesce(credit_limit, 0)"',
           (f"{PLANTED}::test_usage_debits_respect_held_money",)),
    Mutant("settle_skips_customer_check", "billing_module/ledger.py",
           "    if hold.customer_id != customer_id:\n        raise Forbidden(",
           "    if False:\n        raise Forbidden(",
           (f"{PLANTED}::test_a_customer_key_cannot_settle_another_customers_hold",)),
    Mutant("reconcile_skips_running_balance", "billing_module/ledger.py",
           "chain_ok = r.customer_id not in broken", "chain_ok = True",
           (f"{PLANTED}::test_reconcile_reports_a_broken_running_balance_per_customer",)),
    # the bug issue 10 started from: the retry rebuilt the event without resolving the llmid
    Mutant("retry_rebuilds_without_resolving", "billing_module/accounting.py",
           "        if not model_name and llmid:\n            model = await self._model_by_id(llmid, memo)\n",
           "        if False:\n            model = await self._model_by_id(llmid, memo)\n",
           (f"{RECOVERY}::test_issue_reproduction_llmid_only_event_is_recovered_and_charged_once",)),
    # a subscriber's charges must reach the quota hook: the balance row's count, and the debit's check of it
    Mutant("subscribe_keeps_no_count", "billing_module/products/subscriptions.py",
           '            await tx.insert("product_subscription", sub)\n            await recount(tx, customer_id)\n',
           '            await tx.insert("product_subscription", sub)\n',
           (f"{PRODUCTS}::test_the_balance_row_counts_active_subscriptions",
            f"{PRODUCTS}::test_post_usage_spends_the_quota_first_and_charges_only_the_overage")),
    Mutant("expiry_keeps_the_count", "billing_module/products/subscriptions.py",
           '{"s": sub.id, "why": reason[:255], "now": now})\n        await recount(tx, sub.customer_id)\n',
           '{"s": sub.id, "why": reason[:255], "now": now})\n',
           (f"{PRODUCTS}::test_the_balance_row_counts_active_subscriptions",)),
    Mutant("debit_ignores_subscriptions", "billing_module/accounting.py",
           "row, defer_to=self._subscribed_flag)", "row, defer_to=())",
           (f"{PRODUCTS}::test_the_balance_row_counts_active_subscriptions",
            f"{PRODUCTS}::test_post_usage_spends_the_quota_first_and_charges_only_the_overage")),
    # a group's debit with no read first must leave subscribers, budgets, alerts and other
    # currencies to the careful way
    Mutant("batch_debit_ignores_subscriptions", "billing_module/accounting.py",
           "defer_to=self._subscribed_flag)\n            if entries is None:",
           "defer_to=())\n            if entries is None:",
           (f"{PRODUCTS}::test_a_group_of_a_subscribers_charges_spends_the_quota_first",)),
    Mutant("unflagged_debit_ignores_flags", "billing_module/ledger.py",
           "unflagged=self._flags(total, True) + defer_to)", "unflagged=defer_to)",
           ("tests/test_group_commit.py::test_post_many_unflagged_writes_nothing_where_the_careful_way_has_work",
            "tests/test_group_commit.py::test_a_plain_group_waits_little_and_flagged_customers_keep_their_treatment")),
    Mutant("unflagged_debit_any_currency", "billing_module/ledger.py",
           "update = _balance_update(must_cover, refuse_suspended, currency=True,",
           "update = _balance_update(must_cover, refuse_suspended, currency=False,",
           ("tests/test_group_commit.py::test_post_many_unflagged_writes_nothing_where_the_careful_way_has_work",)),
    # a debit assumed to pass is checked before the COMMIT; refuted, it runs again the careful way
    Mutant("assumed_debit_unchecked", "billing_module/ledger.py",
           "await tx.execute(_balance_update(*shape, unflagged=flags), ns, later=True, expect=1)",
           "await tx.execute(_balance_update(*shape, unflagged=flags), ns, later=True)",
           (f"{PLANTED}::test_usage_debits_respect_held_money",
            "tests/test_handoffs.py::test_a_customer_whose_debits_need_more_is_not_assumed_to_pass_until_one_passes_plainly")),
    Mutant("assumed_group_debit_unchecked", "billing_module/ledger.py",
           "await tx.execute(update, ns, later=True, expect=1)", "await tx.execute(update, ns, later=True)",
           ("tests/test_group_commit.py::test_post_many_unflagged_writes_nothing_where_the_careful_way_has_work",)),
    Mutant("assumed_entries_running_backwards", "billing_module/ledger.py",
           'entries[-1]["debited_after"] = -running', 'entries[-1]["debited_after"] = running',
           ("tests/test_group_commit.py::test_post_many_unflagged_debits_with_exact_running_balances_without_a_read_first",)),
    Mutant("assumed_counts_unchecked_on_mysql", "billing_module/db/database.py",
           "            raise\n        _check_all(later, changed)\n        return changed[len(later):]",
           "            raise\n        return changed[len(later):]",
           (f"{PLANTED}::test_usage_debits_respect_held_money",
            "tests/test_handoffs.py::test_a_refuted_assumption_leaves_nothing_and_the_work_runs_again_without_it")),
    Mutant("refuted_count_masked_by_a_later_error", "billing_module/db/database.py",
           "            try:\n                _check_all(later, changed)\n            except AssumptionRefuted as refuted:\n"
           "                raise refuted from e\n            raise",
           "            raise",
           ("tests/test_handoffs.py::test_a_refuted_count_is_the_answer_even_when_a_statement_behind_it_fails",)),
    Mutant("overage_debit_unmarks_the_subscriber", "billing_module/accounting.py",
           "await self._debit(tx, ev, price, row, learn=False)", "await self._debit(tx, ev, price, row)",
           (f"{PRODUCTS}::test_a_subscribers_charges_refute_the_assumed_debit_once",)),
    Mutant("refuted_work_not_run_again", "billing_module/db/database.py",
           "            except AssumptionRefuted:\n                if not assumes:",
           "            except AssumptionRefuted:\n                if True:",
           ("tests/test_handoffs.py::test_a_refuted_assumption_leaves_nothing_and_the_work_runs_again_without_it",
            f"{PLANTED}::test_usage_debits_respect_held_money")),
    # a quote's (model, program) memo must go with a pricing sync: else the old price is charged
    Mutant("priced_memo_outlives_pricing_sync", "billing_module/catalog.py",
           'depends_on=("llmage", "pricing", "users")', 'depends_on=("llmage", "users")',
           ("tests/test_sync.py::test_incremental_sync_applies_changes_deletions_and_drops_caches",
            "tests/test_sync.py::test_no_pricing_after_the_program_is_deleted_at_the_centre")),
    # and with a users sync: else the customer keeps its old discount
    Mutant("priced_memo_outlives_users_sync", "billing_module/catalog.py",
           'depends_on=("llmage", "pricing", "users")', 'depends_on=("llmage", "pricing")',
           ("tests/test_sync.py::test_a_new_discount_is_used_at_once_after_a_users_sync",)),
    # a cached entry must go when its time is up: else another worker's synced price never shows here
    Mutant("cache_entry_never_expires", "billing_module/cache.py",
           "if entry is None or entry[1] <= self._timer():", "if entry is None:",
           ("tests/test_cache.py::test_a_warm_quote_sees_another_workers_price_once_its_entry_expired",
            "tests/test_cache.py::test_an_entry_expires_ttl_seconds_after_it_was_stored")),
    # the usual line's fast path must apply the customer's discount
    Mutant("fixed_price_line_ignores_discount", "billing_module/pricing.py",
           "_int_line(fixed, qty, disc)", "_int_line(fixed, qty, _ONE)",
           ("tests/test_pricing.py::test_discount_rounds_each_line",
            "tests/test_pricing.py::test_property_plan_equals_looking_every_rule_up")),
]


def copy_tree(dest):
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", ".hypothesis")
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def run_tests(tree, tests, backend=None):
    """pytest's exit code (0: every test passed; 1: some failed; 5: none ran) and its last line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    if backend:     # test ids carry the backend ([sqlite], [http-mysql-...]); a test of neither runs on both
        cmd += ["-k", f"not {'mysql' if backend == 'sqlite' else 'sqlite'}"]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    return done.returncode, (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]


# a mutant is killed only by a test that ran and failed: no test run (5), an error of pytest's
# own (2-4) is no kill
_VERDICT = {0: "survived", 1: "killed"}


def check_import_path(tree):
    out = subprocess.run([sys.executable, "-c", "import billing_module; print(billing_module.__file__)"],
                         cwd=tree, capture_output=True, text=True).stdout.strip()
    if not out.startswith(str(tree)):
        sys.exit(f"the copy at {tree} does not import its own package ({out}); aborting")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    ap.add_argument("--backend", choices=("sqlite", "mysql"),
                    help="run the killing tests on this database only (mysql needs BILLING_TEST_MYSQL)")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.backend == "mysql" and not os.environ.get("BILLING_TEST_MYSQL"):
        sys.exit("--backend mysql needs BILLING_TEST_MYSQL")
    backend = args.backend or ("SQLite + MariaDB" if os.environ.get("BILLING_TEST_MYSQL") else "SQLite")
    with tempfile.TemporaryDirectory(prefix="billing-mutants-") as tmp:
        tree = Path(tmp).resolve()
        copy_tree(tree)
        check_import_path(tree)
        all_tests = sorted({t for m in mutants for t in m.tests})
        code, tail = run_tests(tree, all_tests, args.backend)
        if code != 0:
            sys.exit(f"the unmutated tree fails its killing tests: {tail[0]}")
        results = []
        for m in mutants:
            target = tree / m.path
            source = target.read_text()
            if source.count(m.original) != 1:
                results.append((m, "stale", 0.0, f"snippet found {source.count(m.original)} times"))
                continue
            target.write_text(source.replace(m.original, m.replacement))
            started = time.monotonic()
            try:
                code, tail = run_tests(tree, m.tests, args.backend)
            finally:
                target.write_text(source)
            results.append((m, _VERDICT.get(code, f"error {code}"), time.monotonic() - started, tail[0]))
    print(f"planted-bug campaign on {backend}")
    print(f"{'mutant':36} {'result':9} {'seconds':>7}  last line of pytest")
    for m, result, seconds, tail in results:
        print(f"{m.name:36} {result:9} {seconds:7.1f}  {tail}")
    killed = sum(1 for _, r, _, _ in results if r == "killed")
    print(f"killed {killed} of {len(results)}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

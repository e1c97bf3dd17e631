"""``billing-module bench --check``: the targets, judged (the figures themselves are the bench's)."""
def test_bench_check_names_each_missed_target(capsys):
    from billing_module.tools.bench import check
    figures = {"post_usage_vs_floor_1": 0.7, "post_usage_vs_floor_8": 0.9, "pricing_hit_us": 3.0,
               "http_batch_eps": 12000.0}
    assert check({"sqlite": figures, "mysql": dict(figures, http_batch_eps=10.0)}) == [
        ("sqlite", "post_usage_vs_floor_8")]
    out = capsys.readouterr().out
    assert "post_usage_vs_floor_8" in out and "MISSED" in out and "not measured" in out


def test_each_figure_is_its_best_round_and_ratios_are_between_bests():
    """A rate's highest round, a time's lowest, errors added up; each ratio from the two bests."""
    from billing_module.tools.bench import best_of, ratios
    rounds = [{"floor_tps_1": 100.0, "post_usage_tps_1": 60.0, "floor_tps_8": 200.0, "post_usage_tps_8": 300.0,
               "floor_batch_rows_per_s": 1000.0, "accountant_eps": 400.0, "accountant_writes_eps": 700.0,
               "pricing_hit_us": 5.0, "http_batch_errors": 1},
              {"floor_tps_1": 120.0, "post_usage_tps_1": 50.0, "floor_tps_8": 180.0, "post_usage_tps_8": 330.0,
               "floor_batch_rows_per_s": 900.0, "accountant_eps": 450.0, "accountant_writes_eps": 650.0,
               "pricing_hit_us": 4.0, "http_batch_errors": 2}]
    best, spread = best_of(rounds)
    ratios(best)
    assert best["floor_tps_1"] == 120.0 and best["post_usage_tps_1"] == 60.0 and best["pricing_hit_us"] == 4.0
    assert best["http_batch_errors"] == 3 and "http_batch_errors" not in spread
    assert spread["pricing_hit_us"] == (4.0, 5.0)
    assert best["post_usage_vs_floor_1"] == 0.5 and best["accountant_vs_floor_batch"] == 0.45
    assert "http_batch_vs_accountant" not in best          # no HTTP figures in these rounds

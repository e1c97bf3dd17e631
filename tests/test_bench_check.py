"""``billing-module bench --check``: the targets, judged (the figures themselves are the bench's)."""
def test_bench_check_names_each_missed_target(capsys):
    from billing_module.tools.bench import check
    figures = {"post_usage_vs_floor_1": 0.7, "post_usage_vs_floor_8": 0.9, "pricing_hit_us": 3.0,
               "http_batch_eps": 12000.0}
    assert check({"sqlite": figures, "mysql": dict(figures, http_batch_eps=10.0)}) == [
        ("sqlite", "post_usage_vs_floor_8")]
    out = capsys.readouterr().out
    assert "post_usage_vs_floor_8" in out and "MISSED" in out and "not measured" in out

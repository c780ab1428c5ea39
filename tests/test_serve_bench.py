"""The serving bench ``python -m blip2_internlm.tools.serve_bench`` at a very small scale: it starts the server
with and without batching, drives it with concurrent clients, reports one row per server and client count,
the batching gain, and that each server shut down gracefully.  No timing is asserted: the bench measures,
this spec checks what it reports."""

import json

from blip2_internlm.tools import serve_bench


def test_the_bench_reports_a_row_per_server_and_client_count_and_both_servers_stop_gracefully(tmp_path, capsys):
    out = tmp_path / "serve.json"
    argv = ["--clients", "1,2", "--seconds", "0.5", "--warmup", "1", "--images", "3", "--out", str(out)]
    result = serve_bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    batched, sequential = (label for label, _ in serve_bench.SERVERS)
    assert [(row["server"], row["clients"]) for row in result["rows"]] == [(batched, 1), (batched, 2), (sequential, 2)]
    for row in result["rows"]:
        assert row["ok"] > 0 and row["errors"] == 0, row
        assert row["requests_per_s"] > 0 and row["p50_ms"] <= row["p95_ms"]
        assert row["mean_batch"] >= 1
    assert {row["mean_batch"] for row in result["rows"] if row["server"] == sequential} == {1.0}
    assert set(result["batching_gain"]) == {"clients", "batched_vs_sequential_server", "2_clients_vs_1_client"}
    for shutdown in result["shutdowns"].values():
        assert shutdown["graceful"] and shutdown["tracebacks_in_log"] == 0, result["shutdowns"]
    table = capsys.readouterr().out
    assert "| server | clients | requests/s |" in table and f"| {sequential} | 2 |" in table

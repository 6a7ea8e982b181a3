"""Prometheus series of prefill/decode disaggregation's KV hand-offs (engine.disagg.TransferStats), for every
served model whose engine has them:

    tokenloom_kv_transfer_blocks_total     KV blocks copied from prefill to decode workers
    tokenloom_kv_transfer_bytes_total      their bytes
    tokenloom_kv_transfer_skipped_blocks_total  leading blocks not sent: the decode worker held them already
    tokenloom_kv_transfer_fallbacks_total  requests whose decode worker computed the prompt itself (failed transfer)
    tokenloom_kv_transfer_seconds          histogram: prefill worker's export start -> decode worker's copy done
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily


def kv_transfer_families(engines: dict[str, object]):
    counters = {
        "blocks": CounterMetricFamily("tokenloom_kv_transfer_blocks", "KV blocks moved from prefill to decode "
                                      "workers", labels=["model_name"]),
        "bytes": CounterMetricFamily("tokenloom_kv_transfer_bytes", "Bytes of KV blocks moved from prefill to "
                                     "decode workers", labels=["model_name"]),
        "blocks_skipped": CounterMetricFamily("tokenloom_kv_transfer_skipped_blocks", "Prompt blocks not sent: the "
                                              "decode worker held them", labels=["model_name"]),
        "fallbacks": CounterMetricFamily("tokenloom_kv_transfer_fallbacks", "Requests whose decode worker computed "
                                         "the prompt itself", labels=["model_name"]),
    }
    seconds = HistogramMetricFamily("tokenloom_kv_transfer_seconds", "KV hand-off latency: export start to the "
                                    "decode worker's copy done", labels=["model_name"])
    found = False
    for model, engine in list(engines.items()):
        stats_of = getattr(engine, "kv_transfer_stats", None)
        if stats_of is None:
            continue
        found, t = True, stats_of()
        for attr, family in counters.items():
            family.add_metric([model], float(getattr(t, attr)))
        from tokenloom.engine.disagg import TRANSFER_BUCKETS

        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, TRANSFER_BUCKETS), "+Inf"], t.bucket_counts):
            cumulative += count
            buckets.append((bound, cumulative))
        seconds.add_metric([model], buckets, t.seconds_sum)
    if found:
        yield from counters.values()
        yield seconds

"""Prometheus metrics of one server (its own CollectorRegistry, so several servers in one process never clash).

    tokenloom_http_requests_total{path,status}       every HTTP request, by route and status code
    tokenloom_request_success_total{finished_reason} generation requests that ran to the end (stop / length)
    tokenloom_request_aborted_total                  generation requests aborted (client disconnected)
    tokenloom_time_to_first_token_seconds            histogram: arrival -> first generated token
    tokenloom_time_per_output_token_seconds          histogram: per request, decode time / (tokens - 1)
    tokenloom_e2e_request_latency_seconds            histogram: arrival -> last token
    tokenloom_prompt_tokens_total                    prompt tokens of finished generation requests
    tokenloom_generation_tokens_total                generated tokens of finished generation requests
    tokenloom_num_requests_running / _waiting        sequences in the engine now
    tokenloom_kv_cache_usage_perc                    share of KV-cache blocks in use (0..1)
    tokenloom_prefix_cache_hit_rate                  share of prompt tokens served from the prefix cache (0..1)
    tokenloom_batch_size                             histogram: sequences per engine step
    tokenloom_step_num_seqs / _max                   sequences in the last engine step / the most in any step
    tokenloom_num_preemptions / _engine_steps        preemptions and engine steps so far
    tokenloom_spec_decode_num_draft_tokens           speculative decoding: draft tokens verified so far
    tokenloom_spec_decode_num_accepted_tokens        of which accepted
    tokenloom_spec_decode_acceptance_rate            accepted / verified (0..1)
    tokenloom_spec_decode_mean_accepted_length       tokens per verify run: accepted drafts + 1
    tokenloom_grammar_compiles / _compile_seconds    structured output: constraints compiled, their total time
    tokenloom_grammar_mask_steps / _mask_seconds     steps that filled a grammar bitmask, total time filling them
    tokenloom_grammar_mask_seconds_per_step          mean mask time per such step
    tokenloom_kv_cache_bytes / _resident_bytes       the KV pool's size, and how much of it is in memory now
    tokenloom_kv_cache_released_bytes                KV memory of blocks that stayed free, given back to the OS
    tokenloom_request_errors_total{model_name,status} requests to a model answered with an error
    tokenloom_route_requests_total{route,model_name}  A/B routes: requests by the variant chosen
    tokenloom_generation_mean_logprob                histogram: mean token logprob of each answer (quality signal)
    tokenloom_kv_transfer_blocks_total / _bytes_total / _seconds   disaggregation's KV hand-offs (transfer_metrics)
    process_resident_memory_bytes, process_*         the server process (prometheus_client's process collector)

Every model series carries model_name: the loaded model (a variant such as smollm2-135m:int8) that served it.
"""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the server)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from tokenloom.engine.outputs import RequestOutput
from tokenloom.entrypoints.transfer_metrics import kv_transfer_families

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# (gauge, help, the EngineStats field it reads)
_STAT_GAUGES = [
    ("tokenloom_num_preemptions", "Preemptions so far", "num_preemptions"),
    ("tokenloom_engine_steps", "Engine steps so far", "steps"),
    ("tokenloom_spec_decode_num_draft_tokens", "Speculative draft tokens verified so far", "spec_draft_tokens"),
    ("tokenloom_spec_decode_num_accepted_tokens", "Speculative draft tokens accepted so far", "spec_accepted_tokens"),
    ("tokenloom_spec_decode_acceptance_rate", "Accepted share of verified draft tokens (0..1)",
     "spec_acceptance_rate"),
    ("tokenloom_spec_decode_mean_accepted_length", "Tokens per verify run: accepted drafts plus one",
     "spec_mean_accepted_length"),
    ("tokenloom_grammar_compiles", "Structured-output constraints compiled so far", "grammar_compiles"),
    ("tokenloom_grammar_compile_seconds", "Total time compiling structured-output constraints",
     "grammar_compile_seconds"),
    ("tokenloom_grammar_mask_steps", "Engine steps that filled a grammar bitmask", "grammar_mask_steps"),
    ("tokenloom_grammar_mask_seconds", "Total time filling grammar bitmasks (alongside forward passes)",
     "grammar_mask_seconds"),
    ("tokenloom_kv_cache_bytes", "Size of the KV-cache pool (address space reserved)", "kv_cache_bytes"),
    ("tokenloom_kv_cache_resident_bytes", "KV-cache memory written since last given back to the OS",
     "kv_resident_bytes"),
    ("tokenloom_kv_cache_released_bytes", "KV-cache memory given back to the OS so far", "kv_released_bytes"),
]
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)


# (gauge, help, value from the engine and its last stats) beyond _STAT_GAUGES
_ENGINE_GAUGES = [
    ("tokenloom_num_requests_running", "Sequences running in the engine", lambda e, st: st.num_running),
    ("tokenloom_num_requests_waiting", "Sequences waiting in the engine or its command queue",
     lambda e, st: e.num_waiting()),
    ("tokenloom_kv_cache_usage_perc", "Share of KV-cache blocks in use (0..1)", lambda e, st: st.kv_cache_usage),
    ("tokenloom_kv_cache_blocks_used", "KV-cache blocks in use", lambda e, st: st.num_blocks_used),
    ("tokenloom_kv_cache_blocks_total", "KV-cache blocks", lambda e, st: st.num_blocks_total),
    ("tokenloom_prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache (0..1)",
     lambda e, st: st.prefix_cache_hit_rate),
    ("tokenloom_grammar_mask_seconds_per_step", "Mean grammar bitmask time per step that filled one",
     lambda e, st: st.grammar_mask_seconds / max(1, st.grammar_mask_steps)),
    ("tokenloom_step_num_seqs", "Sequences in the last engine step", lambda e, st: e.last_step_num_seqs),
    ("tokenloom_step_num_seqs_max", "Most sequences in one engine step so far", lambda e, st: e.max_step_num_seqs),
] + [(name, doc, lambda e, st, attr=attr: getattr(st, attr)) for name, doc, attr in _STAT_GAUGES]
_LOGPROB_BUCKETS = (-8.0, -6.0, -4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, -0.1, 0.0)


class _EngineGauges:
    """A prometheus collector reading each loaded model's engine when scraped (models come and go)."""

    def __init__(self):
        self.engines: dict[str, object] = {}

    def collect(self):
        families = {name: GaugeMetricFamily(name, doc, labels=["model_name"]) for name, doc, _ in _ENGINE_GAUGES}
        for model, engine in list(self.engines.items()):
            st = engine.stats()
            for name, _, value in _ENGINE_GAUGES:
                families[name].add_metric([model], float(value(engine, st)))
        yield from families.values()
        yield from kv_transfer_families(self.engines)  # prefill/decode disaggregation's KV hand-offs


class ServerMetrics:
    """The server's metrics; each loaded model's series carry its name (model_name), so variants of one model
    served side by side are told apart."""

    def __init__(self):
        self.registry = reg = CollectorRegistry()
        ProcessCollector(registry=reg)  # resident memory, CPU seconds, open files of this process
        model = ["model_name"]
        self.http_requests = Counter("tokenloom_http_requests", "HTTP requests by route and status code",
                                     ["path", "status"], registry=reg)
        self.request_success = Counter("tokenloom_request_success", "Generation requests finished, by reason",
                                       ["model_name", "finished_reason"], registry=reg)
        self.request_aborted = Counter("tokenloom_request_aborted", "Generation requests aborted before the end",
                                       model, registry=reg)
        self.request_errors = Counter("tokenloom_request_errors", "Requests to a model answered with an error status",
                                      ["model_name", "status"], registry=reg)
        self.route_requests = Counter("tokenloom_route_requests", "Requests to a routed name, by the variant chosen",
                                      ["route", "model_name"], registry=reg)
        self.ttft = Histogram("tokenloom_time_to_first_token_seconds", "Time to first token",
                              model, buckets=_LATENCY_BUCKETS, registry=reg)
        self.tpot = Histogram("tokenloom_time_per_output_token_seconds", "Time per output token after the first",
                              model, buckets=_LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram("tokenloom_e2e_request_latency_seconds", "End-to-end request latency",
                             model, buckets=_E2E_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("tokenloom_prompt_tokens", "Prompt tokens of finished requests",
                                     model, registry=reg)
        self.generation_tokens = Counter("tokenloom_generation_tokens", "Generated tokens of finished requests",
                                         model, registry=reg)
        self.mean_logprob = Histogram("tokenloom_generation_mean_logprob",
                                      "Quality signal: mean log-probability of each answer's generated tokens "
                                      "(recorded for A/B route variants and requests asking for logprobs)",
                                      model, buckets=_LOGPROB_BUCKETS, registry=reg)
        self.batch_size = Histogram("tokenloom_batch_size", "Sequences per engine step", model,
                                    buckets=_BATCH_BUCKETS, registry=reg)
        self.step_seconds = Histogram("tokenloom_step_duration_seconds", "Duration of one engine step",
                                      model, buckets=_LATENCY_BUCKETS, registry=reg)
        self._gauges = _EngineGauges()
        reg.register(self._gauges)
        self._listeners: dict[str, tuple[object, object]] = {}

    def attach(self, model_name: str, async_engine) -> None:
        """Report a loaded model's engine under model_name (until detach)."""
        self.detach(model_name)

        def on_step(num_seqs: int, seconds: float) -> None:
            self.batch_size.labels(model_name).observe(num_seqs)
            self.step_seconds.labels(model_name).observe(seconds)

        self._gauges.engines[model_name] = async_engine
        async_engine.step_listeners.append(on_step)
        self._listeners[model_name] = (async_engine, on_step)

    def detach(self, model_name: str) -> None:
        self._gauges.engines.pop(model_name, None)
        engine, listener = self._listeners.pop(model_name, (None, None))
        if engine is not None and listener in engine.step_listeners:
            engine.step_listeners.remove(listener)

    def observe_http(self, path: str, status: int) -> None:
        self.http_requests.labels(path=path, status=str(status)).inc()

    def observe_error(self, model_name: str, status: int) -> None:
        self.request_errors.labels(model_name=model_name, status=str(status)).inc()

    def observe_route(self, route: str, model_name: str) -> None:
        self.route_requests.labels(route=route, model_name=model_name).inc()

    def observe_finished(self, out: RequestOutput, model_name: str, quality: bool = False) -> None:
        """A generation request that ran to the end."""
        m = out.metrics
        n_out = sum(len(o.token_ids) for o in out.candidates or out.outputs)  # best_of: every candidate's
        self.prompt_tokens.labels(model_name).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(model_name).inc(n_out)
        for o in out.outputs:
            self.request_success.labels(model_name=model_name, finished_reason=o.finish_reason or "stop").inc()
            if o.logprobs and o.token_ids:
                lps = [entry.get(t, 0.0) for t, entry in zip(o.token_ids, o.logprobs)]
                self.mean_logprob.labels(model_name).observe(sum(lps) / len(lps))
        if m.first_token_time is not None:
            self.ttft.labels(model_name).observe(m.first_token_time - m.arrival_time)
            longest = max(len(o.token_ids) for o in out.outputs)
            if m.finished_time is not None:
                self.e2e.labels(model_name).observe(m.finished_time - m.arrival_time)
                if longest > 1:
                    self.tpot.labels(model_name).observe((m.finished_time - m.first_token_time) / (longest - 1))

    def observe_aborted(self, model_name: str) -> None:
        self.request_aborted.labels(model_name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

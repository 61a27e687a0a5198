"""Writes the Grafana operator dashboard (grafana/dashboards/llmq-operator.json).

    python monitoring/build_dashboard.py > monitoring/grafana/dashboards/llmq-operator.json

Generated so that ids, grid positions and datasource references stay consistent; a test
checks the committed file equals this script's output. Queries use the ``$datasource``,
``$instance`` and ``$model`` template variables and Grafana's ``$__rate_interval``. Every
gateway replica reports the same per-model gauges (read from Redis), so they take ``max by
(model)`` across replicas, then ``sum`` across models.
"""

from __future__ import annotations

import json
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
GW = 'instance=~"$instance"'  # gateway and worker series carry their scrape instance
API = f'{GW},route!~"/metrics|/health"'
GWM = f'{GW},model=~"$model"'  # per-model series of the selected models
QUEUED = f"sum(max by (model) (api_queue_depth{{{GWM}}}))"
RI = "$__rate_interval"
SATURATION = f"sum(worker_active_jobs{{{GW}}}) / clamp_min(sum(worker_max_active{{{GW}}}), 1)"
# "or vector(0)": no 5xx series at all means 0 %, not "No data".
ERRORS = (
    f'(sum(rate(api_requests_total{{{API},status=~"5.."}}[{RI}])) or vector(0)) / '
    f"clamp_min(sum(rate(api_requests_total{{{API}}}[{RI}])), 1e-9)"
)


def pct(quantile: float, metric: str, sel: str = GW, by: str = "le") -> str:
    return f"histogram_quantile({quantile}, sum by ({by}) (rate({metric}_bucket{{{sel}}}[{RI}])))"


def per_model(metric: str) -> str:
    return f"max by (model) ({metric}{{{GWM}}})"


def pcts(metric: str, sel: str = GW) -> list[tuple[str, str]]:
    return [(pct(p / 100, metric, sel), f"p{p}") for p in (50, 95, 99)]


def rate(metric: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({metric}{{{GW}}}[{RI}]))"


# Stat panels: title, expression, unit, thresholds (orange, red), description; 4 high.
GLANCE: list[tuple[str, str, str, tuple[float, float] | None, str, int]] = [
    ("Request rate", f"sum(rate(api_requests_total{{{API}}}[{RI}]))", "reqps", None,
     "API requests per second, /metrics and /health excluded", 3),
    ("Error rate (5xx)", ERRORS, "percentunit", (0.01, 0.05),
     "Share of API requests answered 5xx (/metrics and /health excluded)", 4),
    ("p95 latency", pct(0.95, "api_request_latency_seconds", API), "s", (30, 120),
     "95th percentile of request latency to the last byte", 3),
    ("p95 TTFT", pct(0.95, "api_time_to_first_token_seconds", GWM), "s", (1, 2),
     "95th percentile time to first token, as the client sees it (selected models)", 3),
    ("Queue depth", QUEUED, "short", (10, 50),
     "Jobs of the selected models waiting in Redis (not yet picked up)", 3),
    ("Saturation", SATURATION, "percentunit", (0.8, 0.95),
     "Σ active jobs / Σ MAX_ACTIVE over workers", 4),
    ("Live workers", f"max(api_live_workers{{{GW}}})", "short", None,
     "Workers with a fresh heartbeat, as the gateways see them", 4),
]  # fmt: skip

Series = tuple[str, list[tuple[str, str]], str, str, int]  # title, [(expr, legend)], unit, desc, w
SECTIONS: list[tuple[str, int, list[Series]]] = [
    ("Trends", 8, [
        ("Requests by status", [(f"sum by (status) (rate(api_requests_total{{{API}}}[{RI}]))",
                                 "{{status}}")], "reqps", "API request rate by HTTP status", 12),
        ("Request latency", pcts("api_request_latency_seconds", API), "s",
         "Latency to the last byte (streams included)", 12),
        ("Time to first token", pcts("api_time_to_first_token_seconds", GWM), "s",
         "Request arrival to first token at the gateway (selected models)", 12),
        ("In flight", [(f"sum(api_active_requests{{{GW}}})", "HTTP requests in flight"),
                       (f"sum({per_model('api_jobs_in_system')})",
                        "admitted jobs (running + waiting)"),
                       (f"sum({per_model('api_capacity_slots')})", "capacity (Σ MAX_ACTIVE)")],
         "short", "Requests in flight against capacity (selected models; a worker serving "
         "several models counts its slots for each)", 12),
    ]),
    ("Models", 8, [
        ("Queue depth by model", [(per_model("api_queue_depth"), "{{model}}")], "short",
         "Jobs waiting per model: each model has its own queue and bound", 8),
        ("Running vs capacity by model", [
            (per_model("api_running_jobs"), "{{model}} running"),
            (per_model("api_capacity_slots"), "{{model}} slots")], "short",
         "Started jobs against the slots of the ready workers serving the model", 8),
        ("Scaling signal", [
            (per_model("api_model_desired_workers"), "{{model}} desired"),
            (per_model("api_model_ready_workers"), "{{model}} ready")], "short",
         "Workers each model needs (running + waiting / (per-slot drain x "
         "SCALE_TARGET_WAIT_S), over slots per worker) against its ready workers", 8),
        ("TTFT by model (p95)", [(pct(0.95, "api_time_to_first_token_seconds", GWM, "le, model"),
                                  "{{model}}")], "s", "Time to first token per model", 8),
        ("Drain rate by model", [(per_model("api_model_drain_rate"), "{{model}}")], "ops",
         "Jobs of each model ending per second, over all workers", 8),
        ("Rejections by model", [(
            f"sum by (model, reason) (rate(api_rejections_total{{{GWM}}}[{RI}]))",
            "{{model}} {{reason}}")], "reqps",
         "Refusals per model (model \"\": refused before a model was known)", 8),
    ]),
    ("Bottlenecks: queue vs saturation vs latency", 8, [
        ("Queue depth", [(QUEUED, "waiting jobs"),
                         (f"sum by (band) (max by (band, model) (api_queue_depth_band{{{GWM}}}))",
                          "band {{band}}")],
         "short", "Jobs waiting for a slot, in all and per priority band (selected models)", 8),
        ("Saturation", [(SATURATION, "saturation")], "percentunit", "Σ active / Σ MAX_ACTIVE", 8),
        ("Queue wait vs engine TTFT (p95)", [
            (pct(0.95, "api_queue_wait_seconds", GWM), "queue wait p95"),
            (pct(0.95, "worker_engine_ttft_seconds"), "engine TTFT p95"),
            (pct(0.95, "worker_pickup_latency_seconds"), "enqueue→start p95")], "s",
         "Where time to first token goes: waiting for a slot or the engine", 8),
    ]),
    ("Tokens and rejections", 8, [
        ("Tokens/s", [(rate("api_completion_tokens_total"), "completion tokens/s"),
                      (rate("api_prompt_tokens_total"), "prompt tokens/s"),
                      (rate("worker_generated_tokens_total"), "generated (workers)")],
         "short", "Token throughput", 8),
        ("Decode rate per request (p50)", [(pct(0.5, "worker_decode_tokens_per_second"),
                                            "p50 tokens/s")], "short",
         "Completion tokens per second of each stream after its first token", 8),
        ("Rejections by reason", [(rate("api_rejections_total", "reason"), "{{reason}}")],
         "reqps", "429/503/504 and cancellations, by reason", 8),
    ]),
    ("Service levels", 8, [
        ("Objective attainment by band", [(
            f'sum by (band) (rate(api_ttft_objective_total{{{GW},result="met"}}[{RI}])) / '
            f"clamp_min(sum by (band) (rate(api_ttft_objective_total{{{GW}}}[{RI}])), 1e-9)",
            "{{band}}")], "percentunit",
         "Requests with a time-to-first-token objective that met it (missed, refused as "
         "unattainable and dropped at their deadline count against it), per band", 8),
        ("Deadline refusals", [(
            f"sum by (band, reason) (rate(api_deadline_refusals_total{{{GW}}}[{RI}]))",
            "{{band}} {{reason}}"),
            (f"sum(rate(worker_jobs_dropped_late_total{{{GW}}}[{RI}]))",
             "dropped by workers")], "reqps",
         "unattainable: refused at admission (predicted first token past the objective); "
         "expired: dropped when its deadline passed in the queue (never run)", 8),
        ("Slots and time per token (MAX_ACTIVE=auto)", [
            (f"sum by (instance) (worker_max_active{{{GW}}})", "slots {{instance}}"),
            (f"max by (instance) (worker_engine_tpot_seconds{{{GW}}}) * 1000",
             "TPOT ms {{instance}}"),
        ], "short", "Each worker's live slot limit and its engine's mean time per output token "
           "(ms) in the last window; the limit backs off on preemption or a TPOT over "
           "TPOT_OBJECTIVE_MS", 8),
    ]),
    ("Migrations and fallbacks", 8, [
        ("Jobs migrated by reason", [(
            f"sum by (reason) (rate(worker_jobs_migrated_total{{{GW}}}[{RI}]))", "{{reason}}")],
         "ops", "Started jobs that went on on another worker (counted by the worker that took "
         "each over): its worker was lost, its engine failed or stalled, or it drained past "
         "DRAIN_TIMEOUT_S", 8),
        ("Cost of migrations", [
            (f"sum by (kind) (rate(worker_migration_tokens_total{{{GW}}}[{RI}]))",
             "tokens {{kind}}/s"),
            (f"sum(rate(worker_job_migrations_sum{{{GW}}}[{RI}])) / "
             f"clamp_min(sum(rate(worker_job_migrations_count{{{GW}}}[{RI}])), 1e-9)",
             "migrations per ended job"),
        ], "short", "Tokens the engines process again (reprefilled: a continued answer's prompt "
           "and text so far; regenerated: a job run again from its start), and migrations "
           "per job", 8),
        ("Model fallbacks", [(
            f"sum by (requested, served, reason) (rate(api_model_fallbacks_total{{{GW}}}[{RI}]))",
            "{{requested}} -> {{served}} ({{reason}})")], "reqps",
         "Requests sent to a MODEL_FALLBACKS model: unavailable (no ready engine) or busy "
         "(its queue refused them for their wait)", 8),
    ]),
    ("Tenants", 8, [
        ("Top keys by tokens/s", [(
            f"topk(10, sum by (key) (rate(api_tenant_tokens_total{{{GW}}}[{RI}])))", "{{key}}")],
         "short", "Prompt + completion tokens per second, by API key name", 8),
        ("Rejections by key", [(
            f"sum by (key, reason) (rate(api_tenant_rejections_total{{{GW}}}[{RI}]))",
            "{{key}} {{reason}}")],
         "reqps", "Refusals per API key and reason (limits, queue, timeouts)", 8),
        ("Queue wait by band (p95)", [(
            "histogram_quantile(0.95, sum by (le, band) "
            f"(rate(api_band_queue_wait_seconds_bucket{{{GW}}}[{RI}])))", "{{band}}")],
         "s", "Admission to pickup per priority band", 8),
    ]),
    ("Workers", 8, [
        ("Jobs by outcome", [(rate("worker_jobs_total", "outcome"), "{{outcome}}")], "ops",
         "Finished jobs per second by outcome", 8),
        ("Active jobs per worker", [(f"sum by (instance) (worker_active_jobs{{{GW}}})",
                                     "{{instance}}")], "short", "Jobs running on each worker", 8),
        ("Engine and Redis up", [
            (f"min by (instance) (worker_engine_up{{{GW}}})", "engine {{instance}}"),
            (f"min(api_redis_up{{{GW}}})", "gateways reach Redis"),
            (f"min(worker_redis_up{{{GW}}})", "workers reach Redis"),
        ], "bool", "1 when the worker's engine answers /v1/models; 1 when every gateway and "
           "worker reached Redis on its last try", 8),
    ]),
    ("Cache affinity", 8, [
        ("Picks by affinity", [(rate("worker_affinity_picks_total", "result"), "{{result}}")],
         "ops", "Jobs picked per second: hit (taken where its prompt prefix is held deepest), "
         "miss (a live worker held more of it), cold (no worker held any)", 8),
        ("Prefix cache hit rate", [
            (f'sum(rate(worker_affinity_picks_total{{{GW},result="hit"}}[{RI}])) / clamp_min('
             f'sum(rate(worker_affinity_picks_total{{{GW},result=~"hit|miss"}}[{RI}])), 1e-9)',
             "picks on the warmest worker"),
            (f"sum(rate(vllm:prefix_cache_hits_total[{RI}])) / "
             f"clamp_min(sum(rate(vllm:prefix_cache_queries_total[{RI}])), 1e-9)",
             "engine tokens found cached")], "percentunit",
         "Share of warm picks that went to the warmest worker, and of prompt tokens the "
         "engines found in their prefix cache (vLLM's own count)", 8),
        ("Wait for a warm worker", pcts("worker_affinity_wait_seconds"), "s",
         "Jobs left for (or passed over for) a warmer worker: from the first time a pick "
         "left one to its pickup (at most AFFINITY_MAX_WAIT_MS while a slot is free)", 8),
    ]),
    ("Endpoints and embeddings", 8, [
        ("Requests by endpoint", [(
            f"sum by (route) (rate(api_requests_total{{{API}}}[{RI}]))", "{{route}}")],
         "reqps", "API requests per second by route: chat, Responses, completions, "
         "embeddings, ...", 8),
        ("Embedding jobs per engine request", [(
            f"sum(rate(worker_embedding_request_jobs_sum{{{GW}}}[{RI}])) / "
            f"clamp_min(sum(rate(worker_embedding_request_jobs_count{{{GW}}}[{RI}])), 1e-9)",
            "jobs per request")], "short",
         "Embedding jobs the workers merged into each engine request (1: no merging; rises "
         "with load)", 8),
        ("Embedding engine requests", [(
            f"sum(rate(worker_embedding_request_jobs_count{{{GW}}}[{RI}]))", "requests/s"),
            (f"sum(rate(worker_embedding_request_jobs_sum{{{GW}}}[{RI}]))", "jobs/s")],
         "ops", "Embeddings requests sent to engines, and the jobs they carried", 8),
    ]),
    ("Batches", 8, [
        ("Batches in flight", [(f"max by (status) (api_batches{{{GW}}})", "{{status}}")],
         "short", "Batches being fed, cancelled or finalized (read from Redis)", 8),
        ("Batch requests", [(f"sum by (result) (rate(worker_batch_requests_total{{{GW}}}[{RI}]))",
                             "{{result}}")], "reqps",
         "Batch requests finished per second, completed or failed (each one line of a result "
         "file)", 8),
        ("Batch tokens", [(f"sum(rate(worker_batch_tokens_total{{{GW}}}[{RI}]))", "tokens/s")],
         "short", "Prompt + completion tokens of batch requests per second: the GPU time "
         "batches fill", 8),
    ]),
    ("vLLM internals", 8, [
        ("Running / waiting", [("sum(vllm:num_requests_running)", "running"),
                               ("sum(vllm:num_requests_waiting)", "waiting")], "short",
         "Requests inside vLLM's scheduler", 8),
        ("KV-cache usage", [("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}")],
         "percentunit", "Share of KV-cache blocks in use", 8),
        ("vLLM TTFT", [("histogram_quantile(0.95, sum by (le) "
                        f"(rate(vllm:time_to_first_token_seconds_bucket[{RI}])))", "p95")], "s",
         "Time to first token inside vLLM", 8),
    ]),
    ("GPU (DCGM)", 7, [
        (title, [(f"{agg} by (gpu, Hostname) ({metric})", "GPU {{gpu}} {{Hostname}}")], unit,
         f"{title} from the DCGM exporter", 8)
        for title, agg, metric, unit in (
            ("GPU utilisation", "avg", "DCGM_FI_DEV_GPU_UTIL", "percent"),
            ("GPU memory used", "sum", "DCGM_FI_DEV_FB_USED", "decmbytes"),
            ("GPU memory free", "sum", "DCGM_FI_DEV_FB_FREE", "decmbytes"),
            ("GPU temperature", "max", "DCGM_FI_DEV_GPU_TEMP", "celsius"),
            ("GPU power", "sum", "DCGM_FI_DEV_POWER_USAGE", "watt"))
    ]),
]  # fmt: skip


class Layout:
    """Hands out panel ids and grid positions row by row (24 columns)."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = self.row_h = 0

    def row(self, title: str) -> None:
        self.y += self.row_h
        self._place({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self.x, self.y, self.row_h = 0, self.y + 1, 0

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["datasource"] = DS
        self._place(panel, w, h)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _place(self, panel: dict[str, Any], w: int, h: int) -> None:
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {
            "x": self.x if panel["type"] != "row" else 0,
            "y": self.y,
            "w": w,
            "h": h,
        }
        self.panels.append(panel)


# Histograms whose observations carry a trace id (OpenMetrics exemplars, README "Tracing"):
# their quantile panels show the exemplars, each naming the trace of a request in that bucket.
EXEMPLARS = ("api_time_to_first_token_seconds", "api_request_latency_seconds",
             "api_queue_wait_seconds", "worker_engine_ttft_seconds",
             "worker_pickup_latency_seconds")  # fmt: skip


def target(expr: str, legend: str) -> dict[str, Any]:
    out = {"expr": expr, "legendFormat": legend, "datasource": DS}
    if "histogram_quantile" in expr and any(f"{m}_bucket" in expr for m in EXEMPLARS):
        out["exemplar"] = True
    return out


def stat(
    title: str, expr: str, unit: str, thresholds: tuple[float, float] | None, desc: str
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if thresholds:
        steps += [
            {"color": "orange", "value": thresholds[0]},
            {"color": "red", "value": thresholds[1]},
        ]
    return {"type": "stat", "title": title, "description": desc,
            "targets": [target(expr, title)],
            "fieldConfig": {"defaults": {"unit": unit,
                                         "thresholds": {"mode": "absolute", "steps": steps}},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto"}}  # fmt: skip


def timeseries(title: str, targets: list[tuple[str, str]], unit: str, desc: str) -> dict[str, Any]:
    return {"type": "timeseries", "title": title, "description": desc,
            "targets": [target(e, legend) for e, legend in targets],
            "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 10}},
                            "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}}}  # fmt: skip


def dashboard() -> dict[str, Any]:
    lay = Layout()
    lay.row("Health at a glance")
    for title, expr, unit, thresholds, desc, w in GLANCE:
        lay.add(stat(title, expr, unit, thresholds, desc), w, 4)
    for section, height, panels in SECTIONS:
        lay.row(section)
        for title, targets, unit, desc, w in panels:
            lay.add(timeseries(title, targets, unit, desc), w, height)
    instances = 'label_values(up{job=~"gateway|worker"}, instance)'
    models = "label_values(api_capacity_slots, model)"
    return {
        "uid": "llmq-operator", "title": "LLM service — operator", "tags": ["llmq"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "", "graphTooltip": 1,
        "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
            {"name": "instance", "label": "Instance", "type": "query", "datasource": DS,
             "query": {"query": instances, "refId": "instance"}, "definition": instances,
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"selected": True, "text": "All", "value": "$__all"}, "hide": 0},
            {"name": "model", "label": "Model", "type": "query", "datasource": DS,
             "query": {"query": models, "refId": "model"}, "definition": models,
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"selected": True, "text": "All", "value": "$__all"}, "hide": 0},
        ]},
        "panels": lay.panels,
    }  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(dashboard(), indent=2, ensure_ascii=False))

"""dashscope-proxy: a drop-in gateway for Alibaba Cloud DashScope image generation.

How a request flows (one straight line, one module per step):

    __main__  -> server (loop, socket, signals) -> app (routes, the request pipeline)
    pipeline:   request id, in-flight gauge, error rendering (errors), metrics, access log
    handler (native | openai | aliyun):
        auth        bearer key -> configured key (constant time), model allowlist
        inbound     bounded body read, JSON, model (input_limits: prompt and header caps)
        admission   per-key rate, concurrency and image quotas (limits), or 429
        upstream    the model's candidate upstreams, swap the key, filter headers
        failover    try candidates by priority/weight; breakers, caps, safe retries
        relay       stream the answer back unchanged while sniffing usage
        metering    usage.image_count -> Meter (metric + listeners); once per task
        keeping     with `storage:`, after metering: each image fetched into the store
                    (storage.keeper) and its URL replaced by a signed gateway link
        tasks       who created which task, where (TaskStore)
        state       where tasks and limit counters live: SQLite (local) or Redis
    GET /images/{name} (fronts.images): the stored copies, by signed link, no bearer key

Pure logic (config parsing, header filtering, usage extraction, error bodies) is
plain functions over plain values; handlers only wire them to sockets. The
DashScope simulator in `proxy.simulator` is a separate app that shares nothing
private with the gateway.
"""

__version__ = "0.1.0"

"""Running the gateway: server, workers, reload, access log, usage ledger, demo."""

"""Running pipelines: `app` runs one (`run_pipeline`), `send` publishes one event (`send_event`).

Nothing is imported here, so `edarun validate` does not pay for the runtime's imports.
"""

"""The loramix server: continuous batching of per-request adapter mixtures behind HTTP APIs."""

"""The simulation benchmark: episodes through the real controller, metrics, report, parallel runner."""

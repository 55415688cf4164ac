"""The associates' web console: a `console` client of the assist broker plus a web server (console/app.py)."""

"""Browser tests: headless Chromium against the real server."""

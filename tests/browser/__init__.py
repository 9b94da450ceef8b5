"""Tests that drive a real headless Chromium (Debian's chromium + chromium-driver) with Selenium."""

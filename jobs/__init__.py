"""Scheduled entry points (the nightly scoring run)."""

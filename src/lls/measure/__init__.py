"""Measurement: multiply-add counts, memory, step timing, diagnostics, reports and plots."""

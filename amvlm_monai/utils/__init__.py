"""Utilities every layer may use: errors for people, command-line values, distributed helpers, precision, progress."""

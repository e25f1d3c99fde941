"""`alignkit reward` commands (registered on the app in alignkit.cli.main)."""

from __future__ import annotations

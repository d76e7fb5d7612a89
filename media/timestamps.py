"""A video frame's ``mm:ss`` stamp, as Gemma 4's processors print it before the frame's soft tokens."""

from __future__ import annotations


def format_timestamp(seconds: float) -> str:
    """``mm:ss`` exactly as Gemma 4's processors print frame stamps (truncated, not rounded)."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"

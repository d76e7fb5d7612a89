"""`--desktop`: the app in a native window through pywebview, where it is installed; else the browser.

pywebview is optional (it needs a GUI toolkit: GTK or Qt on Linux), so it is not in requirements.txt.
"""

from __future__ import annotations

import logging
import webbrowser

log = logging.getLogger(__name__)


def open_window(url: str, title: str) -> bool:
    """Show `url` in a native window and return once it is closed; False (having opened a browser tab
    instead, without waiting) where pywebview is missing or cannot start a window."""
    try:
        import webview  # pywebview
    except ImportError:
        log.info("--desktop: pywebview is not installed (pip install pywebview); opening the browser instead")
        webbrowser.open(url)
        return False
    try:
        webview.create_window(title, url, width=1280, height=860)
        webview.start()  # blocks until the window closes
    except Exception as e:  # no display, no GUI toolkit
        log.warning("--desktop: no native window (%s); opening the browser instead", e)
        webbrowser.open(url)
        return False
    return True

"""The browser suite: the real app in Chromium (see browsertools.py)."""

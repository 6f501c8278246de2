"""The web dashboard: a FastAPI app over the server's read-only state (never imports torch)."""

from fedrot_server.dashboard.app import create_app

__all__ = ["create_app"]

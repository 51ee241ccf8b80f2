"""dropserver: the composition package.

It holds what every domain package shares (settings, auth, HTTP errors, logging,
metrics, database and Redis connections), the launcher for local backing services,
the CLI, and :func:`dropserver.app.create_app`, which builds the Starlette app from
the routes of ``realtime``, ``drops``, ``checkout`` and ``streaming``.
"""

__version__ = "0.1.0"

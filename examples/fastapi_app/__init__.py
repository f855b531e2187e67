"""A FastAPI app (sync Session) that enqueues a receipt email in the order's transaction.

``models`` holds the app's table, engine and ``init_db()``; ``tasks`` the
``Scheduler`` and its handler (``pgotask worker examples.fastapi_app.tasks:scheduler``);
``app`` the FastAPI application and its Session dependency.
"""

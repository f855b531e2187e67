"""Runnable example applications using sqla_pgotask (see docs/examples.md).

``flask_app`` and ``fastapi_app`` each enqueue a task in the same transaction
as the request's own row, and run it with ``pgotask worker``.
"""

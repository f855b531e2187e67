"""A Flask app that enqueues a welcome email in the signup request's transaction.

``models`` holds the app's table, engine and ``init_db()``; ``tasks`` the
``Scheduler`` and its handler (``pgotask worker examples.flask_app.tasks:scheduler``);
``app`` the Flask application and its request-scoped Session.
"""

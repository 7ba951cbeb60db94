"""The server side of the ``dare`` command: ``serve``, ``api``, ``worker``, ``reconcile``, ``db``,
``keys`` and the demo. Sits on top of every other package; nothing imports it."""

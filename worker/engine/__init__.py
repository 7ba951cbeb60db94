"""The hardening engine: pure PyTorch, no web, queue or database imports.

Stages (see ``worker.engine.stages``): validate -> slice -> mine -> tune
[-> compare] -> export -> evaluate. Each stage reads its inputs from a job directory and writes its outputs there, so
the same code runs from the command line, the Celery worker and the benchmark.
"""

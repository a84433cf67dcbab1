"""Helpers shared by the tests: imported as `from tests.support import shared_data`.

Nothing here imports jax at import time: the worker scripts (`python -m
tests.support.multiprocess_worker`) set their device flags after importing this package.
"""
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

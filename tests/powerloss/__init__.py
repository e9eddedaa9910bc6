"""Power loss for tests: a FUSE filesystem that forgets what was not synced.

- :mod:`.lazyfs`: the filesystem (run as its own process);
- :mod:`.mount`: :class:`~.mount.LazyMount` mounts it and cuts its power;
  :func:`~.mount.require_fuse` skips (or, under ``CI=true``, fails) a test where
  FUSE cannot be mounted.

``tests/test_lazyfs.py`` tests the filesystem, ``tests/test_powerloss.py`` the
stores and clusters on it.  See ``docs/power-loss.md``.
"""

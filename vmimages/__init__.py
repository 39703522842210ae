"""Build and cache everything a throwaway QEMU test guest needs, per kernel of the matrix.

Public API (used by the harness)::

    from vmimages import ensure_guest_image, ensure_module, cache_dir, GuestImage
"""

from __future__ import annotations

from .cache import cache_dir
from .chroot import ModuleBuildError, ensure_module
from .guest import GuestImage, ensure_guest_image
from .matrix import DEFAULT_TARGET, Target, targets

__all__ = [
    "DEFAULT_TARGET",
    "GuestImage",
    "ModuleBuildError",
    "Target",
    "cache_dir",
    "ensure_guest_image",
    "ensure_module",
    "targets",
]

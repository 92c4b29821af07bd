"""Teacher backends that write latent thoughts (oracle, OpenAI Batch API, OpenAI-compatible chat).

Importing this package is cheap: it exposes the interface from :mod:`.base` only; backends are
imported when built (see :func:`build_teacher`).
"""

from apps.bolt.teachers.base import (
    WHOLE_DOC,
    LatentRequest,
    LatentResponse,
    Teacher,
    available_teachers,
    build_teacher,
    register_teacher,
)

__all__ = [
    "WHOLE_DOC",
    "LatentRequest",
    "LatentResponse",
    "Teacher",
    "available_teachers",
    "build_teacher",
    "register_teacher",
]

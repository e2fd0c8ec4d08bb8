"""Routes per domain; each module's `router(backend)` builds its APIRouter.

Built per app rather than at import: the key checks and the `k` bound depend on the
settings of the Backend they serve.
"""

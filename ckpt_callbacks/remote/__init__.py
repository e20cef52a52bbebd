"""Object stores behind one small interface, and the uploader pool."""

__all__: list[str] = []

"""Object stores behind one small interface, and the uploader pool."""

from ckpt_callbacks.remote.base import ObjectInfo, RemoteStore
from ckpt_callbacks.remote.factory import open_store

__all__ = ["ObjectInfo", "RemoteStore", "open_store"]

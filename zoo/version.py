"""The installed distribution's version (``mnemax.__version__``)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mnemax")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

"""mirrord: an offline-first local mirror of Sentera FieldAgent image surveys."""

__version__ = "0.1.0"

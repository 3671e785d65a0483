"""granet: GraNet sparse training (engine + trainer) and Ray Tune studies of it."""

__version__ = "0.1.0"


def _quiet_secrets() -> None:
    # granet's warnings name URIs (storage, tracking): never print a password in one
    import logging

    from granet.errors import RedactFilter

    logging.getLogger("granet").addFilter(RedactFilter())


_quiet_secrets()

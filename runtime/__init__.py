"""sdrt.runtime: what applications embed. NumPy plus engines; never torch."""


def sdrt_version() -> str:
    """sdrt's installed version ("unknown" in a tree that was never installed), as recorded in pictures' parameters."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdrt")
    except PackageNotFoundError:
        return "unknown"
